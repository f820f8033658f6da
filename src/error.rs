//! One error type for the whole tool.
//!
//! Every variant renders as one line that says what went wrong and, where one exists,
//! how to fix it (age-plugin-yubikey style). Backend causes are kept as `source` so
//! `-v` logging can show the full chain; the one-line message never includes secrets.

use std::path::PathBuf;

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
    Keystore(#[from] crate::keystore::KeyStoreError),

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
            | Error::Keystore(crate::keystore::KeyStoreError::MissingAnswer { .. }) => 2,
            _ => 1,
        }
    }
}

impl From<dialoguer::Error> for Error {
    fn from(e: dialoguer::Error) -> Self {
        Error::Prompt(e.to_string())
    }
}
