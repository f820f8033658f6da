//! Restarting the cloud connector container after its identity changed (DESIGN §1.6).
//!
//! Children get fixed argument lists: no secret ever goes into a child's argv.

use std::process::{Command, Stdio};

use crate::keystore::{Algorithm, KeystoreKind};
use crate::output::Out;

pub const CONTAINER: &str = "cloudconnector";

/// Secrets the user may hand us through the environment; the connector's tools
/// (`kanto-cm`, `systemctl`) do not inherit them.
const SECRET_ENV: [&str; 4] = [
    "SDV_PROVISION_CONNECTION_STRING",
    "SDV_PROVISION_PKCS11_PIN",
    "SDV_PROVISION_PKCS11_SO_PIN",
    "SDV_PROVISION_TPM_OWNER_AUTH",
];

/// What decides whether today's Leda connector can use an identity (DESIGN §3, "The
/// connector Leda really ships").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage<'a> {
    pub keystore: KeystoreKind,
    pub algorithm: Algorithm,
    /// The cloud backend is DPS (else a Hub connection string).
    pub dps: bool,
    /// The DPS assignment is recorded: the tool registered the device itself, so the
    /// connector's DPS client (which needs a PEM key file) is not needed.
    pub dps_registered: bool,
    /// The primary certificate file carries issuing CA certificates after the leaf.
    pub cert_chain: bool,
    /// The Hub connection string's `HostName` (Hub only).
    pub hub_host: Option<&'a str>,
}

/// Every reason today's connector cannot use the identity; empty when it can (TPM
/// RSA, file keys, Hub or registered DPS). Pure, so the rule has one home and a
/// table test.
pub fn incompatibilities(u: &Usage<'_>) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    let tpm = u.keystore == KeystoreKind::Tpm;
    if tpm && !u.algorithm.is_rsa() {
        reasons.push("it signs TPM keys with RSA-PSS only (use --algorithm rsa-2048)");
    }
    if u.keystore == KeystoreKind::Pkcs11 {
        reasons.push(
            "it cannot use PKCS#11 keys yet (the manifest carries KEY_URI for URI-aware consumers)",
        );
    }
    if u.dps && u.keystore != KeystoreKind::File && !u.dps_registered {
        reasons.push(
            "it needs a key file for DPS, and this device is not registered with DPS \
             through its hardware key",
        );
    }
    if tpm && u.cert_chain {
        reasons.push("in TPM mode it sends only the leaf certificate, not the CA chain");
    }
    if u.hub_host
        .is_some_and(|h| !h.contains(".azure-devices.net"))
    {
        reasons.push("it rejects a Hub HostName without .azure-devices.net");
    }
    reasons
}

/// What changed in this run, which decides how hard to restart (ordered: a later
/// variant includes the earlier ones' restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Nothing,
    /// Certificates or keys changed, the manifest did not: stop and start.
    Certificates,
    /// The manifest changed: the container must be recreated from it.
    Manifest,
}

/// The exact command sequence for a change.
pub fn plan(change: Change) -> Vec<(&'static str, Vec<&'static str>)> {
    let stop = (
        "kanto-cm",
        vec!["stop", "-n", CONTAINER, "-f", "--timeout", "5"],
    );
    match change {
        Change::Nothing => vec![],
        Change::Certificates => vec![stop, ("kanto-cm", vec!["start", "-n", CONTAINER])],
        Change::Manifest => vec![
            stop,
            ("kanto-cm", vec!["remove", "-n", CONTAINER]),
            ("systemctl", vec!["restart", "kanto-auto-deployer"]),
        ],
    }
}

/// Run the restart sequence. Failures are warnings: the identity is already complete
/// on disk, and the user can restart the connector by hand.
pub fn restart(change: Change, out: &Out) {
    let steps = plan(change);
    if steps.is_empty() {
        return;
    }
    if crate::which("kanto-cm").is_none() {
        out.warn(
            "kanto-cm is not on PATH; restart the cloud connector yourself (or pass --no-restart)",
        );
        return;
    }
    out.say(match change {
        Change::Manifest => "Recreating the Cloud Connector container...",
        _ => "Restarting the Cloud Connector container...",
    });
    let _spinner = crate::progress::spinner(out, "Restarting the cloud connector");
    for (program, args) in steps {
        let t = std::time::Instant::now();
        let mut cmd = Command::new(program);
        for var in SECRET_ENV {
            cmd.env_remove(var);
        }
        let status = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        tracing::info!(program, ?args, elapsed = ?t.elapsed(), ?status, "connector step");
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => out.warn(format!("{program} {} exited with {s}", args.join(" "))),
            Err(e) => out.warn(format!("cannot run {program}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompatibility_table() {
        let tpm_rsa_hub = Usage {
            keystore: KeystoreKind::Tpm,
            algorithm: Algorithm::Rsa2048,
            dps: false,
            dps_registered: false,
            cert_chain: false,
            hub_host: Some("myhub.azure-devices.net"),
        };
        let file_dps = Usage {
            keystore: KeystoreKind::File,
            algorithm: Algorithm::EcdsaP256,
            dps: true,
            hub_host: None,
            ..tpm_rsa_hub.clone()
        };
        let n = |u: &Usage<'_>| incompatibilities(u).len();
        let has = |u: &Usage<'_>, word: &str| incompatibilities(u).iter().any(|r| r.contains(word));
        assert_eq!(n(&tpm_rsa_hub), 0);
        assert_eq!(n(&file_dps), 0);
        let ecdsa = Usage {
            algorithm: Algorithm::EcdsaP384,
            ..tpm_rsa_hub.clone()
        };
        assert!(n(&ecdsa) == 1 && has(&ecdsa, "RSA-PSS"));
        let pkcs11 = Usage {
            keystore: KeystoreKind::Pkcs11,
            ..tpm_rsa_hub.clone()
        };
        assert!(n(&pkcs11) == 1 && has(&pkcs11, "PKCS#11"));
        let dps = Usage {
            dps: true,
            hub_host: None,
            ..tpm_rsa_hub.clone()
        };
        assert!(n(&dps) == 1 && has(&dps, "not registered"));
        assert_eq!(
            n(&Usage {
                dps_registered: true,
                ..dps.clone()
            }),
            0
        );
        let chain = Usage {
            cert_chain: true,
            ..tpm_rsa_hub.clone()
        };
        assert!(n(&chain) == 1 && has(&chain, "leaf"));
        assert_eq!(
            n(&Usage {
                keystore: KeystoreKind::File,
                ..chain.clone()
            }),
            0
        );
        let host = Usage {
            hub_host: Some("127.0.0.1"),
            ..tpm_rsa_hub.clone()
        };
        assert!(n(&host) == 1 && has(&host, ".azure-devices.net"));
        // Every reason at once, each named once.
        let all = Usage {
            keystore: KeystoreKind::Pkcs11,
            dps: true,
            ..tpm_rsa_hub.clone()
        };
        assert_eq!(n(&all), 2);
        let all_tpm = Usage {
            algorithm: Algorithm::EcdsaP256,
            dps: true,
            cert_chain: true,
            hub_host: Some("h"),
            ..tpm_rsa_hub
        };
        assert_eq!(n(&all_tpm), 4);
    }

    /// The names children must not inherit are the ones the tool reads secrets from.
    #[test]
    fn secret_env_names_match_the_readers() {
        #[allow(unused_mut)] // without the keystore features there is one name
        let mut readers = vec![crate::cli::CONNECTION_STRING_ENV];
        #[cfg(feature = "pkcs11")]
        readers.extend([
            crate::keystore::pkcs11::PIN_ENV,
            crate::keystore::pkcs11::SO_PIN_ENV,
        ]);
        #[cfg(feature = "tpm")]
        readers.push(crate::keystore::tpm::OWNER_AUTH_ENV);
        for name in readers {
            assert!(super::SECRET_ENV.contains(&name), "{name}");
        }
    }
}
