//! `reset`: remove the identity: its keys (files, token objects, TPM handles it
//! recorded), certificates, cloud configuration, state, and its manifest entries.
//! Never touches objects or handles the tool did not record.
//!
//! Order: the keystore is opened (logged in) before anything changes, so bad input
//! (wrong PIN, token or TPM unreachable) changes nothing; then the manifest (so the
//! connector no longer points at what goes next), then keys and files, the state file
//! last; every step is idempotent, so a reset killed half-way is finished by running
//! it again.

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::keystore::file::FileKeyStore;
use crate::keystore::KeyStore;
use crate::manifest::Manifest;
use crate::model::Confirmation;
use crate::txn::Journal;

use super::{existing_state, recover, Ctx};

pub fn run(ctx: &Ctx, confirmation: Confirmation) -> Result<i32> {
    ctx.check_root()?;
    if confirmation == Confirmation::Ask {
        if !ctx.may_prompt() {
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
        // Nothing left to remove (a reset ran, or the recovery above finished an
        // interrupted one): the device is in the state reset promises.
        Err(_) if nothing_to_remove(ctx) => {
            ctx.out
                .say("Nothing to remove: this device has no identity");
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    // The manifest is parsed, then the keystore opened, before anything changes: a
    // broken manifest, a wrong PIN, a missing token or an unreachable TPM stops the
    // reset here with everything untouched (a committed journal would otherwise make
    // the next run finish the removal).
    let manifest = Manifest::load(&ctx.layout)?;
    let mut ks: Box<dyn KeyStore> = match &state {
        Some(s) => ctx.open_keystore(s.keystore, Some(s))?,
        None => Box::new(FileKeyStore::new(ctx.layout.clone())),
    };
    let manifest_changed = match manifest {
        Some(m) => {
            let clean = m.stripped(state.as_ref().map(|s| s.backend.mounts()).unwrap_or(&[]))?;
            m.save(&clean, crate::fsutil::PUBLIC)?
        }
        None => false,
    };
    // Journal the removal before the first key goes: a reset killed half-way is
    // finished by the next run instead of leaving a state that names missing keys.
    let journal = Journal::reset(state.as_ref());
    for (role, uri) in state.iter().flat_map(|s| &s.keys) {
        ctx.out.say(format!("- Removing the {role} key {uri}"));
    }
    journal.save(&ctx.layout)?;
    journal.roll_forward(&ctx.layout, ks.as_mut(), None)?;
    ctx.out.say("Removed the device identity");
    if ctx.restart && manifest_changed {
        crate::connector::restart(crate::connector::Change::Manifest, &ctx.out);
    }
    if ctx.json {
        crate::output::stdout(&format!("{}\n", serde_json::json!({"reset": true})));
    }
    Ok(0)
}
/// No identity file and no state: what a finished reset leaves.
fn nothing_to_remove(ctx: &Ctx) -> bool {
    let names = crate::txn::identity_files().into_iter().chain([
        crate::paths::STATE_FILE.to_string(),
        crate::txn::JOURNAL_FILE.to_string(),
    ]);
    !names
        .map(|n| ctx.layout.host_cert_file(&n))
        .any(|p| crate::fsutil::exists_nofollow(&p))
}
