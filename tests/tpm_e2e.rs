//! The built binary with `--keystore tpm` against a real swtpm: provision, the
//! manifest's TPM entries, a mutual-TLS 1.3 handshake with the key named by the
//! manifest's `KEY_URI`, re-run, rotation, verify, reset, and the user-facing errors.
#![cfg(feature = "tpm")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::fake_root::{assert_same_tree, put_fixture, snapshot, MANIFEST, TEMPLATE};
use common::swtpm::{cert_file, Abrmd, Swtpm};

const SRK: u32 = 0x8100_0001;
const PRIMARY: u32 = 0x8100_0010;
const SECONDARY: u32 = 0x8100_0011;

fn have_tools() -> bool {
    common::require("swtpm", "TPM end-to-end tests need a software TPM")
        && common::require("tpm2_getcap", "tpm2-tools check what the tool made")
        && common::require("openssl", "certificates are checked with openssl")
}

/// A device root with the Kanto connector template in place.
fn device_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    put_fixture(root.path(), "cloudconnector.kanto.json.template", TEMPLATE);
    root
}

fn manifest_path(root: &Path) -> PathBuf {
    root.join(MANIFEST)
}

fn sdv(tpm: &Swtpm, root: &Path, args: &[&str]) -> Output {
    common::tool()
        .args(["--keystore", "tpm", "--tcti", &tpm.tcti(), "--root"])
        .arg(root)
        .args(["--no-restart", "--non-interactive"])
        .args(args)
        .env_remove("TPM2TOOLS_TCTI")
        .env_remove("TCTI")
        .output()
        .expect("run sdv-provision")
}

fn sdv_ok(tpm: &Swtpm, root: &Path, args: &[&str]) -> Output {
    let out = sdv(tpm, root, args);
    assert!(
        out.status.success(),
        "sdv-provision {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn provision_json(tpm: &Swtpm, root: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--id-scope",
        "0ne0012345A",
        "--device-id",
        "dev-e2e-1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = sdv_ok(tpm, root, &args);
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

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort();
    v
}

fn tls_with_manifest_key(tpm: &Swtpm, root: &Path) {
    let uri = env_value(&manifest_env(root), "KEY_URI").expect("KEY_URI in the manifest");
    let abrmd = Abrmd::start(tpm);
    let env = abrmd.provider_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    common::mtls_handshake(
        dir.path(),
        &cert_file(root, "device.crt"),
        &["-provider", "tpm2", "-provider", "default", "-key", &uri],
        true,
        &env,
    );
}

#[test]
fn provision_manifest_tls_rerun_rotate_verify_reset() {
    if !have_tools() || !Abrmd::available() {
        return;
    }
    let tpm = Swtpm::start();
    let root = device_root();
    let root = root.path();

    let json = provision_json(&tpm, root, &[]);
    assert_eq!(json["keystore"], "tpm");
    assert_eq!(json["certificates"][0]["key_uri"], "handle:0x81000010");
    assert_eq!(json["certificates"][1]["key_uri"], "handle:0x81000011");
    assert_eq!(json["certificates"][0]["algorithm"], "rsa-2048");

    // The manifest: the key by URI plus what today's connector needs, no key file.
    let env = manifest_env(root);
    for (k, v) in [
        ("KEY_URI", "handle:0x81000010"),
        ("TPM_DEVICE", "/dev/tpmrm0"),
        ("TPM_HANDLE", "0x81000001"),
        ("TPM_KEY", "/var/certificates/device.tpm.priv"),
        ("TPM_KEY_PUB", "/var/certificates/device.tpm.pub"),
        ("TPM2OPENSSL_TCTI", "device:/dev/tpmrm0"),
        ("CERT_FILE", "/var/certificates/device.crt"),
    ] {
        assert_eq!(env_value(&env, k).as_deref(), Some(v), "{k} in {env:?}");
    }
    assert!(env_value(&env, "KEY_FILE").is_none(), "{env:?}");
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

    // A consumer loads the key by the manifest's KEY_URI: mutual TLS 1.3.
    tls_with_manifest_key(&tpm, root);

    // Re-running changes nothing.
    let again = provision_json(&tpm, root, &[]);
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
    sdv_ok(&tpm, root, &["rotate"]);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    let new_secondary = common::openssl_sha1(&cert_file(root, "device2.crt"));
    assert_ne!(new_secondary, json["certificates"][1]["sha1_thumbprint"]);
    let secondary_key = tpm.public_pem(SECONDARY);
    sdv_ok(&tpm, root, &["rotate", "--promote"]);
    assert_eq!(
        common::openssl_sha1(&cert_file(root, "device.crt")),
        new_secondary
    );
    assert_eq!(tpm.public_pem(PRIMARY), secondary_key);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY]
    );
    sdv_ok(&tpm, root, &["verify"]);

    // Reset removes our handles and blobs, and only those.
    sdv_ok(&tpm, root, &["reset", "--yes"]);
    assert_eq!(tpm.persistent_handles(), vec![SRK]);
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
    if !have_tools() || !Abrmd::available() {
        return;
    }
    let tpm = Swtpm::start();
    let root = device_root();
    let out = sdv_ok(
        &tpm,
        root.path(),
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
    let compat: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("today's Leda cloud connector"))
        .collect();
    assert_eq!(compat.len(), 1, "one line, both reasons: {stderr}");
    assert!(
        compat[0].contains("RSA-PSS")
            && compat[0].contains("--algorithm rsa-2048")
            && compat[0].contains("needs a key file for DPS"),
        "warns that today's connector needs RSA and a key file for DPS: {stderr}"
    );
    assert_eq!(
        common::openssl_cert_pubkey(&cert_file(root.path(), "device.crt")),
        tpm.public_pem(PRIMARY)
    );
    tls_with_manifest_key(&tpm, root.path());
}

#[test]
fn occupied_handle_is_refused_and_nothing_is_left_half_made() {
    if !have_tools() {
        return;
    }
    let tpm = Swtpm::start();
    tpm.foreign_key_at(SECONDARY, true);
    let foreign = tpm.public_pem(SECONDARY);
    let root = device_root();
    let out = sdv(
        &tpm,
        root.path(),
        &["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-3"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("0x81000011") && stderr.contains("--tpm-secondary-handle"),
        "{stderr}"
    );
    // The foreign key is untouched, and the primary made before the failure is gone.
    assert_eq!(tpm.public_pem(SECONDARY), foreign);
    assert!(!tpm.persistent_handles().contains(&PRIMARY));

    let json = provision_json(&tpm, root.path(), &["--tpm-secondary-handle", "0x81000021"]);
    assert_eq!(json["certificates"][1]["key_uri"], "handle:0x81000021");
    assert_eq!(tpm.public_pem(SECONDARY), foreign);

    // Later runs remember the chosen handle without the flag: rotation stages at
    // 0x81000121 and lands back on 0x81000021; the foreign key is never touched.
    sdv_ok(&tpm, root.path(), &["rotate"]);
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY, 0x8100_0021]
    );
    sdv_ok(&tpm, root.path(), &["verify"]);
    sdv_ok(&tpm, root.path(), &["reset", "--yes"]);
    assert_eq!(sorted(tpm.persistent_handles()), vec![SRK, SECONDARY]);
    assert_eq!(tpm.public_pem(SECONDARY), foreign);
    assert!(!cert_file(root.path(), "device2.tpm.pub").exists());
}

#[test]
fn unreachable_tpm_is_one_clear_error() {
    let root = device_root();
    let tcti = format!("swtpm:host=127.0.0.1,port={}", common::free_port());
    let out = common::tool()
        .args(["--keystore", "tpm", "--tcti", &tcti, "--root"])
        .arg(root.path())
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
    let errors: Vec<_> = stderr.lines().filter(|l| l.contains(&tcti)).collect();
    assert_eq!(errors.len(), 1, "one line names the TCTI: {stderr}");
    assert!(
        errors[0].contains("--tcti") && errors[0].contains("--keystore file"),
        "{stderr}"
    );
    assert!(!manifest_path(root.path()).exists(), "nothing written");
}

/// The kanto-auto-deployer manifest shape (`mount_points`, `/device.crt`, a
/// `device.key` mount, no `host_config.devices`) in TPM mode: the shape is kept, the
/// key-file mount and `KEY_FILE` go, the blobs get mounts of their own, the TPM device
/// is added, and foreign mounts stay (DESIGN §3).
#[test]
fn tpm_entries_in_the_auto_deployer_shape() {
    if !have_tools() {
        return;
    }
    let tpm = Swtpm::start();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    put_fixture(root, "cloudconnector.auto-deployer.json", MANIFEST);
    provision_json(&tpm, root, &[]);
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
        ]
    );
    let env = manifest_env(root);
    for (k, v) in [
        ("CERT_FILE", "/device.crt"),
        ("KEY_URI", "handle:0x81000010"),
        ("TPM_DEVICE", "/dev/tpmrm0"),
        ("TPM_HANDLE", "0x81000001"),
        ("TPM_KEY", "/var/certificates/device.tpm.priv"),
        ("TPM_KEY_PUB", "/var/certificates/device.tpm.pub"),
        ("TPM2OPENSSL_TCTI", "device:/dev/tpmrm0"),
        ("ID_SCOPE", "0ne0012345A"),
    ] {
        assert_eq!(env_value(&env, k).as_deref(), Some(v), "{k} in {env:?}");
    }
    for k in ["KEY_FILE", "KEY_PATH", "CERT_PATH"] {
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
    if !have_tools() {
        return;
    }
    let tpm = Swtpm::start();
    for how in ["--tcti", "TPM2TOOLS_TCTI", "TCTI"] {
        let root = device_root();
        let mut cmd = common::tool();
        cmd.arg("--root")
            .arg(root.path())
            .args(["--no-restart", "--non-interactive", "--json"])
            .args(["--id-scope", "0ne0012345A", "--device-id", "dev-auto"])
            .env_remove("TPM2TOOLS_TCTI")
            .env_remove("TCTI");
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
        // The next identity on the same TPM needs the handles free again.
        sdv_ok(&tpm, root.path(), &["reset", "--yes"]);
    }
}

/// `reset` with the TPM gone fails before it changes anything, and once the TPM is
/// back the identity is intact (no journal left for a later run to finish).
#[test]
fn reset_with_the_tpm_gone_changes_nothing() {
    if !have_tools() {
        return;
    }
    let mut tpm = Swtpm::start();
    let root = device_root();
    let root = root.path();
    provision_json(&tpm, root, &["--algorithm", "ecdsa-p256"]);
    let before = snapshot(root);
    tpm.kill();
    let out = sdv(&tpm, root, &["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{stderr}"
    );
    assert_same_tree(&before, &snapshot(root), "a reset with the TPM gone");
    tpm.restart();
    sdv_ok(&tpm, root, &["verify"]);
    assert_eq!(sorted(tpm.persistent_handles()), [SRK, PRIMARY, SECONDARY]);
}

/// A TPM whose owner hierarchy has a password: without it (or with a wrong one) the
/// error names where to give it; from a file it works; it never shows up in output
/// or files.
#[test]
fn owner_hierarchy_password_from_env_or_file() {
    if !have_tools() {
        return;
    }
    const PASSWORD: &str = "s3cret-owner-pw";
    let tpm = Swtpm::start();
    common::run_ok(tpm.tool("tpm2_changeauth").args(["-c", "owner", PASSWORD]));
    let root = device_root();
    let args = ["--id-scope", "0ne0012345A", "--device-id", "dev-e2e-5"];
    let run = |env: &[(&str, &str)]| {
        let mut c = common::tool();
        c.args(["--keystore", "tpm", "--tcti", &tpm.tcti(), "--root"])
            .arg(root.path())
            .args(["--no-restart", "--non-interactive"])
            .args(args)
            .env_remove("SDV_PROVISION_TPM_OWNER_AUTH")
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
    for entry in walk(root.path()) {
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
