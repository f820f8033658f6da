//! The crash harness shared by the keystore crash tests: random operations, each
//! SIGKILLed at a random moment of its lifetime, then recovery and invariants.
#![allow(dead_code)]

use std::fs;
use std::process::{Command, Stdio};

use super::device::Device;
use super::fake_root::{CERTS, MANIFEST};
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The device under the kill loop and the algorithm every `provision` of it uses.
struct Target<'a> {
    dev: &'a Device,
    alg: &'a str,
}

impl Target<'_> {
    /// The device's command (keystore flags and environment from [`Device`]),
    /// `--no-restart`, with `--algorithm` on `provision`; only stderr is kept.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.dev.base_cmd();
        c.arg("--no-restart").args(args);
        if args.first() == Some(&"provision") {
            c.args(["--algorithm", self.alg]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn ok(&self, args: &[&str]) {
        self.ok_after(args, "setup")
    }

    fn ok_after(&self, args: &[&str], what: &str) {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "sdv-provision {args:?} failed ({what}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The number of kill rounds: `var` from the environment, else `default`.
pub fn kills(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Default, Debug)]
pub struct Tally {
    pub kills: u32,
    pub finished_first: u32,
    pub recovered: u32,
}

/// The harness: `kills` rounds of (random op, SIGKILL at a random moment, checks,
/// recovery) on `dev`, provisioning with `alg`. `allowed` lists the files the
/// certificates directory may hold after recovery; `extra_check` inspects backend
/// state (e.g. TPM handles).
pub fn hammer(
    dev: &Device,
    alg: &str,
    kills: u32,
    allowed: &[&str],
    extra_check: &dyn Fn(),
) -> Tally {
    hammer_guarding(
        dev,
        alg,
        kills,
        allowed,
        &|_| {},
        &|_| extra_check(),
        &String::new,
    )
}

/// Files that are not the tool's, planted before the first run: one in the
/// certificates directory (a name outside the tool's closed set), one beside it.
const FOREIGN_FILES: [(&str, &[u8]); 2] = [
    (
        "data/var/certificates/operator-notes.txt",
        b"not sdv-provision's\n",
    ),
    ("data/var/device.key", b"someone else's key file\n"),
];

/// [`hammer`] with a hook before recovery (repairing what a stand-in backend itself
/// breaks when killed, e.g. SoftHSM's token file), both hooks getting a description
/// of the round for their messages, also proving that nothing which existed before
/// the first run and was not the tool's is touched: `foreign` describes the backend's foreign objects
/// byte for byte (TPM Names, PKCS#11 attributes) and must describe them the same after
/// every recovery; the planted [`FOREIGN_FILES`] must keep their content.
pub fn hammer_guarding(
    dev: &Device,
    alg: &str,
    kills: u32,
    allowed: &[&str],
    before_recovery: &dyn Fn(&str),
    extra_check: &dyn Fn(&str),
    foreign: &dyn Fn() -> String,
) -> Tally {
    let root = dev.fr.root();
    let dev = Target { dev, alg };
    for (rel, bytes) in FOREIGN_FILES {
        dev.dev.fr.write(rel, bytes);
    }
    let foreign_before = foreign();
    let mut allowed = allowed.to_vec();
    allowed.push("operator-notes.txt");
    let allowed = &allowed[..];
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
    eprintln!("crash harness seed: {seed} (SDV_CRASH_SEED={seed} to replay)");
    let mut rng = Rng(seed);
    let ops: [&[&str]; 5] = [
        &["provision", "--id-scope", "0ne0012345A"],
        &["rotate"],
        &["rotate", "--promote"],
        &["reset", "--yes"],
        &["provision", "--force", "--id-scope", "0ne0012345A"],
    ];
    // How long each op takes unkilled, so kill moments spread over its lifetime. The
    // window then adapts: it shrinks when a run finished before its kill (a loaded
    // machine makes runs vary) and grows slowly otherwise, so most kills land inside
    // a run and some land near its end.
    dev.ok(ops[0]);
    let mut durations = Vec::new();
    for op in ops.iter() {
        let t = Instant::now();
        dev.ok(op);
        durations.push(t.elapsed());
        dev.ok(ops[0]);
    }
    let ceiling: Vec<Duration> = durations.iter().map(|d| *d * 4).collect();
    // Start below the measured time: a kill at a random point of a shorter window
    // lands inside the run more often, whatever the load does to later runs.
    let mut durations: Vec<Duration> = durations.iter().map(|d| *d * 3 / 5).collect();
    let mut tally = Tally::default();
    for round in 0..kills {
        let i = rng.below(ops.len() as u64) as usize;
        let op = ops[i];
        let delay = Duration::from_micros(rng.below(durations[i].as_micros() as u64 + 1));
        let mut child = dev.cmd(op).spawn().unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        tally.kills += 1;
        if finished {
            tally.finished_first += 1;
            durations[i] = durations[i] * 3 / 4;
        } else {
            durations[i] = (durations[i] * 21 / 20).min(ceiling[i]);
        }
        // The manifest is always valid JSON: old or new content, never a mix.
        let manifest = dev.dev.fr.p(MANIFEST);
        if let Ok(bytes) = fs::read(&manifest) {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
                "round {round} ({op:?} killed after {delay:?}): manifest is not valid JSON"
            );
        }
        // The next run finishes or undoes the killed one.
        let what =
            format!("round {round}: after {op:?} was killed after {delay:?}, finished={finished}");
        before_recovery(&what);
        dev.ok_after(&["provision", "--id-scope", "0ne0012345A"], &what);
        dev.ok_after(&["verify"], &what);
        let leftovers: Vec<String> = fs::read_dir(dev.dev.fr.p(CERTS))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !allowed.contains(&n.as_str()))
            .collect();
        assert!(
            leftovers.is_empty(),
            "round {round} ({op:?} killed after {delay:?}): leftovers {leftovers:?}"
        );
        extra_check(&what);
        for (rel, bytes) in FOREIGN_FILES {
            assert_eq!(
                fs::read(root.join(rel)).ok().as_deref(),
                Some(bytes),
                "{what}: {rel} is not the tool's and must stay as it was"
            );
        }
        assert_eq!(foreign(), foreign_before, "{what}: foreign objects changed");
        tally.recovered += 1;
    }
    eprintln!("crash harness: {tally:?}");
    assert!(
        tally.finished_first <= tally.kills * 3 / 4,
        "too few kills landed mid-run to mean anything: {tally:?}"
    );
    tally
}
