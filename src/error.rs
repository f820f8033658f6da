//! One error type for the whole tool.
//!
//! Every variant renders as one line that says what went wrong and, where one exists,
//! how to fix it (age-plugin-yubikey style). Backend causes are kept as `source` so
//! `-v` logging can show the full chain; the one-line message never includes secrets.
//! [`KeyStoreError`] lives here too (re-exported as `keystore::KeyStoreError`), so
//! this module depends on no other of the tool's but `model`.

use std::path::PathBuf;

use crate::model::Algorithm;

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

    #[error("{path} is edited or corrupt: {detail}; restore it, or remove it and run `sdv-provision reset --yes`")]
    InvalidState { path: PathBuf, detail: String },

    #[error("{0}")]
    Keystore(#[from] KeyStoreError),

    #[error("certificate {path}: {detail}")]
    Certificate { path: PathBuf, detail: String },

    #[error("{0}")]
    Dps(#[from] crate::dps::DpsError),

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

    #[error("key {uri} not found; run `sdv-provision provision --force` to make a new identity")]
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
