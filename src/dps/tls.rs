//! TLS whose client key is the device key (DESIGN §3b).
//!
//! rustls wants a `'static`, `Send + Sync` signing key, but a [`DeviceKey`] borrows
//! its keystore (a TPM context or a PKCS#11 session, which must stay on one thread).
//! So the key stays where it is: the HTTP exchange runs on a helper thread, and each
//! handshake signature is sent as a [`SignRequest`] to the thread that owns the key
//! ([`serve`]), which signs through the keystore and sends the signature back.
//! The same `DeviceKey` signs the certificates and the handshakes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SignatureAlgorithm, SignatureScheme};

use crate::keystore::{Algorithm, DeviceKey, Hash, TlsScheme};

/// One handshake signature, for the thread that owns the key.
pub struct SignRequest {
    scheme: TlsScheme,
    msg: Vec<u8>,
    reply: Sender<Result<Vec<u8>, String>>,
}

/// Sign every request with `key` until the TLS side is gone; returns how many
/// signatures were made and the last signing failure, if any.
pub fn serve(key: &dyn DeviceKey, rx: Receiver<SignRequest>) -> (u32, Option<String>) {
    let (mut count, mut failure) = (0, None);
    for req in rx {
        let t = std::time::Instant::now();
        let result = key
            .sign_with(req.scheme, &req.msg)
            .map_err(|e| e.to_string());
        tracing::info!(scheme = ?req.scheme, elapsed = ?t.elapsed(), "TLS handshake signed by the device key");
        match &result {
            Ok(_) => count += 1,
            Err(e) => failure = Some(e.clone()),
        }
        let _ = req.reply.send(result);
    }
    (count, failure)
}

/// The rustls schemes a key of `alg` offers, most preferred first: RSA-PSS (TLS 1.3
/// requires it for RSA), then PKCS#1 v1.5 (TLS 1.2); ECDSA with the curve's hash.
fn schemes(alg: Algorithm) -> &'static [(SignatureScheme, TlsScheme)] {
    use SignatureScheme as S;
    match alg {
        Algorithm::Rsa2048 | Algorithm::Rsa3072 => &[
            (S::RSA_PSS_SHA256, TlsScheme::RsaPss(Hash::Sha256)),
            (S::RSA_PSS_SHA384, TlsScheme::RsaPss(Hash::Sha384)),
            (S::RSA_PKCS1_SHA256, TlsScheme::RsaPkcs1(Hash::Sha256)),
            (S::RSA_PKCS1_SHA384, TlsScheme::RsaPkcs1(Hash::Sha384)),
        ],
        Algorithm::EcdsaP256 => &[(S::ECDSA_NISTP256_SHA256, TlsScheme::Ecdsa(Hash::Sha256))],
        Algorithm::EcdsaP384 => &[(S::ECDSA_NISTP384_SHA384, TlsScheme::Ecdsa(Hash::Sha384))],
    }
}

/// The device key as rustls sees it: signatures are made by [`serve`].
#[derive(Debug)]
struct RemoteKey {
    alg: Algorithm,
    tx: Sender<SignRequest>,
}

impl SigningKey for RemoteKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let &(rustls, scheme) = schemes(self.alg)
            .iter()
            .find(|(s, _)| offered.contains(s))?;
        Some(Box::new(RemoteSigner {
            rustls,
            scheme,
            tx: self.tx.clone(),
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        if self.alg.is_rsa() {
            SignatureAlgorithm::RSA
        } else {
            SignatureAlgorithm::ECDSA
        }
    }
}

#[derive(Debug)]
struct RemoteSigner {
    rustls: SignatureScheme,
    scheme: TlsScheme,
    tx: Sender<SignRequest>,
}

impl Signer for RemoteSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let (reply, answer) = mpsc::channel();
        let gone = || rustls::Error::General("the device key is not available".into());
        self.tx
            .send(SignRequest {
                scheme: self.scheme,
                msg: message.to_vec(),
                reply,
            })
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(rustls::Error::General)
    }

    fn scheme(&self) -> SignatureScheme {
        self.rustls
    }
}

/// Presents the device certificate (and its chain) with the device key.
#[derive(Debug)]
struct DeviceCert(Arc<CertifiedKey>);

impl ResolvesClientCert for DeviceCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Where the server's certificate is checked against.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read --dps-ca-file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("{} is not PEM ({e})", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable CA certificate ({e})", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "no system root certificates found; install ca-certificates, \
                            or pass --dps-ca-file"
                        .into(),
                );
            }
        }
    }
    Ok(roots)
}

/// The client configuration: aws-lc (rcgen's provider), TLS 1.2 and 1.3, the given
/// roots, and the device certificate signed for by the device key via `tx`.
pub fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    alg: Algorithm,
    tx: Sender<SignRequest>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = Arc::new(RemoteKey { alg, tx });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(DeviceCert(Arc::new(CertifiedKey::new(
            chain, key,
        ))))))
}

/// ureq's TLS hook: one rustls connection per TCP connection, handshake completed
/// at once so its failure is reported as such. Counts handshakes and keeps the last
/// TLS error, for the error message.
pub struct Connector {
    config: Arc<ClientConfig>,
    pub handshakes: AtomicU32,
    pub last_error: Mutex<Option<rustls::Error>>,
}

impl Connector {
    pub fn new(config: ClientConfig) -> Connector {
        Connector {
            config: Arc::new(config),
            handshakes: AtomicU32::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn tls_error(&self) -> Option<rustls::Error> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ureq::TlsConnector for Connector {
    fn connect(
        &self,
        dns_name: &str,
        io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let name = ServerName::try_from(dns_name.to_owned()).map_err(invalid)?;
        let conn = ClientConnection::new(self.config.clone(), name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let mut tls = rustls::StreamOwned::new(conn, io);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.clone());
                }
                return Err(e.into());
            }
        }
        Ok(Box::new(Tls(tls)))
    }
}

struct Tls(rustls::StreamOwned<ClientConnection, Box<dyn ureq::ReadWrite>>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// The server's alert behind a connection it closed. Under TLS 1.3 the client's
    /// handshake ends before the server has checked the client certificate; a server
    /// that refuses it sends an alert and closes, and the request we send meanwhile
    /// fails with a broken pipe or a reset, in `write` or in the write `read` does
    /// first. The alert is still in the socket's receive queue: read it, so the error
    /// says "refused the device certificate" instead of "cannot reach DPS".
    fn alert_behind(&mut self, e: std::io::Error) -> std::io::Error {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        if !matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) {
            return e;
        }
        let s = &mut self.0;
        while let Ok(1..) = s.conn.read_tls(&mut s.sock) {
            if let Err(alert) = s.conn.process_new_packets() {
                return std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
            }
        }
        e
    }
}

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| self.alert_behind(e))
    }
}

impl Write for Tls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(|e| self.alert_behind(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(|e| self.alert_behind(e))
    }
}

impl ureq::ReadWrite for Tls {
    fn socket(&self) -> Option<&TcpStream> {
        self.0.sock.socket()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without --dps-ca-file the server is checked against the system's roots
    /// (built only: no network).
    #[test]
    fn system_roots_without_a_ca_file() {
        let native = rustls_native_certs::load_native_certs().certs.len();
        let roots = root_store(None).expect("system roots (install ca-certificates)");
        assert!(
            roots.len() > 10 && roots.len() <= native,
            "{} roots",
            roots.len()
        );
        let (tx, _rx) = mpsc::channel();
        let config = client_config(roots, Vec::new(), Algorithm::Rsa2048, tx).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn ca_file_replaces_the_system_roots() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["dps.test".into()]).unwrap();
        std::fs::write(&p, ca.cert.pem()).unwrap();
        assert_eq!(root_store(Some(&p)).unwrap().len(), 1);
        std::fs::write(&p, "not a certificate").unwrap();
        assert!(root_store(Some(&p))
            .unwrap_err()
            .contains("no PEM certificate"));
    }

    #[test]
    fn schemes_fit_their_keys() {
        for alg in Algorithm::ALL {
            assert!(!schemes(alg).is_empty());
            assert!(schemes(alg).iter().all(|(_, s)| s.fits(alg)), "{alg}");
        }
    }
}
