//! The user and SO PINs: where they come from (file, environment, earlier run,
//! prompt; never argv), logging in once without retries, and reading a PIN file
//! (which one the connector gets is `pin_file`'s rule).

use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::{ck, describe, PIN_ENV, SO_PIN_ENV, SO_PIN_FILE_ENV};
use crate::fsutil;
use crate::keystore::{KeyStoreError, Pkcs11Config, Prompt};
use crate::paths::{Layout, CERT_DIR};

/// A locked or unset user PIN is reported before any PIN is asked for or tried.
pub(super) fn check_user_pin_state(
    ctx: &Pkcs11,
    slot: Slot,
    token: &str,
) -> Result<(), KeyStoreError> {
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| ck(format!("read the state of PKCS#11 token {token}"), e))?;
    if info.user_pin_locked() {
        return Err(pin_locked(token));
    }
    if !info.user_pin_initialized() {
        return Err(KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} has no user PIN yet"),
            hint: "set one (e.g. `pkcs11-tool --login --login-type so --init-pin`), \
                   or initialise a blank token with --pkcs11-init-token"
                .into(),
        });
    }
    if info.user_pin_final_try() {
        tracing::warn!("PKCS#11 token {token}: one more wrong PIN locks it");
    }
    Ok(())
}

pub(super) fn login(
    session: &Session,
    token: &str,
    pin: &SecretString,
) -> Result<(), KeyStoreError> {
    match session.login(UserType::User, Some(pin)) {
        // Login state is per process and token: another session of ours is logged in.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e @ CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(KeyStoreError::Rejected {
            what: format!(
                "the PIN was rejected by PKCS#11 token {token} ({})",
                describe(&e)
            ),
            hint: format!(
                "check --pkcs11-pin-file / {PIN_ENV}; sdv-provision does not retry, \
                 because tokens lock after a few wrong PINs"
            ),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(pin_locked(token)),
        Err(e @ CkError::Pkcs11(RvError::PinLenRange | RvError::PinInvalid, _)) => {
            Err(KeyStoreError::Rejected {
                what: format!(
                    "PKCS#11 token {token} does not accept a PIN of this form ({})",
                    describe(&e)
                ),
                hint: format!(
                    "check --pkcs11-pin-file / {PIN_ENV} \
                     (one trailing newline in the file is ignored)"
                ),
            })
        }
        Err(e) => Err(ck(format!("log in to PKCS#11 token {token}"), e)),
    }
}

fn pin_locked(token: &str) -> KeyStoreError {
    KeyStoreError::Rejected {
        what: format!(
            "the user PIN of PKCS#11 token {token} is locked after too many wrong attempts"
        ),
        hint: "unlock it with the SO PIN (e.g. `pkcs11-tool --login --login-type so --init-pin`) \
               or re-initialise the token"
            .into(),
    }
}

/// The user PIN: `--pkcs11-pin-file`, else `SDV_PROVISION_PKCS11_PIN`, else the PIN
/// file an earlier run recorded, else a hidden prompt (interactive runs only).
pub(super) fn user_pin(
    config: &Pkcs11Config,
    layout: &Layout,
    token: &str,
) -> Result<SecretString, KeyStoreError> {
    if let Some(path) = &config.pin_file {
        return read_pin_file(path, "--pkcs11-pin-file");
    }
    if let Some(pin) = std::env::var_os(PIN_ENV) {
        // Bytes first, so a non-UTF-8 value is zeroized too (into_string's error
        // would drop it as it is).
        let bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(pin));
        let pin = std::str::from_utf8(&bytes).map_err(|_| KeyStoreError::Rejected {
            what: format!("{PIN_ENV} is not valid UTF-8"),
            hint: "set it to the token's user PIN".into(),
        })?;
        if pin.is_empty() {
            return Err(KeyStoreError::Rejected {
                what: format!("{PIN_ENV} is empty"),
                hint: "set it to the token's user PIN, or use --pkcs11-pin-file".into(),
            });
        }
        return Ok(SecretString::from(pin));
    }
    if let Some(recorded) = &config.recorded.pin_file {
        let host = layout.host(recorded);
        if host.is_file() {
            return read_pin_file(&host, "--pkcs11-pin-file");
        }
    }
    if config.prompt == Prompt::Allowed {
        let pin = Zeroizing::new(
            dialoguer::Password::new()
                .with_prompt(format!("User PIN of PKCS#11 token {token}"))
                .interact()
                .map_err(|e| KeyStoreError::backend("read the PIN", e.to_string()))?,
        );
        // Copied, not moved: SecretString::from(String) shrinks the buffer into a
        // Box<str>, which can reallocate and leave the typed PIN in freed memory.
        return Ok(SecretString::from(pin.as_str()));
    }
    Err(KeyStoreError::MissingAnswer {
        what: format!("the user PIN of PKCS#11 token {token}"),
        flag: format!("--pkcs11-pin-file FILE or set {PIN_ENV}"),
    })
}

/// SO PIN for `--pkcs11-init-token`: env, or a file named by env. Never argv.
pub(super) fn so_pin() -> Result<SecretString, KeyStoreError> {
    if let Some(pin) = std::env::var_os(SO_PIN_ENV) {
        let bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(pin));
        if let Ok(pin) = std::str::from_utf8(&bytes) {
            if !pin.is_empty() {
                return Ok(SecretString::from(pin));
            }
        }
    }
    if let Some(path) = std::env::var_os(SO_PIN_FILE_ENV) {
        return read_pin_file(Path::new(&path), SO_PIN_FILE_ENV);
    }
    Err(KeyStoreError::Unavailable {
        what: "--pkcs11-init-token needs the token's security officer (SO) PIN".into(),
        hint: format!("set {SO_PIN_ENV}, or {SO_PIN_FILE_ENV} to a file holding it"),
    })
}

/// Longest PIN file read: a PIN is a few dozen bytes; anything larger is not one.
const MAX_PIN_FILE: u64 = 4096;

/// Read a PIN file, dropping one trailing newline. The bytes are zeroized on drop.
/// Opened without following a link and without blocking (a FIFO would hang the run
/// forever), it must be a regular file of at most [`MAX_PIN_FILE`] bytes; one that
/// group or others can read gets a warning (DESIGN §6 "The process").
fn read_pin_file(path: &Path, flag: &str) -> Result<SecretString, KeyStoreError> {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let refuse = |why: String| KeyStoreError::Unavailable {
        what: format!("cannot read PIN file {} ({why})", path.display()),
        hint: format!("pass {flag} with a regular, readable file holding the PIN"),
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse("it is a symbolic link".into()),
            _ => refuse(e.to_string()),
        })?;
    let meta = f.metadata().map_err(|e| refuse(e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.len() > MAX_PIN_FILE {
        return Err(refuse(format!("larger than {MAX_PIN_FILE} bytes")));
    }
    if meta.permissions().mode() & 0o044 != 0 {
        crate::console::warning(&format!(
            "PIN file {} can be read by group or others; chmod 600 it",
            path.display()
        ));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_PIN_FILE as usize + 1));
    f.take(MAX_PIN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| refuse(e.to_string()))?;
    let mut pin: &[u8] = &bytes;
    if let Some(p) = pin.strip_suffix(b"\n") {
        pin = p.strip_suffix(b"\r").unwrap_or(p);
    }
    let text = std::str::from_utf8(pin).map_err(|_| KeyStoreError::Rejected {
        what: format!("PIN file {} is not UTF-8 text", path.display()),
        hint: format!("write the PIN as text into the file named by {flag}"),
    })?;
    if text.is_empty() {
        return Err(KeyStoreError::Rejected {
            what: format!("PIN file {} is empty", path.display()),
            hint: format!("write the PIN into the file named by {flag}"),
        });
    }
    Ok(SecretString::from(text))
}

/// Does the PIN file at device path `file` hold `pin` (one trailing newline allowed)?
/// Read like the tool's other files: never through a link, never blocking on a FIFO.
pub(super) fn pin_file_holds(layout: &Layout, file: &Path, pin: &SecretString) -> bool {
    let Ok(Some(bytes)) = fsutil::read_optional(&layout.host(file)) else {
        return false;
    };
    let bytes = Zeroizing::new(bytes);
    let mut held: &[u8] = &bytes;
    if let Some(p) = held.strip_suffix(b"\n") {
        held = p.strip_suffix(b"\r").unwrap_or(p);
    }
    held == pin.expose_secret().as_bytes()
}

/// The device path of `host_path` if it lies inside the certificates directory.
/// Compared after resolution, never as text: `certificates/../../../etc/x.pin` is not
/// in it, and neither is a link there (the container's mount would follow it).
pub(super) fn inside_cert_dir(layout: &Layout, host_path: &Path) -> Option<PathBuf> {
    let dir = layout.host_cert_dir();
    let name = host_path.file_name()?;
    if !std::fs::symlink_metadata(host_path).ok()?.is_file() {
        return None;
    }
    let parent = host_path.parent()?.canonicalize().ok()?;
    let rel = parent
        .strip_prefix(dir.canonicalize().ok()?)
        .ok()?
        .join(name);
    Some(Path::new(CERT_DIR).join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_file_inside_cert_dir() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let inside = layout.host_cert_file("my.pin");
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(&inside, "1234\n").unwrap();
        std::fs::write(d.path().join("etc/x.pin"), "1234\n").unwrap();
        assert_eq!(
            inside_cert_dir(&layout, &inside),
            Some(PathBuf::from("/data/var/certificates/my.pin"))
        );
        assert_eq!(inside_cert_dir(&layout, &d.path().join("etc/x.pin")), None);
        assert_eq!(inside_cert_dir(&layout, &layout.host_cert_dir()), None);
        // Before: compared as text, this counted as inside (and was mounted).
        let climbing = layout.host_cert_dir().join("../../../etc/x.pin");
        assert_eq!(inside_cert_dir(&layout, &climbing), None);
        let link = layout.host_cert_file("link.pin");
        std::os::unix::fs::symlink(d.path().join("etc/x.pin"), &link).unwrap();
        assert_eq!(inside_cert_dir(&layout, &link), None);
    }

    #[test]
    fn pin_file_strips_one_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pin");
        for (content, want) in [
            ("1234\n", "1234"),
            ("1234\r\n", "1234"),
            ("12 34\n\n", "12 34\n"),
            ("1234", "1234"),
        ] {
            std::fs::write(&p, content).unwrap();
            assert_eq!(read_pin_file(&p, "--x").unwrap().expose_secret(), want);
        }
        std::fs::write(&p, "\n").unwrap();
        assert!(read_pin_file(&p, "--x").is_err());
    }

    /// Before: a FIFO hung the run in read(2) forever; a link was followed.
    #[test]
    fn pin_file_must_be_a_regular_file_of_sane_size() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let real = d.path().join("real");
        std::fs::write(&real, "1234\n").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let big = d.path().join("big");
        std::fs::write(&big, "1".repeat(5000)).unwrap();
        for (p, why) in [
            (&fifo, "not a regular file"),
            (&link, "symbolic link"),
            (&big, "larger than"),
            (&d.path().to_path_buf(), "not a regular file"),
        ] {
            let e = read_pin_file(p, "--x").unwrap_err().to_string();
            assert!(e.contains(why), "{}: {e}", p.display());
        }
        assert_eq!(read_pin_file(&real, "--x").unwrap().expose_secret(), "1234");
    }
}
