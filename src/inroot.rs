//! Paths under `--root`, resolved the way the device will see them (DESIGN §6 "Inside
//! `--root`, always"), and the StrictModes check of the directories secrets go into.
//!
//! `--root` is the device's `/`: an absolute link in an image tree (`data ->
//! /persist/data`) means `<root>/persist/data`, and no `..` or link leads out of it.
//! The resolution is pathrs' (`openat2(RESOLVE_IN_ROOT)`, or its own O_PATH walk where
//! openat2 is missing); the result is read back from `/proc/thread-self/fd`, so it is
//! the real host path of the directory pathrs reached, with no link left in it.
//!
//! A directory that does not exist yet resolves to its deepest existing ancestor plus
//! the missing names (they can hold no link). A link that leads nowhere inside the
//! root is an error: on the device it leads nowhere either.
//!
//! Residual race, and why it is closed: [`crate::paths::Layout`] resolves each
//! directory once per run and the file operations then use the link-free host path.
//! Between the two, only someone who can write to a directory on that path could put
//! a link in; [`check_private`] refuses to write unless every directory from the
//! certificates, manifests and `/etc` directory up to `--root` is owned by us or root
//! and writable by nobody else, as sshd's StrictModes does. The check stops at
//! `--root`: its own parents (say a sticky `/tmp`) are the operator's choice.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use pathrs::error::ErrorKind;
use pathrs::procfs::{ProcfsBase, ProcfsHandle};
use pathrs::{Handle, Root};

use crate::error::{Error, Result};

/// Host path of device directory `dir` (absolute, as the device names it), resolved
/// inside `root`. `Err` is a one-line reason.
pub fn resolve_dir(root: &Path, dir: &Path) -> std::result::Result<PathBuf, String> {
    let comps: Vec<&OsStr> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::new("..")),
            _ => None,
        })
        .collect();
    // A root that does not exist yet (a library caller's fresh tree; the CLI refuses
    // one) holds no links: only plain names below it.
    if std::fs::symlink_metadata(root).is_err_and(|e| e.kind() == io::ErrorKind::NotFound) {
        if comps.contains(&OsStr::new("..")) {
            return Err(format!(
                "{} goes through a missing directory",
                dir.display()
            ));
        }
        return Ok(comps.iter().fold(root.to_owned(), |p, c| p.join(c)));
    }
    let tree =
        Root::open(root).map_err(|e| format!("cannot open {}: {}", root.display(), why(&e)))?;
    let top = host_of(&tree.resolve(".").map_err(|e| why(&e))?, None)?;
    // A directory another run makes meanwhile just means: look again.
    for _ in 0..8 {
        if let Some(r) = resolve_once(&tree, &top, dir, &comps) {
            return r;
        }
    }
    Err(format!("{} keeps changing", dir.display()))
}

/// One try of [`resolve_dir`]: the longest prefix that exists, then the missing
/// names (plain names, none of them a link). `None`: the tree changed, try again.
fn resolve_once(
    tree: &Root,
    top: &Path,
    dir: &Path,
    comps: &[&OsStr],
) -> Option<std::result::Result<PathBuf, String>> {
    for i in (0..=comps.len()).rev() {
        let prefix: PathBuf = std::iter::once(OsStr::new("."))
            .chain(comps[..i].iter().copied())
            .collect();
        let h = match tree.resolve(&prefix) {
            Ok(h) => h,
            Err(e) if e.kind() == ErrorKind::OsError(Some(libc::ENOENT)) && i > 0 => continue,
            Err(e) => return Some(Err(format!("{}: {}", shown(dir, i), why(&e)))),
        };
        let rest = &comps[i..];
        if let Some(next) = rest.first() {
            if let Ok(n) = tree.resolve_nofollow(prefix.join(next)) {
                let link = rustix::fs::fstat(n.as_fd())
                    .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink());
                return link.then(|| {
                    Err(format!(
                        "{} is a link to nothing inside --root",
                        shown(dir, i + 1)
                    ))
                });
            }
            if rest.contains(&OsStr::new("..")) {
                return Some(Err(format!(
                    "{} goes through a missing directory",
                    dir.display()
                )));
            }
        }
        return Some(host_of(&h, Some(top)).map(|base| rest.iter().fold(base, |p, c| p.join(c))));
    }
    Some(Err(format!("cannot resolve {}", dir.display())))
}

/// StrictModes: `dir` (a resolved host path) and each of its existing parents up to
/// and including `root` must be directories owned by us or root and not writable by
/// group or others. Directories still to be made are made 0755 by us.
pub fn check_private(root: &Path, dir: &Path) -> Result<()> {
    let me = rustix::process::geteuid().as_raw();
    // `dir` is a resolved (canonical) path: compare it with the canonical root.
    let root = &std::fs::canonicalize(root).map_err(|e| Error::read(root, e))?;
    let mut cur = Some(dir);
    while let Some(d) = cur {
        match std::fs::symlink_metadata(d) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::read(d, e)),
            Ok(m) if !m.is_dir() => {
                return Err(Error::input(
                    format!("{} is not a directory", d.display()),
                    "sdv-provision keeps keys below it; move it away and re-run",
                ))
            }
            Ok(m) if m.uid() != me && m.uid() != 0 => {
                return Err(Error::input(
                    format!(
                        "{} is owned by uid {}, not by this user or root",
                        d.display(),
                        m.uid()
                    ),
                    format!(
                        "sdv-provision writes keys or settings below it; `chown {me} {}` (or root) and re-run",
                        d.display()
                    ),
                ))
            }
            Ok(m) if m.mode() & 0o022 != 0 => {
                return Err(Error::input(
                    format!(
                        "{} is writable by group or others (mode {:o})",
                        d.display(),
                        m.mode() & 0o7777
                    ),
                    format!(
                        "sdv-provision writes keys or settings below it; `chmod go-w {}` and re-run",
                        d.display()
                    ),
                ))
            }
            Ok(_) => {}
        }
        cur = (d != root).then(|| d.parent()).flatten();
    }
    Ok(())
}

/// The host path of what `h` refers to (from `/proc/thread-self/fd`), checked to lie
/// under `top` (the root's own host path).
fn host_of(h: &Handle, top: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let procfs = ProcfsHandle::new().map_err(|e| format!("cannot use /proc: {}", why(&e)))?;
    let p = procfs
        .readlink(
            ProcfsBase::ProcThreadSelf,
            format!("fd/{}", h.as_fd().as_raw_fd()),
        )
        .map_err(|e| format!("cannot use /proc: {}", why(&e)))?;
    match top {
        Some(t) if !p.starts_with(t) => Err(format!("{} is outside --root", p.display())),
        _ => Ok(p),
    }
}

/// The first `n` components of `dir`, for messages.
fn shown(dir: &Path, n: usize) -> String {
    let mut p = PathBuf::from("/");
    for c in dir
        .components()
        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
        .take(n)
    {
        p.push(c);
    }
    p.display().to_string()
}

fn why(e: &pathrs::error::Error) -> String {
    match e.kind() {
        ErrorKind::OsError(Some(n)) => io::Error::from_raw_os_error(n).to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn resolves_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("persist/data/var")).unwrap();
        std::os::unix::fs::symlink("/persist/data", root.join("data")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("persist/data/up")).unwrap();
        let top = fs::canonicalize(&root).unwrap();
        let r = |p: &str| resolve_dir(&root, Path::new(p));
        assert_eq!(
            r("/data/var/certificates"),
            Ok(top.join("persist/data/var/certificates"))
        );
        assert_eq!(r("/data/up/etc"), Ok(top.join("etc")));
        assert_eq!(r("/../../etc"), Ok(top.join("etc")));
        std::os::unix::fs::symlink("/nowhere", root.join("etc")).unwrap();
        assert!(r("/etc").unwrap_err().contains("link to nothing"));
        let fresh = d.path().join("fresh");
        let f = |p: &str| resolve_dir(&fresh, Path::new(p));
        assert_eq!(f("/data/var"), Ok(fresh.join("data/var")));
        assert!(f("/../etc").is_err());
    }

    #[test]
    fn strict_modes_stop_at_a_root_named_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let certs = root.join("data/var/certificates");
        fs::create_dir_all(&certs).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        // The parent of the root (a temp dir) is not checked, even world-writable.
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let certs = fs::canonicalize(&certs).unwrap();
        check_private(&link, &certs).unwrap();
        fs::set_permissions(root.join("data"), fs::Permissions::from_mode(0o757)).unwrap();
        assert!(check_private(&link, &certs).is_err());
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
    }
}
