//! Where things live on the device (DESIGN §4), and how that maps under `--root`.
//!
//! Paths *written into* files (manifest, state) are device paths; paths we open are
//! host paths (`--root` + device path). Keeping both in one place stops the two from
//! being mixed up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};

/// The certificates directory, as the device sees it.
pub const CERT_DIR: &str = "/data/var/certificates";
/// Where new mounts of the certificates directory land inside the container.
pub const CONTAINER_CERT_DIR: &str = "/var/certificates";
pub const DEVICE_ID_FILE: &str = "/etc/deviceid";
pub const MANIFEST: &str = "/data/var/containers/manifests/cloudconnector.json";
pub const MANIFEST_TEMPLATE: &str = "/data/var/containers/manifests/cloudconnector.json.template";
pub const SYS_CLASS_NET: &str = "/sys/class/net";
/// The manifests directory (it holds a SharedAccessKey in connection-string mode).
pub const MANIFEST_DIR: &str = "/data/var/containers/manifests";
/// Our state file: keystore, algorithm, key URIs, handles, in-flight work.
pub const STATE_FILE: &str = "sdv-provision.state.json";
/// The journal of in-flight work (see `txn`).
pub const JOURNAL_FILE: &str = "sdv-provision.journal.json";
pub const ID_SCOPE_FILE: &str = "azure.idscope";
pub const CONNECTION_STRING_FILE: &str = "azure.connectionstring";
/// The PIN file the PKCS#11 keystore writes for the connector (0600).
pub const PKCS11_PIN_FILE: &str = "pkcs11.pin";

/// The `--root` prefix plus the fixed layout below it.
///
/// Host paths are resolved inside the root ([`crate::inroot`]): each directory once
/// per run (the clones of one `Layout` share what was resolved), so every operation
/// of a run sees the same directories. [`Layout::resolve_dirs`] resolves the fixed
/// ones up front, so a broken link among them is one clear error at the start.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    dirs: Arc<Mutex<HashMap<PathBuf, PathBuf>>>,
}

/// The directories every command may use, resolved by [`Layout::resolve_dirs`].
const FIXED_DIRS: [&str; 4] = [CERT_DIR, MANIFEST_DIR, "/etc", SYS_CLASS_NET];

/// Where a path that cannot be resolved inside the root points instead: below a
/// character device, so every operation on it fails (ENOTDIR) and nothing outside
/// the root is ever reached. Only a link broken in the middle of a run gets here.
const UNRESOLVED: &str = "/dev/null/unresolvable-inside-root";

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout {
            root: root.into(),
            dirs: Default::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Host path of a device path, resolved inside the root.
    pub fn host(&self, device_path: impl AsRef<Path>) -> PathBuf {
        let p = device_path.as_ref();
        self.try_host(p).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}", p.display());
            Path::new(UNRESOLVED).join(p.strip_prefix("/").unwrap_or(p))
        })
    }

    /// [`Layout::host`], with the reason when the path cannot be resolved (a link to
    /// nothing inside the root, a loop, a file where a directory should be). The last
    /// component is never followed (a link there is for the file operations to
    /// refuse), except for the fixed directories, which are resolved whole.
    pub fn try_host(&self, device_path: impl AsRef<Path>) -> Result<PathBuf> {
        let p = device_path.as_ref();
        let fail = |e: String| unresolvable(&self.root, p, e);
        match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) if !FIXED_DIRS.iter().any(|d| Path::new(d) == p) => {
                Ok(self.dir(dir).map_err(fail)?.join(name))
            }
            _ => self.dir(p).map_err(fail),
        }
    }

    /// Host path of a device *directory*, resolved whole inside the root (a link in
    /// the last place is followed there too).
    pub fn try_host_dir(&self, device_dir: impl AsRef<Path>) -> Result<PathBuf> {
        let p = device_dir.as_ref();
        self.dir(p).map_err(|e| unresolvable(&self.root, p, e))
    }

    /// Resolve the fixed directories (certificates, manifests, `/etc`, network
    /// interfaces): every command calls this first.
    pub fn resolve_dirs(&self) -> Result<()> {
        for d in FIXED_DIRS {
            self.dir(Path::new(d))
                .map_err(|e| unresolvable(&self.root, Path::new(d), e))?;
        }
        Ok(())
    }

    /// StrictModes (see [`crate::inroot::check_private`]) for the directories the
    /// tool writes into: the certificates and the manifests directory (secrets) and
    /// `/etc` (the device id), so no one else can swap a link in after resolution.
    pub fn check_private_dirs(&self) -> Result<()> {
        for d in [CERT_DIR, MANIFEST_DIR, "/etc"] {
            crate::inroot::check_private(&self.root, &self.host(d))?;
        }
        Ok(())
    }

    fn dir(&self, device_dir: &Path) -> std::result::Result<PathBuf, String> {
        let mut dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = dirs.get(device_dir) {
            return Ok(p.clone());
        }
        let p = crate::inroot::resolve_dir(&self.root, device_dir)?;
        dirs.insert(device_dir.to_owned(), p.clone());
        Ok(p)
    }

    /// Device path of a file in the certificates directory.
    pub fn cert_file(name: &str) -> PathBuf {
        Path::new(CERT_DIR).join(name)
    }

    /// Host path of a file in the certificates directory.
    pub fn host_cert_file(&self, name: &str) -> PathBuf {
        self.host(Self::cert_file(name))
    }

    pub fn host_cert_dir(&self) -> PathBuf {
        self.host(CERT_DIR)
    }
}

fn unresolvable(root: &Path, device_path: &Path, reason: String) -> Error {
    Error::input(
        format!(
            "{} cannot be resolved inside --root {} ({reason})",
            device_path.display(),
            root.display()
        ),
        "fix or remove the link (links are read as the device reads them, inside the root)",
    )
}
