//! Restarting the cloud connector container after its identity changed (DESIGN §1.6).
//!
//! Children get fixed argument lists: no secret ever goes into a child's argv.

use std::process::{Command, Stdio};

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

/// What changed in this run, which decides how hard to restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
