//! `import-cert`: install a CA-issued certificate (with its chain) for a role.
//!
//! Refused unless the certificate's public key is the role's key (proved by a
//! signature, not by comparing encodings), it is valid now, and its CN is the device
//! id. The file is installed whole (leaf first, then chain), atomically; importing
//! the file already installed is a no-op (no restart).

use std::path::Path;

use crate::cert::{key_matches, CertInfo};
use crate::connector::Change;
use crate::error::{Error, Fix, Result};
use crate::fsutil;
use crate::identity::{Identity, State};
use crate::keystore::Role;
use crate::model::Slot;

use super::{converge, existing_state, recover, report, Ctx};

pub fn run(ctx: &Ctx, role: Role, file: &Path) -> Result<i32> {
    let (pem, new) = read_certificate(file)?;
    let _lock = ctx.lock()?;
    recover(ctx)?;
    let id = Identity::load(&ctx.layout)?;
    let state = existing_state(&id)?;
    if state.adopted && id.state.is_none() {
        return Err(Error::input(
            "the identity left by the original script is not adopted yet",
            Fix::RunFirst,
        ));
    }
    check_subject_and_validity(file, &new, &state)?;
    let uri = state
        .keys
        .get(&role)
        .ok_or_else(|| Error::input(format!("there is no {role} key"), Fix::CompleteIdentity))?;
    let mut ks = ctx.open_keystore(state.keystore, Some(&state))?;
    {
        let key = ks.open(uri)?;
        if !key_matches(key.as_ref(), &new.spki)? {
            return Err(refuse(
                file,
                format!("its public key is not the {role} key {uri}"),
            ));
        }
    }
    let path = ctx.layout.host_cert_file(&Slot::live(role).cert_file());
    // The keystore first (a token's certificate object; idempotent), the file last:
    // a run that stops in between is finished by the next one, and importing the file
    // already installed writes nothing and restarts nothing.
    let installed = fsutil::read_optional(&path)?.as_deref() == Some(&pem[..]);
    ks.attach_certificate(uri, &new.der)?;
    if installed {
        ctx.out
            .say(format!("The {role} certificate is already installed"));
    } else {
        fsutil::atomic_write(&path, &pem, fsutil::PUBLIC)?;
        ctx.out.say(format!(
            "Installed the {role} certificate issued by {} ({} chain certificate(s))",
            new.issuer, new.chain_len
        ));
    }
    if let Some(cloud) = &id.cloud {
        let state = match &id.state {
            Some(_) => super::register::refresh(ctx, &state, cloud)?,
            None => state,
        };
        super::compatibility_warnings(ctx, &state, cloud);
        // The connector only presents the primary certificate.
        let change = if !installed && role == Role::Primary {
            Change::Certificates
        } else {
            Change::Nothing
        };
        converge(ctx, &state, cloud, change)?;
    }
    report(ctx)?;
    Ok(0)
}

/// The PEM file and its parsed leaf (with the chain count).
fn read_certificate(file: &Path) -> Result<(Vec<u8>, CertInfo)> {
    let pem = fsutil::read_optional(file)?.ok_or_else(|| {
        Error::input(
            format!("{} does not exist", file.display()),
            "pass the PEM file of the issued certificate",
        )
    })?;
    let new = CertInfo::from_pem(file, &pem).map_err(|e| {
        Error::input(
            e.to_string(),
            "pass the PEM file of the certificate issued for this device's key",
        )
    })?;
    Ok((pem, new))
}

/// The certificate names this device and is valid now.
fn check_subject_and_validity(file: &Path, new: &CertInfo, state: &State) -> Result<()> {
    if new.subject_cn.as_deref() != Some(state.device_id.as_str()) {
        return Err(refuse(
            file,
            format!(
                "its CN {:?} is not the device id {:?}",
                new.subject_cn.as_deref().unwrap_or(""),
                state.device_id
            ),
        ));
    }
    if !new.is_current() {
        return Err(refuse(
            file,
            format!(
                "it is not valid now (valid until {})",
                new.not_after_rfc3339()
            ),
        ));
    }
    Ok(())
}

fn refuse(file: &Path, why: String) -> Error {
    Error::input(
        format!("refusing {}: {why}", file.display()),
        "import the certificate issued for this device's key",
    )
}
