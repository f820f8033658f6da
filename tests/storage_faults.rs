//! Storage faults (DESIGN §6 "a crash or I/O error loses nothing, leaves nothing
//! half-made"; "the process never aborts"): every mutating command on the file
//! keystore runs under libfiu's POSIX preload (`fiu-run -x`), which fails `open`,
//! `read`, `write` (also short writes: `…/reduce`), `fsync`, `rename`, `unlink`,
//! `readdir` and `close` at random ([`STORAGE_CALLS`]) with the errno given as `failinfo` (without one it would pick
//! from each function's list of valid errnos, see libfiu's preload/posix/codegen.h):
//! storms of ENOSPC and of EIO, at a probability drawn per run so faults land early
//! and late.
//!
//! What a faulty run may do, precisely:
//! - exit 1, with at most one `error:` line and never a panic or an abort; the line
//!   is missing only when the write of the line itself was failed (counted, and it
//!   must stay the exception);
//! - or exit 0, when no fault hit anything that mattered (a retried short write, a
//!   failed `close` of a file already synced, a fault in an optional read whose
//!   absence only costs a warning): then the command's result must be complete
//!   without any re-run — `verify` passes right away and the identity is the one a
//!   successful command makes.
//!
//! After a run that failed, one clean re-run (`sdv-provision`, which finishes or
//! undoes what the run left; the same flags for a first provisioning, which has
//! nothing recorded yet; `reset --yes` for reset) exits 0, then `verify` passes, the identity is the old one or the one a
//! successful command makes (never a mix: see [`Scenario::allowed`]), and no temp
//! file remains. Each scenario reuses its root, so a fault also lands on what the
//! previous recovery left. `SDV_FIU_RUNS` sets the runs per scenario and errno.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fake_root::*;

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// Primary and secondary SHA-1 thumbprints (`None` when the role has none).
type Thumbs = (Option<String>, Option<String>);

fn thumbs(fr: &FakeRoot) -> Thumbs {
    let j = fr.run(&["--json", "status"]).json();
    let of = |role: &str| {
        j["certificates"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == role)?["sha1_thumbprint"]
            .as_str()
            .map(str::to_owned)
    };
    (of("primary"), of("secondary"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    FirstProvision,
    Rerun,
    Force,
    Rotate,
    Promote,
    ImportCert,
    Reset,
}

impl Scenario {
    fn args(self, import: &Path) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect();
        match self {
            Scenario::FirstProvision => s(&["--id-scope", GOOD_SCOPE, "--algorithm", "ecdsa-p256"]),
            Scenario::Rerun => s(&["provision"]),
            Scenario::Force => s(&["--force", "--algorithm", "ecdsa-p256"]),
            Scenario::Rotate => s(&["rotate"]),
            Scenario::Promote => s(&["rotate", "--promote"]),
            Scenario::ImportCert => {
                let mut a = s(&["import-cert", "--role", "primary"]);
                a.push(import.display().to_string());
                a
            }
            Scenario::Reset => s(&["reset", "--yes"]),
        }
    }

    /// May `after` follow `before`, for a run that failed (and was then recovered)
    /// or succeeded? `imported` is the thumbprint of the certificate offered.
    fn allowed(self, before: &Thumbs, after: &Thumbs, imported: &str) -> bool {
        let (p0, s0) = before;
        let (p1, s1) = after;
        match self {
            Scenario::FirstProvision => p1.is_some() && s1.is_some(),
            // A re-run changes nothing.
            Scenario::Rerun => after == before,
            // Both keys new, or both old.
            Scenario::Force => after == before || (p1 != p0 && s1 != s0 && p1.is_some()),
            // The primary stays; the secondary is the old one or a new one.
            Scenario::Rotate => p1 == p0 && s1.is_some(),
            // Nothing moved, or the secondary is the primary now.
            Scenario::Promote => after == before || (p1 == s0 && s1.is_some() && s1 != s0),
            Scenario::ImportCert => s1 == s0 && (p1 == p0 || p1.as_deref() == Some(imported)),
            Scenario::Reset => after == &(None, None),
        }
    }
}

/// `name` and the paths of leftover temp files under `root`.
fn temps(root: &Path) -> Vec<PathBuf> {
    snapshot(root)
        .into_keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".sdv-provision.tmp"))
        })
        .collect()
}

/// A certificate for the current primary key, CN = the device id, with a
/// thumbprint of its own (openssl signs with the file keystore's key).
fn issue_for_primary(fr: &FakeRoot, out: &Path, days: &str) -> String {
    let st = Command::new("openssl")
        .args(["req", "-new", "-x509", "-subj"])
        .arg(format!("/CN={ETH0_ID}"))
        .args(["-days", days, "-key"])
        .arg(fr.cert_file("device.key"))
        .arg("-out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    text.trim().rsplit('=').next().unwrap().replace(':', "")
}

/// libfiu's groups of storage calls: open/close, read/write (and short writes),
/// fsync/fdatasync, and opendir/readdir/unlink/rename. Not `posix/io/net/*`: that
/// holds poll(2), which the standard library calls on fds 0–2 before `main` and
/// (rightly) aborts on when it fails with an errno poll cannot return.
const STORAGE_CALLS: [&str; 4] = [
    "posix/io/oc/*",
    "posix/io/rw/*",
    "posix/io/sync/*",
    "posix/io/dir/*",
];

struct Tally {
    failed: usize,
    succeeded: usize,
    error_line_lost: usize,
}

fn faulty(fr: &FakeRoot, args: &[String], errno: i32, probability: f64) -> Run {
    let mut c = Command::new("fiu-run");
    c.args(["-x", "-f", ""]);
    for group in STORAGE_CALLS {
        c.arg("-c").arg(format!(
            "enable_random name={group},probability={probability},failinfo={errno}"
        ));
    }
    c.arg(common::bin())
        .arg("--root")
        .arg(fr.root())
        .args(["--keystore", "file", "--no-restart"])
        .args(args)
        .env("PATH", fr.path_env())
        .env_remove("SDV_PROVISION_CONNECTION_STRING")
        .stdin(std::process::Stdio::null());
    Run::from(c.output().expect("run fiu-run"))
}

/// One scenario: `runs` faulty runs on one root, each checked and recovered.
fn scenario(sc: Scenario, errno: i32, runs: usize, tally: &mut Tally) {
    let fr = FakeRoot::with_template();
    let import = fr.root().parent().unwrap().join("import.crt");
    if sc != Scenario::FirstProvision {
        fr.provision_dps("ecdsa-p256", &[]);
    }
    let args = sc.args(&import);
    let probabilities = [0.002, 0.005, 0.01, 0.02, 0.05];
    for i in 0..runs {
        if sc == Scenario::FirstProvision {
            let _ = fr.run(&["--no-restart", "reset", "--yes"]);
        }
        if sc == Scenario::Reset && thumbs(&fr).0.is_none() {
            fr.provision_dps("ecdsa-p256", &["--no-restart"]);
        }
        // Alternate validity so each import offers a certificate not installed yet.
        let imported = if sc == Scenario::ImportCert {
            issue_for_primary(&fr, &import, if i % 2 == 0 { "30" } else { "31" })
        } else {
            String::new()
        };
        let before = thumbs(&fr);
        let p = probabilities[i % probabilities.len()];
        let run = faulty(&fr, &args, errno, p);
        let what = format!("{sc:?} errno {errno} p {p} run {i}");
        assert!(
            !run.all().contains("panicked") && !run.all().contains("RUST_BACKTRACE"),
            "{what}: a panic\n{run}"
        );
        let errors = run.stderr.matches("error: ").count();
        match run.code {
            Some(0) => {
                tally.succeeded += 1;
                assert_eq!(errors, 0, "{what}: exit 0 with an error line\n{run}");
            }
            Some(1) => {
                tally.failed += 1;
                assert!(errors <= 1, "{what}: more than one error line\n{run}");
                tally.error_line_lost += usize::from(errors == 0);
                let rerun = match sc {
                    Scenario::Reset => fr.run(&["--no-restart", "reset", "--yes"]),
                    // The first provisioning has nothing recorded to go on yet.
                    Scenario::FirstProvision => {
                        let mut a = vec!["--keystore", "file", "--no-restart"];
                        a.extend(args.iter().map(String::as_str));
                        fr.run(&a)
                    }
                    _ => fr.run(&["--keystore", "file", "--no-restart"]),
                };
                assert_eq!(
                    rerun.code,
                    Some(0),
                    "{what}: the clean re-run failed\nfaulty: {run}\nre-run: {rerun}"
                );
            }
            _ => panic!(
                "{what}: exit {:?} (a signal, an abort, a usage code)\n{run}",
                run.code
            ),
        }
        if sc != Scenario::Reset {
            let v = fr.run(&["verify"]);
            assert_eq!(
                v.code,
                Some(0),
                "{what}: verify fails\nfaulty: {run}\nverify: {v}"
            );
        }
        let after = thumbs(&fr);
        assert!(
            sc.allowed(&before, &after, &imported),
            "{what}: identity {before:?} became {after:?}\n{run}"
        );
        let left = temps(&fr.root());
        assert!(left.is_empty(), "{what}: temp files left: {left:?}\n{run}");
    }
}

#[test]
fn storage_fault_storms_lose_nothing_and_never_abort() {
    if !common::require(
        "fiu-run",
        "the storage-fault suite (Debian package fiu-utils)",
    ) || !common::require("openssl", "issues the certificates import-cert is given")
    {
        return;
    }
    let runs: usize = std::env::var("SDV_FIU_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut tally = Tally {
        failed: 0,
        succeeded: 0,
        error_line_lost: 0,
    };
    for sc in [
        Scenario::FirstProvision,
        Scenario::Rerun,
        Scenario::Force,
        Scenario::Rotate,
        Scenario::Promote,
        Scenario::ImportCert,
        Scenario::Reset,
    ] {
        for errno in [ENOSPC, EIO] {
            scenario(sc, errno, runs, &mut tally);
        }
    }
    let total = tally.failed + tally.succeeded;
    println!(
        "{total} fault-injected runs: {} failed cleanly and were recovered, {} finished (no fault that mattered), {} lost their error line to a failed write of it",
        tally.failed, tally.succeeded, tally.error_line_lost
    );
    // Most runs must meet a fault, or the storm tests nothing.
    assert!(tally.failed * 2 > total, "too few runs met a fault");
    assert!(
        tally.error_line_lost * 5 <= tally.failed,
        "too many failed runs without their error line"
    );
}

/// Found by the storm: a reset whose journal was durable but whose directory fsync
/// failed exits 1; the re-run's recovery finished the removal and then reset
/// itself failed with "this device is not provisioned", so no re-run could succeed.
/// A reset with nothing left to remove has reached its goal: exit 0.
#[test]
fn reset_of_a_reset_device_is_exit_0() {
    let fr = FakeRoot::with_template();
    fr.provision_dps("ecdsa-p256", &[]);
    fr.run(&["reset", "--yes"]).ok();
    let again = fr.run(&["reset", "--yes"]).ok();
    assert!(again.stdout.contains("Nothing to remove"), "{again}");
    assert_eq!(thumbs(&fr), (None, None));
}
