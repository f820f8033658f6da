//! Which PIN file the connector gets: one pure rule ([`choose`]) with a table test,
//! and [`settle`], which gathers its inputs and writes what it decides. Opening the
//! token only logs in ([`super::Pkcs11KeyStore::open`]); the commands call
//! [`settle`] right after, through [`crate::keystore::choose_pin_file`].
//!
//! The connector reads a PIN file of the user's in the certificates directory when
//! it may (the `--pkcs11-pin-file` given, or the one an earlier run recorded while it
//! still holds the PIN the token accepted); otherwise the tool's own `pkcs11.pin`
//! (0600) holds the accepted PIN, so a PIN changed on the token reaches the connector
//! with the next run of any command that logs in. Only provisioning chooses; every
//! other command keeps the file the identity records (the one the manifest names),
//! and `verify` and `csr` write nothing at all.
//!
//! Written right after a successful login, before anything else happens, because:
//! - only a PIN the token has accepted ever reaches a file, so a typo never ends up
//!   in the connector's configuration and a wrong PIN writes nothing;
//! - it is in place before any key exists, so a run killed at any later step never
//!   leaves a manifest whose `pin-source` names a missing file;
//! - it is rewritten only when its content differs, so a re-run changes nothing,
//!   while a PIN changed on the token is picked up by the next run.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::pin::{inside_cert_dir, pin_file_holds};
use super::PIN_FILE_NAME;
use crate::fsutil;
use crate::keystore::{KeyStoreError, PinFile, Pkcs11Config, Purpose};
use crate::paths::Layout;

/// `--pkcs11-pin-file`, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag<'a> {
    None,
    /// Given, but not a regular file inside the certificates directory (after
    /// resolution): the connector cannot be given it.
    Elsewhere,
    /// Given, at this device path in the certificates directory.
    InCertDir(&'a Path),
}

/// What the connector gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A file of the user's, used as it is; `holds_pin`: it holds the accepted PIN.
    Users { file: PathBuf, holds_pin: bool },
    /// The tool's own `pkcs11.pin`; `write`: refresh it with the accepted PIN.
    Ours { write: bool },
}

/// The rule. `recorded` is the file an earlier run recorded, `recorded_holds_pin`
/// whether it holds the PIN the token just accepted, `command` what the command
/// opened the store for: `verify` and `csr` ([`Purpose::Read`]) write nothing,
/// `provision` may choose another file (and then converges the manifest), every
/// other command ([`Purpose::Change`]) keeps the recorded file.
pub fn choose(
    flag: Flag<'_>,
    recorded: Option<&Path>,
    recorded_holds_pin: bool,
    command: Purpose,
) -> Choice {
    let ours = Layout::cert_file(PIN_FILE_NAME);
    let users = recorded.filter(|r| *r != ours).map(Path::to_path_buf);
    match (command, flag, users) {
        (Purpose::Read, _, Some(file)) | (Purpose::Change, _, Some(file)) => Choice::Users {
            file,
            holds_pin: recorded_holds_pin,
        },
        (Purpose::Read, _, None) => Choice::Ours { write: false },
        (Purpose::Provision, Flag::InCertDir(file), _) => Choice::Users {
            file: file.to_path_buf(),
            holds_pin: true,
        },
        (Purpose::Provision, Flag::None, Some(file)) if recorded_holds_pin => Choice::Users {
            file,
            holds_pin: true,
        },
        (Purpose::Provision, _, _) | (Purpose::Change, _, None) => Choice::Ours { write: true },
    }
}

/// The PIN file the connector reads (device path), and whether it holds `pin` (the
/// PIN the token just accepted): [`choose`] for `config.purpose`, then
/// `<certdir>/pkcs11.pin` written (atomically, 0600, only when it differs) where the
/// rule says so.
pub fn settle(
    config: &Pkcs11Config,
    layout: &Layout,
    pin: &SecretString,
) -> Result<PinFile, KeyStoreError> {
    let command = config.purpose;
    let in_cert_dir = match (&config.pin_file, command) {
        (Some(user), Purpose::Provision) => inside_cert_dir(layout, user),
        _ => None,
    };
    let flag = match (&config.pin_file, &in_cert_dir) {
        (_, Some(device)) => Flag::InCertDir(device),
        (Some(_), None) => Flag::Elsewhere,
        (None, None) => Flag::None,
    };
    let recorded = config.recorded.pin_file.as_deref();
    let recorded_holds_pin = recorded.is_some_and(|r| pin_file_holds(layout, r, pin));
    let ours = Layout::cert_file(PIN_FILE_NAME);
    match choose(flag, recorded, recorded_holds_pin, command) {
        Choice::Users { file, holds_pin } => Ok(PinFile {
            path: file,
            holds_pin,
        }),
        Choice::Ours { write: false } => Ok(PinFile {
            holds_pin: pin_file_holds(layout, &ours, pin),
            path: ours,
        }),
        Choice::Ours { write: true } => {
            if !pin_file_holds(layout, &ours, pin) {
                fsutil::atomic_write(
                    &layout.host(&ours),
                    pin.expose_secret().as_bytes(),
                    fsutil::SECRET,
                )
                .map_err(|e| {
                    KeyStoreError::backend("write the connector's PIN file", e.to_string())
                })?;
            }
            Ok(PinFile {
                path: ours,
                holds_pin: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let user = Path::new("/data/var/certificates/user.pin");
        let old = Path::new("/data/var/certificates/old.pin");
        let ours = Layout::cert_file(PIN_FILE_NAME);
        let users = |f: &Path, holds_pin| Choice::Users {
            file: f.to_path_buf(),
            holds_pin,
        };
        let write = Choice::Ours { write: true };
        use Purpose::*;
        // (flag, recorded, recorded holds the PIN, command) -> choice
        let table: [(Flag, Option<&Path>, bool, Purpose, Choice); 14] = [
            // provision: a flag in the certificates directory wins
            (
                Flag::InCertDir(user),
                Some(old),
                true,
                Provision,
                users(user, true),
            ),
            (
                Flag::InCertDir(user),
                None,
                false,
                Provision,
                users(user, true),
            ),
            // ... a flag elsewhere means the tool's copy, never the recorded file
            (Flag::Elsewhere, Some(old), true, Provision, write.clone()),
            // ... no flag: the recorded file while it holds the PIN
            (Flag::None, Some(old), true, Provision, users(old, true)),
            (Flag::None, Some(old), false, Provision, write.clone()),
            (Flag::None, Some(&ours), true, Provision, write.clone()),
            (Flag::None, None, false, Provision, write.clone()),
            // other mutating commands keep the recorded file of the user's, flag or not
            (
                Flag::InCertDir(user),
                Some(old),
                false,
                Change,
                users(old, false),
            ),
            (Flag::None, Some(old), true, Change, users(old, true)),
            (Flag::None, Some(&ours), true, Change, write.clone()),
            (Flag::None, None, false, Change, write.clone()),
            // read-only commands report and write nothing
            (Flag::None, Some(old), false, Read, users(old, false)),
            (
                Flag::InCertDir(user),
                Some(&ours),
                true,
                Read,
                Choice::Ours { write: false },
            ),
            (Flag::None, None, false, Read, Choice::Ours { write: false }),
        ];
        for (flag, recorded, holds, command, want) in table {
            assert_eq!(
                choose(flag, recorded, holds, command),
                want,
                "{flag:?} {recorded:?} {holds} {command:?}"
            );
        }
    }
}
