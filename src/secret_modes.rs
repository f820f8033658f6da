//! Secret files stay 0600 on every run (DESIGN §6 "Secret modes hold on every run").
//!
//! Writers create secrets 0600 ([`fsutil::SECRET`]), but a file loosened afterwards
//! (an editor, a backup restore, a `chmod -R`) would stay loose. So every mutating
//! command, once it holds the run lock, puts the tool's secret files back to 0600
//! and says so ([`tighten`]); `verify` fails and `status` reports a problem for a
//! loose one ([`loose`]). The files: the file keystore's keys (live and staged),
//! the TPM private blobs, `azure.connectionstring`, the tool's `pkcs11.pin`, and the
//! connector manifest while it holds a SharedAccessKey. A PIN file of the user's is
//! not ours to chmod; reading it warns when it is loose (keystore/pkcs11/pin.rs).

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::keystore::Role;
use crate::model::Slot;
use crate::paths::{Layout, CONNECTION_STRING_FILE, MANIFEST, PKCS11_PIN_FILE};

/// A secret file whose mode lets group or others in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loose {
    pub path: PathBuf,
    pub mode: u32,
}

impl Loose {
    /// The problem and its fix, naming the file and both modes.
    pub fn problem(&self) -> String {
        format!(
            "{} holds a secret but is mode {:04o}; run sdv-provision (or chmod 600 it) to make it 0600",
            self.path.display(),
            self.mode
        )
    }
}

/// Host paths of the tool's secret files (whether or not they exist).
fn candidates(layout: &Layout) -> Vec<PathBuf> {
    let mut names = vec![CONNECTION_STRING_FILE.to_string(), PKCS11_PIN_FILE.into()];
    for role in Role::ALL {
        for slot in [Slot::live(role), Slot::staged(role)] {
            names.extend([slot.key_file(), slot.tpm_blobs().1]);
        }
    }
    let mut paths: Vec<PathBuf> = names.iter().map(|n| layout.host_cert_file(n)).collect();
    paths.push(layout.host(MANIFEST));
    paths
}

/// Open `path` without following a link or blocking; `None` unless it is a regular
/// file (a missing file, a link or a FIFO is for the readers to refuse).
fn open(path: &Path) -> Option<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    f.metadata().ok()?.is_file().then_some(f)
}

/// Does the manifest hold a SharedAccessKey? Decided on the bytes, so a manifest
/// too malformed to parse is still treated as a secret.
fn holds_secret(path: &Path) -> bool {
    let Ok(Some(bytes)) = fsutil::read_optional(path) else {
        return false;
    };
    let bytes = zeroize::Zeroizing::new(bytes);
    bytes.windows(16).any(|w| w == b"SharedAccessKey=")
}

/// The tool's secret files that group or others can access, with their modes.
pub fn loose(layout: &Layout) -> Vec<Loose> {
    let manifest = layout.host(MANIFEST);
    candidates(layout)
        .into_iter()
        .filter_map(|path| {
            let mode = open(&path)?.metadata().ok()?.permissions().mode() & 0o7777;
            (mode & 0o077 != 0 && (path != manifest || holds_secret(&path)))
                .then_some(Loose { path, mode })
        })
        .collect()
}

/// Put every loose secret file back to 0600 (through the open descriptor, so a
/// file swapped for a link meanwhile is not followed). Returns what it changed.
pub fn tighten(layout: &Layout) -> Result<Vec<Loose>> {
    let found = loose(layout);
    for l in &found {
        let Some(f) = open(&l.path) else { continue };
        f.set_permissions(Permissions::from_mode(fsutil::SECRET))
            .map_err(|e| Error::write(&l.path, e))?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_secrets_are_found_and_tightened() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let cs = layout.host_cert_file(CONNECTION_STRING_FILE);
        let manifest = layout.host(MANIFEST);
        fsutil::atomic_write(&cs, b"HostName=h;DeviceId=d\n", 0o644).unwrap();
        fsutil::atomic_write(&manifest, br#"{"config":{"env":["ID_SCOPE=x"]}}"#, 0o644).unwrap();
        assert_eq!(
            loose(&layout),
            [Loose {
                path: cs.clone(),
                mode: 0o644
            }]
        );
        fsutil::atomic_write(&manifest, br#"{"e":"SharedAccessKey=abc"}"#, 0o640).unwrap();
        assert_eq!(tighten(&layout).unwrap().len(), 2);
        assert!(loose(&layout).is_empty());
        for p in [&cs, &manifest] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(loose(&layout).iter().all(|l| l.problem().contains("0600")));
    }
}
