//! `status`: what is configured, read-only and fast (no keystore access, no lock).
//! Exit 0 when the identity is complete and consistent, 1 otherwise.

use crate::cloud::Cloud;
use crate::error::Result;
use crate::identity::Identity;
use crate::manifest::Manifest;

use super::{desired_manifest, report, Ctx};

pub fn run(ctx: &Ctx) -> Result<i32> {
    ctx.check_root()?;
    let problems = report(ctx)?;
    let ok = problems.is_empty();
    if !ctx.json {
        if ok {
            ctx.out.say("Status: complete");
        } else {
            ctx.out.say("Status: incomplete");
            for p in problems {
                ctx.out.say(format!("- {p}"));
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// Everything that keeps the identity from being complete and consistent.
pub fn problems(ctx: &Ctx, id: &Identity) -> Result<Vec<String>> {
    let mut p = Vec::new();
    if crate::fsutil::exists_nofollow(&ctx.layout.host_cert_file(crate::identity::JOURNAL_FILE)) {
        p.push("an interrupted run is not finished yet (run sdv-provision)".to_string());
    }
    if id.device_id.is_none() {
        p.push("no device id".to_string());
    }
    p.extend(
        crate::secret_modes::loose(&ctx.layout)
            .iter()
            .map(|l| l.problem()),
    );
    let Some(cloud) = &id.cloud else {
        p.push("no cloud backend configured (run sdv-provision with --id-scope or --connection-string)".into());
        return Ok(finish(p, id));
    };
    if let (Cloud::Hub(cs), Some(dev)) = (cloud, &id.device_id) {
        if &cs.device_id != dev {
            p.push(format!(
                "the connection string's DeviceId {} differs from the device id {dev}",
                cs.device_id
            ));
        }
    }
    let Some(state) = &id.state else {
        return Ok(finish(p, id));
    };
    for r in &id.roles {
        if r.key_uri.is_none() {
            p.push(format!("no {} key", r.role));
        }
        match &r.cert {
            Err(e) => p.push(e.clone()),
            Ok(c) => {
                if c.subject_cn.as_deref() != Some(state.device_id.as_str()) {
                    p.push(format!(
                        "{}: its CN is not the device id {}",
                        r.cert_path.display(),
                        state.device_id
                    ));
                }
                if !c.is_current() {
                    p.push(format!(
                        "{}: not valid now (valid until {})",
                        r.cert_path.display(),
                        c.not_after_rfc3339()
                    ));
                }
            }
        }
    }
    if let Some(m) = Manifest::load(&ctx.layout)? {
        match desired_manifest(state, cloud) {
            None => p.push("the state file lacks the primary key's settings".into()),
            Some(want) => {
                let fresh = m.render(&want)?;
                if m.current.as_ref() != Some(&fresh) {
                    p.push(format!(
                        "the connector manifest {} is not up to date (run sdv-provision)",
                        m.path.display()
                    ));
                }
            }
        }
    }
    Ok(p)
}

fn finish(mut p: Vec<String>, id: &Identity) -> Vec<String> {
    if id.state.is_none() {
        if id.legacy {
            p.push("keys from the original sdv-provision script are not adopted yet (run sdv-provision)".into());
        } else {
            p.push("not provisioned (run sdv-provision)".into());
        }
    }
    p
}
