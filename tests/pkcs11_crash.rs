//! Crash consistency with keys in a PKCS#11 token: `provision`, `rotate`,
//! `rotate --promote`, `reset` and `provision --force` on SoftHSM2 are SIGKILLed at
//! random moments. After every kill the next `provision` must end in a complete
//! identity that `verify` accepts, and the token must hold exactly that identity's
//! six objects: no orphan key pair, certificate or staged (`….next`) object.
//!
//! SoftHSM itself is not crash-safe: it rewrites files by truncating then writing.
//! Two consequences are outside the tool's reach and are handled here, visibly:
//! - every login rewrites the token's `token.object`; a kill inside that write empties
//!   it and the whole token vanishes. The harness then restores the copy taken after
//!   setup (same PINs and master key; objects live in their own files) and counts it;
//! - a kill inside object creation can leave an object with neither label nor CKA_ID
//!   (see [`Device::check_token`]).
//!
//! `SDV_CRASH_SEED=<n>` replays a run; `SDV_CRASH_KILLS=<n>` sets the rounds (default 25).
#![cfg(feature = "pkcs11")]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::softhsm::PrivateStore;
use serde_json::Value;

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Device {
    store: PrivateStore,
    root: PathBuf,
}

impl Device {
    fn new() -> Device {
        let store = PrivateStore::new("leda");
        let root = store.dir.path().join("root");
        let m = root.join("data/var/containers/manifests");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/cloudconnector.kanto.json.template"),
            m.join("cloudconnector.json.template"),
        )
        .unwrap();
        Device { store, root }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.arg("--root")
            .arg(&self.root)
            .args(["--no-restart", "--non-interactive", "--keystore", "pkcs11"])
            .arg("--pkcs11-module")
            .arg(&self.store.module)
            .arg("--pkcs11-pin-file")
            .arg(&self.store.pin_file)
            .args(args);
        if args.first() == Some(&"provision") {
            c.args(["--device-id", "dev-crash", "--algorithm", "ecdsa-p256"]);
        }
        for k in [
            "SDV_PROVISION_PKCS11_PIN",
            "PKCS11_MODULE_PATH",
            "TPM2TOOLS_TCTI",
            "TCTI",
        ] {
            c.env_remove(k);
        }
        for (k, v) in self.store.env() {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn ok(&self, args: &[&str], what: &str) {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "sdv-provision {args:?} failed ({what}): {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.dump()
        );
    }

    /// State, journal and token objects, for a failure message.
    fn dump(&self) -> String {
        let certs = self.root.join("data/var/certificates");
        let mut s = String::new();
        for f in ["sdv-provision.state.json", "sdv-provision.journal.json"] {
            let text = std::fs::read_to_string(certs.join(f)).unwrap_or_default();
            s.push_str(&format!("--- {f}:\n{text}\n"));
        }
        let objects = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&self.store.module)
            .args([
                "--token-label",
                "leda",
                "--login",
                "--list-objects",
                "--pin",
            ])
            .arg(common::softhsm::USER_PIN)
            .env("SOFTHSM2_CONF", &self.store.conf)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        s.push_str(&format!("--- token objects:\n{objects}"));
        s
    }

    /// The token holds exactly the two live identities the state file names.
    ///
    /// SoftHSM 2.6 does not create objects atomically: it writes an empty object file,
    /// then the template. A SIGKILL inside `C_GenerateKeyPair` can leave an object with
    /// neither label nor CKA_ID (a real token's creation is atomic). Nothing can tell
    /// whose such an object is, so the tool leaves it alone; this check tolerates
    /// those, and only those (returns how many).
    fn check_token(&self, what: &str) -> usize {
        let mut labels = self.store.object_labels();
        let anonymous = labels.iter().filter(|l| l.is_empty()).count();
        labels.retain(|l| !l.is_empty());
        labels.sort();
        let dump = self.dump();
        assert_eq!(
            dump.matches("\n  ID:").count(),
            labels.len(),
            "{what}: an unlabelled object has a CKA_ID\n{dump}"
        );
        assert_eq!(
            labels,
            [
                "device-primary",
                "device-primary",
                "device-primary",
                "device-secondary",
                "device-secondary",
                "device-secondary"
            ],
            "{what}: token objects\n{}",
            self.dump()
        );
        let state: Value = serde_json::from_slice(
            &std::fs::read(
                self.root
                    .join("data/var/certificates/sdv-provision.state.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for role in ["primary", "secondary"] {
            let uri = state["keys"][role].as_str().unwrap();
            assert!(
                uri.contains(&format!(";object=device-{role};")),
                "{what}: {uri}"
            );
        }
        anonymous
    }
}

#[test]
fn pkcs11_keystore_survives_random_kills() {
    if !common::softhsm::available() {
        return;
    }
    let kills: u32 = std::env::var("SDV_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let seed = std::env::var("SDV_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("pkcs11 crash harness seed: {seed} (SDV_CRASH_SEED={seed} to replay)");
    let mut rng = Rng(seed);
    let dev = Device::new();
    let ops: [&[&str]; 5] = [
        &["provision", "--id-scope", "0ne0012345A"],
        &["rotate"],
        &["rotate", "--promote"],
        &["reset", "--yes"],
        &["provision", "--force", "--id-scope", "0ne0012345A"],
    ];
    dev.ok(ops[0], "setup");
    let token_file = std::fs::read_dir(dev.store.tokendir())
        .unwrap()
        .flatten()
        .map(|e| e.path().join("token.object"))
        .find(|p| p.is_file())
        .expect("token.object");
    let token_backup = std::fs::read(&token_file).unwrap();
    let mut token_file_faults = 0;
    let mut durations = Vec::new();
    for op in ops {
        let t = Instant::now();
        dev.ok(op, "timing");
        durations.push(t.elapsed());
        dev.ok(ops[0], "timing");
    }
    // Adaptive windows, as in tests/common/crash.rs: shrink after a run that finished
    // before its kill, grow slowly otherwise.
    let ceiling: Vec<Duration> = durations.iter().map(|d| *d * 4).collect();
    // Start below the measured time: a kill at a random point of a shorter window
    // lands inside the run more often, whatever the load does to later runs.
    let mut durations: Vec<Duration> = durations.iter().map(|d| *d * 3 / 5).collect();
    let mut finished_first = 0;
    for round in 0..kills {
        let i = rng.below(ops.len() as u64) as usize;
        let delay = Duration::from_micros(rng.below(durations[i].as_micros() as u64 + 1));
        let mut child = dev.cmd(ops[i]).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_some() {
            finished_first += 1;
            durations[i] = durations[i] * 3 / 4;
        } else {
            durations[i] = (durations[i] * 21 / 20).min(ceiling[i]);
        }
        let _ = child.kill();
        let _ = child.wait();
        let what = format!("round {round}: {:?} killed after {delay:?}", ops[i]);
        if std::fs::metadata(&token_file).map_or(0, |m| m.len()) < token_backup.len() as u64 {
            eprintln!("{what}: SoftHSM's token.object was cut short by the kill; restored");
            std::fs::write(&token_file, &token_backup).unwrap();
            token_file_faults += 1;
        }
        dev.ok(ops[0], &what);
        dev.ok(&["verify"], &what);
        let anonymous = dev.check_token(&what);
        if anonymous > 0 {
            eprintln!("{what}: SoftHSM left {anonymous} object(s) without label or id");
        }
    }
    eprintln!(
        "pkcs11 crash harness: {kills} kills, {finished_first} finished first, \
         {token_file_faults} SoftHSM token.object restores"
    );
    assert!(
        finished_first <= kills * 3 / 4,
        "too few kills landed mid-run to mean anything"
    );
}
