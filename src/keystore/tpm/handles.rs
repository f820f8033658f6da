//! TPM persistent handles: which ones a device key may use, and the errors naming
//! the flags that choose them.

use super::*;

/// Persistent handles the owner hierarchy may use (TPM 2.0 Part 2, 2.3.1).
pub(super) const OWNER_PERSISTENT: RangeInclusive<u32> = 0x8100_0000..=0x817F_FFFF;
pub(super) const ANY_PERSISTENT: RangeInclusive<u32> = 0x8100_0000..=0x81FF_FFFF;

pub(super) fn persistent(h: u32) -> Result<PersistentTpmHandle, KeyStoreError> {
    PersistentTpmHandle::new(h)
        .map_err(|e| KeyStoreError::backend(format!("use TPM handle 0x{h:08x}"), e.to_string()))
}

pub(super) fn tpm_handle(uri: &KeyUri) -> Result<u32, KeyStoreError> {
    match uri {
        KeyUri::TpmHandle(h) => Ok(*h),
        other => Err(KeyStoreError::ForeignUri(other.to_string())),
    }
}

pub(super) fn handle_flag(role: Role) -> &'static str {
    match role {
        Role::Primary => "--tpm-primary-handle",
        Role::Secondary => "--tpm-secondary-handle",
    }
}

pub(super) fn occupied(h: u32, slot: Slot) -> KeyStoreError {
    let role = slot.role;
    let what = if slot.staged {
        format!(
            "TPM persistent handle 0x{h:08x} (where the new {role} key is staged: the {role} \
             handle + 0x{STAGED_OFFSET:x})"
        )
    } else {
        format!("TPM persistent handle 0x{h:08x} (for the {role} key)")
    };
    KeyStoreError::Occupied {
        what,
        hint: format!(
            "pass {} with a free handle (see `tpm2_getcap handles-persistent`)",
            handle_flag(role)
        ),
    }
}

/// A removal aimed at the SRK: never done.
pub(super) fn srk_refused(h: u32) -> KeyStoreError {
    KeyStoreError::Rejected {
        what: format!("refusing to remove the storage root key 0x{h:08x}"),
        hint: Fix::OnlyDeviceKeys.into(),
    }
}

/// A handle that holds someone else's key is left alone, and the user told so.
pub(super) fn warn_foreign(h: u32) {
    crate::console::warning(&format!(
        "TPM handle 0x{h:08x} holds a key sdv-provision did not make; \
         left in place (evict it yourself if it is not needed)"
    ));
}

/// Handles must be owner persistent handles, distinct, and not the SRK, staging slots
/// included.
pub(super) fn check_handles(srk: u32, primary: u32, secondary: u32) -> Result<(), KeyStoreError> {
    let bad = |role: Role, what: String| {
        KeyStoreError::Rejected {
        what,
        hint: format!(
            "choose another with {} (0x81000000-0x817ffeff; staged keys use the handle + 0x{STAGED_OFFSET:x})",
            handle_flag(role)
        ),
    }
    };
    if !ANY_PERSISTENT.contains(&srk) {
        return Err(KeyStoreError::Rejected {
            what: format!("the recorded SRK handle 0x{srk:08x} is not a persistent handle"),
            hint: "fix or remove tpm_srk in the state file".into(),
        });
    }
    let slots = [
        (Role::Primary, primary),
        (Role::Secondary, secondary),
        (Role::Primary, primary.wrapping_add(STAGED_OFFSET)),
        (Role::Secondary, secondary.wrapping_add(STAGED_OFFSET)),
    ];
    for (i, &(role, h)) in slots.iter().enumerate() {
        if !OWNER_PERSISTENT.contains(&h) {
            return Err(bad(
                role,
                format!(
                    "TPM handle 0x{h:08x} for the {role} key is not an owner persistent handle"
                ),
            ));
        }
        if h == srk {
            return Err(bad(
                role,
                format!("TPM handle 0x{h:08x} for the {role} key is the SRK's"),
            ));
        }
        if slots[..i].iter().any(|&(_, o)| o == h) {
            return Err(bad(
                role,
                format!("TPM handle 0x{h:08x} for the {role} key is also used by another key"),
            ));
        }
    }
    Ok(())
}
