//! TPM key templates, public-key conversion, and the device key that signs through
//! `TPM2_Sign`.

use std::convert::TryFrom;
use std::sync::{Mutex, PoisonError};

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::ObjectHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyDerivationFunctionScheme, Public,
    PublicBuilder, PublicEccParameters, PublicKeyRsa, PublicParameters, PublicRsaParameters,
    RsaExponent, RsaScheme, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

use super::{da, tss_error};
use crate::keystore::{
    ecdsa_raw_to_der, rsa_public_der, Algorithm, DeviceKey, Hash, KeyStoreError, KeyUri, TlsScheme,
};

fn template_error(e: tss_esapi::Error) -> KeyStoreError {
    KeyStoreError::backend("build the TPM key template", e.to_string())
}

/// Key parameters for a device key. The scheme is Null so the one key serves RSA-PSS
/// (TLS 1.3, today's connector), PKCS#1 v1.5 (certificates) and ECDSA; the signer picks
/// the scheme per `TPM2_Sign`.
pub fn device_key_parameters(alg: Algorithm) -> PublicParameters {
    match alg {
        Algorithm::Rsa2048 | Algorithm::Rsa3072 => PublicParameters::Rsa(PublicRsaParameters::new(
            SymmetricDefinitionObject::Null,
            RsaScheme::Null,
            if alg == Algorithm::Rsa2048 {
                RsaKeyBits::Rsa2048
            } else {
                RsaKeyBits::Rsa3072
            },
            RsaExponent::default(),
        )),
        // Built directly: tss-esapi's parameter builder refuses a Null scheme on a
        // signing key, which the TPM itself allows (and we need).
        Algorithm::EcdsaP256 | Algorithm::EcdsaP384 => {
            PublicParameters::Ecc(PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::Null,
                if alg == Algorithm::EcdsaP256 {
                    EccCurve::NistP256
                } else {
                    EccCurve::NistP384
                },
                KeyDerivationFunctionScheme::Null,
            ))
        }
    }
}

/// The device key template: a child of the SRK, unrestricted signing, scheme Null,
/// fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA, empty auth.
/// fixedTPM + sensitiveDataOrigin: the private key is made by this TPM and can never
/// leave it, not even wrapped for another TPM. noDA: with an empty auth value there is
/// nothing to guess, and without it every power loss after a key use (no orderly
/// TPM2_Shutdown) counts as a failed authorization: swtpm locked the identity out
/// after three.
pub fn device_key_template(alg: Algorithm) -> Result<Public, KeyStoreError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(template_error)?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    match device_key_parameters(alg) {
        PublicParameters::Rsa(p) => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(p)
            .with_rsa_unique_identifier(PublicKeyRsa::default()),
        PublicParameters::Ecc(p) => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(p)
            .with_ecc_unique_identifier(EccPoint::default()),
        _ => unreachable!("device keys are RSA or ECC"),
    }
    .build()
    .map_err(template_error)
}

/// The standard storage root key (TCG provisioning guidance, ECC P-256 SRK): restricted
/// decryption, AES-128-CFB, Null scheme, noDA so a wrong guess elsewhere never locks
/// out key loading.
pub fn srk_template() -> Result<Public, KeyStoreError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(template_error)?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(PublicEccParameters::new(
            SymmetricDefinitionObject::AES_128_CFB,
            EccScheme::Null,
            EccCurve::NistP256,
            KeyDerivationFunctionScheme::Null,
        ))
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(template_error)
}

/// Is `public` a storage key we can create children under?
pub fn is_storage_key(public: &Public) -> bool {
    let a = public.object_attributes();
    a.restricted() && a.decrypt() && !a.sign_encrypt()
}

/// Which of our algorithms a TPM public area is, if it is an unrestricted signing key
/// of a supported type and size.
pub fn algorithm_of(public: &Public) -> Option<Algorithm> {
    let a = public.object_attributes();
    if !a.sign_encrypt() || a.restricted() {
        return None;
    }
    match public {
        Public::Rsa { parameters, .. } => match parameters.key_bits() {
            RsaKeyBits::Rsa2048 => Some(Algorithm::Rsa2048),
            RsaKeyBits::Rsa3072 => Some(Algorithm::Rsa3072),
            _ => None,
        },
        Public::Ecc { parameters, .. } => match parameters.ecc_curve() {
            EccCurve::NistP256 => Some(Algorithm::EcdsaP256),
            EccCurve::NistP384 => Some(Algorithm::EcdsaP384),
            _ => None,
        },
        _ => None,
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&x| x == 0).count();
    &b[n.min(b.len().saturating_sub(1))..]
}

fn left_pad(v: &[u8], len: usize) -> Result<Vec<u8>, KeyStoreError> {
    let v = strip_leading_zeros(v);
    if v.len() > len {
        return Err(KeyStoreError::backend(
            "read the TPM public key",
            "EC coordinate longer than the curve's field",
        ));
    }
    let mut out = vec![0u8; len - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

/// The public key in the form rcgen's `PublicKeyData::der_bytes` takes: PKCS#1
/// RSAPublicKey for RSA, the uncompressed point `04‖X‖Y` for EC.
pub fn public_der(public: &Public, alg: Algorithm) -> Result<Vec<u8>, KeyStoreError> {
    match public {
        Public::Rsa {
            parameters, unique, ..
        } => {
            // A TPM stores exponent 0 to mean the default, 65537.
            let e = match parameters.exponent().value() {
                0 => 65537u32,
                e => e,
            };
            rsa_public_der(
                strip_leading_zeros(unique.value()),
                strip_leading_zeros(&e.to_be_bytes()),
            )
        }
        Public::Ecc { unique, .. } => {
            let field = alg.bits() / 8;
            let mut out = vec![0x04];
            out.extend(left_pad(unique.x().value(), field)?);
            out.extend(left_pad(unique.y().value(), field)?);
            Ok(out)
        }
        _ => Err(KeyStoreError::backend(
            "read the TPM public key",
            "neither RSA nor ECC",
        )),
    }
}

/// A device key inside the TPM, at a persistent handle.
pub struct TpmKey<'a> {
    /// The keystore's ESAPI context. rcgen's `sign` takes `&self`, but every ESAPI call
    /// needs `&mut Context`; the mutex gives that mutability safely and serialises TPM
    /// commands, since one ESAPI context must never run two commands at once.
    pub(super) ctx: &'a Mutex<Context>,
    /// The ESYS resource for the persistent handle (closed on drop; the key stays).
    pub(super) object: ObjectHandle,
    pub(super) handle: u32,
    pub(super) alg: Algorithm,
    pub(super) public_der: Vec<u8>,
    /// Why the last signature failed: rcgen's error can only say "Remote key error".
    pub(super) last_error: Mutex<Option<KeyStoreError>>,
}

impl TpmKey<'_> {
    /// Certificates: PKCS#1 v1.5 (sha256WithRSAEncryption) or ECDSA with the curve's
    /// hash, the signature algorithm [`Algorithm::rcgen`] names.
    fn tpm_sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        self.sign_scheme(TlsScheme::certificate(self.alg), msg)
    }

    /// `TPM2_Sign` with an explicit scheme: the key's own scheme is Null, so the
    /// TPM takes the one given here (RSASSA, RSAPSS or ECDSA).
    fn sign_scheme(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        if !scheme.fits(self.alg) {
            return Err(scheme.misfit(self.alg));
        }
        let digest = Digest::try_from(scheme.hash().digest(msg))
            .map_err(|e| KeyStoreError::backend("prepare the digest", e.to_string()))?;
        let hash_scheme = HashScheme::new(match scheme.hash() {
            Hash::Sha384 => HashingAlgorithm::Sha384,
            Hash::Sha256 => HashingAlgorithm::Sha256,
        });
        let scheme = match scheme {
            TlsScheme::RsaPkcs1(_) => SignatureScheme::RsaSsa { hash_scheme },
            TlsScheme::RsaPss(_) => SignatureScheme::RsaPss { hash_scheme },
            TlsScheme::Ecdsa(_) => SignatureScheme::EcDsa { hash_scheme },
        };
        // A NULL hashcheck ticket: the digest was computed outside the TPM, which an
        // unrestricted key accepts.
        let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| KeyStoreError::backend("prepare the hashcheck ticket", e.to_string()))?;
        let mut ctx = self.ctx.lock().unwrap_or_else(PoisonError::into_inner);
        let signature = da::retry_transient(|| {
            ctx.execute_with_session(Some(AuthSession::Password), |c| {
                c.sign(self.object.into(), digest.clone(), scheme, ticket.clone())
            })
        })
        .map_err(|e| {
            let step = format!("sign with TPM key 0x{:08x} (TPM2_Sign)", self.handle);
            if da::is_lockout(&e) {
                da::lockout_error(&step, da::Lockout::read(&mut ctx))
            } else {
                tss_error(&step, e)
            }
        })?;
        match signature {
            Signature::RsaSsa(s) | Signature::RsaPss(s) => Ok(s.signature().value().to_vec()),
            Signature::EcDsa(s) => {
                ecdsa_raw_to_der(s.signature_r().value(), s.signature_s().value())
            }
            other => Err(KeyStoreError::backend(
                "sign with the TPM key",
                format!("unexpected signature type {:?}", other.algorithm()),
            )),
        }
    }
}

impl Drop for TpmKey<'_> {
    fn drop(&mut self) {
        let mut ctx = self.ctx.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = ctx.tr_close(&mut self.object);
    }
}

impl rcgen::PublicKeyData for TpmKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_der
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg.rcgen()
    }
}

impl rcgen::SigningKey for TpmKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.tpm_sign(msg).map_err(|e| {
            tracing::error!("signing through the TPM failed: {e}");
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

impl DeviceKey for TpmKey<'_> {
    fn uri(&self) -> KeyUri {
        KeyUri::TpmHandle(self.handle)
    }
    fn alg(&self) -> Algorithm {
        self.alg
    }
    fn sign_with(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
        self.sign_scheme(scheme, msg)
    }
    fn take_sign_error(&self) -> Option<KeyStoreError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}
