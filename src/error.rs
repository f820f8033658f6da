//! One error type for the whole tool.
//!
//! Every variant renders as one line that says what went wrong and, where one exists,
//! how to fix it (age-plugin-yubikey style). Backend causes are kept as `source` so
//! `-v` logging can show the full chain; the one-line message never includes secrets.
//! [`KeyStoreError`] and [`DpsError`] live here too (re-exported as
//! `keystore::KeyStoreError` and `dps::DpsError`), so this module depends on no
//! other of the tool's but `model`.

use std::path::PathBuf;

use crate::model::Algorithm;

/// The fixes the tool's messages recur to, each worded once: the sites name the
/// fix, and its words live here. A message ends in its fix as `"{what}; {fix}"`
/// ([`Error::InvalidInput`], [`KeyStoreError`]'s `hint`); a site with a fix of its
/// own (one command, one backend) keeps its words where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Start over with `--force`, as part of a longer fix ("restore …, or" this).
    Force,
    /// A key, its blobs or its token objects are missing or not the identity's
    /// (keystores, `verify`).
    NewIdentity,
    /// What `provision` found cannot be kept or adopted.
    BuildNewIdentity,
    /// The file keystore's key file is unreadable.
    RestoreKeyFile,
    /// A key of a type or size the tool does not make: the ones it does.
    Supported,
    /// A command that needs an identity, on a device without one.
    ProvisionFirst,
    /// A command that needs the original script's identity adopted, or a cloud
    /// backend configured.
    RunFirst,
    /// A command that needs a role's key, on an identity without it.
    CompleteIdentity,
    /// Remove everything the tool made, as part of a longer fix.
    Reset,
    /// A PKCS#11 token that refuses writes.
    TokenWritable,
    /// A removal aimed at something that is not a device key (the SRK).
    OnlyDeviceKeys,
    /// A cloud settings file of ours that does not parse.
    FixCloudFile,
    /// The kernel gave no random bytes (serial numbers, CKA_IDs).
    KernelRng,
    /// Register with DPS, after the fix a DPS error names.
    Register,
}

impl std::fmt::Display for Fix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const FORCE: &str = "run `sdv-provision provision --force`";
        match self {
            Fix::Force => f.write_str(FORCE),
            Fix::NewIdentity => write!(f, "{FORCE} to make a new identity"),
            Fix::BuildNewIdentity => write!(f, "{FORCE} to build a new identity"),
            Fix::RestoreKeyFile => write!(f, "restore the key file or {FORCE}"),
            Fix::Supported => {
                f.write_str("supported: ")?;
                for (i, alg) in Algorithm::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(alg.as_str())?;
                }
                Ok(())
            }
            Fix::ProvisionFirst => f.write_str("run `sdv-provision` (provision) first"),
            Fix::RunFirst => f.write_str("run `sdv-provision` first"),
            Fix::CompleteIdentity => f.write_str("run `sdv-provision` to complete the identity"),
            Fix::Reset => f.write_str("run `sdv-provision reset --yes`"),
            Fix::TokenWritable => {
                f.write_str("make the token writable, or choose another one with --pkcs11-token")
            }
            Fix::OnlyDeviceKeys => f.write_str("only device keys are removed"),
            Fix::FixCloudFile => {
                f.write_str("fix the file or remove it and run sdv-provision again")
            }
            Fix::KernelRng => f.write_str("check the kernel RNG"),
            Fix::Register => f.write_str("run `sdv-provision register`"),
        }
    }
}

impl From<Fix> for String {
    fn from(fix: Fix) -> String {
        fix.to_string()
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Wrong or missing input from the user (flag, prompt, file content).
    #[error("{what}; {hint}")]
    InvalidInput { what: String, hint: String },

    /// A value is missing and we may not prompt for it.
    #[error("{what} is needed but the run is non-interactive; pass {flag}")]
    MissingAnswer { what: String, flag: String },

    #[error("cannot read {path}: {source}")]
    FailedToRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    FailedToWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not valid JSON ({detail}); fix or restore the file, it was left untouched")]
    InvalidManifest { path: PathBuf, detail: String },

    #[error(
        "another sdv-provision is running on root {path}; wait for it to finish and try again"
    )]
    Locked { path: PathBuf },

    #[error("{path} is a symbolic link; refusing to follow it. Remove the link and re-run")]
    Symlink { path: PathBuf },

    #[error(
        "{path} is edited or corrupt: {detail}; restore it, or remove it and {}",
        Fix::Reset
    )]
    InvalidState { path: PathBuf, detail: String },

    #[error("{0}")]
    Keystore(#[from] KeyStoreError),

    #[error("certificate {path}: {detail}")]
    Certificate { path: PathBuf, detail: String },

    #[error("{0}")]
    Dps(#[from] DpsError),

    #[error("cannot build certificate: {0}")]
    Rcgen(#[from] rcgen::Error),

    #[error("cannot run {program}: {source}")]
    FailedToRun {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{program} {args} failed with {status}")]
    CommandFailed {
        program: String,
        args: String,
        status: String,
    },

    #[error("prompt failed: {0}")]
    Prompt(String),

    /// A command-line usage error (exit 2).
    #[error("{0}")]
    Usage(String),

    /// `status` / `verify` found the identity incomplete or wrong; already reported.
    #[error("{0}")]
    Incomplete(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn input(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            hint: hint.into(),
        }
    }

    pub fn read(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::FailedToRead {
            path: path.into(),
            source,
        }
    }

    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::FailedToWrite {
            path: path.into(),
            source,
        }
    }

    /// Process exit code: 2 for usage errors, 1 for everything else (DESIGN §5).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::MissingAnswer { .. }
            | Error::Usage(_)
            | Error::Keystore(KeyStoreError::MissingAnswer { .. }) => 2,
            _ => 1,
        }
    }
}

/// Keystore errors: what failed, and what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("{what}; {hint}")]
    Unavailable { what: String, hint: String },

    #[error("{what} is already in use by something sdv-provision did not create; {hint}")]
    Occupied { what: String, hint: String },

    #[error("key {uri} not found; {}", Fix::NewIdentity)]
    NotFound { uri: String },

    #[error("{alg} is not supported by this {keystore}; choose another --algorithm")]
    UnsupportedAlgorithm {
        alg: Algorithm,
        keystore: &'static str,
    },

    #[error("{what}; {hint}")]
    Rejected { what: String, hint: String },

    #[error("{step} failed: {detail}")]
    Backend { step: String, detail: String },

    /// A PKCS#11 call failed: cryptoki's error (function and return value) is kept
    /// as the cause and shown by its spec names.
    #[cfg(feature = "pkcs11")]
    #[error("{step} failed: {}", describe_ck(source))]
    Pkcs11 {
        step: String,
        #[source]
        source: cryptoki::error::Error,
    },

    /// A TSS call failed with nothing more specific to say (see `tpm::tss_error`):
    /// the TSS error is kept as the cause.
    #[cfg(feature = "tpm")]
    #[error("{step} failed: {source}")]
    Tss {
        step: String,
        #[source]
        source: tss_esapi::Error,
    },

    #[error("key URI {0} does not belong to this keystore")]
    ForeignUri(String),

    /// A secret the keystore needs, in a run that may not prompt (exit 2, a usage
    /// error, like the tool's other missing answers).
    #[error("{what} is needed but the run is non-interactive; pass {flag}")]
    MissingAnswer { what: String, flag: String },
}

impl KeyStoreError {
    pub fn backend(step: impl Into<String>, detail: impl Into<String>) -> Self {
        KeyStoreError::Backend {
            step: step.into(),
            detail: detail.into(),
        }
    }
}

/// Why a DPS registration did not succeed (re-exported as `dps::DpsError`). Each renders as one line with what to do.
#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    #[error("DPS at {endpoint} does not know registration id {registration_id} with this certificate (401): the device is not enrolled (yet); enroll it, then {}", Fix::Register)]
    NotEnrolled {
        endpoint: String,
        registration_id: String,
    },
    #[error("the DPS server {endpoint} presented a certificate that is not trusted ({detail}); check --dps-endpoint, or pass --dps-ca-file for a private CA")]
    Untrusted { endpoint: String, detail: String },
    #[error("DPS at {endpoint} refused the device certificate in the TLS handshake (alert {alert}); the enrollment must hold this device's primary certificate (see `sdv-provision status`), then {}", Fix::Register)]
    CertificateRefused { endpoint: String, alert: String },
    #[error(
        "cannot reach DPS at {endpoint} ({detail}); check the network and --dps-endpoint, then {}",
        Fix::Register
    )]
    Unreachable { endpoint: String, detail: String },
    #[error(
        "DPS at {endpoint} did not finish the registration within {secs} s; {} again later",
        Fix::Register
    )]
    Timeout { endpoint: String, secs: u64 },
    #[error("DPS at {endpoint} answered {status}{message}; check the enrollment and the ID scope, then {}", Fix::Register)]
    Refused {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error(
        "DPS at {endpoint} answered {status}{message} (a service problem); {} again later",
        Fix::Register
    )]
    Server {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("DPS {status} the registration{message}; check the enrollment in the portal or with `az iot dps enrollment show`, then {}", Fix::Register)]
    Failed { status: String, message: String },
    #[error("DPS at {endpoint} sent a reply that is not a registration result ({detail}); check --dps-endpoint")]
    Malformed { endpoint: String, detail: String },
    #[error("the device key could not sign the TLS handshake ({0}); run `sdv-provision verify`")]
    Key(String),
    #[error("cannot set up TLS for DPS: {0}")]
    Setup(String),
}

impl DpsError {
    /// A not-enrolled device or an unreachable DPS: `provision` completes anyway
    /// and prints the next step.
    pub fn is_pending(&self) -> bool {
        !matches!(self, DpsError::Key(_) | DpsError::Setup(_))
    }
}

/// `C_Login: CKR_PIN_INCORRECT` — short, and greppable against the PKCS#11 spec.
#[cfg(feature = "pkcs11")]
pub fn describe_ck(e: &cryptoki::error::Error) -> String {
    match e {
        cryptoki::error::Error::Pkcs11(rv, function) => {
            format!(
                "C_{function:?}: CKR_{}",
                screaming_snake(&format!("{rv:?}"))
            )
        }
        other => other.to_string(),
    }
}

#[cfg(feature = "pkcs11")]
fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

impl From<dialoguer::Error> for Error {
    fn from(e: dialoguer::Error) -> Self {
        Error::Prompt(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixes' words as the messages carried them before they got one home (the
    /// CLI snapshots in tests/cmd pin some of them in context).
    #[test]
    fn fix_words() {
        let words = |f: Fix| f.to_string();
        assert_eq!(words(Fix::Force), "run `sdv-provision provision --force`");
        assert_eq!(
            words(Fix::NewIdentity),
            "run `sdv-provision provision --force` to make a new identity"
        );
        assert_eq!(
            words(Fix::BuildNewIdentity),
            "run `sdv-provision provision --force` to build a new identity"
        );
        assert_eq!(
            words(Fix::RestoreKeyFile),
            "restore the key file or run `sdv-provision provision --force`"
        );
        assert_eq!(
            words(Fix::Supported),
            "supported: rsa-2048, rsa-3072, ecdsa-p256, ecdsa-p384"
        );
        assert_eq!(
            words(Fix::ProvisionFirst),
            "run `sdv-provision` (provision) first"
        );
        assert_eq!(words(Fix::RunFirst), "run `sdv-provision` first");
        assert_eq!(
            words(Fix::CompleteIdentity),
            "run `sdv-provision` to complete the identity"
        );
        assert_eq!(words(Fix::Reset), "run `sdv-provision reset --yes`");
        assert_eq!(
            words(Fix::TokenWritable),
            "make the token writable, or choose another one with --pkcs11-token"
        );
        assert_eq!(words(Fix::OnlyDeviceKeys), "only device keys are removed");
        assert_eq!(
            words(Fix::FixCloudFile),
            "fix the file or remove it and run sdv-provision again"
        );
        assert_eq!(words(Fix::KernelRng), "check the kernel RNG");
        assert_eq!(words(Fix::Register), "run `sdv-provision register`");
        let dps = [
            DpsError::NotEnrolled {
                endpoint: "e".into(),
                registration_id: "r".into(),
            }
            .to_string(),
            DpsError::Timeout {
                endpoint: "e".into(),
                secs: 9,
            }
            .to_string(),
            DpsError::Failed {
                status: "failed".into(),
                message: "".into(),
            }
            .to_string(),
        ];
        assert_eq!(
            dps,
            [
                "DPS at e does not know registration id r with this certificate (401): the device is not enrolled (yet); enroll it, then run `sdv-provision register`",
                "DPS at e did not finish the registration within 9 s; run `sdv-provision register` again later",
                "DPS failed the registration; check the enrollment in the portal or with `az iot dps enrollment show`, then run `sdv-provision register`",
            ]
        );
        assert_eq!(
            KeyStoreError::NotFound { uri: "handle:0x81000010".into() }.to_string(),
            "key handle:0x81000010 not found; run `sdv-provision provision --force` to make a new identity"
        );
        assert_eq!(
            Error::InvalidState { path: "/s".into(), detail: "d".into() }.to_string(),
            "/s is edited or corrupt: d; restore it, or remove it and run `sdv-provision reset --yes`"
        );
    }
}
