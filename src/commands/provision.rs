//! `provision`: the whole flow of DESIGN §1, idempotent.
//!
//! Inputs are validated before anything is touched; keys are made under the journal;
//! the identity is committed through the state file; the manifest and the connector
//! follow. Re-running with everything in place changes nothing and restarts nothing.
//!
//! [`run`] reads as the six steps of DESIGN §1. Step 3 is one of three named paths,
//! [`keep`] (the existing identity), [`adopt_script_files`] (the original script's
//! files) and [`build_new`]; each ends in the one commit of [`crate::txn`].

use crate::cli::ProvisionArgs;
use crate::cloud::{self, Cloud};
use crate::connector::Change;
use crate::device_id::{self, Source};
use crate::error::{Error, Fix, Result};
use crate::fsutil;
use crate::identity::{Identity, State};
use crate::keystore::{
    self, file::FileKeyStore, Algorithm, Backend, KeyStore, KeyUri, KeystoreKind, Role,
};
use crate::manifest::Manifest;
use crate::model::Slot;
use crate::paths::{Layout, DEVICE_ID_FILE};
use crate::txn::Plan;

use super::{
    build_keys, commit, compatibility_warnings, converge, recover, report, update_manifest, Ctx,
    Settings,
};

pub fn run(ctx: &Ctx, args: &ProvisionArgs) -> Result<i32> {
    let out = &ctx.out;
    let layout = &ctx.layout;
    ctx.check_root()?;

    // Flags first: a bad value stops the run before anything is read or written.
    let mut warnings = Vec::new();
    let flag_cloud = check_flags(args, &mut warnings)?;

    device_id::check_file_kind(layout)?;

    let lock = ctx.lock()?;
    {
        let _s = crate::progress::step("recover interrupted runs");
        recover(ctx)?;
    }
    let load_step = crate::progress::step("read the current identity");
    out.say("Checking Eclipse Leda Device Provisioning configuration...");
    let id = Identity::load(layout)?;
    // Parse (and so validate) the manifest before making anything.
    Manifest::load(layout)?;
    if !lock.made_dir() {
        out.say("- Certificates directory exists");
    } else {
        out.say("- Creating the certificates directory");
    }
    let old = if args.force && (id.state.is_some() || id.legacy) {
        Old::Replace
    } else {
        Old::Keep
    };

    drop(load_step);
    // 1. Device id.
    out.say("Checking Device ID");
    let device_id = resolve_device_id(ctx, args, &id, old, &mut warnings)?;
    out.say(format!("- Device ID: {device_id}"));

    // 2. Cloud backend.
    let cloud = choose_cloud(ctx, flag_cloud, &id, &device_id)?;
    for w in warnings.drain(..) {
        out.warn(w);
    }

    // 3. Keys and certificates.
    let keys_step = crate::progress::step("keys and certificates");
    let mut change = Change::Nothing;
    let state = match (&id.state, id.legacy, old) {
        (Some(s), _, Old::Keep) => keep(ctx, args, s, &id, &device_id, &mut change)?,
        (None, true, Old::Keep) => adopt_script_files(ctx, args, &id, &device_id, &mut change)?,
        (_, _, _) => build_new(ctx, args, &id, &device_id, old, &cloud, &mut change)?,
    };

    drop(keys_step);
    // 4. Device id and cloud files.
    let files_step = crate::progress::step("device id and cloud files");
    write_id_and_cloud(ctx, &id, &device_id, &cloud)?;

    drop(files_step);
    // DPS registration through the device key (DESIGN §3b).
    let state = super::register::provision_step(ctx, state, &cloud, id.cloud.as_ref(), args)?;
    // 5 and 6. Manifest and connector.
    let _s = crate::progress::step("manifest and connector");
    compatibility_warnings(ctx, &state, &cloud);
    converge(ctx, &state, &cloud, change)?;
    let complete = report(ctx)?.is_empty();
    Ok(if complete { 0 } else { 1 })
}

/// The flags that need more than clap: the connection string (or its file), the ID
/// scope and the device id. Returns the cloud backend the flags choose, if any.
fn check_flags(args: &ProvisionArgs, warnings: &mut Vec<String>) -> Result<Option<Cloud>> {
    let cs_text = match &args.connection_string_file {
        Some(f) => Some(cloud::read_secret_text(f)?.ok_or_else(|| {
            Error::input(
                format!("{} does not exist", f.display()),
                "pass an existing --connection-string-file",
            )
        })?),
        None => args.connection_string.clone().map(zeroize::Zeroizing::new),
    };
    let flag_cloud = cloud::from_flags(
        args.id_scope.as_deref(),
        cs_text.as_deref().map(|s| s.as_str()),
        warnings,
    )?;
    if let Some(id) = &args.device_id {
        device_id::check_flag(id)?;
    }
    // The DPS flags and env too (the state's record was valid when written).
    super::register::settings(&args.dps, None)?;
    Ok(flag_cloud)
}

/// Step 2: the flags' backend, else the recorded one, else the user's answer.
fn choose_cloud(
    ctx: &Ctx,
    flag_cloud: Option<Cloud>,
    id: &Identity,
    device_id: &str,
) -> Result<Cloud> {
    let out = &ctx.out;
    out.say("Checking whether either IdScope or ConnectionString is configured");
    let cloud = match (flag_cloud, &id.cloud) {
        (Some(c), _) => c,
        (None, Some(c)) => {
            out.say(match c {
                Cloud::Dps { .. } => " - Id Scope file found",
                Cloud::Hub(_) => " - ConnectionString file found",
            });
            c.clone()
        }
        (None, None) if ctx.may_prompt() => crate::interactive::ask_cloud(out, device_id)?,
        (None, None) => {
            return Err(Error::MissingAnswer {
                what: "the cloud backend (DPS ID scope or IoT Hub connection string)".into(),
                flag: "--id-scope or --connection-string".into(),
            })
        }
    };
    if let Cloud::Hub(cs) = &cloud {
        if cs.device_id != device_id {
            return Err(Error::input(
                format!(
                    "the connection string's DeviceId {:?} differs from the device id {device_id:?} (X.509 authentication needs CN == DeviceId)",
                    cs.device_id
                ),
                format!("pass --device-id {} or use this device's connection string", cs.device_id),
            ));
        }
    }
    Ok(cloud)
}

/// Keep (or adopt) the device's identity, or replace it (`--force`; see [`build_new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Old {
    Keep,
    Replace,
}

/// Step 3, keep the existing identity: its keys must still match their certificates
/// (a missing certificate is re-issued); a missing slot is made and committed.
fn keep(
    ctx: &Ctx,
    args: &ProvisionArgs,
    s: &State,
    id: &Identity,
    device_id: &str,
    change: &mut Change,
) -> Result<State> {
    check_unchanged(ctx, args, s.keystore, s.algorithm)?;
    let mut ks = ctx.open_keystore_to_provision(s.keystore, Some(s))?;
    if check_certificates(ctx, ks.as_mut(), s, id, args.days)? {
        *change = (*change).max(Change::Certificates);
    }
    let s = refresh_pin_file(&ctx.layout, s, ks.as_ref())?;
    complete_slots(ctx, args, ks.as_mut(), s, device_id, change)
}

/// Step 3, adopt the old script's files: its key/cert pairs become the identity, and
/// a missing secondary is made and committed.
fn adopt_script_files(
    ctx: &Ctx,
    args: &ProvisionArgs,
    id: &Identity,
    device_id: &str,
    change: &mut Change,
) -> Result<State> {
    let (adopted, missing) = adopt(ctx, id, device_id)?;
    check_unchanged(ctx, args, KeystoreKind::File, adopted.algorithm)?;
    tighten_key_modes(ctx, &adopted)?;
    ctx.out
        .say("- Adopted the keys and certificates left by the original sdv-provision script");
    if missing.is_empty() {
        adopted.save(&ctx.layout)?;
        return Ok(adopted);
    }
    let mut ks: Box<dyn KeyStore> = Box::new(FileKeyStore::new(ctx.layout.clone()));
    complete_slots(ctx, args, ks.as_mut(), adopted, device_id, change)
}

/// The slots `state` has no key for are built and committed (none missing: `state`).
fn complete_slots(
    ctx: &Ctx,
    args: &ProvisionArgs,
    ks: &mut dyn KeyStore,
    state: State,
    device_id: &str,
    change: &mut Change,
) -> Result<State> {
    let missing: Vec<Role> = Role::ALL
        .into_iter()
        .filter(|r| !state.keys.contains_key(r))
        .collect();
    if missing.is_empty() {
        return Ok(state);
    }
    *change = (*change).max(Change::Certificates);
    let plan = Plan {
        roles: &missing,
        staged: false,
        alg: state.algorithm,
        device_id,
        days: args.days,
    };
    let (journal, built) = build_keys(ctx, ks, &plan)?;
    commit(ctx, ks, journal, built, state, None, Settings::Record)
}

/// Step 3, build a new identity (none yet, or `--force`): all slots in the chosen
/// keystore, staged beside the old identity on a rebuild, then the one commit.
fn build_new(
    ctx: &Ctx,
    args: &ProvisionArgs,
    id: &Identity,
    device_id: &str,
    existing: Old,
    cloud: &Cloud,
    change: &mut Change,
) -> Result<State> {
    let old = id.state.as_ref();
    *change = (*change).max(Change::Certificates);
    let kind = ctx
        .keystore
        .unwrap_or_else(|| keystore::select_auto(&ctx.ks_config));
    let alg = args.algorithm.unwrap_or(Algorithm::Rsa2048);
    if kind == KeystoreKind::File {
        let why = if ctx.keystore.is_some() {
            "--keystore file"
        } else {
            "no TPM or PKCS#11 token found"
        };
        ctx.out.warn(format!("the device keys are plain files ({why}); anyone who can read /data/var/certificates can copy this identity"));
    }
    check_same_token(ctx, old, kind)?;
    let mut ks = ctx.open_keystore_to_provision(kind, old.filter(|s| s.keystore == kind))?;
    let plan = Plan {
        roles: &Role::ALL,
        staged: existing == Old::Replace,
        alg,
        device_id,
        days: args.days,
    };
    let (journal, built) = build_keys(ctx, ks.as_mut(), &plan)?;
    let mut next = State::new(device_id, kind, alg);
    // The DPS endpoint and trust carry over; the assignment was the old key's and is
    // dropped by the registration step.
    next.dps = old.and_then(|o| o.dps.clone());
    if existing == Old::Keep {
        // A new identity: the manifest is written before the commit, so a
        // failure there removes the new keys again (no orphans in a token or
        // TPM). A rebuild keeps the old identity live until its commit, and
        // the manifest follows after it.
        let mut provisional = next.clone();
        provisional.backend = ks.record();
        for b in &built {
            provisional.keys.insert(b.role(), b.uri().clone());
        }
        match update_manifest(ctx, &provisional, cloud) {
            Ok(Some(true)) => *change = Change::Manifest,
            Ok(_) => {}
            Err(e) => {
                if let Err(cleanup) = journal.roll_back(&ctx.layout, ks.as_mut()) {
                    ctx.out.warn(format!(
                        "could not clean up after the failure ({cleanup}); the next run will retry"
                    ));
                }
                return Err(e);
            }
        }
    }
    let old_state = match old {
        Some(s) => Some(s.clone()),
        None if id.legacy => Some(crate::identity::legacy_state(device_id)),
        None => None,
    };
    commit(
        ctx,
        ks.as_mut(),
        journal,
        built,
        next,
        old_state.as_ref(),
        Settings::Record,
    )
}

/// The old keys are removed through the new store when both are PKCS#11: it must be
/// the same token (a store only handles its own token's URIs).
fn check_same_token(ctx: &Ctx, old: Option<&State>, kind: KeystoreKind) -> Result<()> {
    if let (Some(o), Some(t)) = (
        old.filter(|s| s.keystore == kind)
            .and_then(|s| s.backend.pkcs11()?.token.as_deref()),
        ctx.ks_config.pkcs11.token.as_deref(),
    ) {
        if o != t {
            return Err(Error::input(
                format!("this identity's keys are in PKCS#11 token {o}; --force cannot move it to token {t} in one run"),
                format!("{} first (it removes the keys from {o}), then provision with --pkcs11-token {t}", Fix::Reset),
            ));
        }
    }
    Ok(())
}

/// Step 4: `/etc/deviceid` (a failure is a warning) and the cloud backend's file.
fn write_id_and_cloud(ctx: &Ctx, id: &Identity, device_id: &str, cloud: &Cloud) -> Result<()> {
    let id_path = ctx.layout.host(DEVICE_ID_FILE);
    if fsutil::read_optional_string(&id_path)
        .ok()
        .flatten()
        .as_deref()
        .map(str::trim)
        != Some(device_id)
    {
        if let Err(e) = fsutil::atomic_write(
            &id_path,
            format!("{device_id}\n").as_bytes(),
            fsutil::PUBLIC,
        ) {
            ctx.out
                .warn(format!("could not store the device id ({e}); continuing"));
        }
    }
    let cloud_changed = match (&id.cloud, cloud) {
        (Some(Cloud::Dps { id_scope: a }), Cloud::Dps { id_scope: b }) => a != b,
        (Some(Cloud::Hub(a)), Cloud::Hub(b)) => a.expose() != b.expose(),
        _ => true,
    };
    if cloud_changed {
        cloud::save(&ctx.layout, cloud)?;
    }
    Ok(())
}

/// A re-run may have chosen another connector PIN file than the identity records
/// (`keystore::choose_pin_file`, when the store was opened: the recorded user file
/// went missing or no longer holds the PIN the token accepts, so the tool wrote its
/// own copy): the state follows, and with it
/// the manifest (converged later in this run; a run stopped in between is repaired by
/// the next, since the state then names a file that exists).
fn refresh_pin_file(layout: &Layout, state: &State, ks: &dyn KeyStore) -> Result<State> {
    let mut next = state.clone();
    let (Backend::Pkcs11(chosen), Backend::Pkcs11(recorded)) = (ks.record(), &mut next.backend)
    else {
        return Ok(next);
    };
    if chosen.pin_file == recorded.pin_file {
        return Ok(next);
    }
    recorded.pin_file = chosen.pin_file;
    next.save(layout)?;
    Ok(next)
}

fn resolve_device_id(
    ctx: &Ctx,
    args: &ProvisionArgs,
    id: &Identity,
    old: Old,
    warnings: &mut Vec<String>,
) -> Result<String> {
    let existing = if old == Old::Replace {
        None
    } else if let Some(s) = &id.state {
        Some(s.device_id.clone())
    } else if id.legacy {
        let view = id.role(Role::Primary);
        let cn = view
            .cert
            .as_ref()
            .ok()
            .and_then(|c| c.subject_cn.clone())
            .unwrap_or_default();
        device_id::validate(&cn).map_err(|why| {
            Error::input(
                format!(
                    "the existing {} cannot be adopted: its CN is not a valid device id ({why})",
                    view.cert_path.display()
                ),
                Fix::BuildNewIdentity,
            )
        })?;
        Some(cn)
    } else {
        None
    };
    if let Some(existing) = existing {
        if let Some(flag) = &args.device_id {
            if *flag != existing {
                return Err(Error::input(
                    format!("this device already has an identity for device id {existing:?}"),
                    format!("pass --force to build a new identity for {flag:?}"),
                ));
            }
        }
        ctx.out.say("- Based on the existing identity");
        return Ok(existing);
    }
    let (dev, source) = device_id::resolve(&ctx.layout, args.device_id.as_deref(), warnings)?;
    ctx.out.say(match source {
        Source::Flag => "- Given by --device-id".to_string(),
        Source::File => format!("- Read from {DEVICE_ID_FILE}"),
        Source::Interface(i) => format!("- Based on network device: {i}"),
    });
    Ok(dev)
}

/// An existing identity keeps its keystore and algorithm unless `--force` is given.
fn check_unchanged(
    ctx: &Ctx,
    args: &ProvisionArgs,
    kind: KeystoreKind,
    alg: Algorithm,
) -> Result<()> {
    if let Some(want) = ctx.keystore {
        if want != kind {
            return Err(Error::input(
                format!("the existing identity uses the {kind} keystore, not {want}"),
                format!("pass --force to build a new identity in the {want} keystore"),
            ));
        }
    }
    if let Some(want) = args.algorithm {
        if want != alg {
            return Err(Error::input(
                format!("the existing identity uses {alg}, not {want}"),
                format!("pass --force to build a new identity with {want}"),
            ));
        }
    }
    Ok(())
}

/// Adopt the original script's key/cert pairs: no new keys, same thumbprints. Each key
/// must match its certificate. Returns the state and the roles still missing.
fn adopt(ctx: &Ctx, id: &Identity, device_id: &str) -> Result<(State, Vec<Role>)> {
    let mut ks = FileKeyStore::new(ctx.layout.clone());
    let mut state: Option<State> = None;
    let mut missing = Vec::new();
    for role in Role::ALL {
        let uri = KeyUri::File(keystore::file::key_path(Slot::live(role)));
        let view = id.role(role);
        let key_present =
            fsutil::exists_nofollow(&ctx.layout.host(keystore::file::key_path(Slot::live(role))));
        if !key_present && role == Role::Secondary {
            missing.push(role);
            continue;
        }
        let cert = view.cert.as_ref().map_err(|e| {
            Error::input(
                format!("cannot adopt the existing {role} identity: {e}"),
                format!("restore the file, or {}", Fix::BuildNewIdentity),
            )
        })?;
        let key = ks.open(&uri)?;
        if !crate::cert::key_matches(key.as_ref(), &cert.spki)? {
            return Err(Error::input(
                format!(
                    "{} does not belong to {}",
                    ctx.layout
                        .host(keystore::file::key_path(Slot::live(role)))
                        .display(),
                    view.cert_path.display()
                ),
                format!("restore the matching pair, or {}", Fix::BuildNewIdentity),
            ));
        }
        let s = state.get_or_insert_with(|| {
            let mut s = State::new(device_id, KeystoreKind::File, key.alg());
            s.adopted = true;
            s
        });
        if key.alg() != s.algorithm {
            return Err(Error::input(
                format!(
                    "the existing keys use different algorithms ({} and {})",
                    s.algorithm,
                    key.alg()
                ),
                Fix::BuildNewIdentity,
            ));
        }
        s.keys.insert(role, uri);
    }
    Ok((
        state.expect("the primary is adopted or an error was returned"),
        missing,
    ))
}

/// Each recorded key must still be there and match its certificate. A missing
/// certificate is re-issued from the existing key (its thumbprint changes, so the
/// user is told); a damaged or foreign one is an error, and nothing is changed.
/// Returns whether a certificate was re-issued.
fn check_certificates(
    ctx: &Ctx,
    ks: &mut dyn KeyStore,
    state: &State,
    id: &Identity,
    days: u32,
) -> Result<bool> {
    let mut reissued = false;
    for (role, uri) in &state.keys {
        let view = id.role(*role);
        let key = ks.open(uri)?;
        match &view.cert {
            Ok(c) => {
                let matches = key.subject_public_key_info() == c.spki
                    || crate::cert::key_matches(key.as_ref(), &c.spki)?;
                if !matches || c.subject_cn.as_deref() != Some(state.device_id.as_str()) {
                    return Err(Error::input(
                        format!(
                            "{} does not belong to the {role} key {uri} of device {}",
                            view.cert_path.display(),
                            state.device_id
                        ),
                        format!(
                            "restore the right certificate (or `sdv-provision import-cert`), or {}",
                            Fix::Force
                        ),
                    ));
                }
            }
            Err(e) if fsutil::exists_nofollow(&view.cert_path) => {
                return Err(Error::input(
                    e.clone(),
                    format!("restore the file, or {}", Fix::Force),
                ));
            }
            Err(_) => {
                let pem = crate::cert::self_signed(key.as_ref(), &state.device_id, days)?;
                drop(key);
                fsutil::atomic_write(&view.cert_path, pem.as_bytes(), fsutil::PUBLIC)?;
                let info = crate::cert::CertInfo::from_pem(&view.cert_path, pem.as_bytes())?;
                ks.attach_certificate(uri, &info.der)?;
                ctx.out.warn(format!(
                    "re-issued the missing {role} certificate from its existing key; register its new thumbprint {}",
                    info.sha1
                ));
                reissued = true;
            }
        }
    }
    Ok(reissued)
}

/// The original script left its keys with whatever mode `openssl` and the umask gave
/// them. Adopted keys are secrets like ours: make them 0600 (and say so).
fn tighten_key_modes(ctx: &Ctx, state: &State) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for uri in state.keys.values() {
        let KeyUri::File(p) = uri else { continue };
        let path = ctx.layout.host(p);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::read(&path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(fsutil::SECRET))
                .map_err(|e| Error::write(&path, e))?;
            ctx.out.warn(format!(
                "{} was readable by others (mode {:o}); it is now 0600",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
    }
    Ok(())
}
