//! DPS registration through the device key (DESIGN §3b).
//!
//! `PUT https://<endpoint>/<idScope>/registrations/<id>/register?api-version=…`, then
//! `GET …/operations/<operationId>` until the device is assigned, failed or
//! disabled. The device certificate is the TLS client certificate and the device
//! key signs the handshake ([`tls`]). One connection carries the PUT and every poll
//! (ureq keeps it alive); the whole exchange is bounded by [`Settings::timeout`].
//! Nothing here writes to disk: the caller records the [`Assignment`].

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::keystore::DeviceKey;

pub use crate::error::DpsError;

pub mod tls;

pub const DEFAULT_ENDPOINT: &str = "global.azure-devices-provisioning.net";
pub const API_VERSION: &str = "2021-06-01";
pub const ENDPOINT_ENV: &str = "SDV_PROVISION_DPS_ENDPOINT";
pub const CA_FILE_ENV: &str = "SDV_PROVISION_DPS_CA_FILE";
/// Total time a registration may take, in seconds (default 60).
pub const TIMEOUT_ENV: &str = "SDV_PROVISION_DPS_TIMEOUT";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait between polls when DPS sends no `Retry-After`.
const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// What the state records about DPS: where to register (as given, so a later
/// `register` needs no flags) and the assignment, with the SHA-256 thumbprint of
/// the primary certificate it was made for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpsRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment: Option<Assignment>,
}

impl DpsRecord {
    /// Refuse a state file whose DPS part the tool would not have written.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.endpoint {
            check_endpoint(e)?;
        }
        if let Some(a) = &self.assignment {
            a.validate()?;
        }
        Ok(())
    }
}

/// Where DPS put the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    /// SHA-256 thumbprint (upper-case hex) of the certificate that registered.
    pub thumbprint: String,
}

impl Assignment {
    /// The Hub connection string today's connector gets for it (no secret in it).
    pub fn connection_string(&self) -> String {
        format!(
            "HostName={};DeviceId={};x509=true",
            self.assigned_hub, self.device_id
        )
    }

    fn validate(&self) -> Result<(), String> {
        check_host(&self.assigned_hub).map_err(|e| format!("assigned hub: {e}"))?;
        // X.509 authentication: the hub device id is the certificate's CN, which is
        // a device id of ours.
        crate::device_id::validate(&self.device_id)
            .map_err(|e| format!("assigned device id: {e}"))?;
        if self.thumbprint.len() != 64 || !self.thumbprint.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("the registered thumbprint is not 64 hex digits".into());
        }
        Ok(())
    }
}

/// Where and how to register; from flags, env, then what the state recorded.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: String,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl Settings {
    /// Flags first, then env ([`ENDPOINT_ENV`], [`CA_FILE_ENV`]; read here, not by
    /// clap, so an exported value never collides with a flag), then what `recorded`
    /// says, then the defaults.
    pub fn resolve(
        endpoint: Option<&str>,
        ca_file: Option<&Path>,
        recorded: Option<&DpsRecord>,
    ) -> Result<Settings, String> {
        let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
        let endpoint = endpoint
            .map(str::to_owned)
            .or_else(|| env(ENDPOINT_ENV).map(|v| v.to_string_lossy().into_owned()))
            .or_else(|| recorded.and_then(|r| r.endpoint.clone()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        check_endpoint(&endpoint).map_err(|e| format!("--dps-endpoint {endpoint:?}: {e}"))?;
        let ca_file = ca_file
            .map(Path::to_path_buf)
            .or_else(|| env(CA_FILE_ENV).map(PathBuf::from))
            .or_else(|| recorded.and_then(|r| r.ca_file.clone()));
        let timeout = match std::env::var(TIMEOUT_ENV) {
            Ok(s) => s
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| format!("{TIMEOUT_ENV} must be 1-3600 seconds"))?,
            Err(_) => DEFAULT_TIMEOUT,
        };
        Ok(Settings {
            endpoint,
            ca_file,
            timeout,
        })
    }

    /// The record to keep: endpoint only when not the default.
    pub fn record(&self, assignment: Option<Assignment>) -> DpsRecord {
        DpsRecord {
            endpoint: (self.endpoint != DEFAULT_ENDPOINT).then(|| self.endpoint.clone()),
            ca_file: self.ca_file.clone(),
            assignment,
        }
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    ok.then_some(())
        .ok_or_else(|| "not a host name (letters, digits, '-' and '.')".into())
}

/// `HOST[:PORT]`.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (endpoint, None),
    };
    check_host(host)?;
    match port {
        Some(p) if p.parse::<u16>().map_or(true, |p| p == 0) => {
            Err(format!("port {p:?} is not 1-65535"))
        }
        _ => Ok(()),
    }
}

/// What a successful registration returns, with how it went (for `-v` and bench).
#[derive(Debug)]
pub struct Registered {
    pub assigned_hub: String,
    pub device_id: String,
    pub handshakes: u32,
    pub signatures: u32,
    pub elapsed: Duration,
}

/// Register `registration_id` in scope `id_scope`, presenting `chain` (leaf first)
/// with `key`. Blocks for at most `settings.timeout`.
pub fn register(
    key: &dyn DeviceKey,
    chain: Vec<CertificateDer<'static>>,
    settings: &Settings,
    id_scope: &str,
    registration_id: &str,
) -> Result<Registered, DpsError> {
    let t = Instant::now();
    let roots = tls::root_store(settings.ca_file.as_deref()).map_err(DpsError::Setup)?;
    let (tx, rx) = mpsc::channel();
    let config = tls::client_config(roots, chain, key.alg(), tx).map_err(DpsError::Setup)?;
    let flow = Flow {
        settings,
        id_scope,
        registration_id,
        connector: Arc::new(tls::Connector::new(config)),
        deadline: t + settings.timeout,
    };
    // The exchange runs beside this thread, which keeps the key and signs for it;
    // `serve` returns once the exchange has dropped its TLS configuration (the only
    // holder of the sender).
    let ((result, handshakes), (signatures, sign_failure)) = std::thread::scope(|s| {
        let exchange = s.spawn(move || {
            let connector = flow.connector.clone();
            let result = flow.run();
            let handshakes = connector
                .handshakes
                .load(std::sync::atomic::Ordering::Relaxed);
            (result, handshakes)
        });
        let served = tls::serve(key, rx);
        let result = exchange
            .join()
            .unwrap_or_else(|_| (Err(DpsError::Setup("the DPS exchange panicked".into())), 0));
        (result, served)
    });
    let (assigned_hub, device_id) = match (result, sign_failure) {
        (Err(_), Some(e)) => return Err(DpsError::Key(e)),
        (r, _) => r?,
    };
    let elapsed = t.elapsed();
    tracing::info!(?elapsed, handshakes, signatures, "DPS registration done");
    Ok(Registered {
        assigned_hub,
        device_id,
        handshakes,
        signatures,
        elapsed,
    })
}

/// RFC 3986 unreserved characters stay; everything else in a path segment is
/// percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Operation {
    operation_id: Option<String>,
    status: String,
    registration_state: Option<RegistrationState>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationState {
    assigned_hub: Option<String>,
    device_id: Option<String>,
    error_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ServiceError {
    message: Option<String>,
}

/// Text from the server, made safe for one terminal line.
fn printable(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect();
    if clean.is_empty() {
        clean
    } else {
        format!(" ({clean})")
    }
}

struct Flow<'a> {
    settings: &'a Settings,
    id_scope: &'a str,
    registration_id: &'a str,
    connector: Arc<tls::Connector>,
    deadline: Instant,
}

impl Flow<'_> {
    fn url(&self, tail: &str) -> String {
        format!(
            "https://{}/{}/registrations/{}/{tail}?api-version={API_VERSION}",
            self.settings.endpoint,
            utf8_percent_encode(self.id_scope, SEGMENT),
            utf8_percent_encode(self.registration_id, SEGMENT),
        )
    }

    fn remaining(&self) -> Result<Duration, DpsError> {
        self.deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| self.timeout())
    }

    fn timeout(&self) -> DpsError {
        DpsError::Timeout {
            endpoint: self.settings.endpoint.clone(),
            secs: self.settings.timeout.as_secs(),
        }
    }

    fn run(self) -> Result<(String, String), DpsError> {
        let agent = ureq::AgentBuilder::new()
            .tls_connector(self.connector.clone())
            .user_agent(concat!("sdv-provision/", env!("CARGO_PKG_VERSION")))
            .redirects(0)
            .build();
        let body = serde_json::json!({ "registrationId": self.registration_id }).to_string();
        let put = agent
            .put(&self.url("register"))
            .set("Content-Type", "application/json; charset=utf-8")
            .set("Accept", "application/json")
            .timeout(self.remaining()?)
            .send_string(&body);
        let (mut op, mut wait) = self.read(put)?;
        loop {
            match op.status.as_str() {
                "assigned" => return self.assignment(op),
                "assigning" | "unassigned" => {}
                other => {
                    let message = op
                        .registration_state
                        .and_then(|r| r.error_message)
                        .map(|m| printable(&m))
                        .unwrap_or_default();
                    return Err(DpsError::Failed {
                        status: printable(other).trim_matches([' ', '(', ')']).to_owned(),
                        message,
                    });
                }
            }
            let id = op
                .operation_id
                .clone()
                .ok_or_else(|| self.malformed("no operationId"))?;
            if Instant::now() + wait >= self.deadline {
                return Err(self.timeout());
            }
            std::thread::sleep(wait);
            let tail = format!("operations/{}", utf8_percent_encode(&id, SEGMENT));
            let get = agent
                .get(&self.url(&tail))
                .set("Accept", "application/json")
                .timeout(self.remaining()?)
                .call();
            (op, wait) = self.read(get)?;
        }
    }

    fn malformed(&self, detail: impl Into<String>) -> DpsError {
        DpsError::Malformed {
            endpoint: self.settings.endpoint.clone(),
            detail: detail.into(),
        }
    }

    fn assignment(&self, op: Operation) -> Result<(String, String), DpsError> {
        let state = op
            .registration_state
            .ok_or_else(|| self.malformed("assigned without registrationState"))?;
        let (Some(hub), Some(dev)) = (state.assigned_hub, state.device_id) else {
            return Err(self.malformed("assigned without assignedHub and deviceId"));
        };
        let check = Assignment {
            assigned_hub: hub.clone(),
            device_id: dev.clone(),
            thumbprint: "0".repeat(64),
        };
        check.validate().map_err(|e| self.malformed(e))?;
        Ok((hub, dev))
    }

    /// One response: the operation and how long to wait before the next poll.
    fn read(
        &self,
        response: Result<ureq::Response, ureq::Error>,
    ) -> Result<(Operation, Duration), DpsError> {
        let endpoint = self.settings.endpoint.clone();
        let response = match response {
            Ok(r) => r,
            Err(ureq::Error::Status(401, _)) => {
                return Err(DpsError::NotEnrolled {
                    endpoint,
                    registration_id: self.registration_id.to_owned(),
                })
            }
            Err(ureq::Error::Status(status, r)) => {
                let message = r
                    .into_string()
                    .ok()
                    .and_then(|b| serde_json::from_str::<ServiceError>(&b).ok())
                    .and_then(|e| e.message)
                    .map(|m| printable(&m))
                    .unwrap_or_default();
                return Err(if status >= 500 || status == 429 {
                    DpsError::Server {
                        endpoint,
                        status,
                        message,
                    }
                } else {
                    DpsError::Refused {
                        endpoint,
                        status,
                        message,
                    }
                });
            }
            Err(ureq::Error::Transport(t)) => return Err(self.transport(t)),
        };
        let wait = response
            .header("Retry-After")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(DEFAULT_POLL, |s| Duration::from_secs(s.min(3600)));
        let text = response.into_string().map_err(|e| self.io_error(e))?;
        let op: Operation =
            serde_json::from_str(&text).map_err(|e| self.malformed(e.to_string()))?;
        Ok((op, wait))
    }

    fn io_error(&self, e: std::io::Error) -> DpsError {
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            return self.timeout();
        }
        DpsError::Unreachable {
            endpoint: self.settings.endpoint.clone(),
            detail: e.to_string(),
        }
    }

    fn transport(&self, t: ureq::Transport) -> DpsError {
        let endpoint = self.settings.endpoint.clone();
        // A TLS failure during the handshake, or (TLS 1.3) a server alert on the
        // first read: the server refused our certificate after our handshake ended.
        let in_chain = || {
            let mut cause = std::error::Error::source(&t);
            while let Some(c) = cause {
                if let Some(r) = c
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                {
                    return Some(r.clone());
                }
                cause = c.source();
            }
            None
        };
        if let Some(e) = self.connector.tls_error().or_else(in_chain) {
            return match e {
                rustls::Error::AlertReceived(alert) => DpsError::CertificateRefused {
                    endpoint,
                    alert: format!("{alert:?}"),
                },
                rustls::Error::InvalidCertificate(c) => DpsError::Untrusted {
                    endpoint,
                    detail: format!("{c:?}"),
                },
                other => DpsError::Unreachable {
                    endpoint,
                    detail: format!("TLS: {other}"),
                },
            };
        }
        let timed_out = std::error::Error::source(&t)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                )
            });
        if timed_out || Instant::now() >= self.deadline {
            return self.timeout();
        }
        DpsError::Unreachable {
            endpoint,
            detail: printable(&t.to_string())
                .trim_matches([' ', '(', ')'])
                .to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [DEFAULT_ENDPOINT, "127.0.0.1:8443", "dps.example.com"] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "https://x",
            "x:0",
            "x:99999",
            "a/b",
            "a..b",
            "x y",
            "x:",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_text_is_one_safe_line() {
        assert_eq!(printable("a\nb\u{1b}[31m"), " (a?b?[31m)");
        assert_eq!(printable(""), "");
        assert!(printable(&"x".repeat(1000)).len() < 210);
    }

    #[test]
    fn recorded_assignments_are_validated() {
        let ok = Assignment {
            assigned_hub: "hub.azure-devices.net".into(),
            device_id: "dev-1".into(),
            thumbprint: "A".repeat(64),
        };
        assert_eq!(ok.validate(), Ok(()));
        for (hub, dev) in [
            ("hub;x", "d"),
            ("hub", "d;SharedAccessKey=x"),
            ("", "d"),
            ("h", ""),
        ] {
            let bad = Assignment {
                assigned_hub: hub.into(),
                device_id: dev.into(),
                ..ok.clone()
            };
            assert!(bad.validate().is_err(), "{hub} {dev}");
        }
    }
}
