//! The fallback: keys as PKCS#8 PEM files, mode 0600, in the certificates directory.
//!
//! Key generation uses aws-lc (rcgen's `aws_lc_rs` backend), the one rcgen backend that
//! can generate RSA keys. The PEM only exists in memory (zeroized on drop) and in the
//! final directory, written through [`crate::fsutil::atomic_write`]; never in `$TMPDIR`.

use std::path::PathBuf;

use rcgen::{KeyPair, PublicKeyData, RsaKeySize, SigningKey};
use zeroize::Zeroizing;

use super::{
    Algorithm, DeviceKey, Hash, KeyStore, KeyStoreError, KeyUri, KeystoreKind, OwnedKey, Role,
    TlsScheme,
};
use crate::error::Fix;
use crate::fsutil;
use crate::model::Slot;
use crate::paths::Layout;

pub struct FileKeyStore {
    layout: Layout,
}

impl FileKeyStore {
    pub fn new(layout: Layout) -> FileKeyStore {
        FileKeyStore { layout }
    }

    fn host_path(&self, uri: &KeyUri) -> Result<PathBuf, KeyStoreError> {
        match uri {
            KeyUri::File(p) => self
                .layout
                .try_host(p)
                .map_err(|e| KeyStoreError::backend("find the key file", e.to_string())),
            other => Err(KeyStoreError::ForeignUri(other.to_string())),
        }
    }
}

/// Device path of a slot's key file: `/data/var/certificates/device.key`, …
pub fn key_path(slot: Slot) -> PathBuf {
    Layout::cert_file(&slot.key_file())
}

impl KeyStore for FileKeyStore {
    fn kind(&self) -> KeystoreKind {
        KeystoreKind::File
    }

    fn plan(&mut self, slot: Slot) -> Result<KeyUri, KeyStoreError> {
        Ok(KeyUri::File(key_path(slot)))
    }

    fn generate_recorded(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
        record: &mut dyn FnMut(&OwnedKey) -> Result<(), KeyStoreError>,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let path = self.host_path(uri)?;
        let pair = match alg {
            Algorithm::Rsa2048 => KeyPair::generate_rsa_for(alg.rcgen(), RsaKeySize::_2048),
            Algorithm::Rsa3072 => KeyPair::generate_rsa_for(alg.rcgen(), RsaKeySize::_3072),
            _ => KeyPair::generate_for(alg.rcgen()),
        }
        .map_err(|e| KeyStoreError::backend("generate key", e.to_string()))?;
        let pem = Zeroizing::new(pair.serialize_pem());
        fsutil::atomic_write(&path, pem.as_bytes(), fsutil::SECRET).map_err(|e| {
            KeyStoreError::backend(format!("write {}", path.display()), e.to_string())
        })?;
        if let Err(e) = record(&OwnedKey::new(uri.clone())) {
            let _ = fsutil::remove_file(&path);
            return Err(e);
        }
        Ok(Box::new(FileKey {
            pair,
            uri: uri.clone(),
            alg,
        }))
    }

    fn open(&mut self, uri: &KeyUri) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let path = self.host_path(uri)?;
        let pem = fsutil::read_optional(&path)
            .map_err(|e| KeyStoreError::backend("read key", e.to_string()))?
            .map(Zeroizing::new)
            .ok_or_else(|| KeyStoreError::NotFound {
                uri: uri.to_string(),
            })?;
        let text = std::str::from_utf8(&pem).map_err(|_| KeyStoreError::Rejected {
            what: format!("{} is not a PEM private key", path.display()),
            hint: Fix::RestoreKeyFile.into(),
        })?;
        let pair = KeyPair::from_pem(text).map_err(|e| KeyStoreError::Rejected {
            what: format!("{} is not a usable private key ({e})", path.display()),
            hint: Fix::RestoreKeyFile.into(),
        })?;
        let alg = Algorithm::from_spki(&pair.subject_public_key_info()).ok_or_else(|| {
            KeyStoreError::Rejected {
                what: format!(
                    "{} holds a key type or size sdv-provision does not support",
                    path.display()
                ),
                hint: Fix::Supported.into(),
            }
        })?;
        // An RSA key parsed from PEM gets rcgen's default RSA algorithm; pin it to ours
        // so certificates always carry the algorithm we report.
        let pair = if alg.is_rsa() && pair.algorithm() != alg.rcgen() {
            KeyPair::from_pem_and_sign_algo(text, alg.rcgen())
                .map_err(|e| KeyStoreError::backend("load key", e.to_string()))?
        } else {
            pair
        };
        Ok(Box::new(FileKey {
            pair,
            uri: uri.clone(),
            alg,
        }))
    }

    fn remove(&mut self, uri: &KeyUri) -> Result<(), KeyStoreError> {
        let path = self.host_path(uri)?;
        fsutil::remove_file(&path).map_err(|e| KeyStoreError::backend("remove key", e.to_string()))
    }

    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError> {
        let to = KeyUri::File(key_path(Slot::live(role)));
        if from == &to {
            return Ok(to);
        }
        let (src, dst) = (self.host_path(from)?, self.host_path(&to)?);
        if fsutil::exists_nofollow(&src) {
            fsutil::rename(&src, &dst)
                .map_err(|e| KeyStoreError::backend("move key", e.to_string()))?;
        } else if !fsutil::exists_nofollow(&dst) {
            return Err(KeyStoreError::NotFound {
                uri: from.to_string(),
            });
        }
        Ok(to)
    }
}

struct FileKey {
    pair: KeyPair,
    uri: KeyUri,
    alg: Algorithm,
}

impl PublicKeyData for FileKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.pair.algorithm()
    }
}

impl SigningKey for FileKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.pair.sign(msg)
    }
}

impl DeviceKey for FileKey {
    fn uri(&self) -> KeyUri {
        self.uri.clone()
    }
    fn alg(&self) -> Algorithm {
        self.alg
    }

    /// Through aws-lc, from the PKCS#8 form of the key (zeroized after use).
    fn sign_with(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, RsaKeyPair};
        if !scheme.fits(self.alg) {
            return Err(scheme.misfit(self.alg));
        }
        let bad = |e: String| KeyStoreError::backend(format!("sign with {}", self.uri), e);
        let pkcs8 = Zeroizing::new(self.pair.serialize_der());
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let rsa: &'static dyn sig::RsaEncoding = match scheme {
            TlsScheme::Ecdsa(h) => {
                let alg = match h {
                    Hash::Sha256 => &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                    Hash::Sha384 => &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
                };
                let key = EcdsaKeyPair::from_pkcs8(alg, &pkcs8).map_err(|e| bad(e.to_string()))?;
                let s = key.sign(&rng, msg).map_err(|e| bad(e.to_string()))?;
                return Ok(s.as_ref().to_vec());
            }
            TlsScheme::RsaPss(Hash::Sha256) => &sig::RSA_PSS_SHA256,
            TlsScheme::RsaPss(Hash::Sha384) => &sig::RSA_PSS_SHA384,
            TlsScheme::RsaPkcs1(Hash::Sha256) => &sig::RSA_PKCS1_SHA256,
            TlsScheme::RsaPkcs1(Hash::Sha384) => &sig::RSA_PKCS1_SHA384,
        };
        let key = RsaKeyPair::from_pkcs8(&pkcs8).map_err(|e| bad(e.to_string()))?;
        let mut out = vec![0; key.public_modulus_len()];
        key.sign(rsa, &rng, msg, &mut out)
            .map_err(|e| bad(e.to_string()))?;
        Ok(out)
    }
}
