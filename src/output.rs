//! What the user sees: the human transcript (after the original script's), warnings,
//! and the `--json` document (DESIGN §5), printed through [`crate::console`]. Nothing
//! here ever receives a secret: the cloud backend is rendered through [`Cloud`]'s
//! masked forms.

use std::path::Path;

use serde::Serialize;

use crate::cloud::Cloud;
use crate::error::Fix;
use crate::identity::{Identity, RoleView};
use crate::keystore::{KeyUri, KeystoreKind};
use crate::paths::Layout;

pub use crate::console::{failure, set_quiet, stderr, stdout, warning, write_to, Out};

#[derive(Debug, Serialize)]
pub struct Report {
    pub provisioned: bool,
    pub device_id: Option<String>,
    pub keystore: Option<KeystoreKind>,
    pub cloud: Option<CloudReport>,
    pub certificates: Vec<CertReport>,
    pub manifest: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CloudReport {
    Dps {
        id_scope: String,
        /// `null` until `register` succeeded (DESIGN §3b).
        assigned_hub: Option<String>,
        assigned_device_id: Option<String>,
    },
    Hub {
        host_name: String,
        device_id: String,
    },
}

impl CloudReport {
    fn new(c: &Cloud, assignment: Option<&crate::dps::Assignment>) -> Self {
        match c {
            Cloud::Dps { id_scope } => CloudReport::Dps {
                id_scope: id_scope.clone(),
                assigned_hub: assignment.map(|a| a.assigned_hub.clone()),
                assigned_device_id: assignment.map(|a| a.device_id.clone()),
            },
            Cloud::Hub(cs) => CloudReport::Hub {
                host_name: cs.host_name.clone(),
                device_id: cs.device_id.clone(),
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CertReport {
    pub role: &'static str,
    pub path: String,
    pub key_uri: Option<String>,
    pub algorithm: Option<&'static str>,
    pub sha1_thumbprint: Option<String>,
    pub sha256_thumbprint: Option<String>,
    pub not_after: Option<String>,
    pub issuer: Option<String>,
    pub self_signed: Option<bool>,
}

/// Key URI as seen from the host: a file key's path gets the `--root` prefix.
pub fn host_uri(layout: &Layout, uri: &KeyUri) -> String {
    match uri {
        KeyUri::File(p) => format!("file:{}", layout.host(p).display()),
        other => other.to_string(),
    }
}

impl Report {
    /// `manifest`: the connector manifest's host path, if there is one.
    pub fn new(
        layout: &Layout,
        id: &Identity,
        manifest: Option<&Path>,
        problems: Vec<String>,
    ) -> Report {
        Report {
            provisioned: problems.is_empty(),
            device_id: id.device_id.clone(),
            keystore: id
                .state
                .as_ref()
                .map(|s| s.keystore)
                .or(id.legacy.then_some(KeystoreKind::File)),
            cloud: id
                .cloud
                .as_ref()
                .map(|c| CloudReport::new(c, assignment(id))),
            certificates: id.roles.iter().map(|r| cert_report(layout, r)).collect(),
            manifest: manifest.map(|m| m.display().to_string()),
            problems,
        }
    }

    pub fn print_json(&self) {
        print_json(self);
    }
}

fn assignment(id: &Identity) -> Option<&crate::dps::Assignment> {
    id.state.as_ref()?.dps.as_ref()?.assignment.as_ref()
}

/// A `--json` document on stdout, pretty, newline-terminated (see [`stdout`]).
pub fn print_json(doc: &impl Serialize) -> bool {
    write_to("stdout", |o| {
        serde_json::to_writer_pretty(&mut *o, doc)?;
        writeln!(o)
    })
}

fn cert_report(layout: &Layout, r: &RoleView) -> CertReport {
    let c = r.cert.as_ref().ok();
    CertReport {
        role: r.role.as_str(),
        path: r.cert_path.display().to_string(),
        key_uri: r.key_uri.as_ref().map(|u| host_uri(layout, u)),
        algorithm: c.and_then(|c| c.algorithm()).map(|a| a.as_str()),
        sha1_thumbprint: c.map(|c| c.sha1.clone()),
        sha256_thumbprint: c.map(|c| c.sha256.clone()),
        not_after: c.map(|c| c.not_after_rfc3339()),
        issuer: c.map(|c| c.issuer.clone()),
        self_signed: c.map(|c| c.self_signed),
    }
}

/// The keystore line and, for DPS, the assignment (or that there is none yet).
fn print_keystore_and_assignment(out: &Out, id: &Identity) {
    if let Some(s) = &id.state {
        out.say(format!("- Keystore: {} ({})", s.keystore, s.algorithm));
    } else if id.legacy {
        out.say("- Keystore: file (keys left by the original sdv-provision script)");
    }
    match (&id.cloud, assignment(id), &id.state) {
        (Some(Cloud::Dps { .. }), Some(a), _) => out.say(format!(
            "- DPS assignment: device {} on hub {}",
            a.device_id, a.assigned_hub
        )),
        (Some(Cloud::Dps { .. }), None, Some(s)) if s.keystore != KeystoreKind::File => out.say(
            format!("- DPS assignment: not registered yet ({})", Fix::Register),
        ),
        _ => {}
    }
}

/// The human summary of an identity (what re-running prints, like the original).
pub fn print_identity(out: &Out, layout: &Layout, id: &Identity) {
    let name = |r: &RoleView| {
        if r.role == crate::keystore::Role::Primary {
            "Primary"
        } else {
            "Secondary"
        }
    };
    out.say("Checking device certificates");
    print_keystore_and_assignment(out, id);
    for r in &id.roles {
        out.say(format!(
            "- {} device certificate: {}",
            name(r),
            r.cert_path.display()
        ));
        if let Some(u) = &r.key_uri {
            out.say(format!("- {} device key: {}", name(r), host_uri(layout, u)));
        }
        if let Ok(c) = &r.cert {
            let issuer = if c.self_signed {
                "self-signed".to_string()
            } else {
                c.issuer.clone()
            };
            out.say(format!(
                "  issuer: {issuer}; valid until {}",
                c.not_after_rfc3339()
            ));
        }
    }
    let thumbs: Vec<(&RoleView, &crate::cert::CertInfo)> = id
        .roles
        .iter()
        .filter_map(|r| r.cert.as_ref().ok().map(|c| (r, c)))
        .collect();
    if thumbs.is_empty() {
        return;
    }
    out.say("Fingerprints (add these to the Azure IoT Hub Device)");
    for (r, c) in &thumbs {
        out.say(format!("- {} thumbprint: {}", name(r), c.sha1));
    }
    for (r, c) in &thumbs {
        out.say(format!("- {} SHA-256 thumbprint: {}", name(r), c.sha256));
    }
    if let (Some(dev), [(_, p), (_, s)]) = (&id.device_id, thumbs.as_slice()) {
        match &id.cloud {
            Some(Cloud::Hub(cs)) => {
                let hub = cs.host_name.split('.').next().unwrap_or(&cs.host_name);
                out.say("Register the device on the IoT Hub:");
                out.say(format!(
                    "  az iot hub device-identity create --hub-name {hub} --device-id {dev} --am x509_thumbprint --ptp {} --stp {}",
                    p.sha1, s.sha1
                ));
            }
            Some(Cloud::Dps { .. }) => {
                out.say("Enroll the device in DPS (individual enrollment, X.509):");
                out.say(format!(
                    "  az iot dps enrollment create --dps-name <your-dps> -g <resource-group> --enrollment-id {dev} --attestation-type x509 --certificate-path {} --secondary-certificate-path {}",
                    id.roles[0].cert_path.display(),
                    id.roles[1].cert_path.display()
                ));
            }
            None => {}
        }
    }
}
