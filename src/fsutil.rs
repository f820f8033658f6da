//! File-system helpers: the one atomic-write path every writer uses, symlink-safe reads,
//! and the run lock.
//!
//! Atomic write = temp file in the same directory (created 0600, never in `$TMPDIR`),
//! write, fsync, rename over the target, fsync the directory. A crash at any instant
//! leaves either the old file or the new one; a leftover temp file carries the
//! [`TEMP_PREFIX`] and is removed by [`remove_stale_temps`] on the next run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Prefix of our temp files, so a crash leftover can be recognised and cleaned.
pub const TEMP_PREFIX: &str = ".sdv-provision.tmp";

/// Mode for secrets: keys, connection string, PIN files.
pub const SECRET: u32 = 0o600;
/// Mode for public files: certificates, device id, manifest.
pub const PUBLIC: u32 = 0o644;

/// Atomically replace `path` with `data`, with permission `mode`.
///
/// Refuses to replace a symbolic link: a link planted at a key or certificate path
/// must not redirect where we write.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    refuse_symlink(path)?;
    let dir = parent(path);
    ensure_dir(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(fs::Permissions::from_mode(SECRET))
        .tempfile_in(dir)
        .map_err(|e| Error::write(path, e))?;
    let w = |e| Error::write(path, e);
    tmp.write_all(data).map_err(w)?;
    if mode != SECRET {
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(w)?;
    }
    tmp.as_file().sync_all().map_err(w)?;
    tmp.persist(path).map_err(|e| Error::write(path, e.error))?;
    sync_dir(dir).map_err(w)
}

/// Read a file we may have to replace, returning `None` when it does not exist.
/// Symbolic links are refused rather than followed.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::read(path, e)),
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::Symlink {
                path: path.to_owned(),
            })
        }
        Ok(m) if m.is_dir() => {
            return Err(Error::read(
                path,
                io::Error::new(
                    ErrorKind::IsADirectory,
                    "is a directory, not a file; move it away (or restore the file) and re-run",
                ),
            ))
        }
        Ok(m) if !m.is_file() => return Err(not_regular(path)),
        Ok(_) => {}
    }
    // O_NOFOLLOW closes the race between the check above and the open; O_NONBLOCK
    // keeps a FIFO swapped in meanwhile from blocking the open, and the fstat below
    // refuses it.
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::read(path, e))?;
    if !f.metadata().map_err(|e| Error::read(path, e))?.is_file() {
        return Err(not_regular(path));
    }
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut f, &mut buf).map_err(|e| Error::read(path, e))?;
    Ok(Some(buf))
}

fn not_regular(path: &Path) -> Error {
    Error::read(
        path,
        io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device); remove it (or restore the file) and re-run",
        ),
    )
}

/// Like [`read_optional`] for UTF-8 text.
pub fn read_optional_string(path: &Path) -> Result<Option<String>> {
    match read_optional(path)? {
        None => Ok(None),
        Some(b) => String::from_utf8(b).map(Some).map_err(|_| {
            Error::read(
                path,
                io::Error::new(ErrorKind::InvalidData, "not valid UTF-8"),
            )
        }),
    }
}

/// Remove a file we own; a missing file is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)).map_err(|e| Error::write(path, e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::write(path, e)),
    }
}

/// Rename `from` to `to` atomically (same directory) and make it durable.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    refuse_symlink(to)?;
    fs::rename(from, to).map_err(|e| Error::write(to, e))?;
    sync_dir(parent(to)).map_err(|e| Error::write(to, e))
}

/// Create `dir` (and parents) with mode 0755; never world-writable.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::write(dir, e))
}

/// Remove temp files a killed run left behind in `dir`. Recovery sweeps every
/// directory the tool writes: a write whose own clean-up failed too (a failing disk
/// fails the unlink as well) leaves its temp file beside the target.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
}

pub fn exists_nofollow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn refuse_symlink(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::Symlink {
            path: path.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Name of the run lock in the certificates directory (see [`RunLock`]).
pub const LOCK_FILE: &str = ".sdv-provision.lock";

/// Exclusive lock for mutating commands, held until dropped.
///
/// An advisory `flock` on [`LOCK_FILE`], a 0600 file of ours in the certificates
/// directory. Nobody else can take it: opening the file needs write access to it, and
/// the directory passed the StrictModes check (owned by us or root, writable by
/// nobody else), so no one else can plant or replace the file either. (The old lock,
/// a `flock` on the `--root` directory, could be held by any user who can read `/`.)
///
/// The file exists only while a run holds it: it is removed before the lock is
/// released, and a waiter that then gets the lock on the removed file sees that the
/// name no longer leads to the file it holds and tries again. Directories the lock had
/// to make are removed again when they are still empty, so a run that fails on bad
/// input leaves the tree as it was. A file left by a killed run is simply reused.
pub struct RunLock {
    _file: File,
    path: PathBuf,
    made: Vec<PathBuf>,
}

impl RunLock {
    /// Lock in `dir` (a resolved host path), waiting up to `timeout`. A timeout is
    /// [`Error::Locked`] naming `root`.
    pub fn acquire(dir: &Path, root: &Path, timeout: Duration) -> Result<RunLock> {
        let mut made = make_dirs(dir)?;
        let path = dir.join(LOCK_FILE);
        let deadline = Instant::now() + timeout;
        let wait = || {
            if Instant::now() >= deadline {
                return Err(Error::Locked {
                    path: root.to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        };
        let lock = loop {
            let file = match open_lock_file(&path) {
                Ok(f) => f,
                // The directory went away with a run that made it: make it again.
                Err(e) if e.kind() == ErrorKind::NotFound => match make_dirs(dir) {
                    Ok(m) => {
                        made.extend(m);
                        continue;
                    }
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(Error::write(&path, e)),
            };
            match file.try_lock() {
                Ok(()) if still_named(&file, &path) => break Ok(file),
                Ok(()) => continue,
                Err(fs::TryLockError::WouldBlock) => match wait() {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                },
                Err(fs::TryLockError::Error(e)) => break Err(Error::write(&path, e)),
            }
        };
        match lock {
            Ok(file) => Ok(RunLock {
                _file: file,
                path,
                made,
            }),
            Err(e) => {
                remove_empty_dirs(&made);
                Err(e)
            }
        }
    }

    /// Did taking the lock make the directory it lives in (so it was not there)?
    pub fn made_dir(&self) -> bool {
        !self.made.is_empty()
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Still locked here: the file is closed (and unlocked) after this body.
        let _ = fs::remove_file(&self.path);
        remove_empty_dirs(&self.made);
    }
}

/// Make the missing directories of `dir` (0755), returning those this call made.
fn make_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !exists_nofollow(d))
        .collect();
    let mut made = Vec::new();
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => made.push(d.to_owned()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::write(d, e)),
        }
    }
    Ok(made)
}

fn remove_empty_dirs(made: &[PathBuf]) {
    for d in made.iter().rev() {
        if fs::remove_dir(d).is_err() {
            return;
        }
    }
}

/// Open (or create, 0600) the lock file: never through a link, never blocking on a
/// FIFO, and only a regular file owned by us or root.
fn open_lock_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(SECRET)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let m = file.metadata()?;
    let me = rustix::process::geteuid().as_raw();
    if !m.is_file() || (m.uid() != me && m.uid() != 0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file of this user or root; remove it and re-run",
        ));
    }
    if m.permissions().mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(SECRET))?;
    }
    Ok(file)
}

/// Is `file` still the one `path` names (a releasing run may have removed it)?
fn still_named(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/secret");
        atomic_write(&p, b"one", SECRET).unwrap();
        atomic_write(&p, b"two", SECRET).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        atomic_write(&p, b"pub", PUBLIC).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let leftovers: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn refuses_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        fs::write(&target, b"x").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            atomic_write(&link, b"y", SECRET),
            Err(Error::Symlink { .. })
        ));
        assert!(matches!(read_optional(&link), Err(Error::Symlink { .. })));
        assert_eq!(fs::read(&target).unwrap(), b"x");
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let dir = p.join("a/b");
        let held = RunLock::acquire(&dir, p, Duration::from_millis(10)).unwrap();
        assert!(held.made_dir());
        assert_eq!(mode_of(&dir.join(LOCK_FILE)), 0o600);
        assert!(matches!(
            RunLock::acquire(&dir, p, Duration::from_millis(100)),
            Err(Error::Locked { .. })
        ));
        drop(held);
        assert!(!p.join("a").exists(), "the lock removes what it made");
        fs::create_dir_all(&dir).unwrap();
        let again = RunLock::acquire(&dir, p, Duration::from_millis(10)).unwrap();
        assert!(!again.made_dir());
        drop(again);
        assert!(dir.is_dir() && !dir.join(LOCK_FILE).exists());
    }
}
