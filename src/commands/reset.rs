//! `reset`: remove the identity: its keys (files, token objects, TPM handles it
//! recorded), certificates, cloud configuration, state, and its manifest entries.
//! Never touches objects or handles the tool did not record.
//!
//! Order: manifest first (so the connector no longer points at what goes next), then
//! keys and files, the state file last; every step is idempotent, so a reset killed
//! half-way is finished by running it again.

use crate::error::{Error, Result};
use crate::fsutil;
use crate::identity::{Identity, Journal, State};
use crate::manifest::Manifest;
use crate::paths::{self, CONNECTION_STRING_FILE, ID_SCOPE_FILE};

use super::{existing_state, recover, Ctx};

pub fn run(ctx: &Ctx, yes: bool) -> Result<i32> {
    ctx.check_root()?;
    if !yes {
        if !ctx.interactive {
            return Err(Error::MissingAnswer {
                what: "confirmation to remove the device identity".into(),
                flag: "--yes".into(),
            });
        }
        if !crate::interactive::confirm(
            "Remove this device's cloud identity (keys, certificates, cloud configuration)?",
        )? {
            ctx.out.say("Nothing removed.");
            return Ok(1);
        }
    }
    let _lock = ctx.lock()?;
    recover(ctx)?;
    let id = Identity::load(&ctx.layout)?;
    let state = match existing_state(&id) {
        Ok(s) => Some(s),
        Err(_) if id.cloud.is_some() => None,
        Err(e) => return Err(e),
    };
    let manifest_changed = match Manifest::load(&ctx.layout)? {
        Some(m) => {
            let clean = m.stripped(
                state
                    .as_ref()
                    .map(|s| s.backend.mounts.as_slice())
                    .unwrap_or(&[]),
            )?;
            m.save(&clean, false)?
        }
        None => false,
    };
    if let Some(state) = &state {
        remove_identity(ctx, state)?;
    }
    for f in [ID_SCOPE_FILE, CONNECTION_STRING_FILE] {
        fsutil::remove_file(&ctx.layout.host_cert_file(f))?;
    }
    State::remove(&ctx.layout)?;
    Journal::clear(&ctx.layout)?;
    ctx.out.say("Removed the device identity");
    if ctx.restart && manifest_changed {
        crate::connector::restart(crate::connector::Change::Manifest, &ctx.out);
    }
    if ctx.json {
        println!("{}", serde_json::json!({"reset": true}));
    }
    Ok(0)
}

/// Remove the keys and certificate files of `state` (also used after `--force`).
pub fn remove_identity(ctx: &Ctx, state: &State) -> Result<()> {
    let mut ks = ctx.open_keystore(state.keystore, Some(state))?;
    for (role, uri) in &state.keys {
        ks.remove(uri)?;
        ctx.out.say(format!("- Removed the {role} key {uri}"));
    }
    for role in crate::keystore::Role::ALL {
        for staged in [false, true] {
            fsutil::remove_file(&ctx.layout.host_cert_file(&paths::cert_name(role, staged)))?;
        }
    }
    if let Some(pin) = &state.backend.pkcs11_pin_file {
        if pin.starts_with(paths::CERT_DIR) {
            fsutil::remove_file(&ctx.layout.host(pin))?;
        }
    }
    Ok(())
}
