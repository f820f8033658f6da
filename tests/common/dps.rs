//! A DPS stand-in on 127.0.0.1, written from DESIGN §3b (not from the tool's code).
//!
//! TLS (rustls) with a server certificate from a throw-away CA ([`Dps::ca_file`]);
//! a client certificate is required, its handshake signature is verified, and its
//! end-entity certificate must be the one the test expects ([`Dps::expect_client`]).
//! It answers the documented REST calls: `PUT /<scope>/registrations/<id>/register
//! ?api-version=2021-06-01` (`Content-Type: application/json; charset=utf-8`, body
//! `{"registrationId":"<id>"}`) with `202` + `Retry-After`, then `GET
//! …/operations/<operationId>` until the [`Mode`] says otherwise. A request that
//! breaks the contract gets a `400` naming what is wrong (and is logged).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::Digest;

pub const API_VERSION: &str = "2021-06-01";
pub const HUB_A: &str = "hub-a.azure-devices.net";

/// How the stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 202 assigning (Retry-After: 1), then 200 assigned to [`Dps::set_hub`]'s hub.
    Assigned,
    /// 401: not enrolled.
    NotEnrolled,
    /// 503 from the PUT.
    ServerError,
    /// 202, then `failed` with an error message.
    Failed,
    /// `assigning` forever.
    Assigning,
    /// 202 with a body that is not JSON.
    Malformed,
    /// Never answers the PUT.
    Slow,
}

/// One HTTP request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
    /// The TLS connection it came on (0, 1, …).
    pub connection: u32,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Shared {
    mode: Option<Mode>,
    hub: String,
    retry_after: u64,
    expected_client: Option<Vec<u8>>,
    /// SHA-256 (upper-case hex) of each client certificate presented.
    client_thumbprints: Vec<String>,
    /// How many certificates each client presented (leaf + chain).
    chain_lens: Vec<usize>,
    connections: u32,
    requests: Vec<Request>,
    violations: Vec<String>,
}

pub struct Dps {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    shared: Arc<Mutex<Shared>>,
    _dir: tempfile::TempDir,
}

impl Dps {
    pub fn start(mode: Mode) -> Dps {
        Dps::start_with(mode, rustls::DEFAULT_VERSIONS)
    }

    /// Only TLS 1.2: RSA keys sign with PKCS#1 v1.5 there.
    pub fn start_tls12(mode: Mode) -> Dps {
        Dps::start_with(mode, &[&rustls::version::TLS12])
    }

    fn start_with(mode: Mode, versions: &[&'static rustls::SupportedProtocolVersion]) -> Dps {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertifiedIssuer::self_signed(
            {
                let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p
            },
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let ca_file = dir.path().join("dps-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let shared = Arc::new(Mutex::new(Shared {
            mode: Some(mode),
            hub: HUB_A.into(),
            retry_after: 1,
            ..Default::default()
        }));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(Arc::new(DeviceVerifier {
                provider,
                shared: shared.clone(),
            }))
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, s) = (config.clone(), s.clone());
                std::thread::spawn(move || serve(stream, config, s));
            }
        });
        Dps {
            addr,
            ca_file,
            shared,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Only this certificate (PEM file, first block) may register.
    pub fn expect_client(&self, cert_pem: &std::path::Path) {
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_file(cert_pem).unwrap().to_vec();
        self.shared.lock().unwrap().expected_client = Some(der);
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.lock().unwrap().mode = Some(mode);
    }

    /// The `Retry-After` seconds sent with `assigning` (default 1).
    pub fn set_retry_after(&self, secs: u64) {
        self.shared.lock().unwrap().retry_after = secs;
    }

    pub fn set_hub(&self, hub: &str) {
        self.shared.lock().unwrap().hub = hub.into();
    }

    pub fn client_thumbprints(&self) -> Vec<String> {
        self.shared.lock().unwrap().client_thumbprints.clone()
    }

    pub fn chain_lens(&self) -> Vec<usize> {
        self.shared.lock().unwrap().chain_lens.clone()
    }

    pub fn connections(&self) -> u32 {
        self.shared.lock().unwrap().connections
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Contract violations seen so far (must be empty).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().unwrap().violations.clone()
    }

    pub fn reset_log(&self) {
        let mut s = self.shared.lock().unwrap();
        s.client_thumbprints.clear();
        s.chain_lens.clear();
        s.connections = 0;
        s.requests.clear();
    }
}

#[derive(Debug)]
struct DeviceVerifier {
    provider: Arc<CryptoProvider>,
    shared: Arc<Mutex<Shared>>,
}

impl ClientCertVerifier for DeviceVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut s = self.shared.lock().unwrap();
        s.chain_lens.push(1 + intermediates.len());
        s.client_thumbprints
            .push(hex::encode_upper(sha2::Sha256::digest(end_entity.as_ref())));
        match &s.expected_client {
            Some(want) if want.as_slice() != end_entity.as_ref() => Err(
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
            // Before the device has a certificate (provision registers by itself) any
            // is accepted; the test checks the recorded thumbprint afterwards.
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, shared: Arc<Mutex<Shared>>) {
    let connection = {
        let mut s = shared.lock().unwrap();
        s.connections += 1;
        s.connections - 1
    };
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    while let Some(req) = read_request(&mut tls, connection) {
        shared.lock().unwrap().requests.push(req.clone());
        let (status, extra, body) = answer(&req, &shared);
        if status == 0 {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json; charset=utf-8\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let out = tls.get_mut();
        if out
            .write_all(reply.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}

fn read_request(
    r: &mut BufReader<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>,
    connection: u32,
) -> Option<Request> {
    let mut line = String::new();
    r.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
        connection,
    })
}

/// (status, extra header lines, body); status 0 = do not answer.
fn answer(req: &Request, shared: &Mutex<Shared>) -> (u16, String, String) {
    let (mode, hub, retry_after) = {
        let s = shared.lock().unwrap();
        (s.mode.unwrap(), s.hub.clone(), s.retry_after)
    };
    let bad = |what: String| {
        shared.lock().unwrap().violations.push(what.clone());
        (
            400,
            String::new(),
            serde_json::json!({ "message": what }).to_string(),
        )
    };
    let Some((path, query)) = req.target.split_once('?') else {
        return bad(format!("no query in {}", req.target));
    };
    if query != format!("api-version={API_VERSION}") {
        return bad(format!("query {query:?}"));
    }
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let retry = format!("Retry-After: {retry_after}\r\n");
    let assigning = |id: &str| {
        serde_json::json!({"operationId": format!("4.{id}.op-1"), "status": "assigning"})
            .to_string()
    };
    match (req.method.as_str(), seg.as_slice()) {
        ("PUT", [_scope, "registrations", id, "register"]) => {
            if req.header("content-type") != Some("application/json; charset=utf-8") {
                return bad(format!("Content-Type {:?}", req.header("content-type")));
            }
            let body: serde_json::Value = serde_json::from_str(&req.body).unwrap_or_default();
            if body != serde_json::json!({ "registrationId": id }) {
                return bad(format!("body {:?}", req.body));
            }
            match mode {
                Mode::NotEnrolled => (
                    401,
                    String::new(),
                    r#"{"errorCode":401002,"message":"Unauthorized"}"#.into(),
                ),
                Mode::ServerError => (
                    503,
                    String::new(),
                    r#"{"errorCode":503000,"message":"Service unavailable"}"#.into(),
                ),
                Mode::Malformed => (202, retry, "{\"operationId\": ".into()),
                Mode::Slow => (0, String::new(), String::new()),
                _ => (202, retry, assigning(id)),
            }
        }
        ("GET", [_scope, "registrations", id, "operations", op]) => {
            if *op != format!("4.{id}.op-1") {
                return bad(format!("operation {op:?}"));
            }
            match mode {
                Mode::Failed => (200, String::new(), serde_json::json!({
                    "operationId": op, "status": "failed",
                    "registrationState": {"registrationId": id, "status": "failed",
                        "errorCode": 400209, "errorMessage": "Custom allocation failed\nwith a newline"}
                }).to_string()),
                Mode::Assigning => (200, retry, assigning(id)),
                _ => (200, String::new(), serde_json::json!({
                    "operationId": op, "status": "assigned",
                    "registrationState": {"registrationId": id, "assignedHub": hub, "deviceId": id,
                        "status": "assigned", "substatus": "initialAssignment"}
                }).to_string()),
            }
        }
        _ => bad(format!("{} {path}", req.method)),
    }
}
