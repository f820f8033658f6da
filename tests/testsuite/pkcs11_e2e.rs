//! `sdv-provision --keystore pkcs11` end to end: the built binary against a SoftHSM2
//! store of its own, then a mutual-TLS handshake in which `openssl s_client` loads the
//! key by the `KEY_URI` **read from the manifest the tool wrote**.
#![cfg(feature = "pkcs11")]
use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::device::{Device, Kind};
use common::fake_root::{assert_same_tree, snapshot, FakeRoot, Node, Snapshot, MANIFEST};
use common::softhsm::{PrivateStore, USER_PIN};
use serde_json::Value;

const CERT_DIR: &str = "data/var/certificates";

/// The device every test here starts: a [`FakeRoot`] with the Kanto template and a
/// SoftHSM store of its own (`None` when a tool is missing on a developer machine).
fn device() -> Option<Device> {
    Device::start(Kind::SoftHsm)
}

/// The binary on `d`'s root with only its store's environment (no inherited TPM or
/// PIN settings); the tests here give the keystore flags themselves.
fn tool(d: &Device) -> Command {
    d.env_cmd()
}

fn provision_args(d: &Device, alg: &str) -> Vec<String> {
    let store = d.token();
    [
        "--keystore",
        "pkcs11",
        "--pkcs11-module",
        store.module.to_str().unwrap(),
        "--pkcs11-pin-file",
        store.pin_file.to_str().unwrap(),
        "--non-interactive",
        "--no-restart",
        "--json",
        "provision",
        "--id-scope",
        "0ne0012345A",
        "--device-id",
        "52-54-21-4c-f9-5a",
        "--algorithm",
        alg,
    ]
    .map(String::from)
    .to_vec()
}

/// A fresh store and root, provisioned with ecdsa-p256 (the starting point of most
/// tests here).
fn provisioned() -> Option<Device> {
    let d = device()?;
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 0);
    Some(d)
}

/// [`provision_args`] with another `--pkcs11-pin-file` (`None`: no PIN source).
fn with_pin_file(mut args: Vec<String>, pin_file: Option<&Path>) -> Vec<String> {
    let at = args.iter().position(|a| a == "--pkcs11-pin-file").unwrap();
    match pin_file {
        Some(p) => args[at + 1] = p.display().to_string(),
        None => {
            args.drain(at..at + 2);
        }
    }
    args
}

/// The whole stderr of a run whose PIN (in `pin_file`, 0644 as the tests write it) the
/// token rejected, pinned.
fn assert_pin_rejected(stderr: &str, pin_file: &Path) {
    common::pin_file(
        stderr,
        &[("[PIN_FILE]", pin_file.display().to_string())],
        "pkcs11_e2e/wrong_pin",
    );
}

/// A refused run: its stderr is the snapshot `pinned`, and it changed nothing (see
/// [`assert_unchanged`]).
fn assert_refused(d: &Device, before: &Snapshot, stderr: &str, pinned: &str, objects: usize) {
    common::pin_file(stderr, &[], pinned);
    assert_unchanged(d, before, objects, pinned);
}

/// Nothing on disk changed since `before`, and the token holds `objects` objects.
fn assert_unchanged(d: &Device, before: &Snapshot, objects: usize, what: &str) {
    assert_same_tree(before, &snapshot(&d.fr.root()), what);
    assert_eq!(d.token().object_labels().len(), objects, "{what}");
}

/// The one line of `text` that starts with `prefix` (there must be exactly one).
fn only_line<'a>(text: &'a str, prefix: &str) -> &'a str {
    let lines: Vec<_> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(lines.len(), 1, "{text}");
    lines[0]
}

/// Run `cmd`, expect exit status `code`, and return what it printed.
fn run(cmd: &mut Command, code: i32) -> Output {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    out
}

/// What a run printed on stderr.
fn stderr_of(out: Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn env_entry<'a>(manifest: &'a Value, key: &str) -> Option<&'a str> {
    manifest["config"]["env"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
}

/// The (source, destination) pairs of `mounts`, or of `mount_points` in the
/// kanto-auto-deployer shape.
fn mounts(manifest: &Value) -> Vec<(String, String)> {
    manifest
        .get("mounts")
        .or_else(|| manifest.get("mount_points"))
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["source"].as_str().unwrap().to_owned(),
                m["destination"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn provision_cycle(alg: &str) {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let out = run(tool(&d).args(provision_args(&d, alg)), 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One line about today's connector, with both reasons (PKCS#11, DPS).
    let compat: Vec<_> = common::lines_containing(&stderr, "today's Leda cloud connector");
    assert_eq!(compat.len(), 1, "{stderr}");
    assert!(compat[0].starts_with("warning:"), "{stderr}");
    assert!(
        compat[0].contains("cannot use PKCS#11 keys yet")
            && compat[0].contains("needs a key file for DPS"),
        "{stderr}"
    );

    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["keystore"], "pkcs11");
    for (i, role) in ["primary", "secondary"].into_iter().enumerate() {
        let c = &report["certificates"][i];
        assert_eq!(c["role"], role);
        assert_eq!(c["algorithm"], alg);
        let uri = c["key_uri"].as_str().unwrap();
        assert!(
            uri.starts_with(&format!("pkcs11:token=leda;object=device-{role};id=%"))
                && uri.ends_with(";type=private"),
            "{uri}"
        );
    }

    // No key files in this mode; certificates verify.
    let certs = root.join(CERT_DIR);
    for f in ["device.key", "device2.key"] {
        assert!(
            !certs.join(f).exists(),
            "{f} must not exist with --keystore pkcs11"
        );
    }
    common::openssl_verify(&certs.join("device.crt"));
    common::openssl_verify(&certs.join("device2.crt"));

    // The manifest: KEY_URI with a pin-source, module, mounts; no key file entries.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root.join(MANIFEST)).unwrap()).unwrap();
    let key_uri = env_entry(&manifest, "KEY_URI").expect("KEY_URI").to_owned();
    assert_eq!(
        key_uri,
        format!(
            "{}?pin-source=file:/var/certificates/pkcs11.pin",
            report["certificates"][0]["key_uri"].as_str().unwrap()
        )
    );
    assert_eq!(
        env_entry(&manifest, "PKCS11_MODULE_PATH"),
        store.module.to_str()
    );
    for k in ["KEY_FILE", "KEY_PATH"] {
        assert_eq!(env_entry(&manifest, k), None, "{k} in PKCS#11 mode");
    }
    let m = mounts(&manifest);
    let has = |src: &Path| m.iter().any(|(s, _)| Path::new(s) == src);
    assert!(has(Path::new("/data/var/certificates/pkcs11.pin")), "{m:?}");
    assert!(has(&store.module), "{m:?}");
    assert!(has(&store.tokendir()), "{m:?}");
    assert!(has(&store.conf), "{m:?}");
    assert!(!m.iter().any(|(s, _)| s.ends_with(".key")), "{m:?}");

    // No PIN value in anything the tool wrote or printed.
    for (path, node) in d.fr.snapshot() {
        let Node::File { bytes, .. } = node else {
            continue;
        };
        let content = String::from_utf8_lossy(&bytes);
        assert!(!content.contains("pin-value"), "{}", path.display());
        if !path.ends_with("pkcs11.pin") {
            assert!(!content.contains(USER_PIN), "PIN in {}", path.display());
        }
    }
    assert!(!text(&out).contains(USER_PIN));

    // A real consumer loads the key by the manifest's URI. The pin-source names the
    // container path; on this host that is the mount's source under --root.
    let (uri, container_pin) = key_uri.split_once("?pin-source=file:").unwrap();
    let (source, _) = m
        .iter()
        .find(|(_, d)| d == container_pin)
        .expect("a mount for the PIN file");
    let host_pin = root.join(source.trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(&host_pin).unwrap(), USER_PIN);
    let client_uri = format!("{uri}?pin-source=file:{}", host_pin.display());
    let env = store.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::mtls_handshake(
        store.dir.path(),
        &certs.join("device.crt"),
        &[
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-key",
            &client_uri,
        ],
        true,
        &env,
    );

    // Re-running finds the objects and changes nothing.
    let objects = store.object_labels();
    assert_eq!(objects.len(), 6, "{objects:?}");
    let before = d.fr.snapshot();
    run(tool(&d).args(provision_args(&d, alg)), 0);
    assert_same_tree(&before, &d.fr.snapshot(), "a re-run");
    assert_eq!(store.object_labels(), objects);

    // Later commands find the token from the state file alone (recorded PIN file).
    run(tool(&d).args(["--non-interactive", "verify"]), 0);
}

tests_of!(provision_cycle:
    provision_rsa_2048 => ("rsa-2048"),
    provision_rsa_3072 => ("rsa-3072"),
    provision_ecdsa_p256 => ("ecdsa-p256"),
    provision_ecdsa_p384 => ("ecdsa-p384"),
);

#[test]
fn wrong_pin_fails_once_and_writes_nothing() {
    let Some(d) = device() else { return };
    let store = d.token();
    std::fs::write(&store.pin_file, "0000-wrong\n").unwrap();
    let before = d.fr.snapshot();
    let out = run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = only_line(&stderr, "error");
    assert!(error.contains("PIN was rejected"), "{stderr}");
    assert_pin_rejected(&stderr, &store.pin_file);
    assert!(!stderr.contains("0000-wrong"), "{stderr}");
    assert!(out.stdout.is_empty() || serde_json::from_slice::<Value>(&out.stdout).is_ok());
    assert_unchanged(&d, &before, 0, "a wrong PIN");
}

#[test]
fn failure_after_keygen_leaves_no_token_objects() {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    // Injected failure: the secondary certificate cannot be written (a directory sits
    // at its path), after both keys were generated in the token.
    std::fs::create_dir_all(root.join(CERT_DIR).join("device2.crt/blocker")).unwrap();
    let out = run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 1);
    assert_eq!(
        store.object_labels(),
        Vec::<String>::new(),
        "{}",
        text(&out)
    );
    assert!(!root.join(MANIFEST).exists());
}

#[test]
fn auto_picks_pkcs11_when_a_module_is_configured() {
    require_tools!(where common::tools::no_host_tpm());
    let Some(d) = device() else { return };
    let store = d.token();
    let mut args = provision_args(&d, "ecdsa-p256");
    // No --keystore and no --pkcs11-module: PKCS11_MODULE_PATH alone.
    args.drain(0..4);
    let out = run(
        tool(&d).env("PKCS11_MODULE_PATH", &store.module).args(args),
        0,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["keystore"], "pkcs11");
}

#[test]
fn reset_removes_the_token_objects() {
    let Some(d) = provisioned() else { return };
    let (store, root) = (d.token(), d.fr.root());
    assert_eq!(store.object_labels().len(), 6);
    run(tool(&d).args(["--non-interactive", "reset", "--yes"]), 0);
    assert!(store.object_labels().is_empty());
    assert!(!root.join(CERT_DIR).join("pkcs11.pin").exists());
}

/// A PIN file the user keeps in the certificates directory is read by the connector
/// as it is (no `pkcs11.pin` copy) and is not the tool's to delete on reset; the
/// `pkcs11.pin` an earlier run wrote stays after the switch (a container not yet
/// recreated may mount it) and goes with `reset`.
#[test]
fn reset_keeps_the_users_pin_file_and_removes_the_tools() {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let tools = root.join(CERT_DIR).join("pkcs11.pin");
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 0);
    assert!(tools.is_file());

    let own = root.join(CERT_DIR).join("token.pin");
    std::fs::copy(&store.pin_file, &own).unwrap();
    let mut args = with_pin_file(provision_args(&d, "ecdsa-p256"), Some(&own));
    args.push("--force".into());
    let out = run(tool(&d).args(&args), 0);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["manifest"]
            .as_str()
            .is_some_and(|m| std::fs::read_to_string(m)
                .unwrap()
                .contains("pin-source=file:/var/certificates/token.pin")),
        "{report}"
    );
    // The manifest names the user's file now. A container not yet recreated from it
    // may still mount the tool's copy of the PIN: that copy stays, until reset.
    assert!(
        tools.exists(),
        "removed while the old container may mount it"
    );
    // Later runs without a PIN flag read the recorded file and do not touch the copy.
    std::fs::remove_file(&tools).unwrap();
    let manifest = root.join(MANIFEST);
    let before = std::fs::read(&manifest).unwrap();
    run(
        tool(&d).args(["--non-interactive", "--no-restart", "rotate"]),
        0,
    );
    assert!(!tools.exists(), "rotate made a copy of the PIN");
    let key_uri = |bytes: &[u8]| {
        let m: Value = serde_json::from_slice(bytes).unwrap();
        env_entry(&m, "KEY_URI").map(str::to_owned)
    };
    assert_eq!(
        key_uri(&std::fs::read(&manifest).unwrap()),
        key_uri(&before)
    );
    // A reset that fails on a broken manifest changes nothing, PIN files included.
    std::fs::write(&manifest, b"{ not json").unwrap();
    let snap = d.fr.snapshot();
    run(tool(&d).args(["--non-interactive", "reset", "--yes"]), 1);
    assert_same_tree(&snap, &d.fr.snapshot(), "a reset on a broken manifest");
    std::fs::write(&manifest, &before).unwrap();
    std::fs::write(&tools, USER_PIN).unwrap(); // the copy left by the switch
    run(tool(&d).args(["--non-interactive", "reset", "--yes"]), 0);
    assert!(store.object_labels().is_empty());
    assert!(!tools.exists(), "the tool's PIN file outlived reset");
    assert_eq!(
        std::fs::read(&own).unwrap(),
        std::fs::read(&store.pin_file).unwrap()
    );
}

/// The kanto-auto-deployer manifest shape (`mount_points`, `/device.crt`, a
/// `device.key` mount) in PKCS#11 mode: the shape and the certificate's destination
/// are kept, the key-file mount and `KEY_FILE` go, and the PIN file, module, token
/// store and config get mounts (DESIGN §3).
#[test]
fn pkcs11_entries_in_the_auto_deployer_shape() {
    let Some(d) = Device::on(Kind::SoftHsm, FakeRoot::with_manifest) else {
        return;
    };
    let (store, root) = (d.token(), d.fr.root());
    let manifest_path = root.join(MANIFEST);
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 0);
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert!(manifest.get("mounts").is_none(), "shape converted");
    let pair = |s: &Path, d: &str| (s.display().to_string(), d.to_owned());
    let same = |p: &Path| pair(p, &p.display().to_string());
    assert_eq!(
        mounts(&manifest),
        [
            pair(
                Path::new("/data/var/certificates/device.crt"),
                "/device.crt"
            ),
            pair(Path::new("/data/var/mosquitto"), "/mosquitto"),
            pair(
                Path::new("/data/var/certificates/pkcs11.pin"),
                "/var/certificates/pkcs11.pin"
            ),
            same(&store.module),
            same(&store.tokendir()),
            same(&store.conf),
        ]
    );
    assert_eq!(env_entry(&manifest, "CERT_FILE"), Some("/device.crt"));
    assert!(env_entry(&manifest, "KEY_URI")
        .is_some_and(|u| u.ends_with("?pin-source=file:/var/certificates/pkcs11.pin")));
    assert_eq!(
        env_entry(&manifest, "PKCS11_MODULE_PATH"),
        store.module.to_str()
    );
    for k in ["KEY_FILE", "KEY_PATH", "CERT_PATH"] {
        assert_eq!(env_entry(&manifest, k), None, "{k}");
    }
    assert!(manifest["host_config"].get("devices").is_none());
}

/// `reset` with a wrong PIN fails before it changes anything: manifest, files and
/// token objects stay, and no journal is left for a later run to finish.
#[test]
fn reset_with_a_wrong_pin_changes_nothing() {
    let Some(d) = provisioned() else { return };
    let store = d.token();
    let before = d.fr.snapshot();
    let wrong = store.dir.path().join("wrong.pin");
    std::fs::write(&wrong, "0000-wrong\n").unwrap();
    let out = run(
        tool(&d)
            .arg("--pkcs11-pin-file")
            .arg(&wrong)
            .args(["--non-interactive", "reset", "--yes"]),
        1,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("PIN was rejected"), "{stderr}");
    assert_pin_rejected(&stderr, &wrong);
    assert_unchanged(&d, &before, 6, "a reset with a wrong PIN");
    // The identity is intact for the next runs.
    run(tool(&d).args(["--non-interactive", "verify"]), 0);
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 0);
    assert_same_tree(&before, &d.fr.snapshot(), "the run after it");
}

/// A PIN changed on the token: `verify` and `csr` with the new PIN only read (the
/// connector's PIN file keeps the old one: they run without the lock), and `verify`
/// fails on that stale file; the next command that logs in and writes (here
/// `rotate`) refreshes the tool's copy.
#[test]
fn read_only_commands_leave_the_connectors_pin_file_alone() {
    let Some(d) = provisioned() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let new_pin = "4321-new";
    store.change_user_pin(new_pin);
    let new_pin_file = store.dir.path().join("new.pin");
    std::fs::write(&new_pin_file, new_pin).unwrap();
    let before = d.fr.snapshot();
    let with_new_pin = |args: &[&str]| {
        let mut c = tool(&d);
        c.arg("--pkcs11-pin-file")
            .arg(&new_pin_file)
            .arg("--non-interactive")
            .args(args);
        c
    };
    let out = run(&mut with_new_pin(&["verify"]), 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fail = only_line(&stdout, "FAIL");
    assert!(
        fail.contains("keystore.pin_file") && fail.contains("pkcs11.pin"),
        "{stdout}"
    );
    // A PIN file of the user's in the certificates directory, holding the new PIN,
    // does not hide that the file the manifest names is stale.
    let mine = root.join(CERT_DIR).join("mine.pin");
    std::fs::write(&mine, new_pin).unwrap();
    let mut c = tool(&d);
    c.arg("--pkcs11-pin-file")
        .arg(&mine)
        .args(["--non-interactive", "verify"]);
    let out = run(&mut c, 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL keystore.pin_file: /data/var/certificates/pkcs11.pin"),
        "{stdout}"
    );
    std::fs::remove_file(&mine).unwrap();
    let csr = store.dir.path().join("device.csr");
    run(
        &mut with_new_pin(&["csr", "--role", "primary", "--out", csr.to_str().unwrap()]),
        0,
    );
    assert_same_tree(&before, &d.fr.snapshot(), "verify and csr");
    run(&mut with_new_pin(&["--no-restart", "rotate"]), 0);
    assert_eq!(
        std::fs::read_to_string(root.join(CERT_DIR).join("pkcs11.pin")).unwrap(),
        new_pin
    );
    run(&mut with_new_pin(&["verify"]), 0);
}

/// The recorded user PIN file in the certificates directory is the connector's only
/// while it holds the PIN the token accepts: a PIN changed on the token (new PIN from
/// the environment) or the file gone makes the run write the tool's `pkcs11.pin`,
/// and state, manifest and verify follow.
#[test]
fn a_stale_or_missing_user_pin_file_is_replaced_by_the_tools_copy() {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let own = root.join(CERT_DIR).join("token.pin");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::copy(&store.pin_file, &own).unwrap();
    let args = with_pin_file(provision_args(&d, "ecdsa-p256"), Some(&own));
    run(tool(&d).args(&args), 0);
    let tools = root.join(CERT_DIR).join("pkcs11.pin");
    let pin_source = || {
        let m: Value =
            serde_json::from_slice(&std::fs::read(root.join(MANIFEST)).unwrap()).unwrap();
        let uri = env_entry(&m, "KEY_URI").unwrap().to_owned();
        uri.split_once("?pin-source=file:").unwrap().1.to_owned()
    };
    assert_eq!(pin_source(), "/var/certificates/token.pin");

    // The PIN changes on the token; the next run gets the new one from the env.
    let new_pin = "4321-new";
    store.change_user_pin(new_pin);
    let rerun = |extra: &[&str]| {
        let mut args = with_pin_file(provision_args(&d, "ecdsa-p256"), None);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = tool(&d);
        c.env("SDV_PROVISION_PKCS11_PIN", new_pin).args(args);
        c
    };
    run(&mut rerun(&[]), 0);
    assert_eq!(std::fs::read_to_string(&tools).unwrap(), new_pin);
    assert_eq!(pin_source(), "/var/certificates/pkcs11.pin");
    assert_eq!(
        std::fs::read(&own).unwrap(),
        std::fs::read(&store.pin_file).unwrap()
    );
    let verify = |c: &mut Command| {
        c.env("SDV_PROVISION_PKCS11_PIN", new_pin)
            .args(["--non-interactive", "verify"]);
        run(c, 0)
    };
    verify(&mut tool(&d));

    // Back to the user's file (now holding the new PIN), then the file disappears.
    std::fs::write(&own, new_pin).unwrap();
    let args = with_pin_file(provision_args(&d, "ecdsa-p256"), Some(&own));
    let mut c = tool(&d);
    run(c.args(&args).arg("--force"), 0);
    assert_eq!(pin_source(), "/var/certificates/token.pin");
    std::fs::remove_file(&own).unwrap();
    run(&mut rerun(&[]), 0);
    assert_eq!(pin_source(), "/var/certificates/pkcs11.pin");
    assert_eq!(std::fs::read_to_string(&tools).unwrap(), new_pin);
    verify(&mut tool(&d));
}

/// `--force` to the file keystore: the token's objects go; the tool's copy of the PIN
/// stays (a container not yet recreated may mount it) until `reset`.
#[test]
fn force_to_the_file_keystore_removes_the_tokens_objects() {
    let Some(d) = provisioned() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let tools = root.join(CERT_DIR).join("pkcs11.pin");
    assert!(tools.is_file());
    let to_file = [
        "--keystore",
        "file",
        "--non-interactive",
        "--no-restart",
        "provision",
        "--algorithm",
        "ecdsa-p256",
    ];
    run(tool(&d).args(to_file).arg("--force"), 0);
    assert!(store.object_labels().is_empty(), "the token's objects stay");
    assert!(root.join(CERT_DIR).join("device.key").is_file());
    run(tool(&d).args(to_file), 0);
    assert!(
        tools.is_file(),
        "removed while an old container may mount it"
    );
    run(tool(&d).args(["--non-interactive", "reset", "--yes"]), 0);
    assert!(!tools.exists(), "the tool's copy of the PIN outlived reset");
}

/// `--force` with another token label would have to remove the old keys through a
/// store of the other token: refused before anything is made, with the way out.
#[test]
fn force_to_another_token_is_refused_before_anything_changes() {
    let Some(d) = provisioned() else { return };
    let before = d.fr.snapshot();
    let stderr = stderr_of(run(
        tool(&d)
            .args(["--pkcs11-token", "other"])
            .args(provision_args(&d, "ecdsa-p256"))
            .arg("--force"),
        1,
    ));
    assert!(
        stderr.contains("token leda") && stderr.contains("reset --yes"),
        "{stderr}"
    );
    assert_refused(&d, &before, &stderr, "pkcs11_e2e/force_to_another_token", 6);
}

/// No PIN source and no terminal: a missing answer (exit 2, like a missing
/// --id-scope), one error line naming where to give the PIN, nothing written.
#[test]
fn missing_pin_in_a_non_interactive_run_is_a_usage_error() {
    let Some(d) = device() else { return };
    let before = d.fr.snapshot();
    let args = with_pin_file(provision_args(&d, "ecdsa-p256"), None);
    let stderr = stderr_of(run(tool(&d).args(&args), 2));
    let error = only_line(&stderr, "error");
    assert!(
        error.contains("--pkcs11-pin-file") && error.contains("SDV_PROVISION_PKCS11_PIN"),
        "{stderr}"
    );
    assert_refused(&d, &before, &stderr, "pkcs11_e2e/missing_pin", 0);
}

/// With a terminal and no PIN source, the PIN is asked for once, hidden.
#[test]
fn interactive_pin_prompt_is_hidden() {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let mut cmd = tool(&d);
    // On the pty: `FakeRoot::cmd` points stdin at /dev/null.
    cmd.stdin(std::process::Stdio::inherit());
    cmd.args(["--keystore", "pkcs11", "--pkcs11-module"])
        .arg(&store.module)
        .args(["--no-restart", "provision", "--id-scope", "0ne0012345A"])
        .args(["--device-id", "dev-pty", "--algorithm", "ecdsa-p256"]);
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).unwrap();
    p.exp_string("User PIN of PKCS#11 token leda").unwrap();
    crate::common::pty::wait_for_hidden_input(&p);
    p.send_line(USER_PIN).unwrap();
    let rest = p.exp_eof().unwrap();
    assert!(rest.contains("thumbprint"), "{rest}");
    assert!(!rest.contains(USER_PIN), "the PIN was echoed: {rest}");
    // dialoguer redraws the answered prompt as "[hidden]"; a second prompt would also
    // stall exp_eof until the timeout.
    assert!(
        rest.matches("User PIN of").count() <= 1,
        "asked twice: {rest}"
    );
    match p.process.wait().unwrap() {
        rexpect::process::wait::WaitStatus::Exited(_, 0) => {}
        other => panic!("{other:?}: {rest}"),
    }
    assert_eq!(store.object_labels().len(), 6);
    // The accepted PIN is what the connector's PIN file holds.
    assert_eq!(
        std::fs::read_to_string(root.join(CERT_DIR).join("pkcs11.pin")).unwrap(),
        USER_PIN
    );
}

/// `--pkcs11-init-token` on a blank slot, SO PIN from a file named by the environment;
/// never from argv. Without an SO PIN the error names where to put it.
#[test]
fn init_token_from_the_command_line() {
    let Some(d) = device() else { return };
    let store = d.token();
    let mut args = provision_args(&d, "ecdsa-p256");
    args.splice(
        0..0,
        ["--pkcs11-token", "fresh", "--pkcs11-init-token"].map(String::from),
    );

    let stderr = stderr_of(run(tool(&d).args(&args), 1));
    assert!(
        stderr.contains("SDV_PROVISION_PKCS11_SO_PIN_FILE"),
        "{stderr}"
    );

    let so_pin = store.dir.path().join("so.pin");
    std::fs::write(&so_pin, format!("{}\n", common::softhsm::SO_PIN)).unwrap();
    let out = run(
        tool(&d)
            .env("SDV_PROVISION_PKCS11_SO_PIN_FILE", &so_pin)
            .args(&args),
        0,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["certificates"][0]["key_uri"]
        .as_str()
        .unwrap()
        .starts_with("pkcs11:token=fresh;"));
    // The new token is an ordinary token now: later commands need no SO PIN.
    run(tool(&d).args(["--non-interactive", "verify"]), 0);
}

/// The manifest cannot be written (its directory is immutable) after the keys were
/// made. A new identity is written to the manifest before it is committed, so the
/// failure removes the new token objects again: no state, no objects. The next run
/// then provisions normally.
#[test]
fn manifest_write_failure_leaves_no_orphans() {
    require_tools!(Chattr);
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let manifests = root.join("data/var/containers/manifests");
    let Some(guard) = common::tools::immutable(&manifests) else {
        return;
    };
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 1);
    drop(guard);

    assert!(
        !root
            .join(CERT_DIR)
            .join("sdv-provision.state.json")
            .exists(),
        "no identity is committed when its manifest cannot be written"
    );
    let labels = store.object_labels();
    assert!(labels.is_empty(), "objects left in the token: {labels:?}");
    run(tool(&d).args(provision_args(&d, "ecdsa-p256")), 0);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root.join(MANIFEST)).unwrap()).unwrap();
    let key_uri = env_entry(&manifest, "KEY_URI").unwrap();
    let state: Value = serde_json::from_slice(
        &std::fs::read(root.join(CERT_DIR).join("sdv-provision.state.json")).unwrap(),
    )
    .unwrap();
    let primary = state["keys"]["primary"].as_str().unwrap();
    assert!(key_uri.starts_with(primary), "{key_uri} vs {primary}");
    assert_eq!(store.object_labels().len(), 6);
}

/// Paths are compared after resolution, never as text. Before: a PIN file at
/// `…/certificates/../../../etc/x.pin` counted as inside the certificates directory,
/// and that path was mounted into the container; and SoftHSM's config was read taking
/// the first `directories.tokendir` (SoftHSM takes the last), so a first line of `/`
/// gave an empty mount source.
#[test]
fn pin_file_and_token_dir_are_compared_after_resolution() {
    let Some(d) = device() else { return };
    let (store, root) = (d.token(), d.fr.root());
    let conf = std::fs::read_to_string(&store.conf).unwrap();
    std::fs::write(
        &store.conf,
        format!("directories.tokendir = /\n# directories.tokendir = /etc\n{conf}"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join(CERT_DIR)).unwrap();
    std::fs::copy(&store.pin_file, root.join("etc/x.pin")).unwrap();
    let climbing = root.join(CERT_DIR).join("../../../etc/x.pin");
    let args = with_pin_file(provision_args(&d, "ecdsa-p256"), Some(&climbing));
    run(tool(&d).args(&args), 0);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root.join(MANIFEST)).unwrap()).unwrap();
    let uri = env_entry(&manifest, "KEY_URI").unwrap();
    assert!(
        uri.ends_with("pin-source=file:/var/certificates/pkcs11.pin"),
        "{uri}"
    );
    assert!(root.join(CERT_DIR).join("pkcs11.pin").is_file());
    let sources: Vec<String> = mounts(&manifest).into_iter().map(|(s, _)| s).collect();
    for s in &sources {
        assert!(!s.contains("..") && !s.contains("x.pin"), "{sources:?}");
        assert!(s.len() > 1, "a mount of {s:?}: {sources:?}");
    }
    let tokendir = store.tokendir().display().to_string();
    assert!(sources.contains(&tokendir), "{tokendir} not in {sources:?}");
}

/// pkcs11-tool on this store, logged in.
/// Every object with CKA_ID `id` as pkcs11-tool lists it (all its attributes), plus
/// its public key's DER: what must stay byte for byte.
fn objects_with_id(store: &PrivateStore, id: &str) -> String {
    let out = common::run_ok(store.pkcs11_tool().arg("--list-objects"));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut blocks = Vec::new();
    for block in listing
        .split("\n")
        .fold(Vec::<String>::new(), |mut acc, line| {
            if !line.starts_with(' ') || acc.is_empty() {
                acc.push(String::new());
            }
            let last = acc.last_mut().unwrap();
            last.push_str(line);
            last.push('\n');
            acc
        })
    {
        if block
            .lines()
            .any(|l| l.trim() == format!("ID:         {id}"))
        {
            blocks.push(block);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let der = dir.path().join("pub.der");
    common::run_ok(
        store
            .pkcs11_tool()
            .args(["--read-object", "--type", "pubkey", "--id", id, "-o"])
            .arg(&der),
    );
    format!(
        "{}\n{}",
        blocks.join(""),
        hex::encode(std::fs::read(der).unwrap())
    )
}

/// Finding 4: a key pair someone else made under the live label `device-primary`
/// (another CKA_ID) survives `rotate`, `rotate --promote`, `provision --force` and
/// `reset`, byte for byte: the tool finds its objects by CKA_ID and label, and no
/// step sweeps a label.
#[test]
fn a_foreign_pair_under_our_label_survives_promote_and_reset() {
    let Some(d) = provisioned() else { return };
    let store = d.token();
    store.foreign_keypair("device-primary", "0102");
    let foreign = objects_with_id(store, "0102");
    assert_eq!(
        foreign.matches("label:      device-primary").count(),
        2,
        "{foreign}"
    );
    let base: Vec<String> = provision_args(&d, "ecdsa-p256")[..6].to_vec();
    let cmds: [&[&str]; 4] = [
        &["rotate"],
        &["rotate", "--promote"],
        &[
            "provision",
            "--force",
            "--id-scope",
            "0ne0012345A",
            "--device-id",
            "52-54-21-4c-f9-5a",
        ],
        &["reset", "--yes"],
    ];
    for cmd in cmds {
        run(
            tool(&d)
                .args(&base)
                .args(["--non-interactive", "--no-restart"])
                .args(cmd),
            0,
        );
        assert_eq!(objects_with_id(store, "0102"), foreign, "after {cmd:?}");
    }
    // Only the foreign pair is left.
    assert_eq!(store.object_labels(), ["device-primary", "device-primary"]);
}

/// Finding 2: a state file's recorded `mounts` are never replayed into the manifest.
/// An edited state adding the host's `/` is refused as edited, with nothing changed;
/// one adding `/etc` (a clean path) mounts nothing new: the manifest's mounts come
/// from the configuration (the module and SoftHSM's config) on every run.
#[test]
fn mounts_come_from_the_configuration_never_from_the_state() {
    let Some(d) = provisioned() else { return };
    let root = d.fr.root();
    let state_path = root.join(CERT_DIR).join("sdv-provision.state.json");
    let manifest_path = root.join(MANIFEST);
    let read = |p: &Path| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let before = mounts(&read(&manifest_path));
    let mut state = read(&state_path);
    let rerun = || {
        tool(&d)
            .args(provision_args(&d, "ecdsa-p256"))
            .output()
            .unwrap()
    };

    state["backend"]["mounts"] = serde_json::json!(["/"]);
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let tree = d.fr.snapshot();
    let out = rerun();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sdv-provision.state.json") && err.contains("edited or corrupt"),
        "{err}"
    );
    common::pin_file(
        &err,
        &[("[ROOT]", root.display().to_string())],
        "pkcs11_e2e/state_edited",
    );
    assert_same_tree(&tree, &d.fr.snapshot(), "an edited state");

    state["backend"]["mounts"] = serde_json::json!(["/etc"]);
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let out = rerun();
    assert!(out.status.success(), "{}", text(&out));
    let after = mounts(&read(&manifest_path));
    assert!(after.iter().all(|(src, _)| src != "/etc"), "{after:?}");
    assert_eq!(after, before);
}

/// A journal edited to name objects that are not the identity's (a foreign pair
/// under our label, by its CKA_ID; another token's object) is refused before the
/// token is opened: one error naming the journal, the tree and the foreign objects
/// unchanged.
#[test]
fn an_edited_journal_naming_foreign_objects_touches_nothing() {
    let Some(d) = provisioned() else { return };
    let (store, root) = (d.token(), d.fr.root());
    store.foreign_keypair("device-primary", "0102");
    let foreign = objects_with_id(store, "0102");
    let base: Vec<String> = provision_args(&d, "ecdsa-p256")[..6].to_vec();
    for (uri, pinned) in [
        (
            "pkcs11:token=leda;object=device-primary;id=%01%02;type=private",
            "pkcs11_e2e/journal_edited_not_recorded",
        ),
        (
            "pkcs11:token=leda;object=someone-else;id=%01%02;type=private",
            "pkcs11_e2e/journal_edited_not_ours",
        ),
    ] {
        let journal = serde_json::json!({
            "phase": "committed", "version": 1, "keystore": "pkcs11",
            "old_keys": [{"uri": uri}], "old_removed": false, "moves": [],
            "next_state": null, "remove_files": []
        });
        let path = root.join(CERT_DIR).join("sdv-provision.journal.json");
        std::fs::write(&path, serde_json::to_vec(&journal).unwrap()).unwrap();
        let tree = d.fr.snapshot();
        for cmd in [&["rotate"][..], &["reset", "--yes"]] {
            let out = run(
                tool(&d)
                    .args(&base)
                    .args(["--non-interactive", "--no-restart"])
                    .args(cmd),
                1,
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("sdv-provision.journal.json") && err.contains("edited or corrupt"),
                "{uri} {cmd:?}: {err}"
            );
            let at = ("[ROOT]", root.display().to_string());
            common::pin_file(&err, &[at], pinned);
            assert_same_tree(&tree, &d.fr.snapshot(), "an edited journal");
            assert_eq!(objects_with_id(store, "0102"), foreign, "{uri} {cmd:?}");
        }
        std::fs::remove_file(&path).unwrap();
    }
    assert_eq!(
        store.object_labels().len(),
        8,
        "the identity's six and the foreign pair"
    );
}
