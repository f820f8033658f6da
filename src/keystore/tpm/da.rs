//! Dictionary-attack lockout and transient TPM answers.
//!
//! - A TPM in lockout refuses every DA-protected key. The error names the lockout and
//!   when it ends, read from the TPM's own counters (`TPM2_PT_LOCKOUT_*`), instead of
//!   rcgen's bare "Remote key error".
//! - `TPM_RC_RETRY` / `TPM_RC_YIELDED` / `TPM_RC_TESTING`: ESYS (tpm2-tss) already
//!   resubmits a command that gets one of these, but at once and at most
//!   `_ESYS_MAX_SUBMISSIONS` (5) times; a TPM still running its self-tests then
//!   passes the answer up. [`retry_transient`] tries again a few times with a short
//!   pause, bounded, so such a TPM is given time without hanging a run.

use std::time::Duration;

use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Rc;
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::structures::CapabilityData;
use tss_esapi::Context;

use super::KeyStoreError;

/// Pauses before each further attempt after a transient answer (ESYS already made
/// its own immediate resubmissions before each of these).
const RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

/// Is `e` an answer that means "try the same command again"?
pub(super) fn is_transient(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc)
        if matches!(rc.kind(), Some(Rc::Retry | Rc::Yielded | Rc::Testing)))
}

pub(super) fn is_lockout(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Rc::Lockout))
}

/// Run `f`, again after each pause of [`RETRY_PAUSES`] while it answers with a
/// transient code; the last answer is returned as it is.
pub(super) fn retry_transient<T>(
    mut f: impl FnMut() -> Result<T, tss_esapi::Error>,
) -> Result<T, tss_esapi::Error> {
    retry_with(&RETRY_PAUSES, &mut f)
}

fn retry_with<T>(
    pauses: &[Duration],
    f: &mut impl FnMut() -> Result<T, tss_esapi::Error>,
) -> Result<T, tss_esapi::Error> {
    let mut result = f();
    for pause in pauses {
        match &result {
            Err(e) if is_transient(e) => {
                tracing::info!("the TPM answered {e}; trying again in {pause:?}");
                std::thread::sleep(*pause);
                result = f();
            }
            _ => break,
        }
    }
    result
}

/// The TPM's dictionary-attack counters, as `TPM2_GetCapability` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lockout {
    /// Failed authorizations counted now.
    pub counter: u32,
    /// Failures that put the TPM into lockout.
    pub max_auth_fail: u32,
    /// Seconds after which one failure is forgiven (0: never, only a reset helps).
    pub interval: u32,
    /// Seconds after a failed lockoutAuth before the next attempt.
    pub recovery: u32,
}

impl Lockout {
    /// Read the four `TPM2_PT_LOCKOUT_*` / `MAX_AUTH_FAIL` properties (no session).
    pub fn read(ctx: &mut Context) -> Option<Lockout> {
        let (data, _) = ctx
            .execute_without_session(|c| {
                c.get_capability(
                    CapabilityType::TpmProperties,
                    PropertyTag::LockoutCounter.into(),
                    4,
                )
            })
            .ok()?;
        let CapabilityData::TpmProperties(list) = data else {
            return None;
        };
        let get = |tag| list.find(tag).map(|p| p.value());
        Some(Lockout {
            counter: get(PropertyTag::LockoutCounter)?,
            max_auth_fail: get(PropertyTag::MaxAuthFail)?,
            interval: get(PropertyTag::LockoutInterval)?,
            recovery: get(PropertyTag::LockoutRecovery)?,
        })
    }

    /// Seconds until the counter drops below `max_auth_fail` again by itself, or
    /// `None` when it never does (interval 0).
    pub fn seconds_left(&self) -> Option<u64> {
        if self.interval == 0 {
            return None;
        }
        let excess = self.counter.saturating_sub(self.max_auth_fail) + 1;
        Some(u64::from(excess) * u64::from(self.interval))
    }
}

/// The error for a key the TPM refused because it is in dictionary-attack lockout.
pub(super) fn lockout_error(step: &str, lockout: Option<Lockout>) -> KeyStoreError {
    let when = match lockout {
        Some(l) => match l.seconds_left() {
            Some(s) => format!(
                " ({} of {} failed authorizations counted; it forgives one every {} s, so \
                 the key works again in about {s} s; lockoutAuth recovery time {} s)",
                l.counter, l.max_auth_fail, l.interval, l.recovery
            ),
            None => format!(
                " ({} of {} failed authorizations counted; this TPM never forgives them \
                 by itself)",
                l.counter, l.max_auth_fail
            ),
        },
        None => String::new(),
    };
    KeyStoreError::Rejected {
        what: format!("the TPM is in dictionary-attack lockout and will not {step}{when}"),
        hint: "wait for the lockout to end, or have the TPM owner reset it \
               (tpm2_dictionarylockout -c); then replace keys from before noDA with \
               `sdv-provision rotate --promote` twice (see `sdv-provision verify`)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    use tss_esapi::tss2_esys::TSS2_RC;

    fn tpm_error(rc: TSS2_RC) -> tss_esapi::Error {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc))
    }
    const RC_RETRY: TSS2_RC = 0x922;
    const RC_TESTING: TSS2_RC = 0x90A;
    const RC_YIELDED: TSS2_RC = 0x908;
    const RC_LOCKOUT: TSS2_RC = 0x921;

    #[test]
    fn transient_codes() {
        for rc in [RC_RETRY, RC_TESTING, RC_YIELDED] {
            assert!(is_transient(&tpm_error(rc)), "{rc:#x}");
            assert!(!is_lockout(&tpm_error(rc)));
        }
        assert!(!is_transient(&tpm_error(RC_LOCKOUT)));
        assert!(is_lockout(&tpm_error(RC_LOCKOUT)));
    }

    #[test]
    fn retries_are_bounded_and_stop_on_success_or_other_errors() {
        let pauses = [Duration::ZERO; 3];
        let mut calls = 0;
        let r: Result<(), _> = retry_with(&pauses, &mut || {
            calls += 1;
            Err(tpm_error(RC_RETRY))
        });
        assert!(r.is_err() && calls == 4);
        calls = 0;
        let r = retry_with(&pauses, &mut || {
            calls += 1;
            if calls < 3 {
                Err(tpm_error(RC_TESTING))
            } else {
                Ok(7)
            }
        });
        assert_eq!((r.unwrap(), calls), (7, 3));
        calls = 0;
        let r: Result<(), _> = retry_with(&pauses, &mut || {
            calls += 1;
            Err(tpm_error(RC_LOCKOUT))
        });
        assert!(r.is_err() && calls == 1);
    }

    #[test]
    fn lockout_message_names_the_time_left() {
        let l = Lockout {
            counter: 3,
            max_auth_fail: 3,
            interval: 1000,
            recovery: 1000,
        };
        assert_eq!(l.seconds_left(), Some(1000));
        let msg = lockout_error("sign", Some(l)).to_string();
        assert!(msg.contains("dictionary-attack lockout"), "{msg}");
        assert!(msg.contains("about 1000 s"), "{msg}");
        let never = Lockout { interval: 0, ..l };
        assert!(lockout_error("sign", Some(never))
            .to_string()
            .contains("never forgives"));
    }
}
