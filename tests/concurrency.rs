//! Concurrent mutating runs on one root: one proceeds at a time, the others wait (or,
//! with a zero lock timeout, fail with a clear message); the end state is consistent;
//! `status` never blocks behind a running provision.
mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn device() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let net = d.path().join("sys/class/net/eth0");
    fs::create_dir_all(&net).unwrap();
    fs::write(net.join("address"), "52:54:21:4c:f9:5a\n").unwrap();
    fs::write(net.join("type"), "1\n").unwrap();
    common::fake_root::put_fixture(
        d.path(),
        "cloudconnector.kanto.json.template",
        common::fake_root::TEMPLATE,
    );
    d
}

fn cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = common::tool();
    c.arg("--root")
        .arg(root)
        .args(["--no-restart", "--non-interactive", "--keystore", "file"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn parallel_provisions_serialise_and_agree() {
    let d = device();
    let children: Vec<_> = (0..4)
        .map(|_| {
            cmd(
                d.path(),
                &[
                    "provision",
                    "--id-scope",
                    "0ne0012345A",
                    "--algorithm",
                    "rsa-3072",
                ],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Exactly one run generated keys; the others found the identity in place.
    let generated = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stdout).contains("Generating the primary key"))
        .count();
    assert_eq!(generated, 1);
    assert!(cmd(d.path(), &["verify"]).status().unwrap().success());
    assert!(cmd(d.path(), &["status"]).status().unwrap().success());
}

#[test]
fn second_run_fails_clearly_when_it_may_not_wait() {
    let d = device();
    // Hold the lock the way a running sdv-provision does: flock on the root dir.
    let dir = fs::File::open(d.path()).unwrap();
    dir.lock().unwrap();
    let out = cmd(d.path(), &["provision", "--id-scope", "0ne0012345A"])
        .env("SDV_PROVISION_LOCK_TIMEOUT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sdv-provision is running"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        !d.path().join("data/var/certificates").exists(),
        "nothing written"
    );
    // status does not block behind the lock.
    let t = Instant::now();
    let st = cmd(d.path(), &["status"]).output().unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(t.elapsed() < Duration::from_secs(2));
    dir.unlock().unwrap();
    assert!(cmd(d.path(), &["provision", "--id-scope", "0ne0012345A"])
        .status()
        .unwrap()
        .success());
}
