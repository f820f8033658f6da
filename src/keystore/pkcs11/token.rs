//! Loading the module and finding (or initialising) the token by its label; what a
//! containerised consumer of the token must mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::pin::so_pin;
use super::{ck, describe, SO_PIN_ENV, SO_PIN_FILE_ENV};
use crate::keystore::KeyStoreError;

/// How to point the tool at a module.
pub(super) const MODULE_HINT: &str =
    "pass --pkcs11-module (or set PKCS11_MODULE_PATH) to the token's \
                           PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so";

/// SoftHSM's configuration when `SOFTHSM2_CONF` is not set.
const SOFTHSM_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";

/// Modules loaded by this process, initialised once and never finalised.
///
/// `C_Initialize` may run only once per module and process, and `C_Finalize` would
/// end every other user's sessions; a module is therefore loaded on first use and
/// kept (the process exit cleans up). A module some other code in the process already
/// initialised (`CKR_CRYPTOKI_ALREADY_INITIALIZED`) is shared, not an error.
pub(super) fn load_module(path: &Path) -> Result<Pkcs11, KeyStoreError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let hint = MODULE_HINT;
    if !path.is_file() {
        return Err(KeyStoreError::Unavailable {
            what: format!("PKCS#11 module {} does not exist", path.display()),
            hint: hint.into(),
        });
    }
    let ctx = Pkcs11::new(path).map_err(|e| KeyStoreError::Unavailable {
        what: format!(
            "{} is not a PKCS#11 module ({})",
            path.display(),
            describe(&e)
        ),
        hint: hint.into(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KeyStoreError::Unavailable {
                what: format!(
                    "PKCS#11 module {} failed to start ({})",
                    path.display(),
                    describe(&e)
                ),
                hint: "check the module's configuration \
                       (for SoftHSM: SOFTHSM2_CONF and its directories.tokendir)"
                    .into(),
            })
        }
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The slot holding the initialised token labelled `token`, or the labels found.
pub(super) fn find_token(
    ctx: &Pkcs11,
    module: &Path,
    token: &str,
) -> Result<Result<Slot, Vec<String>>, KeyStoreError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ck(format!("list the tokens of {}", module.display()), e))?;
    let mut labels = Vec::new();
    let mut found = None;
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        if info.label() == token {
            if found.is_some() {
                tracing::warn!("several tokens are labelled {token}; using the first");
            } else {
                found = Some(slot);
            }
        }
        labels.push(info.label().to_owned());
    }
    Ok(found.ok_or(labels))
}

pub(super) fn not_found(module: &Path, token: &str, labels: &[String]) -> KeyStoreError {
    let found = if labels.is_empty() {
        "it has no initialised tokens".to_owned()
    } else {
        format!("tokens found: {}", labels.join(", "))
    };
    KeyStoreError::Unavailable {
        what: format!(
            "no PKCS#11 token labelled {token} in {} ({found})",
            module.display()
        ),
        hint: format!(
            "pass --pkcs11-token with one of those labels, or --pkcs11-init-token to \
             initialise a blank slot as {token} (SO PIN from {SO_PIN_ENV} or {SO_PIN_FILE_ENV})"
        ),
    }
}

/// Initialise the first blank slot as `token` and set the user PIN. Only a slot whose
/// token reports "not initialised" is touched: re-initialising a token wipes it.
pub(super) fn init_token(
    ctx: &Pkcs11,
    module: &Path,
    token: &str,
    user_pin: &SecretString,
) -> Result<(), KeyStoreError> {
    if token.is_empty() || token.len() > 32 {
        return Err(KeyStoreError::Rejected {
            what: format!("token label {token:?} is not 1 to 32 bytes long"),
            hint: "pass a shorter --pkcs11-token".into(),
        });
    }
    let so_pin = so_pin()?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| ck(format!("list the tokens of {}", module.display()), e))?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| KeyStoreError::Unavailable {
            what: format!(
                "{} has no blank slot to initialise as {token}",
                module.display()
            ),
            hint: "free a slot, or pass --pkcs11-token with an existing token's label".into(),
        })?;
    ctx.init_token(slot, &so_pin, token).map_err(|e| match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => KeyStoreError::Rejected {
            what: format!(
                "the SO PIN was rejected while initialising token {token} ({})",
                describe(&e)
            ),
            hint: format!(
                "check {SO_PIN_ENV} / {SO_PIN_FILE_ENV}; not retried, because tokens lock"
            ),
        },
        e => ck(format!("initialise token {token}"), e),
    })?;
    // SoftHSM moves a freshly initialised token to a new slot id: look it up again.
    let slot =
        find_token(ctx, module, token)?.map_err(|labels| not_found(module, token, &labels))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| ck(format!("open a session on new token {token}"), e))?;
    session
        .login(UserType::So, Some(&so_pin))
        .map_err(|e| ck(format!("log in as SO to new token {token}"), e))?;
    session
        .init_pin(user_pin)
        .map_err(|e| ck(format!("set the user PIN of new token {token}"), e))?;
    session
        .logout()
        .map_err(|e| ck(format!("log out of new token {token}"), e))?;
    tracing::info!("initialised PKCS#11 token {token}");
    Ok(())
}

/// Host paths a consumer in a container needs besides the module: for SoftHSM, its
/// configuration file and token directory (mounted at the same paths).
pub(super) fn consumer_mounts(ctx: &Pkcs11) -> Vec<PathBuf> {
    let is_softhsm = ctx
        .get_library_info()
        .is_ok_and(|i| i.manufacturer_id().contains("SoftHSM"));
    if !is_softhsm {
        return Vec::new();
    }
    let conf = softhsm_conf_path();
    let mut mounts = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&conf) {
        mounts.extend(softhsm_tokendir(&text));
    }
    mounts.push(conf);
    mounts
}

/// The configuration file SoftHSM reads: `SOFTHSM2_CONF`, else
/// `$HOME/.config/softhsm2/softhsm2.conf` when readable, else the default.
fn softhsm_conf_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SOFTHSM2_CONF") {
        return PathBuf::from(p);
    }
    let user = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".config/softhsm2/softhsm2.conf"))
        .filter(|p| std::fs::File::open(p).is_ok());
    user.unwrap_or_else(|| PathBuf::from(SOFTHSM_DEFAULT_CONF))
}

/// `directories.tokendir` as SoftHSM's `SimpleConfigLoader` reads it: each line cut at
/// the first `#`; name and value are the first two non-empty `=`-separated pieces,
/// trimmed; the **last** assignment wins. Only an absolute directory other than `/`
/// is a mount (mounting `/` would hand the container the host's whole file system).
fn softhsm_tokendir(text: &str) -> Option<PathBuf> {
    let dir = text
        .lines()
        .filter_map(|line| {
            let line = line.split(['#', '\r']).next()?;
            let mut parts = line.split('=').filter(|p| !p.is_empty());
            let (k, v) = (parts.next()?.trim(), parts.next()?.trim());
            (k == "directories.tokendir" && !v.is_empty()).then_some(v)
        })
        .next_back()?;
    let dir: PathBuf = Path::new(dir).components().collect();
    (dir.is_absolute() && dir != Path::new("/")).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softhsm_tokendir_is_read_as_softhsm_reads_it() {
        let t = |s: &str| softhsm_tokendir(s).map(|p| p.display().to_string());
        // Before: the first line won, and `/` gave an empty mount source.
        assert_eq!(
            t("directories.tokendir = /\ndirectories.tokendir = /var/lib/softhsm/tokens/\n"),
            Some("/var/lib/softhsm/tokens".into())
        );
        assert_eq!(
            t("directories.tokendir = /a\ndirectories.tokendir = /\n"),
            None
        );
        assert_eq!(
            t("  directories.tokendir\t=\t/t # comment\n"),
            Some("/t".into())
        );
        assert_eq!(t("# directories.tokendir = /t\n"), None);
        assert_eq!(
            t("directories.tokendir = /t\ndirectories.tokendir =\n"),
            Some("/t".into())
        );
        assert_eq!(t("directories.tokendir == /t=x\r\n"), Some("/t".into()));
        assert_eq!(t("directories.tokendir = tokens\n"), None);
        assert_eq!(t("objectstore.backend = file\n"), None);
    }
}
