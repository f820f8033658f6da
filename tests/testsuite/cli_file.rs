//! End-to-end runs of the built binary on the file keystore, in scratch `--root`s with
//! a fake `sys/class/net`, the fixture manifests, and fake `kanto-cm`/`systemctl`
//! first on PATH (DESIGN §1, §3, §4, §5, §6). Every check against a certificate is made
//! with `openssl`, never with the tool's own code.
//!
//! Tests where the algorithm does not matter use `ecdsa-p256` (RSA key generation is
//! slow in a debug build); the default (`rsa-2048`) and every `--algorithm` have their
//! own tests.
use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::fake_root::*;
use common::{mtls_handshake, openssl_sha1, openssl_sha256, openssl_verify};
use serde_json::Value;

const STOP: &str = "kanto-cm stop -n cloudconnector -f --timeout 5";
const REMOVE: &str = "kanto-cm remove -n cloudconnector";
const START: &str = "kanto-cm start -n cloudconnector";
const REDEPLOY: &str = "systemctl restart kanto-auto-deployer";

/// The env keys DESIGN §3 gives the tool; everything else belongs to someone else.
const OWNED_ENV: &[&str] = &[
    "ID_SCOPE",
    "CONNECTION_STRING",
    "CERT_FILE",
    "CERT_PATH",
    "KEY_URI",
    "KEY_FILE",
    "KEY_PATH",
    "TPM_DEVICE",
    "TPM_HANDLE",
    "TPM_KEY",
    "TPM_KEY_PUB",
    "TPM2OPENSSL_TCTI",
    "PKCS11_MODULE_PATH",
];

fn recreate() -> Vec<String> {
    vec![STOP.into(), REMOVE.into(), REDEPLOY.into()]
}

/// The thumbprint lines of the human transcript must carry openssl's fingerprints.
fn assert_transcript_thumbprints(fr: &FakeRoot, run: &Run) {
    let p = openssl_sha1(&fr.cert_file("device.crt"));
    let s = openssl_sha1(&fr.cert_file("device2.crt"));
    assert!(
        run.stdout.contains(&format!("- Primary thumbprint: {p}")),
        "{run}"
    );
    assert!(
        run.stdout.contains(&format!("- Secondary thumbprint: {s}")),
        "{run}"
    );
}

/// The files every file-keystore identity has, with their modes.
fn assert_identity_files(fr: &FakeRoot) {
    for crt in ["device.crt", "device2.crt"] {
        let p = fr.cert_file(crt);
        let pem = fs::read_to_string(&p).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{crt} is not PEM"
        );
        assert_eq!(mode(&p) & 0o022, 0, "{crt} is writable by others");
        assert_eq!(openssl_subject(&p), format!("CN={ETH0_ID}"), "{crt} CN");
    }
    for key in ["device.key", "device2.key"] {
        let p = fr.cert_file(key);
        assert_eq!(mode(&p), 0o600, "{key} mode");
        let pem = fs::read_to_string(&p).unwrap();
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{key} is not PKCS#8 PEM"
        );
    }
    assert_eq!(fr.read("etc/deviceid").trim(), ETH0_ID);
}

/// Every regular file under the root, as (relative path, bytes).
fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    snapshot(root)
        .into_iter()
        .filter_map(|(p, n)| match n {
            Node::File { bytes, .. } => Some((p, bytes)),
            _ => None,
        })
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------------
// DPS and Hub flows
// ---------------------------------------------------------------------------------

/// The whole DPS flow with the default algorithm, from the Kanto-shape template.
#[test]
fn dps_flow_default_algorithm() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    let tmp = tempfile::tempdir().unwrap();
    let run = fr
        .cmd()
        .args(["--keystore", "file", "--id-scope", GOOD_SCOPE])
        .env("TMPDIR", tmp.path())
        .output()
        .map(Run::from)
        .unwrap()
        .ok();
    assert_identity_files(&fr);
    assert!(
        openssl_cert_text(&fr.cert_file("device.crt")).contains("Public-Key: (2048 bit)"),
        "the default algorithm is rsa-2048"
    );
    assert_eq!(
        fr.read("data/var/certificates/azure.idscope").trim(),
        GOOD_SCOPE
    );
    assert!(!fr.cert_file("azure.connectionstring").exists());
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(env_values(&m, "ID_SCOPE"), [GOOD_SCOPE]);
    assert!(env_values(&m, "CONNECTION_STRING").is_empty());
    assert_eq!(
        env_values(&m, "KEY_URI"),
        ["file:/var/certificates/device.key"]
    );
    assert_eq!(run.stdout.matches("Device ID: ").count(), 1, "{run}");
    assert!(
        run.stdout.contains(&format!("- Device ID: {ETH0_ID}")),
        "{run}"
    );
    assert!(
        run.stdout.contains("- Based on network device: eth0"),
        "{run}"
    );
    assert_transcript_thumbprints(&fr, &run);
    assert!(
        run.stderr.contains("warning:") && run.stderr.contains("plain files (--keystore file)"),
        "{run}"
    );
    // A new manifest: the container is recreated, exactly as DESIGN §1.6 says.
    assert_eq!(fr.calls(), recreate());
    // Paths written into files are device paths: the scratch prefix appears nowhere.
    let prefix = fr.root().to_string_lossy().into_owned();
    for (p, bytes) in files_under(&fr.root()) {
        assert!(
            !contains(&bytes, &prefix),
            "{} holds a --root-prefixed path",
            p.display()
        );
    }
    // Keys are never written to a temp dir (the original left copies in /tmp).
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "something was left in TMPDIR"
    );
}

/// With `--root`, the host's own `/etc` and `/data` are never touched.
/// `--keystore auto` on a machine without a TPM or token falls back to files, and
/// says why (DESIGN §2).
#[test]
fn auto_falls_back_to_files_with_a_warning() {
    require_tools!(Openssl);
    require_tools!(where common::tools::no_host_tpm());
    let fr = FakeRoot::with_template();
    let run = fr
        .run(&[
            "--id-scope",
            GOOD_SCOPE,
            "--algorithm",
            "ecdsa-p256",
            "--json",
        ])
        .ok();
    assert_eq!(run.json()["keystore"], "file", "{run}");
    let warnings: Vec<_> = run.stderr_lines_with("plain files");
    assert_eq!(warnings.len(), 1, "{run}");
    assert!(
        warnings[0].contains("no TPM or PKCS#11 token found"),
        "{run}"
    );
}

/// `SDV_PROVISION_ROOT` stands for `--root`; an ID scope of an unusual form is used
/// with one warning (DESIGN §1.2 only rejects unsafe characters).
#[test]
fn root_from_the_environment_and_an_unusual_id_scope() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    let run = Run::from(
        fr.cmd_without_root()
            .env("SDV_PROVISION_ROOT", fr.root())
            .args(["--keystore", "file", "--algorithm", "ecdsa-p256"])
            .args(["--no-restart", "--id-scope", "MyScope42"])
            .output()
            .unwrap(),
    )
    .ok();
    assert_eq!(
        fr.read("data/var/certificates/azure.idscope").trim(),
        "MyScope42"
    );
    assert!(fr.cert_file("device.crt").is_file());
    let warnings: Vec<_> = run.stderr_lines_with("does not look like an Azure DPS scope");
    assert_eq!(warnings.len(), 1, "{run}");
}

/// `notBefore` is back-dated one hour for device clocks that are a little behind
/// (DESIGN §1.4), as openssl reads it.
#[test]
fn certificates_are_valid_from_an_hour_ago() {
    let Some(fr) = provisioned(FakeRoot::with_template) else {
        return;
    };
    let out = common::run_ok(
        std::process::Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-startdate",
                "-dateopt",
                "iso_8601",
                "-in",
            ])
            .arg(fr.cert_file("device.crt")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.trim().trim_start_matches("notBefore=");
    let format = time::format_description::parse_borrowed::<2>(
        "[year]-[month]-[day] [hour]:[minute]:[second]Z",
    )
    .unwrap();
    let start = time::PrimitiveDateTime::parse(start, &format)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .assume_utc();
    let back = (time::OffsetDateTime::now_utc() - start).whole_minutes();
    assert!(
        (59..=61).contains(&back),
        "notBefore {start} is {back} min back"
    );
}

/// An `/etc` the tool cannot write (a read-only root filesystem): the device id is
/// not stored, one warning says so, and the identity is made anyway (DESIGN §1.1).
/// Root ignores modes, so `/etc` is made immutable (`chattr +i`).
#[test]
fn unwritable_etc_deviceid_is_a_warning() {
    require_tools!(Openssl, Chattr);
    let fr = FakeRoot::with_template();
    let etc = fr.root().join("etc");
    fs::create_dir_all(&etc).unwrap();
    let Some(_mutable) = common::tools::immutable(&etc) else {
        return;
    };
    let run = fr.provision_dps("ecdsa-p256", &[]);
    assert!(!etc.join("deviceid").exists());
    let warnings: Vec<_> = run.stderr_lines_with("could not store the device id");
    assert_eq!(warnings.len(), 1, "{run}");
    assert!(fr.cert_file("device.crt").is_file());
    fr.run(&["verify"]).ok();
}

#[test]
fn host_paths_untouched_with_root() {
    require_tools!(Openssl);
    let watch = [
        "/etc/deviceid",
        "/data",
        "/data/var/certificates",
        "/data/var/certificates/device.key",
        "/data/var/containers/manifests/cloudconnector.json",
    ];
    let state = || {
        watch
            .iter()
            .map(|p| {
                fs::symlink_metadata(p)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()))
            })
            .collect::<Vec<_>>()
    };
    let before = state();
    let fr = FakeRoot::with_template();
    fr.provision_dps("ecdsa-p256", &[]);
    fr.run(&["status"]).ok();
    fr.run(&["--keystore", "file", "--force"]).ok();
    assert_eq!(before, state(), "a host path changed");
}

fn assert_hub_outcome(fr: &FakeRoot, run: &Run) {
    let cs = hub_cs(ETH0_ID);
    assert_identity_files(fr);
    let csf = fr.cert_file("azure.connectionstring");
    assert_eq!(fs::read_to_string(&csf).unwrap().trim(), cs);
    assert_eq!(mode(&csf), 0o600, "azure.connectionstring mode");
    assert!(!fr.cert_file("azure.idscope").exists());
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(env_values(&m, "CONNECTION_STRING"), [cs.as_str()]);
    assert!(env_values(&m, "ID_SCOPE").is_empty());
    // The manifest now carries the SharedAccessKey: it must not be world-readable.
    assert_eq!(
        mode(&fr.p(MANIFEST)) & 0o077,
        0,
        "manifest with a secret is readable by others"
    );
    assert!(
        !run.all().contains(SECRET_KEY),
        "the SharedAccessKey was printed:\n{run}"
    );
    assert!(
        !fr.calls().iter().any(|c| c.contains(SECRET_KEY)),
        "secret in a child's argv"
    );
    // The secret is only where it has to be.
    for (p, bytes) in files_under(&fr.root()) {
        let allowed = p.ends_with("azure.connectionstring") || p.ends_with("cloudconnector.json");
        assert!(
            allowed || !contains(&bytes, SECRET_KEY),
            "the SharedAccessKey is in {}",
            p.display()
        );
    }
    assert_eq!(fr.calls(), recreate());
    let status = fr.run(&["status", "--json"]).ok();
    assert!(!status.all().contains(SECRET_KEY));
    let doc = status.json();
    check_schema(fr, &doc, "ecdsa-p256", "hub");
    assert_eq!(
        doc["cloud"],
        serde_json::json!({"kind": "hub", "host_name": "hub.azure-devices.net", "device_id": ETH0_ID})
    );
}

/// A file-keystore run with ECDSA keys (quick to make).
const FILE_ECDSA: [&str; 4] = ["--keystore", "file", "--algorithm", "ecdsa-p256"];

#[test]
fn hub_flow_connection_string_flag() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_manifest();
    let cs = hub_cs(ETH0_ID);
    let run = fr
        .run(&[&FILE_ECDSA[..], &["--connection-string", &cs]].concat())
        .ok();
    assert_hub_outcome(&fr, &run);
    // The ready-to-paste registration line carries openssl's thumbprints.
    let p = openssl_sha1(&fr.cert_file("device.crt"));
    let s = openssl_sha1(&fr.cert_file("device2.crt"));
    assert!(
        run.stdout.contains(&format!(
            "az iot hub device-identity create --hub-name hub --device-id {ETH0_ID} --am x509_thumbprint --ptp {p} --stp {s}"
        )),
        "{run}"
    );
}

/// The Hub flow with the connection string from the environment, with and without
/// the `provision` word.
fn hub_flow_connection_string_env(args: &[&str]) {
    require_tools!(Openssl);
    let fr = FakeRoot::with_manifest();
    let out = fr
        .cmd()
        .args(args)
        .env("SDV_PROVISION_CONNECTION_STRING", hub_cs(ETH0_ID))
        .output()
        .unwrap();
    let run = Run::from(out).ok();
    assert_hub_outcome(&fr, &run);
}

tests_of!(hub_flow_connection_string_env:
    hub_flow_connection_string_env_plain => (&FILE_ECDSA),
    hub_flow_connection_string_env_with_provision_subcommand =>
        (&["--keystore", "file", "provision", "--algorithm", "ecdsa-p256"]),
);

#[test]
fn hub_flow_connection_string_file() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_manifest();
    let csf = fr.dir.path().join("cs.txt");
    fs::write(&csf, format!("{}\n", hub_cs(ETH0_ID))).unwrap();
    let csf = ["--connection-string-file", csf.to_str().unwrap()];
    let run = fr.run(&[&FILE_ECDSA[..], &csf].concat()).ok();
    assert_hub_outcome(&fr, &run);
}

/// An exported SDV_PROVISION_CONNECTION_STRING is the lowest-priority source: any
/// cloud flag wins over it, and it never collides with one (clap used to count it as
/// a given --connection-string).
#[test]
fn connection_string_env_yields_to_every_cloud_flag() {
    require_tools!(Openssl);
    let env_cs = hub_cs(ETH0_ID);
    let with_env = |fr: &FakeRoot, args: &[&str]| {
        Run::from(
            fr.cmd()
                .args(["--keystore", "file", "--algorithm", "ecdsa-p256"])
                .args(args)
                .env("SDV_PROVISION_CONNECTION_STRING", &env_cs)
                .output()
                .unwrap(),
        )
    };
    // --id-scope: DPS, the environment's Hub string unused.
    let fr = FakeRoot::with_manifest();
    with_env(&fr, &["--id-scope", GOOD_SCOPE]).ok();
    assert_eq!(
        env_values(&read_json(&fr.p(MANIFEST)), "ID_SCOPE"),
        [GOOD_SCOPE]
    );
    assert!(!fr.cert_file("azure.connectionstring").exists());
    // --connection-string-file and `provision --connection-string`: theirs, not the
    // environment's.
    let other = env_cs.replace("HostName=hub.", "HostName=other-hub.");
    let csf = fr.dir.path().join("cs.txt");
    fs::write(&csf, &other).unwrap();
    for args in [
        vec!["--connection-string-file", csf.to_str().unwrap()],
        vec!["provision", "--connection-string", other.as_str()],
    ] {
        let fr = FakeRoot::with_manifest();
        with_env(&fr, &args).ok();
        assert_eq!(
            fs::read_to_string(fr.cert_file("azure.connectionstring"))
                .unwrap()
                .trim(),
            other,
            "{args:?}"
        );
    }
    // A cloud flag with another subcommand is a usage error, not silently ignored.
    let fr = FakeRoot::with_manifest();
    assert_rejected(
        &fr,
        &["--connection-string", &other, "status"],
        2,
        &["provision"],
    );
    // Two cloud flags, one on each side of `provision` (clap sees one side at a time).
    let csf = csf.to_str().unwrap();
    for args in [
        [
            "--id-scope",
            GOOD_SCOPE,
            "provision",
            "--connection-string-file",
            csf,
        ],
        [
            "--connection-string",
            &other,
            "provision",
            "--connection-string-file",
            csf,
        ],
        [
            "--connection-string-file",
            csf,
            "provision",
            "--id-scope",
            GOOD_SCOPE,
        ],
    ] {
        assert_rejected(&fr, &args, 2, &["exclude each other"]);
    }
}

// ---------------------------------------------------------------------------------
// Re-running and restarting
// ---------------------------------------------------------------------------------

#[test]
fn rerun_changes_nothing_and_restarts_nothing() {
    let Some(fr) = provisioned(FakeRoot::with_template) else {
        return;
    };
    assert_eq!(fr.calls(), recreate());
    let before = fr.snapshot();
    fr.clear_calls();
    // Same flags again, then no cloud flag at all (the backend is read from disk).
    let again = fr.provision_dps("ecdsa-p256", &[]);
    assert_same_tree(&before, &fr.snapshot(), "re-run with the same flags");
    let bare = fr.run(&["--keystore", "file"]).ok();
    assert_same_tree(&before, &fr.snapshot(), "re-run without flags");
    let status = fr.run(&["status"]).ok();
    assert_same_tree(&before, &fr.snapshot(), "status");
    assert_eq!(
        fr.calls(),
        Vec::<String>::new(),
        "a re-run restarted the connector"
    );
    // It prints the existing configuration, like the original.
    for run in [&again, &bare, &status] {
        assert_transcript_thumbprints(&fr, run);
    }
    assert!(bare.stdout.contains("Id Scope file found"), "{bare}");
}

#[test]
fn changed_id_scope_recreates_connector_and_keeps_keys() {
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    let crt = fs::read(fr.cert_file("device.crt")).unwrap();
    let key = fs::read(fr.cert_file("device.key")).unwrap();
    fr.clear_calls();
    fr.run(&["--keystore", "file", "--id-scope", "0ne00ABCDEF"])
        .ok();
    assert_eq!(fr.calls(), recreate());
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(env_values(&m, "ID_SCOPE"), ["0ne00ABCDEF"]);
    assert_eq!(
        fr.read("data/var/certificates/azure.idscope").trim(),
        "0ne00ABCDEF"
    );
    assert_eq!(
        fs::read(fr.cert_file("device.crt")).unwrap(),
        crt,
        "the certificate changed"
    );
    assert_eq!(
        fs::read(fr.cert_file("device.key")).unwrap(),
        key,
        "the key changed"
    );
}

/// An edited manifest (e.g. by hand) is brought back, and that is a manifest change.
#[test]
fn drifted_manifest_is_repaired_and_connector_recreated() {
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    let good = fs::read(fr.p(MANIFEST)).unwrap();
    let mut m = read_json(&fr.p(MANIFEST));
    m["config"]["env"]
        .as_array_mut()
        .unwrap()
        .push(Value::String("ID_SCOPE=0ne0000DEAD".into()));
    fr.write(MANIFEST, serde_json::to_vec_pretty(&m).unwrap());
    assert_eq!(
        fr.run(&["status"]).code,
        Some(1),
        "status must see the drift"
    );
    fr.clear_calls();
    fr.run(&["--keystore", "file"]).ok();
    assert_eq!(
        fs::read(fr.p(MANIFEST)).unwrap(),
        good,
        "the manifest was not repaired"
    );
    assert_eq!(fr.calls(), recreate());
}

/// Only a certificate changed (it was lost; its key is still there), the manifest did
/// not: the certificate is re-issued from the same key, then stop and start, no
/// recreate.
#[test]
fn lost_certificate_is_reissued_with_stop_start() {
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    let manifest = fs::read(fr.p(MANIFEST)).unwrap();
    let primary = fs::read(fr.cert_file("device.crt")).unwrap();
    let key = fs::read(fr.cert_file("device2.key")).unwrap();
    let pubkey = common::openssl_cert_pubkey(&fr.cert_file("device2.crt"));
    fs::remove_file(fr.cert_file("device2.crt")).unwrap();
    let before = fr.snapshot();
    assert_eq!(fr.run(&["status"]).code, Some(1));
    assert_same_tree(&before, &fr.snapshot(), "status with a lost certificate");
    fr.clear_calls();
    fr.run(&["--keystore", "file"]).ok();
    let crt = fr.cert_file("device2.crt");
    openssl_verify(&crt);
    assert_eq!(
        common::openssl_cert_pubkey(&crt),
        pubkey,
        "not re-issued from the same key"
    );
    assert_eq!(fs::read(fr.cert_file("device2.key")).unwrap(), key);
    assert_eq!(fs::read(fr.cert_file("device.crt")).unwrap(), primary);
    assert_restarted_only(&fr, &manifest);
}

/// A lost key is a lost identity: one error naming `--force`, nothing touched; with
/// `--force` a new identity is built, and only then is the connector restarted.
#[test]
fn lost_key_needs_force() {
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    let manifest = fs::read(fr.p(MANIFEST)).unwrap();
    let old = [
        openssl_sha1(&fr.cert_file("device.crt")),
        openssl_sha1(&fr.cert_file("device2.crt")),
    ];
    fs::remove_file(fr.cert_file("device2.key")).unwrap();
    fr.clear_calls();
    assert_rejected(&fr, &["--keystore", "file"], 1, &["--force", "device2.key"]);
    fr.run(&["--keystore", "file", "--force"]).ok();
    assert_identity_files(&fr);
    for (crt, old) in ["device.crt", "device2.crt"].iter().zip(&old) {
        assert_ne!(
            &openssl_sha1(&fr.cert_file(crt)),
            old,
            "{crt} was not rebuilt"
        );
    }
    // Same file names, so the manifest is unchanged: stop and start.
    assert_restarted_only(&fr, &manifest);
}

/// The original's documented reconfiguration (seed doc, "Reconfiguration"): delete
/// `azure.idscope`, `azure.connectionstring`, `device*.crt`, `device*.key`, re-run.
/// Our state file survives that: the run stops with one error naming `--force`
/// before touching anything (no manifest update, no restart without keys), and
/// `--force` then builds the new identity.
#[test]
fn original_reconfiguration_procedure_is_guided_to_force() {
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    let old = openssl_sha1(&fr.cert_file("device.crt"));
    for f in [
        "azure.idscope",
        "device.crt",
        "device2.crt",
        "device.key",
        "device2.key",
    ] {
        fs::remove_file(fr.cert_file(f)).unwrap();
    }
    fr.clear_calls();
    let args = ["--keystore", "file", "--id-scope", "0ne00ABCDEF"];
    assert_rejected(&fr, &args, 1, &["--force"]);
    fr.run(&[&args[..], &["--force"]].concat()).ok();
    assert_identity_files(&fr);
    assert_ne!(openssl_sha1(&fr.cert_file("device.crt")), old);
    assert_eq!(
        env_values(&read_json(&fr.p(MANIFEST)), "ID_SCOPE"),
        ["0ne00ABCDEF"]
    );
    assert_eq!(
        fr.read("data/var/certificates/azure.idscope").trim(),
        "0ne00ABCDEF"
    );
    assert_eq!(fr.run(&["status"]).code, Some(0));
    assert_eq!(fr.calls(), recreate());
}

/// Two runs at once on one root (DESIGN §6 locking): both succeed, one identity.
#[test]
fn concurrent_runs_make_one_identity() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    let args = [
        "--keystore",
        "file",
        "--algorithm",
        "ecdsa-p256",
        "--id-scope",
        GOOD_SCOPE,
        "--json",
    ];
    let spawn = || {
        fr.cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        Run::from(a.wait_with_output().unwrap()).ok(),
        Run::from(b.wait_with_output().unwrap()).ok(),
    );
    assert_eq!(
        a.json(),
        b.json(),
        "the two runs report different identities"
    );
    let doc = fr.run(&["status", "--json"]).ok().json();
    assert_eq!(doc, a.json());
    check_schema(&fr, &doc, "ecdsa-p256", "dps");
    // Only the first run changed the manifest.
    assert_eq!(fr.calls(), recreate());
}

#[test]
fn no_restart_makes_no_calls() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    fr.provision_dps("ecdsa-p256", &["--no-restart"]);
    assert!(fr.p(MANIFEST).exists(), "the manifest is still written");
    assert_eq!(fr.calls(), Vec::<String>::new());
}

#[test]
fn missing_kanto_cm_is_a_warning() {
    require_tools!(Openssl);
    assert!(
        !Path::new("/usr/bin/kanto-cm").exists() && !Path::new("/usr/local/bin/kanto-cm").exists(),
        "this host has a real kanto-cm; the test would not prove anything"
    );
    let fr = FakeRoot::with_template();
    fr.remove_fake_tool("kanto-cm");
    let run = fr.provision_dps("ecdsa-p256", &[]);
    let warn: Vec<&str> = run.stderr_lines_with("kanto-cm");
    assert_eq!(warn.len(), 1, "{run}");
    assert!(warn[0].starts_with("warning:"), "{run}");
    assert!(!run.stderr.contains("error:"), "{run}");
    // systemctl is not called on its own either: the sequence is skipped as a whole.
    assert_eq!(fr.calls(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------
// Manifest preservation, both shapes
// ---------------------------------------------------------------------------------

fn ser(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn env_key(e: &str) -> &str {
    e.split_once('=').map_or(e, |(k, _)| k)
}

fn is_cert_mount(m: &Value) -> bool {
    m["source"]
        .as_str()
        .is_some_and(|s| Path::new(s).starts_with("/data/var/certificates"))
}

/// Everything the tool does not own is identical and in its order (compared as
/// serialised text, so key order counts).
fn assert_preserved(before: &Value, after: &Value, mounts_key: &str) {
    assert_eq!(
        keys(before),
        keys(after),
        "top-level keys or their order changed"
    );
    for k in keys(before) {
        if k != "config" && k != mounts_key {
            assert_eq!(ser(&before[&k]), ser(&after[&k]), "`{k}` changed");
        }
    }
    assert_eq!(
        keys(&before["config"]),
        keys(&after["config"]),
        "config keys changed"
    );
    for k in keys(&before["config"]) {
        if k != "env" {
            assert_eq!(
                ser(&before["config"][&k]),
                ser(&after["config"][&k]),
                "config.{k} changed"
            );
        }
    }
    let foreign = |m: &Value| -> Vec<String> {
        env_of(m)
            .into_iter()
            .filter(|e| !OWNED_ENV.contains(&env_key(e)))
            .collect()
    };
    assert_eq!(
        foreign(before),
        foreign(after),
        "env entries the tool does not own changed"
    );
    let foreign_mounts = |m: &Value| -> Vec<String> {
        m[mounts_key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !is_cert_mount(m))
            .map(ser)
            .collect()
    };
    assert_eq!(
        foreign_mounts(before),
        foreign_mounts(after),
        "foreign mounts changed"
    );
    // Owned entries appear once each.
    let env = env_of(after);
    for k in OWNED_ENV {
        assert!(
            env.iter().filter(|e| env_key(e) == *k).count() <= 1,
            "{k} is duplicated"
        );
    }
}

/// `field` mounts the two file-keystore files at `crt` and `key` in the container.
fn assert_cert_mounts(after: &Value, field: &str, crt: &str, key: &str) {
    let host = |f: &str| format!("/data/var/certificates/{f}");
    assert_eq!(
        cert_mounts(after, field),
        [
            (host("device.crt"), crt.to_owned()),
            (host("device.key"), key.to_owned()),
        ]
    );
}

fn cert_mounts(m: &Value, key: &str) -> Vec<(String, String)> {
    m[key]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| is_cert_mount(m))
        .map(|m| {
            (
                m["source"].as_str().unwrap().to_owned(),
                m["destination"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn manifest_kanto_template_shape_preserved() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    let template_bytes = fs::read(fr.p(TEMPLATE)).unwrap();
    let before = read_json(&fr.p(TEMPLATE));
    fr.provision_dps("ecdsa-p256", &[]);
    assert_eq!(
        fs::read(fr.p(TEMPLATE)).unwrap(),
        template_bytes,
        "the template was modified"
    );
    let after = read_json(&fr.p(MANIFEST));
    assert_preserved(&before, &after, "mounts");
    assert!(after.get("mount_points").is_none(), "shape converted");
    assert_eq!(
        ser(&after["host_config"]["devices"]),
        "[]",
        "file mode adds no device"
    );
    assert_eq!(
        ser(&after["x_vendor_extension"]),
        r#"{"keep":["me",1,null],"order":"matters"}"#
    );
    assert!(env_of(&after).contains(&r#"FEATURE_FLAG="quoted value""#.to_string()));
    assert_cert_mounts(
        &after,
        "mounts",
        "/var/certificates/device.crt",
        "/var/certificates/device.key",
    );
    // The legacy keys are updated in place, the new ones are set once.
    let env = env_of(&after);
    assert_eq!(env[0], "CERT_PATH=/var/certificates/device.crt");
    assert_eq!(env[1], "KEY_PATH=/var/certificates/device.key");
    for (k, v) in [
        ("ID_SCOPE", GOOD_SCOPE),
        ("CERT_FILE", "/var/certificates/device.crt"),
        ("KEY_FILE", "/var/certificates/device.key"),
        ("KEY_URI", "file:/var/certificates/device.key"),
    ] {
        assert_eq!(env_values(&after, k), [v], "{k}");
    }
    // Leda's 4-space layout, newline-terminated.
    let text = fr.read(MANIFEST);
    assert!(
        text.starts_with("{\n    \"id\": \"\",\n") && text.ends_with("}\n"),
        "{text}"
    );
}

#[test]
fn manifest_auto_deployer_shape_preserved() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_manifest();
    let before = read_json(&fr.p(MANIFEST));
    fr.provision_dps("ecdsa-p256", &[]);
    let after = read_json(&fr.p(MANIFEST));
    assert_preserved(&before, &after, "mount_points");
    assert!(after.get("mounts").is_none(), "shape converted");
    // The container paths the deployer chose are kept, and the env follows them.
    assert_cert_mounts(&after, "mount_points", "/device.crt", "/device.key");
    let env = env_of(&after);
    assert_eq!(env[0], "CERT_FILE=/device.crt");
    assert_eq!(env[1], "KEY_FILE=/device.key");
    assert_eq!(env_values(&after, "KEY_URI"), ["file:/device.key"]);
    assert_eq!(env_values(&after, "ID_SCOPE"), [GOOD_SCOPE]);
    assert!(
        env_values(&after, "CERT_PATH").is_empty(),
        "CERT_PATH added to a shape without it"
    );
    assert!(
        env_values(&after, "KEY_PATH").is_empty(),
        "KEY_PATH added to a shape without it"
    );
    assert_eq!(ser(&after["x_vendor_extension"]), r#"[{"z":1,"a":2}]"#);
}

// ---------------------------------------------------------------------------------
// --json
// ---------------------------------------------------------------------------------

fn is_upper_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.chars()
            .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
}

/// Check a provisioned `--json` document against DESIGN §5. Returns the two
/// certificate objects.
fn check_schema(fr: &FakeRoot, doc: &Value, alg: &str, kind: &str) -> Vec<Value> {
    let top = doc.as_object().expect("the document is an object");
    let mut k: Vec<&str> = top.keys().map(String::as_str).collect();
    k.sort();
    assert_eq!(
        k,
        [
            "certificates",
            "cloud",
            "device_id",
            "keystore",
            "manifest",
            "provisioned"
        ],
        "top-level keys"
    );
    assert_eq!(doc["provisioned"], Value::Bool(true));
    assert_eq!(doc["device_id"], ETH0_ID);
    assert_eq!(doc["keystore"], "file");
    match kind {
        "dps" => assert_eq!(
            doc["cloud"],
            // DESIGN §5/§3b: the DPS assignment is null until `register` succeeded.
            serde_json::json!({"kind": "dps", "id_scope": GOOD_SCOPE,
                "assigned_hub": null, "assigned_device_id": null})
        ),
        _ => assert_eq!(doc["cloud"]["kind"], "hub"),
    }
    let manifest = PathBuf::from(doc["manifest"].as_str().expect("manifest is a string"));
    assert!(manifest.is_absolute() && manifest.is_file(), "{manifest:?}");
    assert_eq!(
        fs::canonicalize(&manifest).unwrap(),
        fs::canonicalize(fr.p(MANIFEST)).unwrap()
    );
    let certs = doc["certificates"]
        .as_array()
        .expect("certificates is a list")
        .clone();
    assert_eq!(certs.len(), 2);
    // DESIGN §5's keys, plus two informational ones the implementation adds.
    const REQUIRED: &[&str] = &[
        "algorithm",
        "key_uri",
        "not_after",
        "path",
        "role",
        "sha1_thumbprint",
        "sha256_thumbprint",
    ];
    const TOLERATED_EXTRAS: &[&str] = &["issuer", "self_signed"];
    for (c, (role, crt, key)) in certs.iter().zip([
        ("primary", "device.crt", "device.key"),
        ("secondary", "device2.crt", "device2.key"),
    ]) {
        let o = c.as_object().unwrap();
        for r in REQUIRED {
            assert!(o.contains_key(*r), "certificate lacks {r}: {c}");
        }
        for key in o.keys() {
            assert!(
                REQUIRED.contains(&key.as_str()) || TOLERATED_EXTRAS.contains(&key.as_str()),
                "unexpected certificate key {key}"
            );
        }
        assert_eq!(c["role"], role);
        assert_eq!(c["algorithm"], alg);
        let path = PathBuf::from(c["path"].as_str().unwrap());
        assert!(path.is_absolute() && path.is_file(), "{path:?}");
        assert_eq!(
            fs::canonicalize(&path).unwrap(),
            fs::canonicalize(fr.cert_file(crt)).unwrap()
        );
        let uri = c["key_uri"].as_str().unwrap();
        let key_path = PathBuf::from(uri.strip_prefix("file:").expect("a file: URI"));
        assert!(key_path.is_file(), "{uri}");
        assert_eq!(
            fs::canonicalize(&key_path).unwrap(),
            fs::canonicalize(fr.cert_file(key)).unwrap()
        );
        let sha1 = c["sha1_thumbprint"].as_str().unwrap();
        let sha256 = c["sha256_thumbprint"].as_str().unwrap();
        assert!(is_upper_hex(sha1, 40), "{sha1}");
        assert!(is_upper_hex(sha256, 64), "{sha256}");
        assert_eq!(sha1, openssl_sha1(&path));
        assert_eq!(sha256, openssl_sha256(&path));
        let na = c["not_after"].as_str().unwrap();
        let t = time::OffsetDateTime::parse(na, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("not_after {na:?} is not RFC 3339: {e}"));
        let days = (t - time::OffsetDateTime::now_utc()).whole_days();
        assert!(
            (364..=366).contains(&days),
            "not_after {na} is not ~365 days ahead"
        );
    }
    certs
}

#[test]
fn json_provision_and_status() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    let prov = fr.provision_dps("ecdsa-p256", &["--json"]);
    let doc = prov.json();
    check_schema(&fr, &doc, "ecdsa-p256", "dps");
    let status = fr.run(&["status", "--json"]).ok();
    let sdoc = status.json();
    check_schema(&fr, &sdoc, "ecdsa-p256", "dps");
    assert_eq!(
        doc, sdoc,
        "provision and status describe the same identity differently"
    );
    // A re-run with --json is still exactly one document.
    let again = fr.provision_dps("ecdsa-p256", &["--json"]);
    assert_eq!(again.json(), doc);
    // `provision --json` as a subcommand too.
    let sub = fr
        .run(&[
            "--json",
            "--keystore",
            "file",
            "provision",
            "--id-scope",
            GOOD_SCOPE,
        ])
        .ok();
    assert_eq!(sub.json(), doc);
}

/// Days from now to a certificate's `not_after` in a JSON report.
fn days_left(doc: &Value, role: &str) -> i64 {
    let c = doc["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == role)
        .unwrap_or_else(|| panic!("no {role} certificate in {doc}"));
    let na = c["not_after"].as_str().unwrap();
    let t = time::OffsetDateTime::parse(na, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("not_after {na:?} is not RFC 3339: {e}"));
    (t - time::OffsetDateTime::now_utc()).whole_days()
}

/// `rotate --days N` sets the new secondary's validity; the primary keeps its own. A
/// validity out of range is a usage error that changes nothing.
#[test]
fn rotate_days_sets_the_new_secondarys_validity() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    fr.provision_dps("ecdsa-p256", &["--days", "90"]);
    let doc = fr
        .run(&["--no-restart", "--json", "rotate", "--days", "30"])
        .ok()
        .json();
    assert!((29..=30).contains(&days_left(&doc, "secondary")), "{doc}");
    assert!((89..=90).contains(&days_left(&doc, "primary")), "{doc}");
    let doc = fr.run(&["--no-restart", "--json", "rotate"]).ok().json();
    assert!((364..=365).contains(&days_left(&doc, "secondary")), "{doc}");
    fr.clear_calls();
    for bad in ["0", "36501", "x"] {
        assert_rejected(&fr, &["rotate", "--days", bad], 2, &["--days"]);
    }
    assert_rejected(&fr, &["--days", "30", "rotate"], 2, &["rotate --days"]);
}

#[test]
fn json_status_unprovisioned() {
    let fr = FakeRoot::with_template();
    let before = fr.snapshot();
    let run = fr.run(&["status", "--json"]);
    assert_eq!(run.code, Some(1), "{run}");
    let doc = run.json();
    assert_eq!(doc["provisioned"], Value::Bool(false));
    assert!(doc["certificates"].is_array());
    assert_same_tree(&before, &fr.snapshot(), "status --json");
}

// ---------------------------------------------------------------------------------
// Thumbprints and real consumers, every algorithm
// ---------------------------------------------------------------------------------

fn check_algorithm(alg: &str, text_marker: &str) {
    require_tools!(Openssl);
    let fr = FakeRoot::with_manifest();
    let doc = fr.provision_dps(alg, &["--json"]).json();
    let certs = check_schema(&fr, &doc, alg, "dps");
    for c in &certs {
        let crt = PathBuf::from(c["path"].as_str().unwrap());
        let key = PathBuf::from(
            c["key_uri"]
                .as_str()
                .unwrap()
                .strip_prefix("file:")
                .unwrap(),
        );
        openssl_verify(&crt);
        let text = openssl_cert_text(&crt);
        assert!(
            text.contains(text_marker),
            "{alg}: expected {text_marker:?} in\n{text}"
        );
        assert_eq!(
            common::openssl_cert_pubkey(&crt),
            openssl_key_pubkey(&key),
            "{alg}: the key does not belong to its certificate"
        );
        let hs = tempfile::tempdir().unwrap();
        mtls_handshake(hs.path(), &crt, &["-key", key.to_str().unwrap()], true, &[]);
    }
    assert_ne!(
        certs[0]["sha1_thumbprint"], certs[1]["sha1_thumbprint"],
        "primary and secondary are the same"
    );
}

tests_of!(check_algorithm:
    algorithm_rsa_2048 => ("rsa-2048", "Public-Key: (2048 bit)"),
    algorithm_rsa_3072 => ("rsa-3072", "Public-Key: (3072 bit)"),
    algorithm_ecdsa_p256 => ("ecdsa-p256", "NIST CURVE: P-256"),
    algorithm_ecdsa_p384 => ("ecdsa-p384", "NIST CURVE: P-384"),
);

// ---------------------------------------------------------------------------------
// Adopting a device the original script provisioned
// ---------------------------------------------------------------------------------

fn openssl_self_signed(dir: &Path, stem: &str, cn: &str) {
    common::run_ok(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(dir.join(format!("{stem}.key")))
            .arg("-out")
            .arg(dir.join(format!("{stem}.crt"))),
    );
}

/// What the original script leaves behind: openssl key/cert pairs, `azure.idscope`,
/// `/etc/deviceid` and a manifest with `ID_SCOPE` appended twice.
fn legacy_device() -> FakeRoot {
    let fr = FakeRoot::new();
    let certs = fr.p(CERTS);
    fs::create_dir_all(&certs).unwrap();
    openssl_self_signed(&certs, "device", ETH0_ID);
    openssl_self_signed(&certs, "device2", ETH0_ID);
    fr.write(
        "data/var/certificates/azure.idscope",
        format!("{GOOD_SCOPE}\n"),
    );
    fr.write("etc/deviceid", format!("{ETH0_ID}\n"));
    let mut m = read_json(&fixture("cloudconnector.auto-deployer.json"));
    let env = m["config"]["env"].as_array_mut().unwrap();
    env.push(Value::String(format!("ID_SCOPE={GOOD_SCOPE}")));
    env.push(Value::String(format!("ID_SCOPE={GOOD_SCOPE}")));
    fr.write(MANIFEST, serde_json::to_vec_pretty(&m).unwrap());
    fr
}

#[test]
fn adopts_original_script_device() {
    require_tools!(Openssl);
    let fr = legacy_device();
    let files = ["device.crt", "device.key", "device2.crt", "device2.key"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| fs::read(fr.cert_file(f)).unwrap())
        .collect();
    let thumbs = [
        openssl_sha1(&fr.cert_file("device.crt")),
        openssl_sha1(&fr.cert_file("device2.crt")),
    ];
    let manifest_before = read_json(&fr.p(MANIFEST));
    assert_eq!(
        fr.run(&["status"]).code,
        Some(1),
        "not adopted yet: incomplete"
    );
    // No cloud flag: the backend comes from azure.idscope.
    let run = fr.run(&["--keystore", "file", "--json"]).ok();
    let doc = run.json();
    let certs = check_schema(&fr, &doc, "rsa-2048", "dps");
    assert_eq!(certs[0]["sha1_thumbprint"], thumbs[0].as_str());
    assert_eq!(certs[1]["sha1_thumbprint"], thumbs[1].as_str());
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(
            &fs::read(fr.cert_file(f)).unwrap(),
            b,
            "{f} was replaced: new keys were made"
        );
    }
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(
        env_values(&m, "ID_SCOPE"),
        [GOOD_SCOPE],
        "duplicates not collapsed"
    );
    assert_preserved(&manifest_before, &m, "mount_points");
    assert_eq!(fr.calls(), recreate());
    // Complete now, and a re-run is a no-op.
    fr.run(&["status"]).ok();
    let snap = fr.snapshot();
    fr.clear_calls();
    fr.run(&["--keystore", "file"]).ok();
    assert_same_tree(&snap, &fr.snapshot(), "re-run after adoption");
    assert_eq!(fr.calls(), Vec::<String>::new());
}

/// The original copied keys around with default permissions; an adopted key is a
/// file-keystore key and must end up 0600 like every other (DESIGN §2, §6).
#[test]
fn adoption_tightens_key_permissions() {
    require_tools!(Openssl);
    use std::os::unix::fs::PermissionsExt;
    let fr = legacy_device();
    for k in ["device.key", "device2.key"] {
        fs::set_permissions(fr.cert_file(k), fs::Permissions::from_mode(0o644)).unwrap();
    }
    fr.run(&["--keystore", "file"]).ok();
    for k in ["device.key", "device2.key"] {
        assert_eq!(
            mode(&fr.cert_file(k)),
            0o600,
            "{k} is still readable by others after adoption"
        );
    }
}

/// A key that does not belong to its certificate is not adopted; nothing changes.
#[test]
fn adoption_refuses_mismatched_pair() {
    require_tools!(Openssl);
    let fr = legacy_device();
    fs::copy(fr.cert_file("device2.key"), fr.cert_file("device.key")).unwrap();
    let before = fr.snapshot();
    let err = fr.run(&["--keystore", "file"]).one_error(1);
    assert!(err.contains("--force"), "{err}");
    assert_same_tree(&before, &fr.snapshot(), "mismatched adoption");
}

// ---------------------------------------------------------------------------------
// Bad inputs: one error line naming the fix, a non-zero exit, nothing touched
// ---------------------------------------------------------------------------------

/// Run `args`, expect exit `code` with one `error:` line naming every `names`, and the
/// whole tree byte-identical.
/// A device made by `make`, provisioned (file keystore, DPS, ECDSA); `None` without
/// openssl on a developer machine.
fn provisioned(make: fn() -> FakeRoot) -> Option<FakeRoot> {
    require_tools!(Openssl => None);
    let fr = make();
    fr.provision_dps("ecdsa-p256", &[]);
    Some(fr)
}

/// The manifest is still `manifest`, the connector was stopped and started (not
/// recreated), and `status` is happy.
fn assert_restarted_only(fr: &FakeRoot, manifest: &[u8]) {
    assert_eq!(fs::read(fr.p(MANIFEST)).unwrap(), manifest);
    assert_eq!(fr.calls(), [STOP, START]);
    fr.run(&["status"]).ok();
}

/// [`assert_rejected`] of `--keystore file ARGS` with exit 1.
fn assert_file_rejected(fr: &FakeRoot, args: &[&str], names: &[&str]) -> Run {
    let args = [&["--keystore", "file"], args].concat();
    assert_rejected(fr, &args, 1, names)
}

/// The primary certificate's subject is `CN=...` as given.
fn assert_primary_cn(fr: &FakeRoot, subject: &str) {
    assert_eq!(openssl_subject(&fr.cert_file("device.crt")), subject);
}

fn assert_rejected(fr: &FakeRoot, args: &[&str], code: i32, names: &[&str]) -> Run {
    let before = fr.snapshot();
    let run = fr.run(args);
    let err = run.one_error(code);
    for n in names {
        assert!(err.contains(n), "the error does not name {n}:\n{run}");
    }
    assert!(
        !run.all().contains(SECRET_KEY),
        "the SharedAccessKey was printed:\n{run}"
    );
    assert_same_tree(&before, &fr.snapshot(), &format!("{args:?}"));
    assert_eq!(fr.calls(), Vec::<String>::new());
    run
}

#[test]
fn bad_malformed_manifest() {
    let fr = FakeRoot::new();
    fr.write(MANIFEST, "{\"config\": {\"env\": [\"A=1\",]}");
    assert_file_rejected(&fr, &["--id-scope", GOOD_SCOPE], &["cloudconnector.json"]);
    // The same on a provisioned device: the identity survives untouched too.
    let Some(fr) = provisioned(FakeRoot::with_manifest) else {
        return;
    };
    fr.clear_calls();
    fr.write(MANIFEST, "{ not json");
    assert_file_rejected(
        &fr,
        &["--id-scope", "0ne00ABCDEF"],
        &["cloudconnector.json"],
    );
    assert_file_rejected(&fr, &["--force"], &["cloudconnector.json"]);
}

#[test]
fn bad_malformed_template() {
    let fr = FakeRoot::new();
    fr.write(TEMPLATE, "[1, 2");
    assert_file_rejected(
        &fr,
        &["--id-scope", GOOD_SCOPE],
        &["cloudconnector.json.template"],
    );
}

#[test]
fn bad_id_scope() {
    let fr = FakeRoot::with_template();
    let long = "a".repeat(65);
    for scope in [
        "0ne\"0012345",
        "0ne00\",\"X=1",
        "0ne;x=1",
        "0ne\n0012345",
        "0ne0012345A\nID_SCOPE=evil",
        long.as_str(),
        "",
        "bad scope!",
    ] {
        assert_file_rejected(&fr, &["--id-scope", scope], &["--id-scope"]);
    }
}

#[test]
fn bad_connection_string() {
    let fr = FakeRoot::with_template();
    let good = hub_cs(ETH0_ID);
    for cs in [
        format!("HostName=hub.azure-devices.net;DeviceId={ETH0_ID}\";SharedAccessKey={SECRET_KEY}"),
        format!("HostName=hub.azure-devices.net\",\"X\":\"1;DeviceId={ETH0_ID};SharedAccessKey={SECRET_KEY}"),
        format!("{good}\nCONNECTION_STRING=evil"),
        format!("HostName=hub.azure-devices.net;SharedAccessKey={SECRET_KEY}"),
        format!("DeviceId={ETH0_ID};SharedAccessKey={SECRET_KEY}"),
        format!("HostName=hub.azure-devices.net;DeviceId={ETH0_ID};SharedAccessKey={SECRET_KEY}!!"),
        "garbage".to_string(),
    ] {
        assert_file_rejected(&fr, &["--connection-string", &cs], &["--connection-string"]);
    }
}

#[test]
fn bad_connection_string_file() {
    let fr = FakeRoot::with_template();
    let f = fr.dir.path().join("cs.txt");
    fs::write(
        &f,
        format!("HostName=hub.azure-devices.net;SharedAccessKey={SECRET_KEY}\n"),
    )
    .unwrap();
    assert_file_rejected(
        &fr,
        &["--connection-string-file", f.to_str().unwrap()],
        &["connection string"],
    );
    let missing = fr.dir.path().join("nope.txt");
    assert_file_rejected(
        &fr,
        &["--connection-string-file", missing.to_str().unwrap()],
        &["--connection-string-file"],
    );
}

#[test]
fn bad_connection_string_device_id_mismatch() {
    let fr = FakeRoot::with_template();
    let cs = hub_cs("some-other-device");
    let run = assert_file_rejected(&fr, &["--connection-string", &cs], &["--device-id"]);
    assert!(run.stderr.contains("some-other-device"), "{run}");
}

#[test]
fn bad_device_id_flag() {
    let fr = FakeRoot::with_template();
    for id in ["a;b", "a=b", "", "dev.", &"x".repeat(65), "dev\nice"] {
        assert_rejected(&fr, &file_dps_with_device_id(id), 1, &["--device-id"]);
    }
}

#[test]
fn no_physical_interface_needs_device_id() {
    let fr = FakeRoot::bare();
    fr.add_virtual_iface("lo", "00:00:00:00:00:00", "772");
    fr.add_virtual_iface("docker0", "02:42:ac:11:00:01", "1");
    fr.add_iface("can0", "aa:bb:cc:dd:ee:ff", "280");
    fr.add_iface("vcan0", "aa:bb:cc:dd:ee:01", "1");
    fr.add_iface("dummy0", "00:00:00:00:00:00", "1");
    fr.put_fixture("cloudconnector.auto-deployer.json", MANIFEST);
    assert_file_rejected(&fr, &["--id-scope", GOOD_SCOPE], &["--device-id"]);
    // And with no sys/class/net at all.
    let empty = FakeRoot::bare();
    assert_rejected(
        &empty,
        &["--keystore", "file", "--id-scope", GOOD_SCOPE],
        1,
        &["--device-id"],
    );
    // The flag is the fix.
    require_tools!(Openssl);
    empty.provision_dps("ecdsa-p256", &["--device-id", "leda-dev-1"]);
    assert_eq!(empty.read("etc/deviceid").trim(), "leda-dev-1");
    assert_primary_cn(&empty, "CN=leda-dev-1");
}

#[test]
fn non_tty_without_cloud_flags_is_a_usage_error() {
    let fr = FakeRoot::with_template();
    for extra in [&[][..], &["--non-interactive"][..]] {
        let mut args = vec!["--keystore", "file"];
        args.extend_from_slice(extra);
        assert_rejected(&fr, &args, 2, &["--id-scope", "--connection-string"]);
    }
}

#[test]
fn root_that_does_not_exist() {
    let d = tempfile::tempdir().unwrap();
    let fr = FakeRoot::new();
    let nothing = d.path().join("nothing");
    for args in [
        vec!["--keystore", "file", "--id-scope", GOOD_SCOPE],
        vec!["status"],
    ] {
        for via_env in [false, true] {
            let mut cmd = fr.cmd_without_root();
            if via_env {
                cmd.env("SDV_PROVISION_ROOT", &nothing);
            } else {
                cmd.arg("--root").arg(&nothing);
            }
            let run = Run::from(cmd.args(&args).output().unwrap());
            let err = run.one_error(1);
            assert!(err.contains("--root"), "{run}");
            assert!(!nothing.exists(), "--root was created");
            assert_eq!(
                fs::read_dir(d.path()).unwrap().count(),
                0,
                "something was created beside it"
            );
        }
    }
    // A file is not a root either.
    fs::write(&nothing, "").unwrap();
    let run = Run::from(
        fr.cmd_without_root()
            .arg("--root")
            .arg(&nothing)
            .arg("status")
            .output()
            .unwrap(),
    );
    assert!(run.one_error(1).contains("--root"), "{run}");
}

#[test]
fn empty_or_invalid_etc_deviceid_is_regenerated() {
    require_tools!(Openssl);
    for content in ["", "\n", "bad id;x\n"] {
        let fr = FakeRoot::with_template();
        fr.write("etc/deviceid", content);
        let run = fr.provision_dps("ecdsa-p256", &[]);
        assert_eq!(fr.read("etc/deviceid").trim(), ETH0_ID, "{content:?}");
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with("warning:") && l.contains("deviceid")),
            "no warning for {content:?}:\n{run}"
        );
        assert!(!run.stderr.contains("error:"), "{run}");
        assert_primary_cn(&fr, &format!("CN={ETH0_ID}"));
    }
}

#[test]
fn valid_etc_deviceid_wins_over_the_mac() {
    require_tools!(Openssl);
    let fr = FakeRoot::with_template();
    fr.write("etc/deviceid", "leda-from-file\n");
    let run = fr.provision_dps("ecdsa-p256", &[]);
    assert!(run.stdout.contains("- Device ID: leda-from-file"), "{run}");
    assert_primary_cn(&fr, "CN=leda-from-file");
}

// ---------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------

#[test]
fn status_incomplete_then_complete_and_read_only() {
    let fr = FakeRoot::with_template();
    let before = fr.snapshot();
    let run = fr.run(&["status"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stdout.contains("Status: incomplete"), "{run}");
    assert_same_tree(&before, &fr.snapshot(), "status on an unprovisioned root");
    require_tools!(Openssl);
    fr.provision_dps("ecdsa-p256", &[]);
    fr.clear_calls();
    let snap = fr.snapshot();
    let run = fr.run(&["status"]).ok();
    assert!(run.stdout.contains("Status: complete"), "{run}");
    assert_transcript_thumbprints(&fr, &run);
    assert_same_tree(&snap, &fr.snapshot(), "status on a provisioned root");
    assert_eq!(fr.calls(), Vec::<String>::new());
    // A missing certificate makes it incomplete again, still without writing.
    fs::remove_file(fr.cert_file("device2.crt")).unwrap();
    let snap = fr.snapshot();
    assert_eq!(fr.run(&["status"]).code, Some(1));
    assert_same_tree(&snap, &fr.snapshot(), "status on a broken root");
}

/// A failed atomic write whose own clean-up also failed (a failing disk fails the
/// unlink too) leaves a temp file beside its target; the next run removes ours in
/// every directory the tool writes: certificates, manifests and /etc (the storage
/// fault storm found one left in the manifests directory after `reset`).
#[test]
fn a_run_removes_temp_files_left_in_every_directory_it_writes() {
    let fr = FakeRoot::with_template();
    let dirs = [
        "data/var/certificates",
        "data/var/containers/manifests",
        "etc",
    ];
    for d in dirs {
        fs::create_dir_all(fr.root().join(d)).unwrap();
        fs::write(fr.root().join(d).join(".sdv-provision.tmpAbC123"), b"half").unwrap();
    }
    // Someone else's file that merely looks alike is not ours.
    fs::write(fr.root().join("etc/sdv-provision.tmp.keep"), b"theirs").unwrap();
    fr.run(&[
        "--id-scope",
        GOOD_SCOPE,
        "--algorithm",
        "ecdsa-p256",
        "--no-restart",
    ])
    .ok();
    for d in dirs {
        let left = fr.root().join(d).join(".sdv-provision.tmpAbC123");
        assert!(!left.exists(), "{} is still there", left.display());
    }
    assert!(fr.root().join("etc/sdv-provision.tmp.keep").exists());
}
