//! Secrets never leak (DESIGN §6 "Permissions", "Output and logs").
//!
//! On each keystore (file, SoftHSM, swtpm) every command — provision, status, verify,
//! rotate, rotate --promote, csr, import-cert, reset — runs in text and `--json`, with
//! no logging, `-v` and `-vv`, against a Hub connection string carrying a
//! SharedAccessKey (given through the environment, never argv). All stdout and stderr
//! is searched for the PKCS#11 user PIN, the SO PIN (`--pkcs11-init-token`), the
//! SharedAccessKey, the TPM owner password, `PRIVATE KEY` and the base64 lines of
//! every private key file the run made. After every command: every file under the root
//! that holds a secret is 0600, the SO PIN and owner password are in no file, the
//! fake `kanto-cm`/`systemctl` saw no secret in their argv, and `$TMPDIR` (an empty
//! directory of its own) is still empty.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fake_root::*;

#[cfg(feature = "tpm")]
const OWNER_PASSWORD: &str = "tpm-owner-pw-must-never-show";

/// The commands of one pass, in an order that makes sense on one root.
fn commands(import: &Path) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    vec![
        s(&[
            "provision",
            "--device-id",
            ETH0_ID,
            "--algorithm",
            "ecdsa-p256",
        ]),
        s(&["status"]),
        s(&["verify"]),
        s(&["rotate"]),
        s(&["rotate", "--promote"]),
        s(&["csr", "--role", "primary"]),
        // Filled in by the driver: a copy of the live primary certificate.
        s(&["import-cert", "--role", "primary", import.to_str().unwrap()]),
        s(&["provision"]),
        s(&["reset", "--yes"]),
    ]
}

struct Secrets {
    /// Strings that must never be printed, nor be in argv of a child.
    never_printed: Vec<(&'static str, String)>,
    /// Strings that must be in no file at all.
    never_stored: Vec<(&'static str, String)>,
    /// Strings that may be stored, but only in 0600 files.
    stored_0600: Vec<String>,
    /// Files that must have been found holding a secret (so the mode check ran).
    secret_files: Vec<&'static str>,
}

/// Base64 body lines of every PEM private key under `root` (the file keystore's).
fn private_key_lines(root: &Path, into: &mut Vec<String>) {
    for p in walk(root) {
        let Ok(text) = fs::read_to_string(&p) else {
            continue;
        };
        if !text.contains("PRIVATE KEY-----") {
            continue;
        }
        for l in text.lines() {
            if !l.starts_with("-----") && l.len() >= 16 && !into.iter().any(|x| x == l) {
                into.push(l.to_owned());
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(walk(&p));
        } else if m.is_file() {
            out.push(p);
        }
    }
    out
}

/// Run every command in every output mode; `base` builds the command for one run
/// (root, keystore flags, environment) and `first` adds arguments to the first
/// provisioning of a pass (e.g. `--pkcs11-init-token`).
fn drive(
    what: &str,
    mut fresh: impl FnMut() -> (FakeRoot, Box<dyn Fn(&FakeRoot) -> Command>),
    first: &[&str],
    secrets: &Secrets,
) -> usize {
    let mut runs = 0;
    let mut key_lines: Vec<String> = Vec::new();
    let mut secret_files = std::collections::BTreeSet::new();
    for json in [false, true] {
        for verbosity in [None, Some("-v"), Some("-vv")] {
            let (fr, base) = fresh();
            let tmp = fr.dir.path().join("tmpdir");
            fs::create_dir(&tmp).unwrap();
            let import = fr.dir.path().join("import.pem");
            let mut seen = String::new();
            for (i, args) in commands(&import).into_iter().enumerate() {
                if args[0] == "import-cert" {
                    fs::copy(fr.cert_file("device.crt"), &import).unwrap();
                }
                let mut cmd = base(&fr);
                cmd.env("TMPDIR", &tmp);
                if json {
                    cmd.arg("--json");
                }
                if let Some(v) = verbosity {
                    cmd.arg(v);
                }
                cmd.args(&args);
                if i == 0 {
                    cmd.args(first);
                }
                let run = Run::from(cmd.output().unwrap());
                runs += 1;
                let label = format!("{what} json={json} {verbosity:?} {args:?}");
                assert_eq!(run.code, Some(0), "{label}:\n{run}");
                for (name, s) in &secrets.never_printed {
                    assert!(
                        !run.all().contains(s.as_str()),
                        "{label} printed the {name}:\n{run}"
                    );
                }
                assert!(
                    !run.all().contains("PRIVATE KEY"),
                    "{label} printed a private key:\n{run}"
                );
                private_key_lines(&fr.root(), &mut key_lines);
                seen.push_str(&run.all());
                // Files: secrets only in 0600 files, some secrets nowhere.
                for p in walk(&fr.root()) {
                    let bytes = fs::read(&p).unwrap();
                    let text = String::from_utf8_lossy(&bytes);
                    let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                    for (name, s) in &secrets.never_stored {
                        assert!(
                            !text.contains(s.as_str()),
                            "{label}: the {name} is in {}",
                            p.display()
                        );
                    }
                    let secret = text.contains("PRIVATE KEY")
                        || secrets
                            .stored_0600
                            .iter()
                            .any(|s| text.contains(s.as_str()));
                    if secret {
                        secret_files.insert(p.file_name().unwrap().to_string_lossy().into_owned());
                        assert_eq!(
                            mode,
                            0o600,
                            "{label}: {} holds a secret and is {mode:o}",
                            p.display()
                        );
                    }
                }
                let left: Vec<_> = fs::read_dir(&tmp).unwrap().flatten().collect();
                assert!(left.is_empty(), "{label} left {left:?} in $TMPDIR");
            }
            for l in &key_lines {
                assert!(
                    !seen.contains(l.as_str()),
                    "{what}: a private key line was printed"
                );
            }
            // The fakes record their argv: no secret on a child's command line.
            let calls = fr.calls().join("\n");
            assert!(
                !calls.is_empty(),
                "{what}: the connector was never restarted"
            );
            let env = fr.child_env();
            for (name, s) in &secrets.never_printed {
                assert!(
                    !calls.contains(s.as_str()),
                    "{what}: the {name} was in argv: {calls}"
                );
                assert!(
                    !env.contains(s.as_str()),
                    "{what}: the {name} was in a child's environment"
                );
            }
        }
    }
    for f in &secrets.secret_files {
        assert!(
            secret_files.contains(*f),
            "{what}: {f} never held a secret: {secret_files:?}"
        );
    }
    println!("{what}: {runs} runs, no secret printed or exposed; 0600 checked on {secret_files:?}");
    runs
}

/// The SharedAccessKey, given through the environment (never argv).
fn hub_env(c: &mut Command) {
    c.env("SDV_PROVISION_CONNECTION_STRING", hub_cs(ETH0_ID));
}

#[test]
fn file_keystore_never_leaks() {
    if !common::require("openssl", "used by the fixtures") {
        return;
    }
    let secrets = Secrets {
        never_printed: vec![("SharedAccessKey", SECRET_KEY.into())],
        never_stored: vec![],
        stored_0600: vec![SECRET_KEY.into()],
        secret_files: vec![
            "azure.connectionstring",
            "cloudconnector.json",
            "device.key",
            "device2.key",
        ],
    };
    drive(
        "file",
        || {
            (
                FakeRoot::with_template(),
                Box::new(|fr: &FakeRoot| {
                    let mut c = fr.cmd();
                    c.args(["--keystore", "file"]);
                    hub_env(&mut c);
                    c
                }),
            )
        },
        &[],
        &secrets,
    );
}

#[cfg(feature = "pkcs11")]
#[test]
fn pkcs11_keystore_never_leaks() {
    use common::softhsm::{PrivateStore, SO_PIN, USER_PIN};
    if !common::softhsm::available() {
        return;
    }
    let secrets = Secrets {
        never_printed: vec![
            ("SharedAccessKey", SECRET_KEY.into()),
            ("user PIN", USER_PIN.into()),
            ("SO PIN", SO_PIN.into()),
        ],
        never_stored: vec![("SO PIN", SO_PIN.into())],
        stored_0600: vec![SECRET_KEY.into(), USER_PIN.into()],
        secret_files: vec![
            "azure.connectionstring",
            "cloudconnector.json",
            "pkcs11.pin",
        ],
    };
    // One SoftHSM store per pass (kept alive beside its root).
    let stores = std::cell::RefCell::new(Vec::new());
    drive(
        "pkcs11",
        || {
            let store = std::rc::Rc::new(PrivateStore::new("leda"));
            stores.borrow_mut().push(store.clone());
            let fr = FakeRoot::with_template();
            (
                fr,
                Box::new(move |fr: &FakeRoot| {
                    let mut c = fr.cmd();
                    c.args(["--keystore", "pkcs11", "--pkcs11-module"])
                        .arg(&store.module)
                        .args(["--pkcs11-token", "fresh"]);
                    for (k, v) in store.env() {
                        c.env(k, v);
                    }
                    c.env("SDV_PROVISION_PKCS11_PIN", USER_PIN);
                    c.env("SDV_PROVISION_PKCS11_SO_PIN", SO_PIN);
                    hub_env(&mut c);
                    c
                }),
            )
        },
        &["--pkcs11-init-token"],
        &secrets,
    );
}

#[cfg(feature = "tpm")]
#[test]
fn tpm_keystore_never_leaks() {
    use common::swtpm::Swtpm;
    if !common::require("swtpm", "a software TPM")
        || !common::require("tpm2_changeauth", "sets the owner password")
    {
        return;
    }
    let secrets = Secrets {
        never_printed: vec![
            ("SharedAccessKey", SECRET_KEY.into()),
            ("TPM owner password", OWNER_PASSWORD.into()),
        ],
        never_stored: vec![("TPM owner password", OWNER_PASSWORD.into())],
        stored_0600: vec![SECRET_KEY.into()],
        secret_files: vec!["azure.connectionstring", "cloudconnector.json"],
    };
    let tpm = std::rc::Rc::new(Swtpm::start());
    common::run_ok(
        tpm.tool("tpm2_changeauth")
            .args(["-c", "owner", OWNER_PASSWORD]),
    );
    drive(
        "tpm",
        || {
            let tpm = tpm.clone();
            (
                FakeRoot::with_template(),
                Box::new(move |fr: &FakeRoot| {
                    let mut c = fr.cmd();
                    c.args(["--keystore", "tpm", "--tcti", &tpm.tcti()]);
                    c.env("SDV_PROVISION_TPM_OWNER_AUTH", OWNER_PASSWORD);
                    c.env_remove("SDV_PROVISION_TPM_OWNER_AUTH_FILE");
                    hub_env(&mut c);
                    c
                }),
            )
        },
        &[],
        &secrets,
    );
}

/// Connection strings that are wrong around the SharedAccessKey. Each holds
/// [`SECRET_KEY`] somewhere a parser could mistake for a name or a value.
pub fn malformed_connection_strings() -> Vec<String> {
    let (h, d, k) = ("HostName=hub.azure-devices.net", ETH0_ID, SECRET_KEY);
    vec![
        // The case: the `=` after the key name missing, so the first `=` is
        // the key's own base64 padding.
        format!("{h};DeviceId={d};SharedAccessKey{k}"),
        format!("{h};DeviceId={d};SharedAccessKey{k}x=="),
        format!("{h};DeviceId={d};SharedAccessKey:{k}"),
        format!("{h};DeviceId={d};{k}"),
        format!("{h};DeviceId={d};sharedaccesskey={k}"),
        format!("{h};DeviceId={d};SharedAccessKey={k}!"),
        format!("{h};DeviceId={d};SharedAccessKey={k}=="),
        format!("{h};DeviceId={d};SharedAccessKey={k};SharedAccessKey={k}"),
        format!("{h};DeviceId={d};SharedAccessKey={k};"),
        format!("{h};DeviceId={d};;SharedAccessKey={k}"),
        format!("{h};DeviceId={k}"),
        format!("HostName={k};DeviceId={d}"),
        format!("SharedAccessKey={k}"),
        format!("{h};DeviceId={d};SharedAccessKey={k};x509=yes"),
        format!("{h};DeviceId={d};GatewayHostName={k}"),
        format!("{h};DeviceId=other;SharedAccessKey={k}"),
        k.to_string(),
    ]
}

/// Any 8-character window of the SharedAccessKey found in `text`.
pub fn leaked_window(text: &str) -> Option<&'static str> {
    (0..=SECRET_KEY.len() - 8)
        .map(|i| &SECRET_KEY[i..i + 8])
        .find(|w| text.contains(w))
}

fn assert_no_leak(what: &str, input: &str, run: &Run) {
    if let Some(w) = leaked_window(&run.all()) {
        panic!("{what} with {input:?}: {w:?} of the key was printed:\n{run}");
    }
}

/// DESIGN §6 "Never echo a secret, even from malformed input": every malformed
/// string, through the flag, `--connection-string-file`, the environment, and on
/// disk for `status`/`verify`/a re-run, in text and `--json`, with `-vv`: one
/// `error:` line for the input, and no 8 characters of the key on stdout or stderr.
/// (The interactive prompt's retry message is checked in tests/interactive.rs.)
#[test]
fn malformed_connection_strings_never_echo_the_key() {
    let fr = FakeRoot::with_template();
    let good = Run::from(
        fr.cmd()
            .args(["--keystore", "file", "--algorithm", "ecdsa-p256"])
            .env("SDV_PROVISION_CONNECTION_STRING", hub_cs(ETH0_ID))
            .output()
            .unwrap(),
    )
    .ok();
    assert_no_leak("a good provisioning", "", &good);
    let on_disk = fr.cert_file("azure.connectionstring");
    let file = fr.root().parent().unwrap().join("cs-input");
    let mut runs = 0;
    for bad in malformed_connection_strings() {
        for json in [&[][..], &["--json"][..], &["-vv"][..]] {
            let base = || {
                let mut c = fr.cmd();
                c.args(json)
                    .args(["--keystore", "file", "provision", "--force"]);
                c
            };
            let flag = Run::from(
                base()
                    .arg("--connection-string")
                    .arg(&bad)
                    .output()
                    .unwrap(),
            );
            fs::write(&file, format!("{bad}\n")).unwrap();
            let from_file = Run::from(
                base()
                    .arg("--connection-string-file")
                    .arg(&file)
                    .output()
                    .unwrap(),
            );
            let env = Run::from(
                base()
                    .env("SDV_PROVISION_CONNECTION_STRING", &bad)
                    .output()
                    .unwrap(),
            );
            for (what, run) in [("flag", &flag), ("file", &from_file), ("env", &env)] {
                assert_no_leak(what, &bad, run);
                run.one_error(1);
                runs += 1;
            }
            // The same text on disk, read by status, verify and a plain re-run.
            let saved = fs::read(&on_disk).unwrap();
            fs::write(&on_disk, format!("{bad}\n")).unwrap();
            for cmd in ["status", "verify", "provision"] {
                let run = Run::from(fr.cmd().args(json).arg(cmd).output().unwrap());
                assert_no_leak(cmd, &bad, &run);
                assert_ne!(run.code, Some(0), "{cmd} accepted {bad:?}:\n{run}");
                runs += 1;
            }
            fs::write(&on_disk, saved).unwrap();
        }
    }
    fr.run(&["verify"]).ok();
    println!("{runs} runs with malformed connection strings, no key window printed");
}
