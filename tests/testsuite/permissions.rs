//! Permissions and ownership (DESIGN §6): under `umask 000` nothing the tool creates is
//! world-writable and secrets are 0600; a symbolic link planted at a key, certificate
//! or manifest path — before the first provisioning and on a re-run — is refused with
//! one clear error, and its target is untouched. Directories: links are read inside
//! the root (one leading out is refused, an absolute in-tree one works), and
//! directories others can change are refused (StrictModes).

use crate::common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::fake_root::*;

/// Every directory and file under `root` created by the run (not in `before`):
/// directories not group/world-writable, files not group/world-writable, and the
/// secret ones 0600.
fn check_created_modes(fr: &FakeRoot, before: &Snapshot) -> usize {
    let after = fr.snapshot();
    let mut checked = 0;
    for (p, n) in &after {
        if before.contains_key(p) {
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        match n {
            Node::Dir { mode } => {
                assert_eq!(mode & 0o022, 0, "{} is {mode:o}", p.display());
            }
            Node::File { mode, bytes } => {
                assert_eq!(mode & 0o022, 0, "{} is {mode:o}", p.display());
                let text = String::from_utf8_lossy(bytes);
                let secret = name.ends_with(".key")
                    || name == "azure.connectionstring"
                    || text.contains(SECRET_KEY)
                    || text.contains("PRIVATE KEY");
                if secret {
                    assert_eq!(*mode, 0o600, "{} holds a secret: {mode:o}", p.display());
                }
            }
            Node::Link { target } => panic!("created a link {} -> {target:?}", p.display()),
            Node::Other { .. } => panic!("created a special file {}", p.display()),
        }
        checked += 1;
    }
    checked
}

/// The binary under `umask 000`, through a shell wrapper.
fn umask0(fr: &FakeRoot, args: &[&str], env: &[(&str, String)]) -> Run {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(common::bin())
        .arg("--root")
        .arg(fr.root())
        .args(args)
        .env("PATH", fr.path_env())
        .env_remove("SDV_PROVISION_CONNECTION_STRING")
        .env_remove("SDV_PROVISION_ROOT");
    for (k, v) in env {
        c.env(k, v);
    }
    Run::from(c.output().unwrap())
}

#[test]
fn umask_000_creates_nothing_world_writable() {
    require_tools!(Openssl);
    // DPS on a device with no certificates dir and no /etc: both are created.
    let fr = FakeRoot::with_template();
    let before = fr.snapshot();
    umask0(
        &fr,
        &[
            "--keystore",
            "file",
            "--id-scope",
            GOOD_SCOPE,
            "--algorithm",
            "ecdsa-p256",
        ],
        &[],
    )
    .ok();
    let n = check_created_modes(&fr, &before);
    assert!(fr.p(CERTS).is_dir() && fr.p("etc/deviceid").is_file());
    // Rotation and promotion write new files too.
    for a in [&["rotate"][..], &["rotate", "--promote"][..]] {
        let before = fr.snapshot();
        umask0(&fr, a, &[]).ok();
        check_created_modes(&fr, &before);
    }
    // Hub: the connection string and a manifest that holds the SharedAccessKey.
    let hub = FakeRoot::with_template();
    let before = hub.snapshot();
    umask0(
        &hub,
        &["--keystore", "file", "--algorithm", "ecdsa-p256"],
        &[("SDV_PROVISION_CONNECTION_STRING", hub_cs(ETH0_ID))],
    )
    .ok();
    let m = check_created_modes(&hub, &before);
    assert_eq!(mode(&hub.cert_file("azure.connectionstring")), 0o600);
    assert!(hub.read(MANIFEST).contains(SECRET_KEY));
    assert_eq!(mode(&hub.p(MANIFEST)), 0o600);
    println!("umask 000: {} created entries checked", n + m);
}

/// A file outside the root that a planted link points at.
fn evil(fr: &FakeRoot) -> std::path::PathBuf {
    let p = fr.dir.path().join("evil");
    fs::write(&p, "evil\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

fn assert_untouched(target: &Path) {
    assert_eq!(fs::read_to_string(target).unwrap(), "evil\n");
    assert_eq!(mode(target), 0o644);
}

fn provision(fr: &FakeRoot) -> Run {
    fr.run_dps("ecdsa-p256", &[])
}

#[test]
fn symlink_at_key_or_cert_path_is_refused_before_first_provisioning() {
    require_tools!(Openssl);
    for name in ["device.key", "device.crt", "device2.key", "device2.crt"] {
        let fr = FakeRoot::with_template();
        let target = evil(&fr);
        fs::create_dir_all(fr.p(CERTS)).unwrap();
        symlink(&target, fr.cert_file(name)).unwrap();
        let before = fr.snapshot();
        let run = provision(&fr);
        let err = run.one_error(1);
        assert!(err.contains(name) && err.contains("symbolic link"), "{run}");
        assert_untouched(&target);
        assert_same_tree(&before, &fr.snapshot(), name);
        assert!(fr.calls().is_empty());
        // Remove the link: the next run succeeds.
        fs::remove_file(fr.cert_file(name)).unwrap();
        provision(&fr).ok();
        assert_untouched(&target);
    }
}

#[test]
fn symlink_at_key_or_cert_path_is_refused_on_rerun() {
    require_tools!(Openssl);
    for name in ["device.key", "device.crt", "device2.key", "device2.crt"] {
        for args in [
            &["--keystore", "file"][..],
            &["--keystore", "file", "--force"][..],
            &["rotate"][..],
            &["rotate", "--promote"][..],
            &["verify"][..],
        ] {
            let fr = FakeRoot::with_template();
            provision(&fr).ok();
            fr.clear_calls();
            // The link points at a copy of the real file, so following it would work.
            let target = fr.dir.path().join("evil");
            fs::copy(fr.cert_file(name), &target).unwrap();
            let original = fs::read(&target).unwrap();
            fs::remove_file(fr.cert_file(name)).unwrap();
            symlink(&target, fr.cert_file(name)).unwrap();
            let before = fr.snapshot();
            let run = fr.run(args);
            assert_ne!(run.code, Some(0), "{name} {args:?}:\n{run}");
            let named = run
                .all()
                .lines()
                .any(|l| (l.starts_with("error:") || l.starts_with("FAIL")) && l.contains(name));
            assert!(named, "{name} {args:?}: no line names the link:\n{run}");
            assert!(
                run.stderr
                    .lines()
                    .filter(|l| l.starts_with("error:"))
                    .count()
                    <= 1,
                "{run}"
            );
            assert_eq!(fs::read(&target).unwrap(), original, "{name} {args:?}");
            assert_same_tree(&before, &fr.snapshot(), &format!("{name} {args:?}"));
        }
    }
}

#[test]
fn symlink_at_manifest_path_is_refused() {
    require_tools!(Openssl);
    // Before the first provisioning, and on a provisioned device.
    for provisioned in [false, true] {
        let fr = FakeRoot::with_template();
        if provisioned {
            provision(&fr).ok();
            fr.clear_calls();
        }
        // A valid manifest outside the root: following the link would rewrite it.
        let target = fr.dir.path().join("evil.json");
        fs::copy(fixture("cloudconnector.auto-deployer.json"), &target).unwrap();
        let original = fs::read(&target).unwrap();
        let _ = fs::remove_file(fr.p(MANIFEST));
        symlink(&target, fr.p(MANIFEST)).unwrap();
        let before = fr.snapshot();
        let run = fr.run(&["--keystore", "file", "--id-scope", "0ne00ABCDEF"]);
        let err = run.one_error(1);
        assert!(err.contains("cloudconnector.json"), "{run}");
        assert_eq!(fs::read(&target).unwrap(), original);
        assert_same_tree(&before, &fr.snapshot(), "manifest link");
        assert!(fr.calls().is_empty());
    }
}

/// DESIGN §6 "Secret modes hold on every run". Before: a key, the connection string
/// or the SharedAccessKey-bearing manifest loosened to 0644 stayed 0644 after a
/// re-run, and status and verify were content.
#[test]
fn loosened_secret_files_are_reported_and_tightened_by_every_mutating_run() {
    let fr = FakeRoot::with_template();
    let hub = |args: &[&str]| {
        let mut c = fr.cmd();
        c.args(["--keystore", "file"])
            .args(args)
            .env("SDV_PROVISION_CONNECTION_STRING", hub_cs(ETH0_ID));
        Run::from(c.output().unwrap())
    };
    hub(&["--algorithm", "ecdsa-p256"]).ok();
    let secrets = [
        fr.cert_file("device.key"),
        fr.cert_file("device2.key"),
        fr.cert_file("azure.connectionstring"),
        fr.p(MANIFEST),
    ];
    let import = fr.root().parent().unwrap().join("import.crt");
    let commands: [&[&str]; 5] = [
        &["provision"],
        &["rotate"],
        &["rotate", "--promote"],
        &["import-cert", "--role", "primary", import.to_str().unwrap()],
        &["provision", "--force"],
    ];
    for cmd in commands {
        fs::copy(fr.cert_file("device.crt"), &import).unwrap();
        for p in &secrets {
            fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
        }
        let status = fr.run(&["status"]);
        assert_eq!(status.code, Some(1), "{status}");
        let verify = fr.run(&["--json", "verify"]);
        assert_eq!(verify.code, Some(1), "{verify}");
        let check = verify.json()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "secret_modes")
            .cloned()
            .unwrap();
        assert_eq!(check["ok"], false);
        for p in &secrets {
            let name = p.display().to_string();
            let line = format!("{name} holds a secret but is mode 0644");
            assert!(status.stdout.contains(&line), "{line}:\n{status}");
            assert!(check["detail"].as_str().unwrap().contains(&line), "{check}");
        }
        let run = hub(cmd).ok();
        for p in &secrets {
            assert_eq!(mode(p), 0o600, "{cmd:?} left {} loose", p.display());
            assert!(
                run.stderr
                    .contains(&format!("{} holds a secret but was mode 0644", p.display())),
                "{cmd:?}:\n{run}"
            );
        }
        fr.run(&["verify"]).ok();
        fr.run(&["status"]).ok();
    }
}

/// The directories the certificates directory hangs from (each one can be a link).
const CHAIN: [&str; 3] = ["data", "data/var", CERTS];

/// Move directory `rel` (made if missing) to `to` and leave a link `link` in its place.
fn relink(fr: &FakeRoot, rel: &str, to: &Path, link: &Path) {
    fs::create_dir_all(fr.p(CERTS)).unwrap();
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::rename(fr.p(rel), to).unwrap();
    symlink(link, fr.p(rel)).unwrap();
}

/// `../` as often as it takes to climb from `rel`'s directory above the root.
fn climb_out(rel: &str) -> String {
    "../".repeat(rel.split('/').count()) + "outside"
}

/// `run` (through `rel`, linked to `outside`) is refused with one error naming
/// `inside --root`; nothing changed inside the root or outside it, nothing restarted.
fn refused_at_the_link(
    fr: &FakeRoot,
    outside: &Path,
    rel: &str,
    what: &str,
    run: impl FnOnce() -> Run,
) {
    let (before, out_before) = (fr.snapshot(), snapshot(outside));
    let run = run();
    assert!(run.one_error(1).contains("inside --root"), "{what}: {run}");
    assert_same_tree(&out_before, &snapshot(outside), "outside the root");
    assert_same_tree(&before, &fr.snapshot(), rel);
    assert!(fr.calls().is_empty());
}

/// Before: only the last path component was checked, so a certificates directory
/// (or `data`, `data/var`) linked out of the root received the keys. Links are now
/// resolved inside the root, where this one leads nowhere: refused, nothing changed.
#[test]
fn a_directory_linked_out_of_the_root_is_refused() {
    require_tools!(Openssl);
    for rel in CHAIN {
        for relative in [false, true] {
            let fr = FakeRoot::with_template();
            let outside = fr.dir.path().join("outside");
            let link = match relative {
                true => Path::new(&climb_out(rel)).to_owned(),
                false => outside.clone(),
            };
            relink(&fr, rel, &outside, &link);
            let what = format!("{rel} -> {link:?}");
            refused_at_the_link(&fr, &outside, rel, &what, || provision(&fr));
        }
    }
}

/// Before: `reset` through a linked certificates directory deleted the files in the
/// link's target outside the root.
#[test]
fn reset_through_a_linked_directory_removes_nothing_outside() {
    require_tools!(Openssl);
    for rel in CHAIN {
        let fr = FakeRoot::with_template();
        provision(&fr).ok();
        fr.clear_calls();
        let outside = fr.dir.path().join("outside");
        relink(&fr, rel, &outside, &outside);
        refused_at_the_link(&fr, &outside, rel, rel, || fr.run(&["reset", "--yes"]));
    }
}

/// An image tree with `data -> /persist/data` (and the same one level down): the
/// link is read as the device reads it, inside the tree. Before: it was followed on
/// the build host and the run failed (or wrote there).
#[test]
fn an_absolute_link_inside_the_tree_resolves_inside_it() {
    require_tools!(Openssl);
    for rel in CHAIN {
        let fr = FakeRoot::with_template();
        let inside = format!("/persist/{rel}");
        relink(&fr, rel, &fr.p(&inside), Path::new(&inside));
        provision(&fr).ok();
        let certs = fr.p("persist").join(CERTS);
        for f in ["device.crt", "device.key", "device2.crt", "azure.idscope"] {
            assert!(certs.join(f).is_file(), "{rel}: {f} not in {certs:?}");
        }
        // The manifest names the device's paths, not the tree's.
        let moved = MANIFEST.starts_with(&format!("{rel}/"));
        let manifest = fr.read(&format!(
            "{}{MANIFEST}",
            if moved { "persist/" } else { "" }
        ));
        assert!(
            manifest.contains("/data/var/certificates/device.crt"),
            "{manifest}"
        );
        assert!(!manifest.contains("persist"), "{manifest}");
        fr.run(&["verify"]).ok();
        fr.run(&["reset", "--yes"]).ok();
        assert!(
            !certs.join("device.key").exists(),
            "{rel}: reset left the key"
        );
        assert!(fs::symlink_metadata(fr.p(rel)).unwrap().is_symlink());
    }
}

/// StrictModes (as sshd checks): every directory from the certificates, the
/// manifests and the `/etc` directory up to `--root` must be ours (or root's) and
/// writable by nobody else. Before: keys were written into a group-writable directory or one
/// another user owns, where that user could swap them. `--root`'s own parent (here a
/// sticky, world-writable one like `/tmp`) is not checked.
#[test]
fn directories_others_can_change_are_refused() {
    require_tools!(Openssl);
    for rel in ["", "data", "data/var", CERTS, MANIFESTS, "etc"] {
        for foreign in [false, true] {
            let fr = FakeRoot::with_template();
            fs::create_dir_all(fr.p(CERTS)).unwrap();
            fs::create_dir_all(fr.p("etc")).unwrap();
            let dir = if rel.is_empty() { fr.root() } else { fr.p(rel) };
            if foreign {
                std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            } else {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).unwrap();
            }
            let before = fr.snapshot();
            let run = provision(&fr);
            let err = run.one_error(1);
            let why = if foreign {
                "owned by uid 65534"
            } else {
                "chmod go-w"
            };
            assert!(err.contains(&format!("{} ", dir.display())), "{rel}: {run}");
            assert!(err.contains(why), "{rel}: {run}");
            let pinned = match foreign {
                true => "permissions/strict_modes_owner",
                false => "permissions/strict_modes_writable",
            };
            let dir = ("[DIR]", dir.display().to_string());
            common::pin_file(&err, &[dir], pinned);
            assert_same_tree(&before, &fr.snapshot(), rel);
            assert!(fr.calls().is_empty());
        }
    }
    let fr = FakeRoot::with_template();
    fs::set_permissions(fr.dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    provision(&fr).ok();
}

/// Before: an interface link in `sys/class/net` that climbs out of the root was
/// followed on the host, and the device id came from a MAC outside the tree. Read
/// inside the root it leads nowhere, so there is no interface to take the id from.
#[test]
fn a_network_interface_linked_out_of_the_root_is_not_read() {
    let fr = FakeRoot::bare();
    fr.put_fixture("cloudconnector.kanto.json.template", TEMPLATE);
    let outside = fr.dir.path().join("outside-net/eth9");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("address"), "52:54:00:12:34:56\n").unwrap();
    fs::write(outside.join("type"), "1\n").unwrap();
    fs::create_dir_all(fr.p("sys/class/net")).unwrap();
    symlink("../../../../outside-net/eth9", fr.p("sys/class/net/eth9")).unwrap();
    let before = fr.snapshot();
    let run = provision(&fr);
    assert!(run.one_error(1).contains("--device-id"), "{run}");
    assert!(!run.all().contains("52-54-00-12-34-56"), "{run}");
    assert_same_tree(&before, &fr.snapshot(), "interface link");
}
