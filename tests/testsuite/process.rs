//! The process never aborts on output it cannot write (DESIGN §6 "The process"):
//! stdout or stderr on a full disk is exit 1 with the run finished, a closed stderr
//! is no reason to stop.
use crate::common;

use std::process::{Command, Stdio};

use common::fake_root::*;

/// A file-keystore provisioning whose scope does not look like Azure's: it gets a
/// warning, so the run has something to say on stderr.
const PROVISION: [&str; 6] = [
    "--keystore",
    "file",
    "--id-scope",
    "example",
    "--algorithm",
    "ecdsa-p256",
];

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

/// Before: `--json status > /dev/full` exited 0 with nothing written.
#[test]
fn json_to_a_full_disk_is_exit_1() {
    let fr = FakeRoot::with_template();
    fr.provision_dps("ecdsa-p256", &[]);
    for args in [
        &["--json", "status"][..],
        &["--json", "verify"][..],
        &["status"][..],
        &["--json", "csr", "--role", "primary"][..],
        &["--help"][..],
    ] {
        let run = Run::from(fr.cmd().args(args).stdout(dev_full()).output().unwrap());
        let e = run.one_error(1);
        assert!(e.contains("cannot write"), "{args:?}: {run}");
    }
}

/// Before: "failed printing to stderr", then SIGABRT in the middle of the run. Now
/// the warning is lost, the provisioning finishes, and the exit code says so.
#[test]
fn stderr_on_a_full_disk_finishes_the_run_and_exits_1() {
    let fr = FakeRoot::with_template();
    // A scope that does not look like Azure's gets a warning on stderr.
    let run = Run::from(
        fr.cmd()
            .args(PROVISION)
            .stderr(dev_full())
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stdout.contains("Primary thumbprint"), "{run}");
    let v = fr.run(&["verify"]);
    assert_eq!(v.code, Some(0), "the run did not finish:\n{v}");
    // A usage error with stderr on a full disk: still a non-zero exit, no abort.
    let bad = Command::new(common::bin())
        .arg("--no-such-flag")
        .stderr(dev_full())
        .status()
        .unwrap();
    assert_eq!(bad.code(), Some(1));
}

/// The binary on `fr`'s root, started by `sh` with stderr closed (`2>&-`).
fn stderr_closed(fr: &FakeRoot) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("exec \"$0\" \"$@\" 2>&-")
        .arg(common::bin())
        .args(["--root"])
        .arg(fr.root());
    c
}

/// A closed stderr (`2>&-`): the standard library points fd 2 at /dev/null before
/// `main`, so nothing we open later can become fd 2 and receive our messages; the
/// run does its work and exits as usual.
#[test]
fn closed_stderr_is_no_reason_to_stop() {
    let fr = FakeRoot::with_template();
    let run = Run::from(
        stderr_closed(&fr)
            .args(PROVISION)
            .env("PATH", fr.path_env())
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, Some(0), "{run}");
    fr.run(&["verify"]).ok();
    let mut c = stderr_closed(&fr);
    c.args(["--keystore", "file", "--id-scope", "0ne!", "--force"]);
    assert_eq!(c.status().unwrap().code(), Some(1));
    fr.run(&["verify"]).ok();
}
