//! Certificates: built through a [`DeviceKey`] (any backend), parsed for thumbprints,
//! validity and issuer, and signatures checked against a certificate's public key.

use std::path::Path;
use std::time::SystemTime;

use der::{Decode, Encode};
use sha1::Digest;
use time::OffsetDateTime;
use x509_cert::Certificate;

use crate::error::{Error, Fix, Result};
use crate::keystore::{Algorithm, DeviceKey};

/// How far back `notBefore` goes, so a device whose clock is a little behind (no RTC,
/// no NTP yet) still accepts its own certificate, and so does the cloud.
pub const CLOCK_SKEW: time::Duration = time::Duration::hours(1);

/// A self-signed X.509 v3 client certificate, CN = device id, signed through `key`.
pub fn self_signed(key: &dyn DeviceKey, device_id: &str, days: u32) -> Result<String> {
    let params = params(device_id, days)?;
    let cert = params.self_signed(&key).map_err(|e| sign_failure(key, e))?;
    Ok(cert.pem())
}

/// A PKCS#10 request for `key`, CN = device id, asking for clientAuth.
pub fn csr(key: &dyn DeviceKey, device_id: &str) -> Result<String> {
    let mut params = params(device_id, 365)?;
    // The CA picks the serial; rcgen refuses one in a CSR.
    params.serial_number = None;
    // The certificate is the issuing CA's to make: its key identifiers come from the
    // CA's profile (rcgen writes none into a request; an AKI would name the CA's key).
    params.use_authority_key_identifier_extension = false;
    let request = params
        .serialize_request(&key)
        .map_err(|e| sign_failure(key, e))?;
    Ok(request.pem()?)
}

/// rcgen's error for a failed signature is a bare "Remote key error"; the key may
/// know why (a TPM in lockout), and that is the error to show.
fn sign_failure(key: &dyn DeviceKey, e: rcgen::Error) -> Error {
    match (e, key.take_sign_error()) {
        (rcgen::Error::RemoteKeyError, Some(cause)) => cause.into(),
        (e, _) => e.into(),
    }
}

fn params(device_id: &str, days: u32) -> Result<rcgen::CertificateParams> {
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, device_id);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - CLOCK_SKEW;
    p.not_after = now + time::Duration::days(i64::from(days));
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| Error::input("no randomness available", Fix::KernelRng))?;
    serial[0] &= 0x7f; // positive INTEGER
    serial[0] |= 0x01; // and no leading zero byte to strip
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    // ExplicitNoCa writes basicConstraints CA:FALSE and, with it, the
    // subjectKeyIdentifier (rcgen writes SKI only for Ca/ExplicitNoCa); the AKI of a
    // self-signed certificate is that same key id. Without both, a verifier trusting
    // the primary and the secondary (same subject, both self-signed) cannot tell them
    // apart and verifies only the first (DESIGN §1.3).
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    Ok(p)
}

/// What we need to know about an installed certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    /// SHA-1 of the DER, upper-case hex, no colons: what the Azure portal takes.
    pub sha1: String,
    pub sha256: String,
    pub subject_cn: Option<String>,
    pub issuer: String,
    pub self_signed: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// Further certificates in the PEM (the issuing chain of an imported cert).
    pub chain_len: usize,
}

/// Every `CERTIFICATE` block of a PEM file, in order; anything else between or
/// around them (comments, `openssl x509 -text` output) is ignored.
///
/// Each block is base64-decoded whole and then parsed from the bytes. Not x509-cert
/// 0.2's `load_pem_chain`: its streaming PEM reader never returns on a block whose
/// DER header claims more bytes than the block holds (`MIIB` alone hung
/// `import-cert`, and a truncated `device.crt` would hang every command; found by
/// fuzz/fuzz_targets/cert_import.rs).
fn pem_chain(pem: &[u8]) -> std::result::Result<Vec<Certificate>, String> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut certs = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let block = &rest[start..];
        let end =
            find(block, END).ok_or("a PEM block has no `-----END CERTIFICATE-----`")? + END.len();
        let (label, der) = der::pem::decode_vec(&block[..end])
            .map_err(|e| format!("not a PEM certificate ({e})"))?;
        if label != "CERTIFICATE" {
            return Err(format!("a PEM block is a {label}, not a CERTIFICATE"));
        }
        let cert = Certificate::from_der(&der)
            .map_err(|e| format!("certificate {} is not valid DER ({e})", certs.len() + 1))?;
        certs.push(cert);
        rest = &block[end..];
    }
    if certs.is_empty() {
        return Err("not a PEM certificate (no `-----BEGIN CERTIFICATE-----`)".into());
    }
    Ok(certs)
}

impl CertInfo {
    /// Parse the first certificate of a PEM file (the rest is its chain).
    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<CertInfo> {
        let bad = |detail: String| Error::Certificate {
            path: path.to_owned(),
            detail,
        };
        if pem.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(bad("the file is empty, no certificate in it".into()));
        }
        let chain = pem_chain(pem).map_err(bad)?;
        let cert = chain
            .first()
            .ok_or_else(|| bad("no certificate in file".into()))?;
        let der = cert.to_der().map_err(|e| bad(e.to_string()))?;
        let tbs = &cert.tbs_certificate;
        let spki = tbs
            .subject_public_key_info
            .to_der()
            .map_err(|e| bad(e.to_string()))?;
        Ok(CertInfo {
            sha1: hex::encode_upper(sha1::Sha1::digest(&der)),
            sha256: hex::encode_upper(sha2::Sha256::digest(&der)),
            subject_cn: common_name(&tbs.subject),
            issuer: tbs.issuer.to_string(),
            self_signed: tbs.issuer == tbs.subject,
            not_before: to_offset(tbs.validity.not_before.to_system_time()),
            not_after: to_offset(tbs.validity.not_after.to_system_time()),
            spki,
            chain_len: chain.len() - 1,
            der,
        })
    }

    pub fn algorithm(&self) -> Option<Algorithm> {
        Algorithm::from_spki(&self.spki)
    }

    /// `notAfter` as RFC 3339.
    pub fn not_after_rfc3339(&self) -> String {
        self.not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }

    /// Seconds of validity left (negative when expired).
    pub fn remaining(&self) -> time::Duration {
        self.not_after - OffsetDateTime::now_utc()
    }

    pub fn is_current(&self) -> bool {
        let now = OffsetDateTime::now_utc();
        self.not_before <= now && now <= self.not_after
    }
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    const CN: der::asn1::ObjectIdentifier = der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    name.0.iter().flat_map(|rdn| rdn.0.iter()).find_map(|atv| {
        if atv.oid != CN {
            return None;
        }
        atv.value
            .decode_as::<der::asn1::Utf8StringRef<'_>>()
            .map(|s| s.as_str().to_owned())
            .or_else(|_| {
                atv.value
                    .decode_as::<der::asn1::PrintableStringRef<'_>>()
                    .map(|s| s.as_str().to_owned())
            })
            .ok()
    })
}

/// Check `sig` over `msg` against a SubjectPublicKeyInfo, using the signature scheme
/// our keys sign with for `alg` (RSA PKCS#1 v1.5 SHA-256, ECDSA DER).
pub fn verify_signature(spki_der: &[u8], alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature;
    let Ok(spki) = spki::SubjectPublicKeyInfoRef::from_der(spki_der) else {
        return false;
    };
    let Some(key) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    let scheme: &dyn signature::VerificationAlgorithm = match alg {
        Algorithm::Rsa2048 | Algorithm::Rsa3072 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
        Algorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
    };
    signature::UnparsedPublicKey::new(scheme, key)
        .verify(msg, sig)
        .is_ok()
}

/// Sign a fresh random challenge with `key` and check it with `spki`: proves the key
/// is usable and belongs to the certificate.
pub fn key_matches(key: &dyn DeviceKey, spki: &[u8]) -> Result<bool> {
    let mut challenge = [0u8; 32];
    aws_lc_rs::rand::fill(&mut challenge)
        .map_err(|_| Error::input("no randomness available", Fix::KernelRng))?;
    let sig = key.sign(&challenge).map_err(|e| sign_failure(key, e))?;
    Ok(verify_signature(spki, key.alg(), &challenge, &sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::{file::FileKeyStore, KeyStore, Role};
    use crate::model::Slot;
    use crate::paths::Layout;

    #[test]
    fn file_key_cert_round_trip_all_algorithms() {
        let d = tempfile::tempdir().unwrap();
        let mut ks = FileKeyStore::new(Layout::new(d.path()));
        for alg in Algorithm::ALL {
            let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
            let key = ks.generate(&uri, alg).unwrap();
            let pem = self_signed(key.as_ref(), "dev-1", 30).unwrap();
            let info = CertInfo::from_pem(Path::new("x"), pem.as_bytes()).unwrap();
            assert_eq!(info.subject_cn.as_deref(), Some("dev-1"));
            assert!(info.self_signed && info.is_current());
            assert_eq!(info.algorithm(), Some(alg));
            assert_eq!(info.sha1.len(), 40);
            assert!(key_matches(key.as_ref(), &info.spki).unwrap());
            drop(key);
            let reopened = ks.open(&uri).unwrap();
            assert_eq!(reopened.alg(), alg);
            assert!(key_matches(reopened.as_ref(), &info.spki).unwrap());
        }
    }

    /// Before: x509-cert's `load_pem_chain` never returned on this input (the DER
    /// header claims more bytes than the block holds): `import-cert` hung.
    #[test]
    fn truncated_pem_is_refused_not_hung() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
            let _ = tx.send(CertInfo::from_pem(Path::new("x"), pem).map(|_| ()));
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(10));
        let e = r.expect("from_pem returned").unwrap_err().to_string();
        assert!(
            e.contains("not valid DER") || e.contains("not a PEM"),
            "{e}"
        );
    }

    #[test]
    fn pem_chains_keep_their_order_and_ignore_text_around_them() {
        let d = tempfile::tempdir().unwrap();
        let mut ks = FileKeyStore::new(Layout::new(d.path()));
        let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
        let key = ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
        let a = self_signed(key.as_ref(), "dev-a", 30).unwrap();
        let b = self_signed(key.as_ref(), "dev-b", 30).unwrap();
        let text = format!("Certificate:\n  (text)\n{a}\nsome comment\n{b}");
        let info = CertInfo::from_pem(Path::new("x"), text.as_bytes()).unwrap();
        assert_eq!(info.subject_cn.as_deref(), Some("dev-a"));
        assert_eq!(info.chain_len, 1);
        for bad in ["", "\n \n", "no pem", "-----BEGIN CERTIFICATE-----\nMIIB\n"] {
            assert!(
                CertInfo::from_pem(Path::new("x"), bad.as_bytes()).is_err(),
                "{bad:?}"
            );
        }
        let key_pem = a.replace("CERTIFICATE", "PRIVATE KEY");
        assert!(CertInfo::from_pem(Path::new("x"), key_pem.as_bytes()).is_err());
    }

    /// Two self-signed certificates of one subject carry different key identifiers,
    /// and each one's authorityKeyIdentifier is its own subjectKeyIdentifier.
    #[test]
    fn certificates_carry_key_identifiers() {
        use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
        let d = tempfile::tempdir().unwrap();
        let mut ks = FileKeyStore::new(Layout::new(d.path()));
        let mut ids = Vec::new();
        for role in Role::ALL {
            let uri = ks.plan(Slot::live(role)).unwrap();
            let key = ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
            let pem = self_signed(key.as_ref(), "dev-1", 30).unwrap();
            let cert = Certificate::load_pem_chain(pem.as_bytes())
                .unwrap()
                .remove(0);
            let ski = cert
                .tbs_certificate
                .get::<SubjectKeyIdentifier>()
                .unwrap()
                .expect("subjectKeyIdentifier")
                .1;
            let aki = cert
                .tbs_certificate
                .get::<AuthorityKeyIdentifier>()
                .unwrap()
                .expect("authorityKeyIdentifier")
                .1;
            assert_eq!(aki.key_identifier.as_ref(), Some(&ski.0));
            ids.push(ski.0);
        }
        assert_ne!(ids[0], ids[1]);
    }
}
