//! The built binary with `--keystore tpm` against a real swtpm: provision, the
//! manifest's TPM entries, a mutual-TLS 1.3 handshake with the key named by the
//! manifest's `KEY_URI`, re-run, rotation, verify, reset, and the user-facing errors.
#![cfg(feature = "tpm")]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::device::{Device, Kind};
use common::fake_root::{assert_same_tree, snapshot, FakeRoot, MANIFEST};
use common::swtpm::{cert_file, Abrmd, Swtpm};

const SRK: u32 = 0x8100_0001;
const PRIMARY: u32 = 0x8100_0010;
const SECONDARY: u32 = 0x8100_0011;

/// The device every test here starts: a [`FakeRoot`] with the Kanto template and a
/// swtpm of its own (`None` when a tool is missing on a developer machine).
fn device() -> Option<Device> {
    Device::start(Kind::Swtpm)
}

/// [`device`] whose keys the OpenSSL tpm2 provider can reach (through tpm2-abrmd).
fn tls_device() -> Option<Device> {
    Device::swtpm_with_abrmd(FakeRoot::with_template)
}

fn manifest_path(root: &Path) -> PathBuf {
    root.join(MANIFEST)
}

/// The binary on `d` with `--no-restart`.
fn sdv_cmd(d: &Device, args: &[&str]) -> Command {
    let mut c = d.base_cmd();
    c.arg("--no-restart").args(args);
    c
}

fn sdv(d: &Device, args: &[&str]) -> Output {
    sdv_cmd(d, args).output().expect("run sdv-provision")
}

fn sdv_ok(d: &Device, args: &[&str]) -> Output {
    common::run_ok(&mut sdv_cmd(d, args))
}

fn provision_json(d: &Device, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--id-scope",
        "0ne0012345A",
        "--device-id",
        "dev-e2e-1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = sdv_ok(d, &args);
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON document")
}

fn manifest_env(root: &Path) -> Vec<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest_path(root)).unwrap()).unwrap();
    m["config"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn env_value(env: &[String], key: &str) -> Option<String> {
    env.iter()
        .find_map(|e| e.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// The connector's TPM entries in the manifest (and its config file), in both
/// manifest shapes.
const TPM_ENV: [(&str, &str); 8] = [
    ("KEY_URI", "handle:0x81000010"),
    ("TPM_DEVICE", "/dev/tpmrm0"),
    ("TPM_HANDLE", "0x81000001"),
    ("TPM_KEY", "/var/certificates/device.tpm.priv"),
    ("TPM_KEY_PUB", "/var/certificates/device.tpm.pub"),
    ("TPM2OPENSSL_TCTI", "device:/dev/tpmrm0"),
    ("KEY_FILE", "/var/certificates/device.tpm.priv"),
    (
        "CLOUD_CONNECTOR_CONFIG",
        "/var/certificates/cloudconnector.config.json",
    ),
];

/// Each `KEY=value` of `expected` is in the manifest's `env`.
fn assert_env(env: &[String], expected: &[(&str, &str)]) {
    for (k, v) in expected {
        assert_eq!(env_value(env, k).as_deref(), Some(*v), "{k} in {env:?}");
    }
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort();
    v
}

/// The connector's config file, read as the connector reads it (Go's
/// `encoding/json` into `TPMHandle uint64` and three strings): `tpmHandle` must be a
/// JSON number, and the paths are the container paths of the mounted blobs, which
/// `KEY_FILE` names too.
fn assert_connector_reads(root: &Path, dir: &str) {
    let config = cert_file(root, "cloudconnector.config.json");
    let meta = std::fs::metadata(&config).expect("the connector config file");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 4, "{v}");
    assert_eq!(v["tpmDevice"].as_str(), Some("/dev/tpmrm0"));
    assert_eq!(
        v["tpmHandle"].as_u64(),
        Some(u64::from(SRK)),
        "a number: {v}"
    );
    assert_eq!(
        v["tpmKey"].as_str(),
        Some(format!("{dir}/device.tpm.priv").as_str())
    );
    assert_eq!(
        v["tpmKeyPub"].as_str(),
        Some(format!("{dir}/device.tpm.pub").as_str())
    );
    let env = manifest_env(root);
    assert_eq!(env_value(&env, "KEY_FILE").as_deref(), v["tpmKey"].as_str());
    // Each container path is the destination of a mount of the host file.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest_path(root)).unwrap()).unwrap();
    let mounts = m.get("mounts").or(m.get("mount_points")).unwrap();
    let dest_of = |name: &str| {
        mounts
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["source"] == format!("/data/var/certificates/{name}"))
            .map(|x| x["destination"].as_str().unwrap().to_owned())
    };
    assert_eq!(dest_of("device.tpm.priv").as_deref(), v["tpmKey"].as_str());
    assert_eq!(
        dest_of("device.tpm.pub").as_deref(),
        v["tpmKeyPub"].as_str()
    );
    assert_eq!(
        dest_of("cloudconnector.config.json"),
        env_value(&env, "CLOUD_CONNECTOR_CONFIG")
    );
}

/// Both keys have noDA (`tpm2_readpublic`); both certificates carry a
/// subjectKeyIdentifier and an authorityKeyIdentifier (`openssl x509 -text`), and
/// `openssl verify` with both in one CA file verifies each.
fn assert_noda_and_key_ids(tpm: &Swtpm, root: &Path) {
    for h in [PRIMARY, SECONDARY] {
        let out = common::run_ok(
            tpm.tool("tpm2_readpublic")
                .arg("-c")
                .arg(format!("0x{h:08x}")),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let attrs = text
            .lines()
            .skip_while(|l| !l.starts_with("attributes:"))
            .nth(1)
            .unwrap_or_default();
        assert!(attrs.contains("noda"), "0x{h:08x}: {text}");
    }
    let both = root.join("both.pem");
    let mut pem = std::fs::read(cert_file(root, "device.crt")).unwrap();
    pem.extend(std::fs::read(cert_file(root, "device2.crt")).unwrap());
    std::fs::write(&both, pem).unwrap();
    for name in ["device.crt", "device2.crt"] {
        let cert = cert_file(root, name);
        let out = common::run_ok(
            Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(&cert),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("X509v3 Subject Key Identifier"),
            "{name}: {text}"
        );
        assert!(
            text.contains("X509v3 Authority Key Identifier"),
            "{name}: {text}"
        );
        let out = common::run_ok(
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(&both)
                .arg(&cert),
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": OK"),
            "{name}"
        );
    }
}

/// A real `openssl s_server` trusting both certificates (one CA file) accepts each
/// identity, its key loaded by handle through the OpenSSL tpm2 provider.
fn tls_with_both_identities(tpm: &Swtpm, root: &Path) {
    let abrmd = Abrmd::start(tpm);
    for (name, h) in [("device.crt", PRIMARY), ("device2.crt", SECONDARY)] {
        let key = format!("handle:0x{h:08x}");
        abrmd.mtls13(&root.join("both.pem"), &cert_file(root, name), &key);
    }
}

fn tls_with_manifest_key(tpm: &Swtpm, root: &Path) {
    let uri = env_value(&manifest_env(root), "KEY_URI").expect("KEY_URI in the manifest");
    let cert = cert_file(root, "device.crt");
    Abrmd::start(tpm).mtls13(&cert, &cert, &uri);
}

#[test]
fn provision_manifest_tls_rerun_rotate_verify_reset() {
    let Some(d) = tls_device() else { return };
    let tpm = d.tpm();
    let root = &d.fr.root();

    let json = provision_json(&d, &[]);
    assert_eq!(json["keystore"], "tpm");
    assert_eq!(json["certificates"][0]["key_uri"], "handle:0x81000010");
    assert_eq!(json["certificates"][1]["key_uri"], "handle:0x81000011");
    assert_eq!(json["certificates"][0]["algorithm"], "rsa-2048");

    // The manifest: the key by URI plus what today's connector needs, no key file.
    let env = manifest_env(root);
    assert_env(&env, &TPM_ENV);
    assert_env(&env, &[("CERT_FILE", "/var/certificates/device.crt")]);
    assert_connector_reads(root, "/var/certificates");
    let manifest = std::fs::read_to_string(manifest_path(root)).unwrap();
    assert!(!manifest.contains("device.key"), "no key file is mounted");
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert!(m["host_config"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["path_on_host"] == "/dev/tpmrm0" && d["cgroup_permissions"] == "rwm"));
    assert!(!cert_file(root, "device.key").exists());

    // The TPM holds what the manifest says; the blobs load under the SRK.
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    assert_eq!(
        common::openssl_cert_pubkey(&cert_file(root, "device.crt")),
        tpm.public_pem(PRIMARY)
    );
    for stem in ["device", "device2"] {
        common::openssl_verify(&cert_file(root, &format!("{stem}.crt")));
        tpm.load_blobs(
            SRK,
            &cert_file(root, &format!("{stem}.tpm.pub")),
            &cert_file(root, &format!("{stem}.tpm.priv")),
        );
    }

    assert_noda_and_key_ids(tpm, root);
    // A consumer loads the key by the manifest's KEY_URI: mutual TLS 1.3; and a
    // server trusting both certificates in one CA file accepts each identity.
    tls_with_manifest_key(tpm, root);
    tls_with_both_identities(tpm, root);

    // Re-running changes nothing.
    let again = provision_json(&d, &[]);
    assert_eq!(again["certificates"], json["certificates"]);
    assert_eq!(
        std::fs::read_to_string(manifest_path(root)).unwrap(),
        manifest
    );
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );

    // Rotation: a new secondary (staged, then promoted into 0x81000011), then the
    // secondary becomes the primary. No staging handle is left behind.
    sdv_ok(&d, &["rotate"]);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    let new_secondary = common::openssl_sha1(&cert_file(root, "device2.crt"));
    assert_ne!(new_secondary, json["certificates"][1]["sha1_thumbprint"]);
    let secondary_key = tpm.public_pem(SECONDARY);
    sdv_ok(&d, &["rotate", "--promote"]);
    assert_eq!(
        common::openssl_sha1(&cert_file(root, "device.crt")),
        new_secondary
    );
    assert_eq!(tpm.public_pem(PRIMARY), secondary_key);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    sdv_ok(&d, &["verify"]);

    // verify covers the config file's content.
    let config = cert_file(root, "cloudconnector.config.json");
    let good = std::fs::read(&config).unwrap();
    std::fs::write(
        &config,
        br#"{"tpmDevice":"/dev/tpmrm0","tpmHandle":"0x81000001"}"#,
    )
    .unwrap();
    let out = sdv(&d, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL manifest:") && l.contains("cloudconnector.config.json")),
        "{text}"
    );
    // A re-run repairs it; the manifest stays as it was.
    sdv_ok(
        &d,
        &["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-1"],
    );
    assert_eq!(std::fs::read(&config).unwrap(), good);
    sdv_ok(&d, &["verify"]);

    // Reset removes our handles and blobs, and only those, and the config file with
    // its manifest entries.
    sdv_ok(&d, &["reset", "--yes"]);
    assert_eq!(tpm.persistent_handles(), vec![SRK]);
    assert!(!config.exists());
    let env = manifest_env(root);
    for k in ["CLOUD_CONNECTOR_CONFIG", "KEY_FILE", "TPM_KEY"] {
        assert_eq!(env_value(&env, k), None, "{k} in {env:?}");
    }
    assert!(!std::fs::read_to_string(manifest_path(root))
        .unwrap()
        .contains("cloudconnector.config.json"));
    for f in [
        "device.tpm.pub",
        "device.tpm.priv",
        "device2.tpm.pub",
        "device2.tpm.priv",
    ] {
        assert!(!cert_file(root, f).exists(), "{f} left behind");
    }
}

#[test]
fn ecdsa_p256_provision_warns_and_serves_tls13() {
    let Some(d) = tls_device() else { return };
    let tpm = d.tpm();
    let root = &d.fr.root();
    let out = sdv_ok(
        &d,
        &[
            "--id-scope",
            "0ne0012345A",
            "--device-id",
            "dev-e2e-2",
            "--algorithm",
            "ecdsa-p256",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let compat: Vec<_> = common::lines_containing(&stderr, "today's Leda cloud connector");
    assert_eq!(compat.len(), 1, "one line, both reasons: {stderr}");
    assert!(
        compat[0].contains("RSA-PSS")
            && compat[0].contains("--algorithm rsa-2048")
            && compat[0].contains("needs a key file for DPS")
            && compat[0].contains("not registered"),
        "warns that today's connector needs RSA and a key file for DPS: {stderr}"
    );
    assert_eq!(
        common::openssl_cert_pubkey(&cert_file(root, "device.crt")),
        tpm.public_pem(PRIMARY)
    );
    tls_with_manifest_key(tpm, root);
}

#[test]
fn occupied_handle_is_refused_and_nothing_is_left_half_made() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    tpm.foreign_key_at(SECONDARY, true);
    let foreign = tpm.public_pem(SECONDARY);
    let root = &d.fr.root();
    let out = sdv(
        &d,
        &["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-3"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0x81000011") && stderr.contains("--tpm-secondary-handle"),
        "{stderr}"
    );
    common::pin_file(&stderr, &[], "tpm_e2e/occupied_handle");
    // The foreign key is untouched, and the primary made before the failure is gone.
    assert_eq!(tpm.public_pem(SECONDARY), foreign);
    assert!(!tpm.persistent_handles().contains(&PRIMARY));

    let json = provision_json(&d, &["--tpm-secondary-handle", "0x81000021"]);
    assert_eq!(json["certificates"][1]["key_uri"], "handle:0x81000021");
    assert_eq!(tpm.public_pem(SECONDARY), foreign);

    // Later runs remember the chosen handle without the flag: rotation stages at
    // 0x81000121 and lands back on 0x81000021; the foreign key is never touched.
    sdv_ok(&d, &["rotate"]);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY, 0x8100_0021]
    );
    sdv_ok(&d, &["verify"]);
    sdv_ok(&d, &["reset", "--yes"]);
    assert_eq!(sorted(tpm.persistent_handles()), vec![SRK, SECONDARY]);
    assert_eq!(tpm.public_pem(SECONDARY), foreign);
    assert!(!cert_file(root, "device2.tpm.pub").exists());
}

#[test]
fn unreachable_tpm_is_one_clear_error() {
    let fr = FakeRoot::with_template();
    let tcti = format!("swtpm:host=127.0.0.1,port={}", common::free_port());
    let out = fr
        .cmd()
        .args(["--keystore", "tpm", "--tcti", &tcti])
        .args([
            "--no-restart",
            "--non-interactive",
            "--id-scope",
            "0ne0012345A",
        ])
        .args(["--device-id", "dev-e2e-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<_> = common::lines_containing(&stderr, &tcti);
    assert_eq!(errors.len(), 1, "one line names the TCTI: {stderr}");
    common::pin_file(
        &stderr,
        &[("[TCTI]", tcti.clone())],
        "tpm_e2e/unreachable_tpm",
    );
    assert!(
        errors[0].contains("--tcti") && errors[0].contains("--keystore file"),
        "{stderr}"
    );
    assert!(!fr.p(MANIFEST).exists(), "nothing written");
}

/// The kanto-auto-deployer manifest shape (`mount_points`, `/device.crt`, a
/// `device.key` mount, no `host_config.devices`) in TPM mode: the shape is kept, the
/// key-file mount and `KEY_FILE` go, the blobs get mounts of their own, the TPM device
/// is added, and foreign mounts stay (DESIGN §3).
#[test]
fn tpm_entries_in_the_auto_deployer_shape() {
    let Some(d) = Device::on(Kind::Swtpm, FakeRoot::with_manifest) else {
        return;
    };
    let root = &d.fr.root();
    provision_json(&d, &[]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest_path(root)).unwrap()).unwrap();
    assert!(m.get("mounts").is_none(), "shape converted");
    let mounts: Vec<(String, String)> = m["mount_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["source"].as_str().unwrap().to_owned(),
                x["destination"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let pair = |s: &str, d: &str| (s.to_owned(), d.to_owned());
    assert_eq!(
        mounts,
        [
            pair("/data/var/certificates/device.crt", "/device.crt"),
            pair("/data/var/mosquitto", "/mosquitto"),
            pair(
                "/data/var/certificates/device.tpm.pub",
                "/var/certificates/device.tpm.pub"
            ),
            pair(
                "/data/var/certificates/device.tpm.priv",
                "/var/certificates/device.tpm.priv"
            ),
            pair(
                "/data/var/certificates/cloudconnector.config.json",
                "/var/certificates/cloudconnector.config.json"
            ),
        ]
    );
    assert_connector_reads(root, "/var/certificates");
    let env = manifest_env(root);
    assert_env(&env, &TPM_ENV);
    assert_env(
        &env,
        &[("CERT_FILE", "/device.crt"), ("ID_SCOPE", "0ne0012345A")],
    );
    // Idempotent: a re-run rewrites neither the manifest nor the config file.
    let before = snapshot(root);
    sdv_ok(
        &d,
        &["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-1"],
    );
    assert_same_tree(&before, &snapshot(root), "a re-run");
    sdv_ok(&d, &["verify"]);
    for k in ["KEY_PATH", "CERT_PATH"] {
        assert_eq!(env_value(&env, k), None, "{k} in {env:?}");
    }
    assert_eq!(
        m["host_config"]["devices"],
        serde_json::json!([{
            "path_on_host": "/dev/tpmrm0",
            "path_in_container": "/dev/tpmrm0",
            "cgroup_permissions": "rwm"
        }])
    );
    assert_eq!(
        m["x_vendor_extension"],
        serde_json::json!([{"z": 1, "a": 2}])
    );
}

/// `--keystore auto` picks the TPM a TCTI names, from `--tcti`, `TPM2TOOLS_TCTI` or
/// `TCTI` (DESIGN §2); with DPS it warns once that today's connector needs a key file
/// for DPS.
#[test]
fn auto_picks_the_tpm_a_tcti_names() {
    require_tools!(Swtpm, Tpm2Tools, Openssl);
    let tpm = Swtpm::start();
    for how in ["--tcti", "TPM2TOOLS_TCTI", "TCTI"] {
        let fr = FakeRoot::with_template();
        let mut cmd = fr.cmd();
        cmd.args(["--no-restart", "--non-interactive", "--json"])
            .args(["--id-scope", "0ne0012345A", "--device-id", "dev-auto"]);
        match how {
            "--tcti" => cmd.args(["--tcti", &tpm.tcti()]),
            var => cmd.env(var, tpm.tcti()),
        };
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{how}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["keystore"], "tpm", "{how}");
        assert_eq!(
            stderr.matches("needs a key file for DPS").count(),
            1,
            "{how}: {stderr}"
        );
        // TPM RSA with DPS: that is the one reason, and the device is not registered.
        let compat: Vec<&str> = common::lines_containing(&stderr, "today's Leda cloud connector");
        assert!(
            compat.len() == 1 && compat[0].contains("not registered") && !compat[0].contains(';'),
            "{how}: {stderr}"
        );
        // The next identity on the same TPM needs the handles free again.
        common::run_ok(
            fr.cmd()
                .args(["--keystore", "tpm", "--tcti", &tpm.tcti()])
                .args(["--no-restart", "--non-interactive", "reset", "--yes"]),
        );
    }
}

/// `reset` with the TPM gone fails before it changes anything, and once the TPM is
/// back the identity is intact (no journal left for a later run to finish).
#[test]
fn reset_with_the_tpm_gone_changes_nothing() {
    let Some(mut d) = device() else { return };
    let root = &d.fr.root();
    provision_json(&d, &["--algorithm", "ecdsa-p256"]);
    let before = snapshot(root);
    d.tpm_mut().kill();
    let out = sdv(&d, &["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{stderr}"
    );
    assert_same_tree(&before, &snapshot(root), "a reset with the TPM gone");
    d.tpm_mut().restart();
    sdv_ok(&d, &["verify"]);
    assert_eq!(
        sorted(d.tpm().persistent_handles()),
        [SRK, PRIMARY, SECONDARY]
    );
}

/// A TPM whose owner hierarchy has a password: without it (or with a wrong one) the
/// error names where to give it; from a file it works; it never shows up in output
/// or files.
#[test]
fn owner_hierarchy_password_from_env_or_file() {
    const PASSWORD: &str = "s3cret-owner-pw";
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    common::run_ok(tpm.tool("tpm2_changeauth").args(["-c", "owner", PASSWORD]));
    let root = &d.fr.root();
    let args = ["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-5"];
    let run = |env: &[(&str, &str)]| {
        let mut c = sdv_cmd(&d, &args);
        c.env_remove("SDV_PROVISION_TPM_OWNER_AUTH")
            .env_remove("SDV_PROVISION_TPM_OWNER_AUTH_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let mut seen = String::new();
    for env in [vec![], vec![("SDV_PROVISION_TPM_OWNER_AUTH", "wrong")]] {
        let out = run(&env);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("SDV_PROVISION_TPM_OWNER_AUTH")
                && stderr.contains("SDV_PROVISION_TPM_OWNER_AUTH_FILE"),
            "{stderr}"
        );
        assert!(tpm.persistent_handles().is_empty(), "nothing made");
        seen.push_str(&stderr);
    }
    let pw_file = tpm.dir().join("owner.pw");
    std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap();
    let out = run(&[(
        "SDV_PROVISION_TPM_OWNER_AUTH_FILE",
        pw_file.to_str().unwrap(),
    )]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen.push_str(&String::from_utf8_lossy(&out.stdout));
    seen.push_str(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    assert!(!seen.contains(PASSWORD), "the password was printed");
    for entry in walk(root) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(PASSWORD),
            "the password is in {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A `TPM2_PT_*` property of `tpm2_getcap properties-variable`.
fn tpm_property(tpm: &Swtpm, name: &str) -> u32 {
    let out = common::run_ok(tpm.tool("tpm2_getcap").arg("properties-variable"));
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: 0x")))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    u32::from_str_radix(value.trim(), 16).unwrap()
}

/// Power loss: swtpm killed with SIGKILL (no TPM2_Shutdown) after the keys signed,
/// restarted on the same state, more times than its MAX_AUTH_FAIL. Keys without noDA
/// were locked out after three; with noDA the failure counter never moves and the
/// identity keeps signing.
#[test]
fn power_loss_never_locks_the_identity_out() {
    let Some(mut d) = device() else { return };
    provision_json(&d, &[]);
    let max = tpm_property(d.tpm(), "TPM2_PT_MAX_AUTH_FAIL");
    assert!(max > 0);
    for round in 0..=max + 1 {
        // Both keys sign in every round (checked line by line, so a lockout shows
        // as the key's own failure).
        let out = sdv(&d, &["verify"]);
        let text = String::from_utf8_lossy(&out.stdout);
        for role in ["primary", "secondary"] {
            assert!(
                text.contains(&format!("ok   {role}.key:")),
                "round {round}: {text}"
            );
        }
        d.tpm_mut().restart(); // SIGKILL, then the same state directory
    }
    sdv_ok(&d, &["verify"]);
    assert_eq!(tpm_property(d.tpm(), "TPM2_PT_LOCKOUT_COUNTER"), 0);
}

/// A key from an older run without noDA: `verify` names it and the fix. With the
/// TPM in dictionary-attack lockout, that key's error says so, with the time left
/// (not rcgen's bare "Remote key error"), while the noDA secondary still signs.
#[test]
fn old_key_without_noda_and_a_tpm_in_lockout() {
    let Some(d) = tls_device() else { return };
    let tpm = d.tpm();
    let root = &d.fr.root();
    provision_json(&d, &[]);
    // Replace the primary with a key made the old way (no noDA), as tpm2-tools makes it.
    let tmp = tempfile::tempdir().unwrap();
    let (public, private, ctx) = (
        tmp.path().join("k.pub"),
        tmp.path().join("k.priv"),
        tmp.path().join("k.ctx"),
    );
    let p = format!("0x{PRIMARY:08x}");
    common::run_ok(tpm.tool("tpm2_evictcontrol").args(["-C", "o", "-c", &p]));
    common::run_ok(
        tpm.tool("tpm2_create")
            .args(["-C", &format!("0x{SRK:08x}"), "-G", "rsa2048:null", "-a"])
            .arg("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign")
            .arg("-u")
            .arg(&public)
            .arg("-r")
            .arg(&private),
    );
    common::run_ok(
        tpm.tool("tpm2_load")
            .args(["-C", &format!("0x{SRK:08x}"), "-u"])
            .arg(&public)
            .arg("-r")
            .arg(&private)
            .arg("-c")
            .arg(&ctx),
    );
    common::run_ok(
        tpm.tool("tpm2_evictcontrol")
            .args(["-C", "o", "-c"])
            .arg(&ctx)
            .arg(&p),
    );
    common::run_ok(tpm.tool("tpm2_flushcontext").arg("-t"));
    // What that run left: its blobs (tpm2_create's -u/-r format) and a self-signed
    // certificate made through the key (OpenSSL's tpm2 provider).
    std::fs::copy(&public, cert_file(root, "device.tpm.pub")).unwrap();
    std::fs::copy(&private, cert_file(root, "device.tpm.priv")).unwrap();
    // 0600, as sdv-provision writes a private blob (tpm2_create's file is 0660 under
    // this umask, which verify's secret_modes check would rightly fail on).
    let secret = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(cert_file(root, "device.tpm.priv"), secret).unwrap();
    {
        let abrmd = Abrmd::start(tpm);
        let mut req = Command::new("openssl");
        req.args([
            "req",
            "-new",
            "-x509",
            "-provider",
            "tpm2",
            "-provider",
            "default",
        ])
        .args([
            "-key",
            &format!("handle:{p}"),
            "-subj",
            "/CN=dev-e2e-1",
            "-days",
            "30",
        ])
        .arg("-out")
        .arg(cert_file(root, "device.crt"));
        for (k, v) in abrmd.provider_env() {
            req.env(k, v);
        }
        common::run_ok(&mut req);
    }

    let out = sdv(&d, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let failing: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failing.len(), 1, "only the missing noDA fails: {text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l[5..].starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .to_owned()
    };
    let attrs = line("primary.key.attributes");
    assert!(
        attrs.starts_with("FAIL") && attrs.contains("lacks noDA"),
        "{attrs}"
    );
    assert!(attrs.contains("rotate --promote"), "{attrs}");
    common::pin_file(&attrs, &[], "tpm_e2e/key_without_noda");
    assert!(line("secondary.key.attributes").starts_with("ok"), "{text}");

    // Lockout: one failure allowed, then a wrong password on the DA-protected key.
    common::run_ok(
        tpm.tool("tpm2_dictionarylockout")
            .args(["-s", "-n", "1", "-t", "600", "-l", "900"]),
    );
    let msg = tmp.path().join("msg");
    std::fs::write(&msg, b"x").unwrap();
    let wrong = tpm
        .tool("tpm2_sign")
        .args(["-c", &p, "-p", "wrong", "-g", "sha256", "-o"])
        .arg(tmp.path().join("sig"))
        .arg(&msg)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(tpm_property(tpm, "TPM2_PT_LOCKOUT_COUNTER") >= 1);

    let out = sdv(&d, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let key = text
        .lines()
        .find(|l| l.contains("primary.key:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(key.starts_with("FAIL"), "{key}");
    assert!(key.contains("dictionary-attack lockout"), "{key}");
    assert!(key.contains("about 600 s"), "{key}");
    assert!(!key.contains("Remote key error"), "{key}");
    common::pin_file(key, &[], "tpm_e2e/lockout");
    assert!(text.contains("ok   secondary.key:"), "{text}");
}

/// Hub connection strings: TPM RSA gets no compatibility warning; a HostName the
/// connector rejects (no `.azure-devices.net`) is named.
#[test]
fn tpm_rsa_with_a_hub_gets_no_warning_and_a_foreign_host_one() {
    let Some(d) = device() else { return };
    let compat = |out: &Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("today's Leda cloud connector"))
            .map(str::to_owned)
            .collect()
    };
    let cs = "HostName=myhub.azure-devices.net;DeviceId=dev-hub;x509=true";
    let out = sdv_ok(&d, &["--connection-string", cs, "--device-id", "dev-hub"]);
    assert_eq!(
        compat(&out),
        Vec::<String>::new(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cs = "HostName=hub.example.com;DeviceId=dev-hub;x509=true";
    let out = sdv_ok(&d, &["--connection-string", cs, "--device-id", "dev-hub"]);
    let lines = compat(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(".azure-devices.net"), "{lines:?}");
    assert!(!lines[0].contains(';'), "one reason only: {lines:?}");
}

/// The config file and manifest converge once: a re-run rewrites neither (same
/// inodes) and restarts nothing. A template that names its own
/// CLOUD_CONNECTOR_CONFIG keeps it, with a warning.
#[test]
fn connector_config_is_idempotent_and_a_templates_own_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    let Some(d) = Device::on(Kind::Swtpm, FakeRoot::with_manifest) else {
        return;
    };
    let fr = &d.fr;
    let run = |args: &[&str]| {
        d.base_cmd()
            .args(["--id-scope", "0ne0012345A"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !fr.calls().is_empty(),
        "the first run restarts the connector"
    );
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (manifest, config) = (fr.p(MANIFEST), fr.cert_file("cloudconnector.config.json"));
    let before = (ino(&manifest), ino(&config));
    fr.clear_calls();
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fr.calls(), Vec::<String>::new());
    assert_eq!((ino(&manifest), ino(&config)), before, "rewritten");

    // The manifest's own CLOUD_CONNECTOR_CONFIG: kept, not mounted over, warned about.
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let env = m["config"]["env"].as_array_mut().unwrap();
    env.retain(|e| !e.as_str().unwrap().starts_with("CLOUD_CONNECTOR_CONFIG="));
    env.push("CLOUD_CONNECTOR_CONFIG=/etc/cloudconnector/mine.json".into());
    let mounts = m["mount_points"].as_array_mut().unwrap();
    mounts.retain(|x| {
        !x["source"]
            .as_str()
            .unwrap()
            .ends_with("cloudconnector.config.json")
    });
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("warning:")
            && l.contains("CLOUD_CONNECTOR_CONFIG=/etc/cloudconnector/mine.json")
            && l.contains("left alone")),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&manifest).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let env: Vec<&str> = m["config"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        env.iter()
            .filter(|e| e.starts_with("CLOUD_CONNECTOR_CONFIG="))
            .collect::<Vec<_>>(),
        [&"CLOUD_CONNECTOR_CONFIG=/etc/cloudconnector/mine.json"]
    );
    assert!(
        !text.contains("/var/certificates/cloudconnector.config.json"),
        "{text}"
    );
    assert!(
        env.contains(&"KEY_FILE=/var/certificates/device.tpm.priv"),
        "{env:?}"
    );
}

/// Provisioning on a [`SharedTpm`] root, with ECDSA keys.
const OWN_ECDSA: [&str; 6] = [
    "--id-scope",
    "0ne0012345A",
    "--device-id",
    "dev-own",
    "--algorithm",
    "ecdsa-p256",
];

/// One swtpm behind tpm2-abrmd, so the tool and "another application" (tpm2-tools)
/// talk to the TPM at the same time, as on a device with /dev/tpmrm0.
struct SharedTpm {
    _tpm: Swtpm,
    abrmd: Abrmd,
}

impl SharedTpm {
    fn start() -> SharedTpm {
        let tpm = Swtpm::start();
        let abrmd = Abrmd::start(&tpm);
        SharedTpm { _tpm: tpm, abrmd }
    }

    fn env(&self, c: &mut Command) {
        for (k, v) in self.abrmd.provider_env() {
            c.env(k, v);
        }
        c.env("TPM2TOOLS_TCTI", self.abrmd.tcti())
            .env_remove("TCTI");
    }

    /// The binary on `fr`'s root, through the resource manager.
    fn sdv(&self, fr: &FakeRoot, args: &[&str]) -> Command {
        let mut c = fr.cmd();
        c.args(["--keystore", "tpm", "--tcti", &self.abrmd.tcti()])
            .args(["--no-restart", "--non-interactive"])
            .args(args);
        self.env(&mut c);
        c
    }

    fn tool(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        self.env(&mut c);
        c
    }

    /// The TPM Name of what `handle` holds now (tpm2_readpublic -n), or `None`.
    fn name(&self, handle: u32) -> Option<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("name");
        let ok = self
            .tool("tpm2_readpublic")
            .arg("-c")
            .arg(format!("0x{handle:08x}"))
            .arg("-n")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        ok.then(|| std::fs::read(&out).unwrap())
    }

    /// Another application's key, persisted at `handle`; returns its Name.
    fn foreign_key_at(&self, handle: u32) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("foreign.ctx");
        common::run_ok(
            self.tool("tpm2_createprimary")
                .args(["-C", "o", "-G", "ecc256", "-c"])
                .arg(&ctx),
        );
        common::run_ok(
            self.tool("tpm2_evictcontrol")
                .args(["-C", "o", "-c"])
                .arg(&ctx)
                .arg(format!("0x{handle:08x}")),
        );
        self.name(handle).expect("the foreign key is persisted")
    }

    /// Start a provisioning (RSA, so key generation is slow) and SIGKILL it as soon
    /// as its journal exists: a run killed while making the primary key.
    fn provision_killed_early(&self, fr: &FakeRoot) {
        let journal = fr.cert_file("sdv-provision.journal.json");
        let mut child = self
            .sdv(
                fr,
                &[
                    "--id-scope",
                    "0ne0012345A",
                    "--device-id",
                    "dev-own",
                    "--algorithm",
                    "rsa-2048",
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !journal.exists() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it journaled"
            );
            assert!(std::time::Instant::now() < end, "no journal within 60 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(journal.exists());
        assert_eq!(
            self.name(SECONDARY),
            None,
            "killed before the secondary key existed"
        );
    }
}

fn output(mut c: Command) -> (bool, String) {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Finding 1: a run killed while making the primary, then another application
/// persists a key at the planned secondary handle. The next run finishes the
/// interrupted one without evicting that key (it was planned, never recorded as
/// ours), says the handle is taken and which flag chooses another, and the foreign
/// key survives every later command byte for byte (its TPM Name).
#[test]
fn a_crash_then_a_foreign_key_at_the_planned_handle_is_left_alone() {
    require_tools!(Swtpm, Tpm2Tools, Openssl, Abrmd);
    let tpm = SharedTpm::start();
    let fr = FakeRoot::with_template();
    let root = &fr;
    tpm.provision_killed_early(root);
    let foreign = tpm.foreign_key_at(SECONDARY);

    let (ok, text) = output(tpm.sdv(
        root,
        &["--id-scope", "0ne0012345A", "--device-id", "dev-own"],
    ));
    assert!(!ok, "provisioned over a foreign key:\n{text}");
    assert!(text.contains("--tpm-secondary-handle"), "{text}");
    assert_eq!(tpm.name(SECONDARY).as_ref(), Some(&foreign), "{text}");
    assert!(!fr.cert_file("sdv-provision.journal.json").exists());

    let other = ["--tpm-secondary-handle", "0x81000012"];
    let args = [&OWN_ECDSA[..], &other].concat();
    let (ok, text) = output(tpm.sdv(root, &args));
    assert!(ok, "{text}");
    for cmd in [
        &["rotate"][..],
        &["rotate", "--promote"],
        &["reset", "--yes"],
    ] {
        let (ok, text) = output(tpm.sdv(root, cmd));
        assert!(ok, "{cmd:?}: {text}");
        assert_eq!(tpm.name(SECONDARY).as_ref(), Some(&foreign), "{cmd:?}");
    }
    assert_eq!(tpm.name(PRIMARY), None);
    assert_eq!(tpm.name(0x8100_0012), None);
}

/// Finding 1, second form: two `--root`s on one TPM with the same handles. Root B's
/// run is killed before its keys exist; root A then provisions at those handles. B's
/// next run must not "roll back" A's live keys: they were never B's.
#[test]
fn two_roots_on_one_tpm_never_remove_each_others_keys() {
    require_tools!(Swtpm, Tpm2Tools, Openssl, Abrmd);
    let tpm = SharedTpm::start();
    let (a, b) = (FakeRoot::with_template(), FakeRoot::with_template());
    tpm.provision_killed_early(&b);
    let (ok, text) = output(tpm.sdv(&a, &OWN_ECDSA));
    assert!(ok, "{text}");
    let names = (tpm.name(PRIMARY), tpm.name(SECONDARY));
    assert!(names.0.is_some() && names.1.is_some());

    let (ok, text) = output(tpm.sdv(&b, &["--id-scope", "0ne0012345A", "--device-id", "dev-own"]));
    assert!(!ok, "root B provisioned over root A's keys:\n{text}");
    assert!(text.contains("--tpm-primary-handle"), "{text}");
    assert_eq!((tpm.name(PRIMARY), tpm.name(SECONDARY)), names, "{text}");
    // B has nothing to reset (its identity never existed); either way A's keys stay.
    output(tpm.sdv(&b, &["reset", "--yes"]));
    assert_eq!((tpm.name(PRIMARY), tpm.name(SECONDARY)), names);
    let (ok, text) = output(tpm.sdv(&a, &["verify"]));
    assert!(ok, "root A's identity after root B's runs:\n{text}");
}

/// A TPM identity recorded before ownership proofs existed (no `tpm_names`): the
/// next mutating run records each key's Name once the handle's public area is shown
/// to equal the key's public blob; a handle whose key does not match its blob gets
/// no proof, and `reset` then leaves it in the TPM.
#[test]
fn an_older_state_gets_its_names_only_where_the_blobs_prove_them() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    let root = &d.fr.root();
    provision_json(&d, &["--algorithm", "ecdsa-p256"]);
    let state_path = cert_file(root, "sdv-provision.state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let names = state["tpm_names"].clone();
    assert_eq!(names.as_object().map(|m| m.len()), Some(2), "{state}");
    let mut old = state.clone();
    old.as_object_mut().unwrap().remove("tpm_names");
    std::fs::write(&state_path, serde_json::to_vec(&old).unwrap()).unwrap();
    sdv_ok(&d, &["provision", "--id-scope", "0ne0012345A"]);
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(again["tpm_names"], names, "the Names were recorded again");

    // The primary's public blob replaced by the secondary's: no proof for the
    // primary handle, so reset keeps that key.
    std::fs::write(&state_path, serde_json::to_vec(&old).unwrap()).unwrap();
    std::fs::copy(
        cert_file(root, "device2.tpm.pub"),
        cert_file(root, "device.tpm.pub"),
    )
    .unwrap();
    let out = sdv_ok(&d, &["reset", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be shown"), "{stderr}");
    assert_eq!(sorted(tpm.persistent_handles()), [SRK, PRIMARY]);
}
