//! `register`: DPS registration through the device key (DESIGN §3b), and the step
//! `provision`, `rotate --promote` and `import-cert` share with it.
//!
//! Registering writes nothing; only a successful registration is recorded (state,
//! then the manifest, then a restart if the manifest changed).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{converge, existing_state, recover, Ctx};
use crate::cert::CertInfo;
use crate::cli::{DpsArgs, ProvisionArgs};
use crate::cloud::Cloud;
use crate::dps::{self, Assignment, DpsError, Settings};
use crate::error::{Error, Fix, Result};
use crate::fsutil;
use crate::identity::{Identity, State};
use crate::keystore::{KeystoreKind, Role};
use crate::model::Slot;

pub fn run(ctx: &Ctx, args: &DpsArgs) -> Result<i32> {
    // Flags first: a bad value stops the run before anything is read.
    settings(args, None)?;
    let _lock = ctx.lock()?;
    recover(ctx)?;
    let id = Identity::load(&ctx.layout)?;
    let state = match &id.state {
        Some(s) => s.clone(),
        None => existing_state(&id).and_then(|_| {
            Err(Error::input(
                "this device's identity was made by the original script and is not adopted yet",
                "run `sdv-provision` (provision) once first",
            ))
        })?,
    };
    let (cloud, id_scope) = dps_cloud(&id)?;
    let settings = settings(args, Some(&state))?;
    let assignment = register(ctx, &state, &id_scope, &settings)?;
    record(ctx, &state, &cloud, &settings, assignment)?;
    Ok(0)
}

/// The identity's DPS backend, or an error saying `register` is for DPS only.
fn dps_cloud(id: &Identity) -> Result<(Cloud, String)> {
    match &id.cloud {
        Some(c @ Cloud::Dps { id_scope }) => Ok((c.clone(), id_scope.clone())),
        Some(Cloud::Hub(_)) => Err(Error::input(
            "this device connects to IoT Hub with a connection string, not through DPS",
            "`register` is for DPS; provision with --id-scope to use DPS",
        )),
        None => Err(Error::input(
            "no cloud backend is configured",
            "run `sdv-provision --id-scope SCOPE` first",
        )),
    }
}

/// Flags, env, then the state's record.
pub fn settings(args: &DpsArgs, state: Option<&State>) -> Result<Settings> {
    Settings::resolve(
        args.dps_endpoint.as_deref(),
        args.dps_ca_file.as_deref(),
        state.and_then(|s| s.dps.as_ref()),
    )
    .map_err(|e| Error::input(e, "pass --dps-endpoint HOST[:PORT]"))
}

/// Does this identity need `register` for the connector to reach its hub? (DPS with
/// a TPM or PKCS#11 key; the file keystore's connector does DPS itself.)
pub fn needs_registration(state: &State, cloud: &Cloud) -> bool {
    matches!(cloud, Cloud::Dps { .. }) && state.keystore != KeystoreKind::File
}

/// Register the primary key's certificate; writes nothing.
pub fn register(
    ctx: &Ctx,
    state: &State,
    id_scope: &str,
    settings: &Settings,
) -> Result<Assignment> {
    let uri = state
        .keys
        .get(&Role::Primary)
        .ok_or_else(|| Error::InvalidState {
            path: ctx.layout.host_cert_file(crate::paths::STATE_FILE),
            detail: "no primary key".into(),
        })?;
    let path = ctx
        .layout
        .host_cert_file(&Slot::live(Role::Primary).cert_file());
    let pem = fsutil::read_optional(&path)?.ok_or_else(|| {
        Error::input(
            format!("{} is missing", path.display()),
            "run `sdv-provision` (provision) to repair the identity",
        )
    })?;
    let info = CertInfo::from_pem(&path, &pem)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    // Read-only: signing a handshake writes nothing (not even a PIN copy).
    let mut ks = ctx.open_keystore_to_read(state.keystore, Some(state))?;
    let key = ks.open(uri)?;
    ctx.out.say(format!(
        "- Registering {} with DPS at {} (ID scope {id_scope}) through the {} key",
        state.device_id, settings.endpoint, state.keystore
    ));
    let spinner = crate::progress::spinner(&ctx.out, "Registering with DPS");
    let reg = dps::register(key.as_ref(), chain, settings, id_scope, &state.device_id);
    drop(spinner);
    let reg = reg?;
    tracing::info!(elapsed = ?reg.elapsed, handshakes = reg.handshakes, "registered");
    ctx.out.say(format!(
        "- DPS assigned {} to hub {} ({} ms, {} TLS handshake{})",
        reg.device_id,
        reg.assigned_hub,
        reg.elapsed.as_millis(),
        reg.handshakes,
        if reg.handshakes == 1 { "" } else { "s" }
    ));
    Ok(Assignment {
        assigned_hub: reg.assigned_hub,
        device_id: reg.device_id,
        thumbprint: info.sha256,
    })
}

/// Record a registration: the state if it changed, then the manifest (the hub's
/// connection string for a hardware key), then a restart only if the manifest
/// changed. The same assignment again rewrites and restarts nothing.
pub fn record(
    ctx: &Ctx,
    state: &State,
    cloud: &Cloud,
    settings: &Settings,
    assignment: Assignment,
) -> Result<State> {
    let next = save_assignment(ctx, state, settings, Some(assignment))?;
    converge(ctx, &next, cloud, crate::connector::Change::Nothing)?;
    Ok(next)
}

/// The state with `settings` and `assignment` recorded, saved if that changed it.
pub fn save_assignment(
    ctx: &Ctx,
    state: &State,
    settings: &Settings,
    assignment: Option<Assignment>,
) -> Result<State> {
    let mut next = state.clone();
    let record = settings.record(assignment);
    next.dps = (record != dps::DpsRecord::default()).then_some(record);
    if next != *state {
        next.save(&ctx.layout)?;
    }
    Ok(next)
}

/// The SHA-256 thumbprint of the primary certificate on disk.
fn primary_thumbprint(ctx: &Ctx) -> Result<Option<String>> {
    let path = ctx
        .layout
        .host_cert_file(&Slot::live(Role::Primary).cert_file());
    Ok(fsutil::read_optional(&path)?
        .map(|pem| CertInfo::from_pem(&path, &pem))
        .transpose()?
        .map(|c| c.sha256))
}

/// `provision`'s step: record the DPS settings, forget an assignment that no longer
/// fits (another ID scope than the `previous` cloud's, another primary certificate)
/// and, for a hardware key, register unless `--no-register`. Not enrolled yet,
/// offline, a DPS error: the identity stays complete, and the next step is printed.
pub fn provision_step(
    ctx: &Ctx,
    state: State,
    cloud: &Cloud,
    previous: Option<&Cloud>,
    args: &ProvisionArgs,
) -> Result<State> {
    let Cloud::Dps { id_scope } = cloud else {
        return Ok(state);
    };
    let scope_kept = matches!(previous, Some(Cloud::Dps { id_scope: p }) if p == id_scope);
    let settings = settings(&args.dps, Some(&state))?;
    let thumb = primary_thumbprint(ctx)?;
    let kept = state
        .dps
        .as_ref()
        .and_then(|d| d.assignment.clone())
        .filter(|a| scope_kept && Some(&a.thumbprint) == thumb.as_ref());
    let state = save_assignment(ctx, &state, &settings, kept.clone())?;
    if kept.is_some() || !needs_registration(&state, cloud) {
        return Ok(state);
    }
    if args.no_register {
        ctx.out.say(format!(
            "- DPS registration skipped (--no-register); {} once the device is enrolled",
            Fix::Register
        ));
        return Ok(state);
    }
    loop {
        match register(ctx, &state, id_scope, &settings) {
            Ok(a) => return save_assignment(ctx, &state, &settings, Some(a)),
            Err(Error::Dps(e)) => {
                next_step(ctx, &state, id_scope, &e);
                // On a terminal the user may enroll now and retry here.
                let retry = ctx.may_prompt()
                    && matches!(e, DpsError::NotEnrolled { .. })
                    && crate::interactive::confirm(
                        "Enrolled the device? Retry the DPS registration now",
                    )?;
                if !retry {
                    return Ok(state);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The next step after a registration that could not be made (`provision`,
/// `rotate --promote`, `import-cert`): enroll, then `register`.
pub fn next_step(ctx: &Ctx, state: &State, id_scope: &str, e: &DpsError) {
    ctx.out.warn(format!("DPS registration is pending: {e}"));
    let cert = |r| ctx.layout.host_cert_file(&Slot::live(r).cert_file());
    ctx.out.say(format!(
        "- Next: enroll the device in DPS (ID scope {id_scope}): `az iot dps enrollment create \
         --dps-name <your-dps> -g <resource-group> --enrollment-id {} --attestation-type x509 \
         --certificate-path {} --secondary-certificate-path {}`, then {}",
        state.device_id,
        cert(Role::Primary).display(),
        cert(Role::Secondary).display(),
        Fix::Register,
    ));
}

/// After `rotate --promote` or `import-cert` changed the primary certificate of a
/// registered DPS identity: register the new one (saved; the caller converges the
/// manifest). A failure is not fatal (the enrollment may not know the new
/// certificate yet): the next step is printed and the recorded assignment stays, as
/// the hub still knows the device, until `register` succeeds.
pub fn refresh(ctx: &Ctx, state: &State, cloud: &Cloud) -> Result<State> {
    let Cloud::Dps { id_scope } = cloud else {
        return Ok(state.clone());
    };
    let Some(registered) = state.dps.as_ref().and_then(|d| d.assignment.as_ref()) else {
        return Ok(state.clone());
    };
    if primary_thumbprint(ctx)?.as_ref() == Some(&registered.thumbprint) {
        return Ok(state.clone());
    }
    ctx.out
        .say("- The primary certificate changed; registering it with DPS");
    let settings = settings(&DpsArgs::default(), Some(state))?;
    match register(ctx, state, id_scope, &settings) {
        Ok(a) => save_assignment(ctx, state, &settings, Some(a)),
        Err(Error::Dps(e)) => {
            ctx.out.warn(
                "the new primary certificate is not registered with DPS yet; \
                 the hub keeps the recorded assignment until `sdv-provision register` succeeds",
            );
            next_step(ctx, state, id_scope, &e);
            Ok(state.clone())
        }
        Err(e) => Err(e),
    }
}
