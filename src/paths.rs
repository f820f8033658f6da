//! Where things live on the device (DESIGN §4), and how that maps under `--root`.
//!
//! Paths *written into* files (manifest, state) are device paths; paths we open are
//! host paths (`--root` + device path). Keeping both in one place stops the two from
//! being mixed up.

use std::path::{Path, PathBuf};

use crate::keystore::Role;

/// The certificates directory, as the device sees it.
pub const CERT_DIR: &str = "/data/var/certificates";
/// Where new mounts of the certificates directory land inside the container.
pub const CONTAINER_CERT_DIR: &str = "/var/certificates";
pub const DEVICE_ID_FILE: &str = "/etc/deviceid";
pub const MANIFEST: &str = "/data/var/containers/manifests/cloudconnector.json";
pub const MANIFEST_TEMPLATE: &str = "/data/var/containers/manifests/cloudconnector.json.template";
pub const SYS_CLASS_NET: &str = "/sys/class/net";
/// Our state file: keystore, algorithm, key URIs, handles, in-flight work.
pub const STATE_FILE: &str = "sdv-provision.state.json";
pub const ID_SCOPE_FILE: &str = "azure.idscope";
pub const CONNECTION_STRING_FILE: &str = "azure.connectionstring";
/// The PIN file the PKCS#11 keystore writes for the connector (0600).
pub const PKCS11_PIN_FILE: &str = "pkcs11.pin";

/// The `--root` prefix plus the fixed layout below it.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Host path of a device path.
    pub fn host(&self, device_path: impl AsRef<Path>) -> PathBuf {
        crate::fsutil::under_root(&self.root, device_path.as_ref())
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

/// File-name stem for a role's files: `device` / `device2` as the original script named
/// them, and `device.next` / `device2.next` for an identity being built while the old
/// one is still in service (rotation, `--force`).
pub fn stem(role: Role, staged: bool) -> &'static str {
    match (role, staged) {
        (Role::Primary, false) => "device",
        (Role::Secondary, false) => "device2",
        (Role::Primary, true) => "device.next",
        (Role::Secondary, true) => "device2.next",
    }
}

/// `device.crt`, `device2.crt`, …
pub fn cert_name(role: Role, staged: bool) -> String {
    format!("{}.crt", stem(role, staged))
}
