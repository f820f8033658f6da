//! `rotate`: a new secondary identity, or (`--promote`) the secondary becomes the
//! primary and a fresh secondary follows.
//!
//! Both go through the journal: the new secondary is built beside the old one and
//! moved into place only when complete; a promotion is journaled as committed before
//! the old primary is removed, so a crash leaves a usable identity and the next run
//! finishes the move (and `provision` then makes the missing secondary).

use crate::connector::Change;
use crate::error::{Error, Fix, Result};
use crate::identity::{Identity, State};
use crate::keystore::Role;
use crate::model::Rotation;
use crate::txn::{Journal, Plan};

use super::{build_keys, commit, converge, recover, report, Ctx, Settings};

pub fn run(ctx: &Ctx, rotation: Rotation, days: u32) -> Result<i32> {
    let _lock = ctx.lock()?;
    recover(ctx)?;
    let id = Identity::load(&ctx.layout)?;
    let state = id.state.clone().ok_or_else(|| {
        Error::input(
            "this device has no sdv-provision identity",
            Fix::ProvisionFirst,
        )
    })?;
    let cloud = id
        .cloud
        .clone()
        .ok_or_else(|| Error::input("no cloud backend is configured", Fix::RunFirst))?;
    // Parse (and so validate) the manifest before making anything: a broken one
    // would otherwise stop the run after the new keys were made.
    crate::manifest::Manifest::load(&ctx.layout)?;
    let mut ks = ctx.open_keystore(state.keystore, Some(&state))?;
    let mut state = state;
    if rotation == Rotation::Promote {
        let journal = Journal::promote(&state)?;
        ctx.out.say("- Promoting the secondary identity to primary");
        journal.save(&ctx.layout)?;
        state = journal
            .roll_forward(&ctx.layout, ks.as_mut(), None)?
            .expect("a journal with a next state yields it");
    }
    // A fresh secondary: built beside the live one (if any), moved in when complete.
    let staged = state.keys.contains_key(&Role::Secondary);
    let plan = Plan {
        roles: &[Role::Secondary],
        staged,
        alg: state.algorithm,
        device_id: &state.device_id,
        days,
    };
    let (journal, built) = build_keys(ctx, ks.as_mut(), &plan)?;
    // Only the secondary is replaced: the old state with just that key.
    let mut base: State = state.clone();
    base.forget(Role::Primary);
    let old = staged.then_some(&base);
    state = commit(
        ctx,
        ks.as_mut(),
        journal,
        built,
        state.clone(),
        old,
        Settings::Keep,
    )?;
    drop(ks);
    if rotation == Rotation::Promote {
        // The primary changed: DPS learns it, the manifest follows and the
        // connector restarts.
        state = super::register::refresh(ctx, &state, &cloud)?;
        converge(ctx, &state, &cloud, Change::Certificates)?;
    }
    let id = Identity::load(&ctx.layout)?;
    if let Ok(c) = &id.role(Role::Secondary).cert {
        ctx.out.say(format!(
            "New secondary thumbprint (register it before promoting): {}",
            c.sha1
        ));
    }
    report(ctx)?;
    Ok(0)
}
