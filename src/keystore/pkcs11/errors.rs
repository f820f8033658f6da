//! PKCS#11 failures as one line each: the step, cryptoki's function and return value
//! by their spec names, and a hint where the return value tells one.

use cryptoki::error::{Error as CkError, RvError};

use super::KeyStoreError;

/// A failed PKCS#11 call, keeping cryptoki's cause (the function and return value).
pub(super) fn ck(step: impl Into<String>, e: CkError) -> KeyStoreError {
    KeyStoreError::backend(step, describe(&e))
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
            hint: "make the token writable, or choose another one with --pkcs11-token".into(),
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

/// `C_Login: CKR_PIN_INCORRECT` — short, and greppable against the PKCS#11 spec.
pub(super) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => {
            format!(
                "C_{function:?}: CKR_{}",
                screaming_snake(&format!("{rv:?}"))
            )
        }
        other => other.to_string(),
    }
}

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
