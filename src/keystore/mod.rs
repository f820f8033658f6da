//! Where device keys live, behind one abstraction.
//!
//! The device key *is* the signer: every backend's key implements rcgen's
//! [`rcgen::SigningKey`], so `cert.rs` builds certificates and CSRs without knowing
//! whether the key sits in a TPM, a PKCS#11 token or a plain file. rcgen hands `sign`
//! the whole to-be-signed data; backends hash it (SHA-256 / SHA-384 to match the
//! algorithm) and return ECDSA signatures as DER and RSA signatures raw.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod file;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
mod settings;
#[cfg(feature = "tpm")]
pub mod tpm;
mod uri;

pub use settings::{
    Backend, BlankToken, ConnectorPin, KeystoreConfig, PinFile, Pkcs11Config, Pkcs11Settings,
    Prompt, Purpose, TpmConfig, TpmSettings, DEFAULT_PRIMARY, DEFAULT_SECONDARY, DEFAULT_SRK,
};
pub use uri::{KeyUri, Pkcs11Uri};

use crate::model::Slot;
pub use crate::model::{Algorithm, KeystoreKind, Role};

/// Algorithms by their keys' encodings.
impl Algorithm {
    /// Recognise the algorithm of a SubjectPublicKeyInfo (DER).
    pub fn from_spki(spki_der: &[u8]) -> Option<Algorithm> {
        use der::Decode;
        let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der).ok()?;
        const RSA: der::asn1::ObjectIdentifier =
            der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
        const EC: der::asn1::ObjectIdentifier =
            der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
        const P256: der::asn1::ObjectIdentifier =
            der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
        const P384: der::asn1::ObjectIdentifier =
            der::asn1::ObjectIdentifier::new_unwrap("1.3.132.0.34");
        if spki.algorithm.oid == RSA {
            let key = spki.subject_public_key.as_bytes()?;
            let rsa = RsaPublicKey::from_der(key).ok()?;
            match rsa.modulus.as_bytes().len() * 8 {
                2048 => Some(Algorithm::Rsa2048),
                3072 => Some(Algorithm::Rsa3072),
                _ => None,
            }
        } else if spki.algorithm.oid == EC {
            let curve: der::asn1::ObjectIdentifier = spki.algorithm.parameters?.decode_as().ok()?;
            match curve {
                c if c == P256 => Some(Algorithm::EcdsaP256),
                c if c == P384 => Some(Algorithm::EcdsaP384),
                _ => None,
            }
        } else {
            None
        }
    }
}

/// PKCS#1 RSAPublicKey, the form rcgen's `PublicKeyData::der_bytes` takes for RSA.
#[derive(der::Sequence)]
pub struct RsaPublicKey<'a> {
    pub modulus: der::asn1::UintRef<'a>,
    pub public_exponent: der::asn1::UintRef<'a>,
}

/// DER `RSAPublicKey` from big-endian modulus and exponent.
pub fn rsa_public_der(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
    use der::Encode;
    let bad = |e: der::Error| KeyStoreError::backend("encode RSA public key", e.to_string());
    RsaPublicKey {
        modulus: der::asn1::UintRef::new(modulus).map_err(bad)?,
        public_exponent: der::asn1::UintRef::new(exponent).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)
}

#[derive(der::Sequence)]
struct EcdsaSig<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

/// Convert a raw ECDSA signature `r‖s` (PKCS#11, or TPM `r`,`s` concatenated) to the
/// DER `ECDSA-Sig-Value` X.509 needs.
pub fn ecdsa_raw_to_der(r: &[u8], s: &[u8]) -> Result<Vec<u8>, KeyStoreError> {
    use der::Encode;
    let bad = |e: der::Error| KeyStoreError::backend("encode ECDSA signature", e.to_string());
    EcdsaSig {
        r: der::asn1::UintRef::new(r).map_err(bad)?,
        s: der::asn1::UintRef::new(s).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)
}

/// A device key: signs through its backend, names itself by URI.
pub trait DeviceKey: rcgen::SigningKey {
    /// The URI consumers load this key by.
    fn uri(&self) -> KeyUri;
    fn alg(&self) -> Algorithm;

    /// Sign `msg` (the whole message; the backend hashes it) with an explicit
    /// scheme, for TLS handshakes (DESIGN §3b). RSA signatures come back raw, ECDSA
    /// ones as DER. The key's own algorithm must fit the scheme ([`TlsScheme::fits`]).
    fn sign_with(&self, scheme: TlsScheme, msg: &[u8]) -> Result<Vec<u8>, KeyStoreError>;

    /// Why the last `sign` failed, where the backend knows more than rcgen's
    /// `RemoteKeyError` can carry (a TPM in lockout, say). Taken once.
    fn take_sign_error(&self) -> Option<KeyStoreError> {
        None
    }
}

/// The hash of a [`TlsScheme`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    pub fn digest(self, msg: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hash::Sha256 => sha2::Sha256::digest(msg).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(msg).to_vec(),
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
        }
    }

    /// DER `DigestInfo` (RFC 8017 §9.2 note 1) around `digest`, for raw PKCS#1 v1.5.
    pub fn digest_info(self, digest: &[u8]) -> Vec<u8> {
        let mut info = match self {
            Hash::Sha256 => vec![
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => vec![
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
        };
        info.extend_from_slice(digest);
        info
    }
}

/// A signature scheme a TLS peer may ask for: RSA-PSS (TLS 1.3, MGF1 with the same
/// hash, salt as long as the hash), RSA PKCS#1 v1.5 (TLS 1.2) or ECDSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsScheme {
    RsaPss(Hash),
    RsaPkcs1(Hash),
    Ecdsa(Hash),
}

impl TlsScheme {
    /// The scheme a certificate or CSR is signed with: PKCS#1 v1.5 with SHA-256
    /// (sha256WithRSAEncryption) or ECDSA with the curve's hash, the signature
    /// algorithm [`Algorithm::rcgen`] names.
    pub fn certificate(alg: Algorithm) -> TlsScheme {
        match alg {
            Algorithm::EcdsaP384 => TlsScheme::Ecdsa(Hash::Sha384),
            Algorithm::EcdsaP256 => TlsScheme::Ecdsa(Hash::Sha256),
            Algorithm::Rsa2048 | Algorithm::Rsa3072 => TlsScheme::RsaPkcs1(Hash::Sha256),
        }
    }

    pub fn hash(self) -> Hash {
        match self {
            TlsScheme::RsaPss(h) | TlsScheme::RsaPkcs1(h) | TlsScheme::Ecdsa(h) => h,
        }
    }

    /// Can a key of `alg` sign with this scheme? ECDSA keys sign with their curve's
    /// hash only (what TLS 1.3 pairs them with).
    pub fn fits(self, alg: Algorithm) -> bool {
        match self {
            TlsScheme::RsaPss(_) | TlsScheme::RsaPkcs1(_) => alg.is_rsa(),
            TlsScheme::Ecdsa(Hash::Sha256) => alg == Algorithm::EcdsaP256,
            TlsScheme::Ecdsa(Hash::Sha384) => alg == Algorithm::EcdsaP384,
        }
    }

    /// The error for a scheme that does not fit the key (a caller's bug, not input).
    pub fn misfit(self, alg: Algorithm) -> KeyStoreError {
        KeyStoreError::backend(
            "sign for TLS",
            format!("a {alg} key cannot sign with {self:?}"),
        )
    }
}

/// A backend that makes, finds and destroys device keys.
///
/// Locations are planned before keys are made ([`KeyStore::plan`]), but a plan proves
/// nothing: a key becomes the tool's only through the proof
/// [`KeyStore::generate_recorded`] hands over once it exists, and is removed only
/// while that proof still holds ([`KeyStore::remove_owned`]; DESIGN §6).
pub trait KeyStore {
    fn kind(&self) -> KeystoreKind;

    /// The URI a new key for `slot` will get. Staged keys are built beside the live
    /// ones while those stay in service (rotation, `--force`). Fails if the location is
    /// taken by something this tool did not make.
    fn plan(&mut self, slot: Slot) -> Result<KeyUri, KeyStoreError>;

    /// Make a key at a planned location. `record` is called with the key's ownership
    /// proof as soon as the key exists (TPM: before it is persisted, see the TPM
    /// store), and the key is taken back if it fails: the caller journals the proof
    /// there, so nothing is ever "ours" on a plan alone (DESIGN §6).
    fn generate_recorded(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
        record: &mut dyn FnMut(&OwnedKey) -> Result<(), KeyStoreError>,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError>;

    /// [`KeyStore::generate_recorded`] without recording.
    fn generate(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        self.generate_recorded(uri, alg, &mut |_| Ok(()))
    }

    /// Open an existing key.
    fn open(&mut self, uri: &KeyUri) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError>;

    /// Destroy a key this tool made. A key that is already gone is not an error.
    fn remove(&mut self, uri: &KeyUri) -> Result<(), KeyStoreError>;

    /// Destroy `key` only while what its location holds is what its proof names.
    /// `Ok(false)`: something else is there now; it was left in place. The PKCS#11 and
    /// file proofs are in the URI itself (CKA_ID + label; a closed set of file names).
    fn remove_owned(&mut self, key: &OwnedKey) -> Result<bool, KeyStoreError> {
        self.remove(&key.uri).map(|()| true)
    }

    /// The proof for a key an older run recorded without one, if the key there can
    /// be shown to be the identity's (TPM: its public area equals the key's public
    /// blob); `None` when it cannot. Changes nothing.
    fn prove(&mut self, uri: &KeyUri) -> Result<Option<OwnedKey>, KeyStoreError> {
        Ok(Some(OwnedKey::new(uri.clone())))
    }

    /// Move a staged key to the live location of `role`, returning its new URI.
    /// Idempotent, so an interrupted move can be finished by the next run.
    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError>;

    /// Called once the key's certificate is final; PKCS#11 stores it as a token object.
    /// Idempotent: calling it again with the same certificate changes nothing.
    fn attach_certificate(&mut self, _uri: &KeyUri, _cert_der: &[u8]) -> Result<(), KeyStoreError> {
        Ok(())
    }

    /// Backend settings to record in the state file, so later runs and `status` find
    /// the keys without flags.
    fn record(&self) -> Backend {
        Backend::File
    }

    /// PKCS#11: the PIN the token accepted and the connector's PIN file, which the
    /// command chooses right after opening ([`choose_pin_file`]); `None` elsewhere.
    fn connector_pin(&mut self) -> Option<&mut ConnectorPin> {
        None
    }

    /// Check what consumers need from the store itself, for `verify`: the check's
    /// name (`verify` shows it as `keystore.<name>`) and its outcome; `None` when
    /// there is nothing to check (PKCS#11 checks the connector's PIN file). Changes
    /// nothing.
    fn check_store(&self) -> Option<(&'static str, Result<String, KeyStoreError>)> {
        None
    }

    /// Check the copies of the key at `uri` that consumers load instead of the key
    /// itself, for `verify`: `None` when there are none (files, PKCS#11), else what was
    /// checked, or why the copies are not that key. Changes nothing.
    fn check_copies(&mut self, _uri: &KeyUri) -> Option<Result<String, KeyStoreError>> {
        None
    }

    /// Check how the key at `uri` was made, for `verify`: `None` when the backend has
    /// nothing to check, else what was checked or what is wrong and how to fix it (a
    /// TPM key from an older run without noDA). Changes nothing.
    fn check_key(&mut self, _uri: &KeyUri) -> Option<Result<String, KeyStoreError>> {
        None
    }
}

/// A key with the proof that it is this tool's (DESIGN §6), as the journal and the
/// state record it: a PKCS#11 key's proof is the random CKA_ID in its URI, a key
/// file's its name (one of a closed set), a TPM key's its Name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedKey {
    pub uri: KeyUri,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_name: Option<TpmName>,
}

impl OwnedKey {
    pub fn new(uri: KeyUri) -> OwnedKey {
        OwnedKey {
            uri,
            tpm_name: None,
        }
    }
}

/// A TPM object's Name: its name algorithm (2 bytes) and the digest of its public
/// area under that algorithm, written as hex. Only an object with the very same
/// public area has it, and a persistent object with our key's public area can only
/// be our key (fixedTPM | fixedParent: it cannot be imported or duplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmName(Vec<u8>);

impl TpmName {
    /// A Name as the TPM returns it: SHA-1, SHA-256, SHA-384 or SHA-512 name algorithm
    /// followed by a digest of that algorithm's size.
    pub fn new(bytes: Vec<u8>) -> Result<TpmName, String> {
        let digest_len = match bytes.get(..2) {
            Some([0x00, 0x04]) => 20,
            Some([0x00, 0x0b]) => 32,
            Some([0x00, 0x0c]) => 48,
            Some([0x00, 0x0d]) => 64,
            _ => return Err("a TPM Name starts with a SHA name algorithm".into()),
        };
        if bytes.len() != 2 + digest_len {
            return Err("a TPM Name's digest has the wrong length".into());
        }
        Ok(TpmName(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for TpmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl Serialize for TpmName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TpmName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex::decode(&s).map_err(|_| serde::de::Error::custom("TPM Name: not hex"))?;
        TpmName::new(bytes).map_err(serde::de::Error::custom)
    }
}

/// How the connector reaches the primary key; the manifest is written from this.
/// Built from the state file alone (see `identity::key_ref`), so `status` never has to
/// open a TPM or log in to a token.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyRef {
    /// A PKCS#8 file in the certificates directory (device path).
    File { key_file: PathBuf },
    /// A persistent TPM key, plus the blobs (device paths) today's connector loads
    /// under the SRK.
    Tpm {
        handle: u32,
        srk: u32,
        pub_blob: PathBuf,
        priv_blob: PathBuf,
    },
    /// A PKCS#11 token object. `pin_file` is the device path of the PIN file the
    /// connector reads; `mounts` are extra host paths a consumer needs (module, token
    /// store, SoftHSM config), mounted at the same path inside the container.
    Pkcs11 {
        uri: Pkcs11Uri,
        module: PathBuf,
        pin_file: PathBuf,
        mounts: Vec<PathBuf>,
    },
}

pub use crate::error::KeyStoreError;

/// Whether a recorded TPM key must carry its Name ([`OwnedKey::tpm_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameRule {
    /// Made by this version, which records the Name as it makes the key.
    Required,
    /// May come from an older run, which recorded none.
    Optional,
}

/// A key named in a journal or state: of `kind`'s backend; in `slot` when one is
/// given (file name, label, handle range); with its Name as `names` says.
pub(crate) fn check_recorded_key(
    kind: KeystoreKind,
    slot: Option<Slot>,
    key: &OwnedKey,
    names: NameRule,
) -> std::result::Result<(), String> {
    let slots: Vec<Slot> = match slot {
        Some(s) => vec![s],
        None => Slot::ALL.to_vec(),
    };
    let uri = &key.uri;
    let fits = match (kind, uri) {
        (KeystoreKind::File, KeyUri::File(p)) => slots.iter().any(|s| *p == file::key_path(*s)),
        (KeystoreKind::Tpm, KeyUri::TpmHandle(h)) => {
            (0x8100_0000..=0x817F_FFFF).contains(h)
                && (key.tpm_name.is_some() || names == NameRule::Optional)
        }
        #[cfg(feature = "pkcs11")]
        (KeystoreKind::Pkcs11, KeyUri::Pkcs11(u)) => {
            slots.iter().any(|s| u.object == s.pkcs11_label())
        }
        _ => false,
    };
    if key.tpm_name.is_some() && kind != KeystoreKind::Tpm {
        return Err(format!("{uri}: only a TPM key has a TPM Name"));
    }
    if fits {
        Ok(())
    } else {
        Err(format!("{uri} is not a {kind} key sdv-provision makes"))
    }
}

/// Convert a keystore failure inside rcgen's `sign` callback. rcgen's error type has no
/// room for a cause, so the cause is logged here rather than dropped silently.
pub fn sign_error(e: KeyStoreError) -> rcgen::Error {
    tracing::error!("signing through the keystore failed: {e}");
    rcgen::Error::RemoteKeyError
}

/// `--keystore auto`: a TPM if a TCTI is configured or `/dev/tpmrm0` exists; else
/// PKCS#11 if a module is configured; else plain files (the caller warns).
pub fn select_auto(config: &KeystoreConfig) -> KeystoreKind {
    if cfg!(feature = "tpm")
        && (config.tpm.tcti.is_some() || std::path::Path::new("/dev/tpmrm0").exists())
    {
        KeystoreKind::Tpm
    } else if cfg!(feature = "pkcs11") && config.pkcs11.module.is_some() {
        KeystoreKind::Pkcs11
    } else {
        KeystoreKind::File
    }
}

/// The commands' step right after [`open`]: a PKCS#11 store's connector PIN file, as
/// `pkcs11::pin_file::choose` decides for `config.purpose` (written where it says
/// so, see `pkcs11::pin_file::settle`). The store only logged in and kept the
/// accepted PIN; other stores have no PIN file.
#[cfg_attr(not(feature = "pkcs11"), allow(unused_variables))]
pub fn choose_pin_file(
    ks: &mut dyn KeyStore,
    config: &Pkcs11Config,
    layout: &crate::paths::Layout,
) -> Result<(), KeyStoreError> {
    #[cfg(feature = "pkcs11")]
    if let Some(login) = ks.connector_pin() {
        if let Some(pin) = login.accepted() {
            let file = pkcs11::pin_file::settle(config, layout, pin)?;
            login.chosen(file);
        }
    }
    Ok(())
}

/// Open the backend.
#[cfg_attr(not(all(feature = "tpm", feature = "pkcs11")), allow(unused_variables))]
pub fn open(
    kind: KeystoreKind,
    config: &KeystoreConfig,
    layout: &crate::paths::Layout,
) -> Result<Box<dyn KeyStore>, KeyStoreError> {
    match kind {
        KeystoreKind::File => Ok(Box::new(file::FileKeyStore::new(layout.clone()))),
        #[cfg(feature = "tpm")]
        KeystoreKind::Tpm => Ok(Box::new(tpm::TpmKeyStore::open(&config.tpm, layout)?)),
        #[cfg(feature = "pkcs11")]
        KeystoreKind::Pkcs11 => Ok(Box::new(pkcs11::Pkcs11KeyStore::open(
            &config.pkcs11,
            layout,
        )?)),
        #[allow(unreachable_patterns)]
        other => Err(KeyStoreError::Unavailable {
            what: format!("this build of sdv-provision has no {other} keystore"),
            hint: "rebuild with the feature enabled, or pass --keystore file".into(),
        }),
    }
}
