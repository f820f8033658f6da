//! `verify`: prove every key signs and matches its certificate, the copies consumers
//! load instead of the key (TPM blobs) are that key, the certificates are valid, and
//! the manifest agrees with the state. Exit 0 only if all checks pass.

use serde::Serialize;

use crate::cert::key_matches;
use crate::error::Result;
use crate::identity::Identity;
use crate::keystore::Role;
use crate::manifest::Manifest;

use super::{desired_manifest, existing_state, Ctx};

/// Warn when a certificate has fewer days left than this.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
struct VerifyReport<'a> {
    ok: bool,
    checks: &'a [Check],
}

pub fn run(ctx: &Ctx) -> Result<i32> {
    ctx.check_root()?;
    let checks = checks(ctx)?;
    let ok = checks.iter().all(|c| c.ok);
    if ctx.json {
        crate::output::print_json(&VerifyReport {
            ok,
            checks: &checks,
        });
    } else {
        for c in &checks {
            ctx.out.say(format!(
                "{} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.check,
                c.detail
            ));
        }
        ctx.out.say(if ok {
            "Verification passed"
        } else {
            "Verification FAILED"
        });
    }
    Ok(if ok { 0 } else { 1 })
}

pub fn checks(ctx: &Ctx) -> Result<Vec<Check>> {
    let id = Identity::load(&ctx.layout)?;
    let state = existing_state(&id)?;
    let mut checks = Vec::new();
    let mut add =
        |check: String, ok: bool, detail: String| checks.push(Check { check, ok, detail });

    match &id.cloud {
        Some(c) => add("cloud".into(), true, format!("{} configured", c.kind())),
        None => add(
            "cloud".into(),
            false,
            "no ID scope or connection string configured".into(),
        ),
    }
    let mut ks = match ctx.open_keystore_to_read(state.keystore, Some(&state)) {
        Ok(ks) => Some(ks),
        Err(e) => {
            add(format!("keystore.{}", state.keystore), false, e.to_string());
            None
        }
    };
    if let Some((name, outcome)) = ks.as_ref().and_then(|ks| ks.check_store()) {
        let ok = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|e| e.to_string());
        add(format!("keystore.{name}"), ok, detail);
    }
    for role in Role::ALL {
        let view = id.role(role);
        let cert = match &view.cert {
            Ok(c) => c,
            Err(e) => {
                add(format!("{role}.certificate"), false, e.clone());
                continue;
            }
        };
        let cn_ok = cert.subject_cn.as_deref() == Some(state.device_id.as_str());
        add(
            format!("{role}.certificate.subject"),
            cn_ok,
            format!(
                "CN {:?}, device id {:?}",
                cert.subject_cn.as_deref().unwrap_or(""),
                state.device_id
            ),
        );
        let days_left = cert.remaining().whole_days();
        let (ok, detail) = if !cert.is_current() {
            (
                false,
                format!("not valid now (valid until {})", cert.not_after_rfc3339()),
            )
        } else if days_left < EXPIRY_WARNING_DAYS {
            ctx.out.warn(format!(
                "the {role} certificate expires in {days_left} days; renew it: `sdv-provision rotate`, register the new secondary, then `sdv-provision rotate --promote` (or import a new CA-issued certificate)"
            ));
            (true, format!("valid, but only {days_left} days left"))
        } else {
            (true, format!("valid until {}", cert.not_after_rfc3339()))
        };
        add(format!("{role}.certificate.validity"), ok, detail);
        let Some(uri) = &view.key_uri else {
            add(format!("{role}.key"), false, "no key recorded".into());
            continue;
        };
        let Some(ks) = ks.as_mut() else { continue };
        let result = ks
            .open(uri)
            .map_err(crate::Error::from)
            .and_then(|key| key_matches(key.as_ref(), &cert.spki));
        let key_ok = matches!(result, Ok(true));
        match result {
            Ok(true) => add(format!("{role}.key"), true, format!("{uri} signs and matches {}", view.cert_path.display())),
            Ok(false) => add(
                format!("{role}.key"),
                false,
                format!("{uri} does not match {}: a signature by the key fails under the certificate's public key", view.cert_path.display()),
            ),
            Err(e) => add(format!("{role}.key"), false, format!("{uri}: {e}")),
        }
        // How the key was made (noDA) and the copies consumers load instead of it
        // (TPM blobs, for today's connector), checked against a key that passed: one
        // failure names one cause.
        if key_ok {
            if let Some(outcome) = ks.check_key(uri) {
                let ok = outcome.is_ok();
                let detail = outcome.unwrap_or_else(|e| e.to_string());
                add(format!("{role}.key.attributes"), ok, detail);
            }
            if let Some(outcome) = ks.check_copies(uri) {
                let ok = outcome.is_ok();
                let detail = outcome.unwrap_or_else(|e| e.to_string());
                add(format!("{role}.key.copies"), ok, detail);
            }
        }
    }
    let loose = crate::secret_modes::loose(&ctx.layout);
    let detail = if loose.is_empty() {
        "every secret file is 0600".to_string()
    } else {
        loose
            .iter()
            .map(|l| l.problem())
            .collect::<Vec<_>>()
            .join("; ")
    };
    add("secret_modes".into(), loose.is_empty(), detail);
    match (Manifest::load(&ctx.layout)?, &id.cloud) {
        (None, _) => add(
            "manifest".into(),
            true,
            "no connector manifest on this device".into(),
        ),
        (Some(_), None) => {}
        (Some(m), Some(cloud)) => match desired_manifest(&state, cloud) {
            None => add(
                "manifest".into(),
                false,
                "the state lacks the primary key's settings".into(),
            ),
            Some(want) => {
                let fresh = m.render(&want)?;
                let config = config_problem(ctx, crate::manifest::connector_config(&fresh, &want));
                let ok = m.current.as_ref() == Some(&fresh) && config.is_none();
                let detail = if let Some(problem) = config {
                    format!("{problem}; run sdv-provision to repair it")
                } else if ok {
                    format!("{} agrees with the identity", m.path.display())
                } else {
                    let differing: Vec<&str> = crate::manifest::OWNED_ENV
                        .iter()
                        .copied()
                        .filter(|k| {
                            m.current
                                .as_ref()
                                .and_then(|c| crate::manifest::env_value(c, k))
                                != crate::manifest::env_value(&fresh, k)
                        })
                        .collect();
                    format!(
                        "{} does not agree with the identity (entries: {}); run sdv-provision to repair it",
                        m.path.display(),
                        if differing.is_empty() { "mounts or devices".into() } else { differing.join(", ") }
                    )
                };
                add("manifest".into(), ok, detail);
            }
        },
    }
    Ok(checks)
}

/// What is wrong with the connector's TPM config file, compared with what the
/// manifest's identity needs (`None`: nothing, or not TPM mode and no file).
fn config_problem(ctx: &Ctx, want: Option<serde_json::Value>) -> Option<String> {
    let path = ctx
        .layout
        .host_cert_file(crate::manifest::CONNECTOR_CONFIG_FILE);
    let have = match crate::fsutil::read_optional(&path) {
        Ok(have) => have,
        Err(e) => return Some(e.to_string()),
    };
    let parsed = have
        .as_deref()
        .map(serde_json::from_slice::<serde_json::Value>);
    match (want, parsed) {
        (None, None) => None,
        (None, Some(_)) => Some(format!("{} is left over from TPM mode", path.display())),
        (Some(_), None) => Some(format!("{} is missing", path.display())),
        (Some(want), Some(Ok(have))) if have == want => None,
        (Some(_), Some(_)) => Some(format!(
            "{} does not hold the identity's TPM settings (tpmDevice, tpmHandle, tpmKey, tpmKeyPub)",
            path.display()
        )),
    }
}
