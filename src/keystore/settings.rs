//! Backend settings, typed per backend (as parsec's `ProviderConfig`): what an
//! identity records about its keystore ([`Backend`], kept in the state file) and what
//! opens one ([`KeystoreConfig`], from flags and environment plus the record). A TPM
//! store sees only TPM settings and a PKCS#11 store only PKCS#11 ones.
//!
//! The state file keeps its flat `backend` object (`tpm_srk`, `pkcs11_module`, …);
//! `identity` converts it to and from [`Backend`], so states on devices in the field
//! read as before and new ones are written the same.

use std::path::PathBuf;

use secrecy::SecretString;

use crate::model::{KeystoreKind, Role};

/// Where the storage root key lives unless the state file recorded another (TCG
/// provisioning guidance).
pub const DEFAULT_SRK: u32 = 0x8100_0001;
/// The live key handles unless `--tpm-primary-handle` / `--tpm-secondary-handle`
/// (or an earlier run) chose others.
pub const DEFAULT_PRIMARY: u32 = 0x8100_0010;
pub const DEFAULT_SECONDARY: u32 = 0x8100_0011;

/// An identity's backend settings (device paths): everything needed to name its keys
/// to a consumer without opening the keystore. The variant is the state's keystore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    File,
    Tpm(TpmSettings),
    Pkcs11(Pkcs11Settings),
}

impl Backend {
    /// Nothing recorded yet for a store of `kind`.
    pub fn empty(kind: KeystoreKind) -> Backend {
        match kind {
            KeystoreKind::File => Backend::File,
            KeystoreKind::Tpm => Backend::Tpm(TpmSettings::default()),
            KeystoreKind::Pkcs11 => Backend::Pkcs11(Pkcs11Settings::default()),
        }
    }

    pub fn kind(&self) -> KeystoreKind {
        match self {
            Backend::File => KeystoreKind::File,
            Backend::Tpm(_) => KeystoreKind::Tpm,
            Backend::Pkcs11(_) => KeystoreKind::Pkcs11,
        }
    }

    pub fn tpm(&self) -> Option<&TpmSettings> {
        match self {
            Backend::Tpm(t) => Some(t),
            _ => None,
        }
    }

    pub fn pkcs11(&self) -> Option<&Pkcs11Settings> {
        match self {
            Backend::Pkcs11(p) => Some(p),
            _ => None,
        }
    }

    /// Host paths mounted into the connector for this backend (outside the
    /// certificates directory); the tool owns those mounts. Only PKCS#11 has any.
    pub fn mounts(&self) -> &[PathBuf] {
        match self {
            Backend::Pkcs11(p) => &p.mounts,
            _ => &[],
        }
    }
}

/// A TPM identity's record. Absent values are the defaults (older states, and a
/// store that uses the default handles, record less).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TpmSettings {
    pub srk: Option<u32>,
    /// Key handles chosen with `--tpm-primary-handle` / `--tpm-secondary-handle`, so
    /// later runs (rotate, reset) use them without the flags.
    pub primary_handle: Option<u32>,
    pub secondary_handle: Option<u32>,
}

impl TpmSettings {
    pub fn srk(&self) -> u32 {
        self.srk.unwrap_or(DEFAULT_SRK)
    }

    /// `role`'s live handle as recorded (the default unless a flag chose another).
    pub fn live_handle(&self, role: Role) -> u32 {
        match role {
            Role::Primary => self.primary_handle.unwrap_or(DEFAULT_PRIMARY),
            Role::Secondary => self.secondary_handle.unwrap_or(DEFAULT_SECONDARY),
        }
    }
}

/// A PKCS#11 identity's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Settings {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    /// The PIN file the connector reads (`pin-source`), as the command chose it.
    pub pin_file: Option<PathBuf>,
    /// See [`Backend::mounts`].
    pub mounts: Vec<PathBuf>,
}

/// What a command opens a keystore for; the PKCS#11 store and the connector's PIN
/// file rule (`pkcs11::pin_file::choose`) act on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// A command that changes the identity but keeps the connector's PIN file the
    /// identity records, so the state and the manifest never drift apart behind a
    /// command that does not converge them.
    #[default]
    Change,
    /// `provision`: may choose (and write) the connector's PIN file; it converges the
    /// manifest afterwards.
    Provision,
    /// `verify`, `csr`: only read, without the lock. Opening writes nothing, not even
    /// the connector's PIN file; a PKCS#11 token gets a read-only session and is
    /// never initialised.
    Read,
}

/// May the store ask for a secret (the PIN) on the terminal?
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Prompt {
    /// Interactive run on a terminal.
    Allowed,
    /// `--non-interactive` or no TTY: a missing PIN is an error naming the flag.
    #[default]
    Never,
}

/// What to do when no initialised token has the label (`--pkcs11-init-token`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BlankToken {
    /// Report the labels found.
    #[default]
    Refuse,
    /// Initialise a blank slot with the label and the user PIN (SO PIN from env).
    Initialise,
}

/// Settings that open a TPM store: flags and environment, then the record.
#[derive(Debug, Clone, Default)]
pub struct TpmConfig {
    pub tcti: Option<String>,
    pub primary_handle: Option<u32>,
    pub secondary_handle: Option<u32>,
    /// What an earlier run recorded; used where no flag says otherwise.
    pub recorded: TpmSettings,
}

impl TpmConfig {
    /// `role`'s live handle: the flag, else the record, else the default.
    pub fn live_handle(&self, role: Role) -> u32 {
        let flag = match role {
            Role::Primary => self.primary_handle,
            Role::Secondary => self.secondary_handle,
        };
        flag.unwrap_or_else(|| self.recorded.live_handle(role))
    }
}

/// Settings that open a PKCS#11 store: flags and environment, then the record.
#[derive(Debug, Clone, Default)]
pub struct Pkcs11Config {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    /// `--pkcs11-pin-file` (host path).
    pub pin_file: Option<PathBuf>,
    pub blank_token: BlankToken,
    pub prompt: Prompt,
    pub purpose: Purpose,
    /// What an earlier run recorded; used where no flag says otherwise.
    pub recorded: Pkcs11Settings,
}

/// Settings that pick and configure a keystore; filled from flags and environment.
#[derive(Debug, Clone, Default)]
pub struct KeystoreConfig {
    pub tpm: TpmConfig,
    pub pkcs11: Pkcs11Config,
}

impl KeystoreConfig {
    /// Fill in what an earlier run recorded (the one backend it names).
    pub fn set_recorded(&mut self, recorded: &Backend) {
        match recorded {
            Backend::File => {}
            Backend::Tpm(t) => self.tpm.recorded = t.clone(),
            Backend::Pkcs11(p) => self.pkcs11.recorded = p.clone(),
        }
    }
}

/// The connector's PIN file a command chose for a PKCS#11 store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinFile {
    /// Device path.
    pub path: PathBuf,
    /// Does it hold the PIN the token accepted? (Read-only commands do not rewrite
    /// it; `verify` reports a stale one.)
    pub holds_pin: bool,
}

/// A PKCS#11 store's login: the PIN the token accepted when the store was opened,
/// until the command has chosen the connector's PIN file from it; then that file.
pub struct ConnectorPin {
    accepted: Option<SecretString>,
    file: Option<PinFile>,
}

impl ConnectorPin {
    pub fn new(accepted: SecretString) -> ConnectorPin {
        ConnectorPin {
            accepted: Some(accepted),
            file: None,
        }
    }

    /// The PIN the token accepted; `None` once the PIN file is chosen.
    pub fn accepted(&self) -> Option<&SecretString> {
        self.accepted.as_ref()
    }

    /// The connector's PIN file, once chosen.
    pub fn file(&self) -> Option<&PinFile> {
        self.file.as_ref()
    }

    /// Record the chosen PIN file and forget the PIN (zeroized on drop): the session
    /// stays logged in, and nothing later needs the PIN itself.
    pub fn chosen(&mut self, file: PinFile) {
        self.file = Some(file);
        self.accepted = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag wins over the record, the record over the default; the SRK comes from
    /// the record or the default.
    #[test]
    fn tpm_handles_flag_then_record_then_default() {
        let mut c = TpmConfig::default();
        assert_eq!(c.live_handle(Role::Primary), DEFAULT_PRIMARY);
        assert_eq!(c.live_handle(Role::Secondary), DEFAULT_SECONDARY);
        assert_eq!(c.recorded.srk(), DEFAULT_SRK);
        c.recorded = TpmSettings {
            srk: Some(0x8100_0002),
            primary_handle: Some(0x8100_0020),
            secondary_handle: None,
        };
        assert_eq!(c.live_handle(Role::Primary), 0x8100_0020);
        assert_eq!(c.live_handle(Role::Secondary), DEFAULT_SECONDARY);
        assert_eq!(c.recorded.srk(), 0x8100_0002);
        c.primary_handle = Some(0x8100_0030);
        c.secondary_handle = Some(0x8100_0031);
        assert_eq!(c.live_handle(Role::Primary), 0x8100_0030);
        assert_eq!(c.live_handle(Role::Secondary), 0x8100_0031);
    }

    /// The record of one backend reaches only that backend's config.
    #[test]
    fn recorded_settings_fill_their_own_backend_only() {
        for kind in [KeystoreKind::File, KeystoreKind::Tpm, KeystoreKind::Pkcs11] {
            assert_eq!(Backend::empty(kind).kind(), kind);
        }
        let mut c = KeystoreConfig::default();
        c.set_recorded(&Backend::Pkcs11(Pkcs11Settings {
            token: Some("leda".into()),
            mounts: vec!["/var/lib/softhsm/tokens".into()],
            ..Pkcs11Settings::default()
        }));
        assert_eq!(c.pkcs11.recorded.token.as_deref(), Some("leda"));
        assert_eq!(c.tpm.recorded, TpmSettings::default());
        c.set_recorded(&Backend::Tpm(TpmSettings {
            srk: Some(DEFAULT_SRK),
            ..TpmSettings::default()
        }));
        assert_eq!(c.tpm.recorded.srk, Some(DEFAULT_SRK));
        assert_eq!(Backend::File.mounts(), &[] as &[PathBuf]);
    }
}
