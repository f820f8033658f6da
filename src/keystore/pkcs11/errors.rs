//! PKCS#11 failures as one line each: the step, cryptoki's function and return value
//! by their spec names, and a hint where the return value tells one.

use cryptoki::error::{Error as CkError, RvError};

use super::KeyStoreError;
use crate::error::Fix;

/// A failed PKCS#11 call, keeping cryptoki's cause (the function and return value).
pub(super) fn ck(step: impl Into<String>, e: CkError) -> KeyStoreError {
    KeyStoreError::Pkcs11 {
        step: step.into(),
        source: e,
    }
}

/// Like [`ck`] for calls that write to the token (`step` says what was being done,
/// e.g. "generate an ecdsa-p256 key pair"): storage errors get a hint.
pub(super) fn write_error(step: &str, token: &str, e: CkError) -> KeyStoreError {
    let cause = describe(&e);
    match e {
        CkError::Pkcs11(RvError::DeviceMemory, _) => KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} is full: cannot {step} ({cause})"),
            hint: "remove unused objects from the token, or use another token".into(),
        },
        CkError::Pkcs11(RvError::TokenWriteProtected, _) => KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} is write-protected: cannot {step} ({cause})"),
            hint: Fix::TokenWritable.into(),
        },
        CkError::Pkcs11(
            RvError::GeneralError | RvError::DeviceError | RvError::FunctionFailed,
            _,
        ) => KeyStoreError::Rejected {
            what: format!(
                "PKCS#11 token {token} could not store the change: cannot {step} ({cause})"
            ),
            hint: "check that the token's storage is writable and not full \
                   (SoftHSM: directories.tokendir in SOFTHSM2_CONF)"
                .into(),
        },
        e => ck(format!("{step} in PKCS#11 token {token}"), e),
    }
}

pub(crate) use crate::error::describe_ck as describe;
