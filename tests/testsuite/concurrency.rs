//! Concurrent mutating runs on one root: one proceeds at a time, the others wait (or,
//! with a zero lock timeout, fail with a clear message); the end state is consistent;
//! `status` never blocks behind a running provision; no other user can take the lock.
use crate::common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LOCK: &str = "data/var/certificates/.sdv-provision.lock";

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
    // Hold the lock the way a running sdv-provision does: flock on its 0600 lock
    // file in the certificates directory.
    let dir = lock_file(d.path());
    dir.lock().unwrap();
    let out = cmd(d.path(), &["provision", "--id-scope", "0ne0012345A"])
        .env("SDV_PROVISION_LOCK_TIMEOUT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another sdv-provision is running"), "{err}");
    common::pin_file(
        &err,
        &[("[ROOT]", d.path().display().to_string())],
        "concurrency/locked",
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let certs: Vec<_> = fs::read_dir(d.path().join("data/var/certificates"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(certs, [".sdv-provision.lock"], "nothing written");
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

/// The run lock's file, made as the tool makes it (0600, in the certificates dir).
fn lock_file(root: &Path) -> fs::File {
    let p = root.join(LOCK);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(p)
        .unwrap()
}

/// `flock(1)` on `path` as user `nobody`; returns once it holds the lock (it prints
/// `locked`), or `None` when it could not take it.
fn flock_as_nobody(path: &Path) -> Option<Child> {
    require_tools!(SetprivFlock => None);
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "flock",
            "-n",
        ])
        .arg(path)
        .args(["-c", "echo locked; exec sleep 120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() == "locked" {
        return Some(child);
    }
    child.wait().unwrap();
    None
}

/// Before: any user could `flock` the root directory (with the default root, `/`)
/// and so block every provisioning; the run failed with "another sdv-provision is
/// running". Now the lock is a 0600 file of ours that `nobody` cannot open.
#[test]
fn a_lock_held_by_another_user_does_not_block_a_run() {
    let d = device();
    // nobody must be able to reach the root to lock it (a 0700 temp dir is not).
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    require_tools!(SetprivFlock);
    let on_root = flock_as_nobody(d.path());
    require_tools!(where on_root
        .as_ref()
        .map(drop)
        .ok_or_else(|| "setpriv/flock as nobody did not take the lock".to_owned()));
    let mut on_root = on_root.unwrap();
    // The tool's lock file, as a run leaves it when killed: nobody cannot take it.
    drop(lock_file(d.path()));
    assert!(
        flock_as_nobody(&d.path().join(LOCK)).is_none(),
        "nobody took the 0600 lock file"
    );
    let out = cmd(d.path(), &["provision", "--id-scope", "0ne0012345A"])
        .env("SDV_PROVISION_LOCK_TIMEOUT", "0")
        .output()
        .unwrap();
    on_root.kill().unwrap();
    on_root.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !d.path().join(LOCK).exists(),
        "the lock file is removed after the run"
    );
}
