//! A key in the token, and reading its public half: signing through the store's
//! session (`CKM_ECDSA`, `CKM_RSA_PKCS` over a DigestInfo), the key's algorithm from
//! its attributes, and the public key in the form rcgen takes.

use std::sync::Mutex;

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectHandle};
use cryptoki::session::Session;
use rcgen::{PublicKeyData, SigningKey};

use super::ck;
use crate::error::Fix;
use crate::keystore::{
    ecdsa_raw_to_der, rsa_public_der, sign_error, Algorithm, DeviceKey, Hash, KeyStoreError,
    KeyUri, TlsScheme,
};

/// DER `ECParameters` (namedCurve OIDs) for the two curves we support.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// A key in the token. Signing runs through the store's session.
pub(super) struct Pkcs11Key<'a> {
    pub(super) session: &'a Mutex<Session>,
    pub(super) private: ObjectHandle,
    /// PKCS#1 `RSAPublicKey` DER, or the uncompressed EC point: what rcgen's
    /// `der_bytes` takes.
    pub(super) public_der: Vec<u8>,
    pub(super) alg: Algorithm,
    pub(super) uri: KeyUri,
}

impl Pkcs11Key<'_> {
    /// RSA signs with `CKM_RSA_PKCS` over a DigestInfo we build from a software SHA-256,
    /// rather than with `CKM_SHA256_RSA_PKCS`:
    /// - raw `CKM_RSA_PKCS` is the one RSA signing mechanism every token offers (many
    ///   smart cards and HSM firmwares lack the hash-and-sign variants);
    /// - it is what libp11 itself uses for PKCS#1 v1.5 signatures, so the certificate is
    ///   signed the same way the TLS consumer will later use the key;
    /// - hashing stays in one place for both algorithms ([`Algorithm::digest`]), and only
    ///   51 bytes cross the token interface instead of the whole to-be-signed data.
    fn sign_in_token(&self, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        self.sign_scheme(TlsScheme::certificate(self.alg), msg)
    }

    /// Sign with an explicit scheme over a software digest: `CKM_RSA_PKCS` over a
    /// DigestInfo, `CKM_RSA_PKCS_PSS` (MGF1 with the same hash, salt = hash length,
    /// as TLS 1.3 requires) or `CKM_ECDSA`.
    fn sign_scheme(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        if !scheme.fits(self.alg) {
            return Err(scheme.misfit(self.alg));
        }
        let hash = scheme.hash();
        let digest = hash.digest(msg);
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let step = format!("sign with {}", self.uri);
        match scheme {
            TlsScheme::RsaPkcs1(_) => session
                .sign(
                    &Mechanism::RsaPkcs,
                    self.private,
                    &hash.digest_info(&digest),
                )
                .map_err(|e| ck(step, e)),
            TlsScheme::RsaPss(_) => {
                let (hash_alg, mgf) = match hash {
                    Hash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                    Hash::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
                };
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (hash.output_len() as u64).into(),
                };
                session
                    .sign(&Mechanism::RsaPkcsPss(params), self.private, &digest)
                    .map_err(|e| ck(step, e))
            }
            TlsScheme::Ecdsa(_) => {
                let raw = session
                    .sign(&Mechanism::Ecdsa, self.private, &digest)
                    .map_err(|e| ck(&step, e))?;
                if raw.is_empty() || raw.len() % 2 != 0 {
                    return Err(KeyStoreError::backend(
                        step,
                        format!("the token returned a {}-byte ECDSA signature", raw.len()),
                    ));
                }
                let (r, s) = raw.split_at(raw.len() / 2);
                ecdsa_raw_to_der(r, s)
            }
        }
    }
}

impl PublicKeyData for Pkcs11Key<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_der
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg.rcgen()
    }
}

impl SigningKey for Pkcs11Key<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_in_token(msg).map_err(sign_error)
    }
}

impl DeviceKey for Pkcs11Key<'_> {
    fn uri(&self) -> KeyUri {
        self.uri.clone()
    }
    fn alg(&self) -> Algorithm {
        self.alg
    }
    fn sign_with(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        self.sign_scheme(scheme, msg)
    }
}

pub(super) fn ec_params(alg: Algorithm) -> &'static [u8] {
    match alg {
        Algorithm::EcdsaP384 => P384_PARAMS,
        _ => P256_PARAMS,
    }
}

/// Which of our algorithms a private key is, from its own attributes.
pub(super) fn key_algorithm(
    session: &Session,
    key: ObjectHandle,
) -> Result<Algorithm, KeyStoreError> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::Modulus,
                AttributeType::EcParams,
            ],
        )
        .map_err(|e| ck("read the key's attributes", e))?;
    let (mut kt, mut modulus, mut params) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(k) => kt = Some(k),
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::EcParams(p) => params = Some(p),
            _ => {}
        }
    }
    let unsupported = || KeyStoreError::Rejected {
        what: "the key's type or size is not one sdv-provision supports".into(),
        hint: format!("{}; {}", Fix::Supported, Fix::Force),
    };
    match kt {
        Some(KeyType::RSA) => {
            let m = modulus.ok_or_else(unsupported)?;
            let bits = m.iter().skip_while(|b| **b == 0).count() * 8;
            match bits {
                2048 => Ok(Algorithm::Rsa2048),
                3072 => Ok(Algorithm::Rsa3072),
                _ => Err(unsupported()),
            }
        }
        Some(KeyType::EC) => match params.as_deref() {
            Some(P256_PARAMS) => Ok(Algorithm::EcdsaP256),
            Some(P384_PARAMS) => Ok(Algorithm::EcdsaP384),
            _ => Err(unsupported()),
        },
        _ => Err(unsupported()),
    }
}

/// rcgen's public-key bytes from the public key object: PKCS#1 `RSAPublicKey` DER, or
/// the uncompressed EC point (CKA_EC_POINT is a DER OCTET STRING around it; a few
/// tokens return the bare point, which is accepted too).
pub(super) fn public_der(
    session: &Session,
    public: ObjectHandle,
    alg: Algorithm,
) -> Result<Vec<u8>, KeyStoreError> {
    let read = |t: &[AttributeType]| {
        session
            .get_attributes(public, t)
            .map_err(|e| ck("read the public key", e))
    };
    if alg.is_rsa() {
        let (mut n, mut e) = (None, None);
        for a in read(&[AttributeType::Modulus, AttributeType::PublicExponent])? {
            match a {
                Attribute::Modulus(m) => n = Some(m),
                Attribute::PublicExponent(x) => e = Some(x),
                _ => {}
            }
        }
        match (n, e) {
            (Some(n), Some(e)) => rsa_public_der(&n, &e),
            _ => Err(KeyStoreError::backend(
                "read the public key",
                "the token returned no modulus/exponent",
            )),
        }
    } else {
        let point = read(&[AttributeType::EcPoint])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| {
                KeyStoreError::backend("read the public key", "the token returned no EC point")
            })?;
        let raw_len = 1 + 2 * alg.bits().div_ceil(8);
        if point.len() == raw_len && point[0] == 0x04 {
            return Ok(point);
        }
        use der::Decode;
        let os = der::asn1::OctetStringRef::from_der(&point)
            .map_err(|e| KeyStoreError::backend("decode CKA_EC_POINT", e.to_string()))?;
        let inner = os.as_bytes();
        if inner.len() != raw_len || inner[0] != 0x04 {
            return Err(KeyStoreError::backend(
                "decode CKA_EC_POINT",
                "not an uncompressed point of the expected curve",
            ));
        }
        Ok(inner.to_vec())
    }
}
