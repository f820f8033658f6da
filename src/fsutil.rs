//! File-system helpers: the one atomic-write path every writer uses, symlink-safe reads,
//! and the run lock.
//!
//! Atomic write = temp file in the same directory (created 0600, never in `$TMPDIR`),
//! write, fsync, rename over the target, fsync the directory. A crash at any instant
//! leaves either the old file or the new one; a leftover temp file carries the
//! [`TEMP_PREFIX`] and is removed by [`remove_stale_temps`] on the next run.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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

/// Remove temp files a killed run left behind in `dir`.
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

/// Exclusive lock for mutating commands, held until dropped.
///
/// The lock is an advisory `flock` on the `--root` directory itself: it always exists,
/// so taking the lock creates no file and a run that fails on bad input leaves the
/// tree exactly as it was; and parallel runs on different roots (tests, image builds)
/// do not block each other. Waits up to `timeout`, then fails with a clear message.
pub struct RunLock {
    _dir: File,
}

impl RunLock {
    pub fn acquire(dir: &Path, timeout: Duration) -> Result<RunLock> {
        let file = File::open(dir).map_err(|e| Error::read(dir, e))?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(RunLock { _dir: file }),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        path: dir.to_owned(),
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::write(dir, e)),
            }
        }
    }
}

/// Join a device path (absolute, as seen on the device) onto the `--root` prefix.
pub fn under_root(root: &Path, device_path: &Path) -> PathBuf {
    root.join(device_path.strip_prefix("/").unwrap_or(device_path))
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

    #[test]
    fn lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let _held = RunLock::acquire(p, Duration::from_millis(10)).unwrap();
        assert!(matches!(
            RunLock::acquire(p, Duration::from_millis(100)),
            Err(Error::Locked { .. })
        ));
    }
}
