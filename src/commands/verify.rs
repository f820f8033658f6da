//! `verify`: prove every key signs and matches its certificate, the copies consumers
//! load instead of the key (TPM blobs) are that key, the certificates are valid, and
//! the manifest agrees with the state. Exit 0 only if all checks pass.

use serde::Serialize;

use crate::cert::{key_matches, CertInfo};
use crate::error::Result;
use crate::identity::{Identity, RoleView, State};
use crate::keystore::{KeyStore, KeyStoreError, Role};
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

/// The checks so far, in the order they ran.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, check: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.0.push(Check {
            check: check.into(),
            ok,
            detail: detail.into(),
        });
    }

    /// A keystore's own check: its description, or its error as the failure.
    fn outcome(&mut self, check: String, outcome: std::result::Result<String, KeyStoreError>) {
        let ok = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|e| e.to_string());
        self.add(check, ok, detail);
    }
}

/// The checks `verify` runs, in order: cloud, keystore, per role the certificate and
/// the key, the secret files' modes, then the manifest.
pub fn checks(ctx: &Ctx) -> Result<Vec<Check>> {
    let id = Identity::load(&ctx.layout)?;
    let state = existing_state(&id)?;
    let mut checks = Checks::default();
    check_cloud(&mut checks, &id);
    let mut ks = check_keystore(&mut checks, ctx, &state);
    for role in Role::ALL {
        let view = id.role(role);
        let Some(cert) = check_certificate(&mut checks, ctx, &state, view) else {
            continue;
        };
        check_key(
            &mut checks,
            view,
            cert,
            ks.as_mut().map(|k| k.as_mut() as _),
        );
    }
    check_secret_modes(&mut checks, ctx);
    check_manifest(&mut checks, ctx, &id, &state)?;
    Ok(checks.0)
}

/// Every secret file is 0600 (DESIGN §6).
fn check_secret_modes(checks: &mut Checks, ctx: &Ctx) {
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
    checks.add("secret_modes", loose.is_empty(), detail);
}

fn check_cloud(checks: &mut Checks, id: &Identity) {
    match &id.cloud {
        Some(c) => checks.add("cloud", true, format!("{} configured", c.kind())),
        None => checks.add(
            "cloud",
            false,
            "no ID scope or connection string configured",
        ),
    }
}

/// The keystore opens (read-only) and passes its own store check, if it has one.
fn check_keystore(checks: &mut Checks, ctx: &Ctx, state: &State) -> Option<Box<dyn KeyStore>> {
    let ks = match ctx.open_keystore_to_read(state.keystore, Some(state)) {
        Ok(ks) => ks,
        Err(e) => {
            checks.add(format!("keystore.{}", state.keystore), false, e.to_string());
            return None;
        }
    };
    if let Some((name, outcome)) = ks.check_store() {
        checks.outcome(format!("keystore.{name}"), outcome);
    }
    Some(ks)
}

/// The role's certificate parses, names the device and is valid (a warning when it
/// expires soon). Returns it when it parses, for the key check.
fn check_certificate<'v>(
    checks: &mut Checks,
    ctx: &Ctx,
    state: &State,
    view: &'v RoleView,
) -> Option<&'v CertInfo> {
    let role = view.role;
    let cert = match &view.cert {
        Ok(c) => c,
        Err(e) => {
            checks.add(format!("{role}.certificate"), false, e.clone());
            return None;
        }
    };
    let cn_ok = cert.subject_cn.as_deref() == Some(state.device_id.as_str());
    checks.add(
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
    checks.add(format!("{role}.certificate.validity"), ok, detail);
    Some(cert)
}

/// The recorded key signs and matches the certificate; then how it was made (noDA)
/// and the copies consumers load instead of it (TPM blobs, for today's connector),
/// checked against a key that passed: one failure names one cause.
fn check_key(checks: &mut Checks, view: &RoleView, cert: &CertInfo, ks: Option<&mut dyn KeyStore>) {
    let role = view.role;
    let Some(uri) = &view.key_uri else {
        checks.add(format!("{role}.key"), false, "no key recorded");
        return;
    };
    let Some(ks) = ks else { return };
    let result = ks
        .open(uri)
        .map_err(crate::Error::from)
        .and_then(|key| key_matches(key.as_ref(), &cert.spki));
    match result {
        Ok(true) => checks.add(
            format!("{role}.key"),
            true,
            format!("{uri} signs and matches {}", view.cert_path.display()),
        ),
        Ok(false) => {
            checks.add(
                format!("{role}.key"),
                false,
                format!("{uri} does not match {}: a signature by the key fails under the certificate's public key", view.cert_path.display()),
            );
            return;
        }
        Err(e) => {
            checks.add(format!("{role}.key"), false, format!("{uri}: {e}"));
            return;
        }
    }
    if let Some(outcome) = ks.check_key(uri) {
        checks.outcome(format!("{role}.key.attributes"), outcome);
    }
    if let Some(outcome) = ks.check_copies(uri) {
        checks.outcome(format!("{role}.key.copies"), outcome);
    }
}

/// The manifest (and the connector's TPM config file) agree with the identity.
fn check_manifest(checks: &mut Checks, ctx: &Ctx, id: &Identity, state: &State) -> Result<()> {
    let (m, cloud) = match (Manifest::load(&ctx.layout)?, &id.cloud) {
        (None, _) => {
            checks.add("manifest", true, "no connector manifest on this device");
            return Ok(());
        }
        (Some(_), None) => return Ok(()),
        (Some(m), Some(cloud)) => (m, cloud),
    };
    let Some(want) = desired_manifest(state, cloud) else {
        checks.add(
            "manifest",
            false,
            "the state lacks the primary key's settings",
        );
        return Ok(());
    };
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
            if differing.is_empty() {
                "mounts or devices".into()
            } else {
                differing.join(", ")
            }
        )
    };
    checks.add("manifest", ok, detail);
    Ok(())
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
