//! PKCS#11 keystore: device keys generated in a token, used through its session.
//!
//! - The module is `--pkcs11-module` / `PKCS11_MODULE_PATH`, else the recorded one.
//! - The token is found **by label** (`--pkcs11-token`, default `leda`), never by slot
//!   id: SoftHSM renumbers its slots between processes.
//! - Each identity is three objects that share a label (`device-primary`,
//!   `device-secondary`, `….next` while staged) and a random CKA_ID: a sign-only,
//!   sensitive, non-extractable private key, its public key, and (once final) its
//!   X.509 certificate, so URI-aware consumers (libp11) load key and cert from the token.
//! - The PIN comes from `--pkcs11-pin-file`, `SDV_PROVISION_PKCS11_PIN`, the PIN file
//!   an earlier run recorded, or a hidden prompt; never argv. A wrong PIN is reported
//!   once and never retried: real tokens lock after a few attempts.
//! - Objects are created and destroyed, never rewritten in place (promotion copies,
//!   then destroys): SoftHSM rewrites an object file by truncating it first, so a
//!   process killed mid-update would lose the object (`tests/pkcs11_crash.rs`).
//! - New objects are made as session objects and copied to the token whole
//!   ([`Placement::CopyFromSession`]) where the token can copy: one write per object.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::slice;
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use rcgen::{PublicKeyData, SigningKey};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::{
    ecdsa_raw_to_der, rsa_public_der, sign_error, Algorithm, BackendRecord, DeviceKey, KeyRef,
    KeyStore, KeyStoreError, KeyUri, KeystoreConfig, KeystoreKind, Pkcs11Uri, Role,
};
use crate::fsutil;
use crate::paths::{Layout, CERT_DIR};

/// Token label used when neither a flag nor an earlier run names one.
pub const DEFAULT_TOKEN: &str = "leda";
/// The user PIN, when no `--pkcs11-pin-file` is given.
pub const PIN_ENV: &str = "SDV_PROVISION_PKCS11_PIN";
/// The security officer PIN for `--pkcs11-init-token`, or a file holding it.
pub const SO_PIN_ENV: &str = "SDV_PROVISION_PKCS11_SO_PIN";
pub const SO_PIN_FILE_ENV: &str = "SDV_PROVISION_PKCS11_SO_PIN_FILE";
/// The PIN file the connector reads (`pin-source=file:…`), in the certificates directory.
pub use crate::paths::PKCS11_PIN_FILE as PIN_FILE_NAME;
/// SoftHSM's configuration when `SOFTHSM2_CONF` is not set.
const SOFTHSM_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";

/// DER `ECParameters` (namedCurve OIDs) for the two curves we support.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// DER `DigestInfo` header for SHA-256 (RFC 8017 §9.2, note 1); the 32-byte hash follows.
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
/// How to point the tool at a module.
const MODULE_HINT: &str = "pass --pkcs11-module (or set PKCS11_MODULE_PATH) to the token's \
                           PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so";
/// The object classes that make up one identity.
const IDENTITY_CLASSES: [ObjectClass; 3] = [
    ObjectClass::PRIVATE_KEY,
    ObjectClass::PUBLIC_KEY,
    ObjectClass::CERTIFICATE,
];

/// The live (or staged) object label of a role.
pub fn label(role: Role, staged: bool) -> &'static str {
    match (role, staged) {
        (Role::Primary, false) => "device-primary",
        (Role::Secondary, false) => "device-secondary",
        (Role::Primary, true) => "device-primary.next",
        (Role::Secondary, true) => "device-secondary.next",
    }
}

/// How new objects reach the token's storage.
///
/// `C_GenerateKeyPair` and `C_CreateObject` with `CKA_TOKEN=true` make a token object
/// and then give it its attributes; a token may store each one as it goes. SoftHSM's
/// file store rewrites the object's file once per attribute, truncating it first:
/// about 30 writes per object, and a process killed in between leaves an object
/// without label or CKA_ID that nobody can attribute (`tests/pkcs11_crash.rs`).
/// Making the object in the session (memory) and copying it to the token with
/// `C_CopyObject(CKA_TOKEN=true)` stores it whole, in one write (SoftHSM copies inside
/// one transaction): 19 instead of 175 file rewrites for a provisioning, and about a
/// third of the time with the store on ext4 (`bench/results.md`).
///
/// The copy keeps the key's history: `CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE` and
/// `CKA_NEVER_EXTRACTABLE` stay true (PKCS#11 defines a copy of a locally generated
/// key as local), and the key never leaves the token. Many hardware tokens (OpenSC cards,
/// tpm2-pkcs11, YubiKey PIV) have no session keys or no `C_CopyObject`; they get
/// [`Placement::Direct`], as every token did before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Made as a session object, then copied to the token with `C_CopyObject`.
    CopyFromSession,
    /// Made on the token (`CKA_TOKEN=true`) directly.
    Direct,
}

/// Keys in a PKCS#11 token.
pub struct Pkcs11KeyStore {
    module: PathBuf,
    token: String,
    /// One logged-in read/write session for the store's lifetime. Behind a `Mutex`
    /// because rcgen signs through `&self` while a PKCS#11 session may run only one
    /// operation at a time (`Session` is `Send` but not `Sync`; parsec's PKCS#11
    /// provider guards its sessions the same way).
    session: Mutex<Session>,
    /// Device path of the PIN file the connector reads.
    pin_file: PathBuf,
    /// Extra host paths a containerised consumer needs (SoftHSM's token store and
    /// config); the module itself is added by the manifest code.
    mounts: Vec<PathBuf>,
    /// How new objects are made; probed at the first write (status and verify never
    /// write, so they never probe).
    placement: Option<Placement>,
}

impl Pkcs11KeyStore {
    /// Load the module, find the token by label (initialising a blank one with
    /// `--pkcs11-init-token`), log in, and make sure the connector's PIN file holds
    /// the PIN the token just accepted.
    ///
    /// The PIN file is written here, right after a successful login, because:
    /// - only a PIN the token has accepted ever reaches a file, so a typo never ends
    ///   up in the connector's configuration and a wrong PIN writes nothing;
    /// - it is in place before any key exists, so a run killed at any later step never
    ///   leaves a manifest whose `pin-source` names a missing file;
    /// - it is rewritten only when its content differs, so a re-run changes nothing,
    ///   while a PIN changed on the token is picked up by the next run.
    ///
    /// It is not written when the user's `--pkcs11-pin-file` already lies inside the
    /// certificates directory: the connector then reads that file.
    pub fn open(config: &KeystoreConfig, layout: &Layout) -> Result<Pkcs11KeyStore, KeyStoreError> {
        let module = config
            .pkcs11_module
            .clone()
            .or_else(|| config.recorded.pkcs11_module.clone())
            .ok_or_else(|| KeyStoreError::Unavailable {
                what: "no PKCS#11 module configured".into(),
                hint: MODULE_HINT.into(),
            })?;
        let token = config
            .pkcs11_token
            .clone()
            .or_else(|| config.recorded.pkcs11_token.clone())
            .unwrap_or_else(|| DEFAULT_TOKEN.to_owned());
        let ctx = load_module(&module)?;

        // The token's state is checked before the PIN is asked for, and the PIN is
        // asked for once, also when a blank token is initialised with it.
        let (slot, pin) = match find_token(&ctx, &module, &token)? {
            Ok(slot) => {
                check_user_pin_state(&ctx, slot, &token)?;
                (slot, user_pin(config, layout, &token)?)
            }
            Err(_) if config.pkcs11_init_token => {
                let pin = user_pin(config, layout, &token)?;
                init_token(&ctx, &module, &token, &pin)?;
                let slot = find_token(&ctx, &module, &token)?
                    .map_err(|labels| not_found(&module, &token, &labels))?;
                (slot, pin)
            }
            Err(labels) => return Err(not_found(&module, &token, &labels)),
        };
        let session = ctx.open_rw_session(slot).map_err(|e| match e {
            CkError::Pkcs11(RvError::TokenWriteProtected, _) => KeyStoreError::Rejected {
                what: format!(
                    "PKCS#11 token {token} is write-protected ({})",
                    describe(&e)
                ),
                hint: "make the token writable, or choose another one with --pkcs11-token".into(),
            },
            e => ck(format!("open a session on PKCS#11 token {token}"), e),
        })?;
        login(&session, &token, &pin)?;

        let pin_file = connector_pin_file(config, layout, &pin)?;
        let mounts = consumer_mounts(&ctx);
        Ok(Pkcs11KeyStore {
            module,
            token,
            session: Mutex::new(session),
            pin_file,
            mounts,
            placement: None,
        })
    }

    /// Choose how new objects are made instead of probing the token. The tests use
    /// it to take, on SoftHSM, the path of tokens that cannot copy objects.
    pub fn set_placement(&mut self, placement: Placement) {
        self.placement = Some(placement);
    }

    /// How new objects are made on this token: probed once, with a session data
    /// object that is created, copied and destroyed (nothing reaches the token).
    pub fn placement(&mut self) -> Placement {
        if let Some(p) = self.placement {
            return p;
        }
        let p = probe_placement(self.session());
        tracing::debug!(placement = ?p, "PKCS#11 object placement");
        self.placement = Some(p);
        p
    }

    /// Make objects with `make(on_token)` so that they end up on the token, each
    /// stored whole where the token allows it (see [`Placement`]). `make(false)` must
    /// create session objects, `make(true)` the same objects on the token.
    ///
    /// A token that refuses the copy (although its probe passed) is switched to
    /// [`Placement::Direct`] and the objects are made again on the token. Session
    /// objects are always destroyed here; a killed process loses them with its
    /// session, so they never outlive the run.
    fn make_on_token(
        &mut self,
        step: &str,
        make: impl Fn(&Session, bool) -> Result<Vec<ObjectHandle>, CkError>,
    ) -> Result<Vec<ObjectHandle>, KeyStoreError> {
        let token = self.token.clone();
        let placement = self.placement();
        let session = self.session();
        if placement == Placement::CopyFromSession {
            let made = match make(session, false) {
                Ok(made) => made,
                Err(e) if copy_refused(&e) => {
                    // No session keys on this token (the probe used a data object).
                    tracing::debug!(
                        "token {token}: {}; making objects on the token",
                        describe(&e)
                    );
                    self.placement = Some(Placement::Direct);
                    return make(self.session(), true).map_err(|e| write_error(step, &token, e));
                }
                Err(e) => return Err(write_error(step, &token, e)),
            };
            let mut copies = Vec::with_capacity(made.len());
            let mut refused = None;
            for &h in &made {
                match session.copy_object(h, &[Attribute::Token(true)]) {
                    Ok(c) => copies.push(c),
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            destroy_all(session, &made);
            match refused {
                None => return Ok(copies),
                Some(e) => {
                    destroy_all(session, &copies);
                    if !copy_refused(&e) {
                        return Err(write_error(step, &token, e));
                    }
                    tracing::debug!(
                        "token {token} cannot copy objects to the token ({}): making them there",
                        describe(&e)
                    );
                    self.placement = Some(Placement::Direct);
                }
            }
        }
        make(self.session(), true).map_err(|e| write_error(step, &token, e))
    }

    /// The token label this store works on.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// How a consumer reaches the key at `uri`: the same [`KeyRef`] the manifest code
    /// builds from [`KeyStore::record`] and the state file.
    pub fn key_ref(&self, uri: &KeyUri) -> Result<KeyRef, KeyStoreError> {
        Ok(KeyRef::Pkcs11 {
            uri: self.uri(uri)?.clone(),
            module: self.module.clone(),
            pin_file: self.pin_file.clone(),
            mounts: self.mounts.clone(),
        })
    }

    fn uri<'u>(&self, uri: &'u KeyUri) -> Result<&'u Pkcs11Uri, KeyStoreError> {
        match uri {
            KeyUri::Pkcs11(u) if u.token == self.token => Ok(u),
            other => Err(KeyStoreError::ForeignUri(other.to_string())),
        }
    }

    fn session(&mut self) -> &Session {
        self.session.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl KeyStore for Pkcs11KeyStore {
    fn kind(&self) -> KeystoreKind {
        KeystoreKind::Pkcs11
    }

    fn plan(&mut self, role: Role, staged: bool) -> Result<KeyUri, KeyStoreError> {
        let label = label(role, staged);
        let token = self.token.clone();
        ensure_free(self.session(), &token, label)?;
        let id = random_id()?;
        Ok(KeyUri::Pkcs11(Pkcs11Uri {
            token,
            object: label.to_owned(),
            id,
        }))
    }

    fn generate(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let u = self.uri(uri)?.clone();
        ensure_free(self.session(), &u.token, &u.object)?;
        let common = |private: bool| {
            vec![
                Attribute::Private(private),
                Attribute::Label(u.object.as_bytes().to_vec()),
                Attribute::Id(u.id.clone()),
            ]
        };
        let mut public = common(false);
        public.extend([
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
        ]);
        let mut private = common(true);
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::SignRecover(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]);
        let mechanism = if alg.is_rsa() {
            public.extend([
                Attribute::ModulusBits((alg.bits() as u64).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ]);
            Mechanism::RsaPkcsKeyPairGen
        } else {
            public.push(Attribute::EcParams(ec_params(alg).to_vec()));
            Mechanism::EccKeyPairGen
        };
        let step = format!("generate the {alg} key pair {}", u.object);
        let made = self.make_on_token(&step, |session, on_token| {
            let with = |t: &[Attribute]| {
                let mut t = t.to_vec();
                t.push(Attribute::Token(on_token));
                t
            };
            let (pub_h, priv_h) =
                session.generate_key_pair(&mechanism, &with(&public), &with(&private))?;
            Ok(vec![priv_h, pub_h])
        })?;
        let [priv_h, pub_h] = made[..] else {
            unreachable!("a key pair is two objects")
        };
        let session = self.session();
        // The pair exists now: any failure from here on destroys it (no orphans).
        match public_der(session, pub_h, alg) {
            Ok(der) => Ok(Box::new(Pkcs11Key {
                session: &self.session,
                private: priv_h,
                public_der: der,
                alg,
                uri: uri.clone(),
            })),
            Err(e) => {
                destroy_all(session, &[priv_h, pub_h]);
                Err(e)
            }
        }
    }

    fn open(&mut self, uri: &KeyUri) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let u = self.uri(uri)?.clone();
        let session = self.session();
        let not_found = || KeyStoreError::NotFound {
            uri: uri.to_string(),
        };
        let template = identity_template(&u.object, &u.id, ObjectClass::PRIVATE_KEY);
        let private = match find(session, &template)?[..] {
            [] => return Err(not_found()),
            [h] => h,
            _ => {
                return Err(KeyStoreError::Rejected {
                    what: format!("token {} holds several private keys for {uri}", u.token),
                    hint: "remove the duplicates (pkcs11-tool --delete-object), \
                           or run `sdv-provision reset`"
                        .into(),
                })
            }
        };
        let alg = key_algorithm(session, private).map_err(|e| match e {
            KeyStoreError::Rejected { what, hint } => KeyStoreError::Rejected {
                what: format!("{uri}: {what}"),
                hint,
            },
            e => e,
        })?;
        let public_der = match find(
            session,
            &identity_template(&u.object, &u.id, ObjectClass::PUBLIC_KEY),
        )?[..]
        {
            [h, ..] => public_der(session, h, alg)?,
            [] => {
                return Err(KeyStoreError::Rejected {
                    what: format!(
                        "token {} has the private key of {uri} but not its public key object",
                        u.token
                    ),
                    hint: "run `sdv-provision provision --force` to make a new identity".into(),
                })
            }
        };
        Ok(Box::new(Pkcs11Key {
            session: &self.session,
            private,
            public_der,
            alg,
            uri: uri.clone(),
        }))
    }

    fn remove(&mut self, uri: &KeyUri) -> Result<(), KeyStoreError> {
        let u = self.uri(uri)?.clone();
        let session = self.session();
        for class in IDENTITY_CLASSES {
            for h in find(session, &identity_template(&u.object, &u.id, class))? {
                session.destroy_object(h).map_err(|e| {
                    write_error(&format!("remove the objects of {uri}"), &u.token, e)
                })?;
            }
        }
        Ok(())
    }

    /// Move the staged objects to the live label, keeping their CKA_ID. Like the file
    /// keystore's rename, the move *replaces* what is at the destination: objects with
    /// the live label and another CKA_ID (the previous key of that role) are destroyed
    /// last, once the new ones carry the live label.
    ///
    /// Each object is **copied** under the live label (`C_CopyObject`) and the staged
    /// one destroyed, rather than relabelled in place (`C_SetAttributeValue`): a token
    /// that rewrites an object file non-atomically (SoftHSM truncates, then writes)
    /// loses the object if the process dies mid-update, while a copy is a new object and
    /// a destroy is an unlink. Every step is idempotent: for each class, the staged
    /// object, its live copy, or both exist at every instant, and a re-run finishes
    /// the move. Tokens that cannot copy ([`Placement::Direct`], or a refused copy)
    /// get the staged objects relabelled in place.
    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError> {
        let u = self.uri(from)?.clone();
        let live = label(role, false);
        let to = KeyUri::Pkcs11(Pkcs11Uri {
            token: u.token.clone(),
            object: live.to_owned(),
            id: u.id.clone(),
        });
        let copies = self.placement() == Placement::CopyFromSession;
        let session = self.session();
        let step = format!("move {} to {live}", u.object);
        let live_label = Attribute::Label(live.as_bytes().to_vec());
        if u.object != live {
            for class in IDENTITY_CLASSES {
                let staged = find(session, &identity_template(&u.object, &u.id, class))?;
                let Some(&first) = staged.first() else {
                    continue;
                };
                if find(session, &identity_template(live, &u.id, class))?.is_empty() {
                    // A token that cannot copy gets the staged objects relabelled in
                    // place instead.
                    match copies.then(|| session.copy_object(first, slice::from_ref(&live_label))) {
                        Some(Ok(_)) => {}
                        Some(Err(e)) if !copy_refused(&e) => {
                            return Err(write_error(&step, &u.token, e))
                        }
                        _ => {
                            for h in &staged {
                                session
                                    .update_attributes(*h, slice::from_ref(&live_label))
                                    .map_err(|e| write_error(&step, &u.token, e))?;
                            }
                            continue;
                        }
                    }
                }
                for h in staged {
                    session
                        .destroy_object(h)
                        .map_err(|e| write_error(&step, &u.token, e))?;
                }
            }
        }
        if find(
            session,
            &identity_template(live, &u.id, ObjectClass::PRIVATE_KEY),
        )?
        .is_empty()
        {
            return Err(KeyStoreError::NotFound {
                uri: from.to_string(),
            });
        }
        for class in IDENTITY_CLASSES {
            for h in find(session, &[Attribute::Class(class), live_label.clone()])? {
                if object_id(session, h)?.as_deref() != Some(&u.id[..]) {
                    session
                        .destroy_object(h)
                        .map_err(|e| write_error(&step, &u.token, e))?;
                }
            }
        }
        Ok(to)
    }

    /// Store (or replace) the certificate object next to the key, same label and
    /// CKA_ID. The new object is created before the old one is destroyed, so a failure
    /// never leaves the key without a certificate it had.
    fn attach_certificate(&mut self, uri: &KeyUri, cert_der: &[u8]) -> Result<(), KeyStoreError> {
        use der::{Decode, Encode};
        let u = self.uri(uri)?.clone();
        let cert = x509_cert::Certificate::from_der(cert_der).map_err(|e| {
            KeyStoreError::backend("parse the certificate for the token", e.to_string())
        })?;
        let enc = |r: der::Result<Vec<u8>>| {
            r.map_err(|e| KeyStoreError::backend("encode certificate fields", e.to_string()))
        };
        let tbs = &cert.tbs_certificate;
        let template = [
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Private(false),
            Attribute::Label(u.object.as_bytes().to_vec()),
            Attribute::Id(u.id.clone()),
            Attribute::Subject(enc(tbs.subject.to_der())?),
            Attribute::Issuer(enc(tbs.issuer.to_der())?),
            Attribute::SerialNumber(enc(tbs.serial_number.to_der())?),
            Attribute::Value(cert_der.to_vec()),
        ];
        let old = find(
            self.session(),
            &identity_template(&u.object, &u.id, ObjectClass::CERTIFICATE),
        )?;
        let step = format!("store the certificate of {}", u.object);
        self.make_on_token(&step, |session, on_token| {
            let mut t = template.to_vec();
            t.push(Attribute::Token(on_token));
            Ok(vec![session.create_object(&t)?])
        })?;
        let session = self.session();
        for h in old {
            session
                .destroy_object(h)
                .map_err(|e| write_error(&step, &u.token, e))?;
        }
        Ok(())
    }

    fn record(&self) -> BackendRecord {
        BackendRecord {
            pkcs11_module: Some(self.module.clone()),
            pkcs11_token: Some(self.token.clone()),
            pkcs11_pin_file: Some(self.pin_file.clone()),
            mounts: self.mounts.clone(),
            ..BackendRecord::default()
        }
    }
}

/// A key in the token. Signing runs through the store's session.
struct Pkcs11Key<'a> {
    session: &'a Mutex<Session>,
    private: ObjectHandle,
    /// PKCS#1 `RSAPublicKey` DER, or the uncompressed EC point: what rcgen's
    /// `der_bytes` takes.
    public_der: Vec<u8>,
    alg: Algorithm,
    uri: KeyUri,
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
        let digest = self.alg.digest(msg);
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let step = format!("sign with {}", self.uri);
        if self.alg.is_rsa() {
            // Our RSA certificates are always sha256WithRSAEncryption (Algorithm::rcgen).
            if digest.len() != 32 {
                return Err(KeyStoreError::backend(
                    step,
                    "RSA signing expects a SHA-256 digest",
                ));
            }
            let mut info = SHA256_DIGEST_INFO.to_vec();
            info.extend_from_slice(&digest);
            session
                .sign(&Mechanism::RsaPkcs, self.private, &info)
                .map_err(|e| ck(step, e))
        } else {
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
}

/// Modules loaded by this process, initialised once and never finalised.
///
/// `C_Initialize` may run only once per module and process, and `C_Finalize` would
/// end every other user's sessions; a module is therefore loaded on first use and
/// kept (the process exit cleans up). A module some other code in the process already
/// initialised (`CKR_CRYPTOKI_ALREADY_INITIALIZED`) is shared, not an error.
fn load_module(path: &Path) -> Result<Pkcs11, KeyStoreError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let hint = MODULE_HINT;
    if !path.is_file() {
        return Err(KeyStoreError::Unavailable {
            what: format!("PKCS#11 module {} does not exist", path.display()),
            hint: hint.into(),
        });
    }
    let ctx = Pkcs11::new(path).map_err(|e| KeyStoreError::Unavailable {
        what: format!(
            "{} is not a PKCS#11 module ({})",
            path.display(),
            describe(&e)
        ),
        hint: hint.into(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KeyStoreError::Unavailable {
                what: format!(
                    "PKCS#11 module {} failed to start ({})",
                    path.display(),
                    describe(&e)
                ),
                hint: "check the module's configuration \
                       (for SoftHSM: SOFTHSM2_CONF and its directories.tokendir)"
                    .into(),
            })
        }
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The slot holding the initialised token labelled `token`, or the labels found.
fn find_token(
    ctx: &Pkcs11,
    module: &Path,
    token: &str,
) -> Result<Result<Slot, Vec<String>>, KeyStoreError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| ck(format!("list the tokens of {}", module.display()), e))?;
    let mut labels = Vec::new();
    let mut found = None;
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        if info.label() == token {
            if found.is_some() {
                tracing::warn!("several tokens are labelled {token}; using the first");
            } else {
                found = Some(slot);
            }
        }
        labels.push(info.label().to_owned());
    }
    Ok(found.ok_or(labels))
}

fn not_found(module: &Path, token: &str, labels: &[String]) -> KeyStoreError {
    let found = if labels.is_empty() {
        "it has no initialised tokens".to_owned()
    } else {
        format!("tokens found: {}", labels.join(", "))
    };
    KeyStoreError::Unavailable {
        what: format!(
            "no PKCS#11 token labelled {token} in {} ({found})",
            module.display()
        ),
        hint: format!(
            "pass --pkcs11-token with one of those labels, or --pkcs11-init-token to \
             initialise a blank slot as {token} (SO PIN from {SO_PIN_ENV} or {SO_PIN_FILE_ENV})"
        ),
    }
}

/// Initialise the first blank slot as `token` and set the user PIN. Only a slot whose
/// token reports "not initialised" is touched: re-initialising a token wipes it.
fn init_token(
    ctx: &Pkcs11,
    module: &Path,
    token: &str,
    user_pin: &SecretString,
) -> Result<(), KeyStoreError> {
    if token.is_empty() || token.len() > 32 {
        return Err(KeyStoreError::Rejected {
            what: format!("token label {token:?} is not 1 to 32 bytes long"),
            hint: "pass a shorter --pkcs11-token".into(),
        });
    }
    let so_pin = so_pin()?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| ck(format!("list the tokens of {}", module.display()), e))?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| KeyStoreError::Unavailable {
            what: format!(
                "{} has no blank slot to initialise as {token}",
                module.display()
            ),
            hint: "free a slot, or pass --pkcs11-token with an existing token's label".into(),
        })?;
    ctx.init_token(slot, &so_pin, token).map_err(|e| match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => KeyStoreError::Rejected {
            what: format!(
                "the SO PIN was rejected while initialising token {token} ({})",
                describe(&e)
            ),
            hint: format!(
                "check {SO_PIN_ENV} / {SO_PIN_FILE_ENV}; not retried, because tokens lock"
            ),
        },
        e => ck(format!("initialise token {token}"), e),
    })?;
    // SoftHSM moves a freshly initialised token to a new slot id: look it up again.
    let slot =
        find_token(ctx, module, token)?.map_err(|labels| not_found(module, token, &labels))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| ck(format!("open a session on new token {token}"), e))?;
    session
        .login(UserType::So, Some(&so_pin))
        .map_err(|e| ck(format!("log in as SO to new token {token}"), e))?;
    session
        .init_pin(user_pin)
        .map_err(|e| ck(format!("set the user PIN of new token {token}"), e))?;
    session
        .logout()
        .map_err(|e| ck(format!("log out of new token {token}"), e))?;
    tracing::info!("initialised PKCS#11 token {token}");
    Ok(())
}

/// A locked or unset user PIN is reported before any PIN is asked for or tried.
fn check_user_pin_state(ctx: &Pkcs11, slot: Slot, token: &str) -> Result<(), KeyStoreError> {
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| ck(format!("read the state of PKCS#11 token {token}"), e))?;
    if info.user_pin_locked() {
        return Err(pin_locked(token));
    }
    if !info.user_pin_initialized() {
        return Err(KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} has no user PIN yet"),
            hint: "set one (e.g. `pkcs11-tool --login --login-type so --init-pin`), \
                   or initialise a blank token with --pkcs11-init-token"
                .into(),
        });
    }
    if info.user_pin_final_try() {
        tracing::warn!("PKCS#11 token {token}: one more wrong PIN locks it");
    }
    Ok(())
}

fn login(session: &Session, token: &str, pin: &SecretString) -> Result<(), KeyStoreError> {
    match session.login(UserType::User, Some(pin)) {
        // Login state is per process and token: another session of ours is logged in.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e @ CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(KeyStoreError::Rejected {
            what: format!(
                "the PIN was rejected by PKCS#11 token {token} ({})",
                describe(&e)
            ),
            hint: format!(
                "check --pkcs11-pin-file / {PIN_ENV}; sdv-provision does not retry, \
                 because tokens lock after a few wrong PINs"
            ),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(pin_locked(token)),
        Err(e @ CkError::Pkcs11(RvError::PinLenRange | RvError::PinInvalid, _)) => {
            Err(KeyStoreError::Rejected {
                what: format!(
                    "PKCS#11 token {token} does not accept a PIN of this form ({})",
                    describe(&e)
                ),
                hint: format!(
                    "check --pkcs11-pin-file / {PIN_ENV} \
                     (one trailing newline in the file is ignored)"
                ),
            })
        }
        Err(e) => Err(ck(format!("log in to PKCS#11 token {token}"), e)),
    }
}

fn pin_locked(token: &str) -> KeyStoreError {
    KeyStoreError::Rejected {
        what: format!(
            "the user PIN of PKCS#11 token {token} is locked after too many wrong attempts"
        ),
        hint: "unlock it with the SO PIN (e.g. `pkcs11-tool --login --login-type so --init-pin`) \
               or re-initialise the token"
            .into(),
    }
}

/// The user PIN: `--pkcs11-pin-file`, else `SDV_PROVISION_PKCS11_PIN`, else the PIN
/// file an earlier run recorded, else a hidden prompt (interactive runs only).
fn user_pin(
    config: &KeystoreConfig,
    layout: &Layout,
    token: &str,
) -> Result<SecretString, KeyStoreError> {
    if let Some(path) = &config.pkcs11_pin_file {
        return read_pin_file(path, "--pkcs11-pin-file");
    }
    if let Some(pin) = std::env::var_os(PIN_ENV) {
        // Bytes first, so a non-UTF-8 value is zeroized too (into_string's error
        // would drop it as it is).
        let bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(pin));
        let pin = std::str::from_utf8(&bytes).map_err(|_| KeyStoreError::Rejected {
            what: format!("{PIN_ENV} is not valid UTF-8"),
            hint: "set it to the token's user PIN".into(),
        })?;
        if pin.is_empty() {
            return Err(KeyStoreError::Rejected {
                what: format!("{PIN_ENV} is empty"),
                hint: "set it to the token's user PIN, or use --pkcs11-pin-file".into(),
            });
        }
        return Ok(SecretString::from(pin));
    }
    if let Some(recorded) = &config.recorded.pkcs11_pin_file {
        let host = layout.host(recorded);
        if host.is_file() {
            return read_pin_file(&host, "--pkcs11-pin-file");
        }
    }
    if config.interactive {
        let pin = Zeroizing::new(
            dialoguer::Password::new()
                .with_prompt(format!("User PIN of PKCS#11 token {token}"))
                .interact()
                .map_err(|e| KeyStoreError::backend("read the PIN", e.to_string()))?,
        );
        // Copied, not moved: SecretString::from(String) shrinks the buffer into a
        // Box<str>, which can reallocate and leave the typed PIN in freed memory.
        return Ok(SecretString::from(pin.as_str()));
    }
    Err(KeyStoreError::Unavailable {
        what: format!(
            "the user PIN of PKCS#11 token {token} is needed but the run is non-interactive"
        ),
        hint: format!("pass --pkcs11-pin-file FILE or set {PIN_ENV}"),
    })
}

/// SO PIN for `--pkcs11-init-token`: env, or a file named by env. Never argv.
fn so_pin() -> Result<SecretString, KeyStoreError> {
    if let Some(pin) = std::env::var_os(SO_PIN_ENV) {
        let bytes = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(pin));
        if let Ok(pin) = std::str::from_utf8(&bytes) {
            if !pin.is_empty() {
                return Ok(SecretString::from(pin));
            }
        }
    }
    if let Some(path) = std::env::var_os(SO_PIN_FILE_ENV) {
        return read_pin_file(Path::new(&path), SO_PIN_FILE_ENV);
    }
    Err(KeyStoreError::Unavailable {
        what: "--pkcs11-init-token needs the token's security officer (SO) PIN".into(),
        hint: format!("set {SO_PIN_ENV}, or {SO_PIN_FILE_ENV} to a file holding it"),
    })
}

/// Read a PIN file, dropping one trailing newline. The bytes are zeroized on drop.
fn read_pin_file(path: &Path, flag: &str) -> Result<SecretString, KeyStoreError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| KeyStoreError::Unavailable {
        what: format!("cannot read PIN file {} ({e})", path.display()),
        hint: format!("pass {flag} with a readable file holding the PIN"),
    })?);
    let mut pin: &[u8] = &bytes;
    if let Some(p) = pin.strip_suffix(b"\n") {
        pin = p.strip_suffix(b"\r").unwrap_or(p);
    }
    let text = std::str::from_utf8(pin).map_err(|_| KeyStoreError::Rejected {
        what: format!("PIN file {} is not UTF-8 text", path.display()),
        hint: format!("write the PIN as text into the file named by {flag}"),
    })?;
    if text.is_empty() {
        return Err(KeyStoreError::Rejected {
            what: format!("PIN file {} is empty", path.display()),
            hint: format!("write the PIN into the file named by {flag}"),
        });
    }
    Ok(SecretString::from(text))
}

/// Device path of the PIN file the connector reads; writes `<certdir>/pkcs11.pin`
/// (0600, atomically, only when it differs) unless the user's PIN file already lies in
/// the certificates directory.
fn connector_pin_file(
    config: &KeystoreConfig,
    layout: &Layout,
    pin: &SecretString,
) -> Result<PathBuf, KeyStoreError> {
    if let Some(user) = &config.pkcs11_pin_file {
        if let Some(device) = inside_cert_dir(layout, user) {
            return Ok(device);
        }
    }
    let host = layout.host_cert_file(PIN_FILE_NAME);
    let want = pin.expose_secret().as_bytes();
    let current = fsutil::read_optional(&host)
        .map_err(|e| KeyStoreError::backend("read the connector's PIN file", e.to_string()))?
        .map(Zeroizing::new);
    if current.as_deref().map(|c| &c[..]) != Some(want) {
        fsutil::atomic_write(&host, want, fsutil::SECRET)
            .map_err(|e| KeyStoreError::backend("write the connector's PIN file", e.to_string()))?;
    }
    Ok(Layout::cert_file(PIN_FILE_NAME))
}

/// The device path of `host_path` if it lies inside the certificates directory.
fn inside_cert_dir(layout: &Layout, host_path: &Path) -> Option<PathBuf> {
    let dir = layout.host_cert_dir();
    let rel = host_path
        .strip_prefix(&dir)
        .ok()
        .map(Path::to_owned)
        .or_else(|| {
            let (d, p) = (dir.canonicalize().ok()?, host_path.canonicalize().ok()?);
            p.strip_prefix(d).ok().map(Path::to_owned)
        })?;
    (!rel.as_os_str().is_empty()).then(|| Path::new(CERT_DIR).join(rel))
}

/// Host paths a consumer in a container needs besides the module: for SoftHSM, its
/// configuration file and token directory (mounted at the same paths).
fn consumer_mounts(ctx: &Pkcs11) -> Vec<PathBuf> {
    let is_softhsm = ctx
        .get_library_info()
        .is_ok_and(|i| i.manufacturer_id().contains("SoftHSM"));
    if !is_softhsm {
        return Vec::new();
    }
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SOFTHSM_DEFAULT_CONF));
    let mut mounts = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&conf) {
        if let Some(dir) = text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "directories.tokendir").then(|| v.trim().to_owned())
        }) {
            mounts.push(PathBuf::from(dir.trim_end_matches('/')));
        }
    }
    mounts.push(conf);
    mounts
}

/// A fresh random 16-byte CKA_ID. It only has to be unique: the URI names the key by
/// label *and* id, and a staged key must never be mistaken for the live one.
fn random_id() -> Result<Vec<u8>, KeyStoreError> {
    let mut id = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut id)
        .map_err(|_| KeyStoreError::backend("make a random CKA_ID", "no randomness available"))?;
    Ok(id)
}

/// Can this token copy objects? A session data object is made, copied and destroyed;
/// any failure means [`Placement::Direct`].
fn probe_placement(session: &Session) -> Placement {
    let probe = [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Label(b"sdv-provision probe".to_vec()),
    ];
    let Ok(h) = session.create_object(&probe) else {
        return Placement::Direct;
    };
    let placement = match session.copy_object(h, &[Attribute::Token(false)]) {
        Ok(copy) => {
            destroy_all(session, &[copy]);
            Placement::CopyFromSession
        }
        Err(_) => Placement::Direct,
    };
    destroy_all(session, &[h]);
    placement
}

/// The errors of a token that does not copy objects (or not to the token).
fn copy_refused(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::FunctionNotSupported
                | RvError::ActionProhibited
                | RvError::AttributeReadOnly
                | RvError::AttributeValueInvalid
                | RvError::TemplateInconsistent,
            _,
        )
    )
}

/// Destroy objects we made, on a path that already failed or no longer needs them;
/// a failure here is logged, not returned (the first error is the one to report).
fn destroy_all(session: &Session, handles: &[ObjectHandle]) {
    for &h in handles {
        if let Err(e) = session.destroy_object(h) {
            tracing::error!(
                "cleanup: cannot destroy an object we made: {}",
                describe(&e)
            );
        }
    }
}

/// `plan`/`generate` refuse a label something already uses.
fn ensure_free(session: &Session, token: &str, label: &str) -> Result<(), KeyStoreError> {
    let taken = find(session, &[Attribute::Label(label.as_bytes().to_vec())])?;
    if taken.is_empty() {
        Ok(())
    } else {
        Err(KeyStoreError::Occupied {
            what: format!(
                "label {label} in PKCS#11 token {token} ({} object(s))",
                taken.len()
            ),
            hint: "choose another token with --pkcs11-token, delete those objects \
                   (pkcs11-tool --delete-object), or run `sdv-provision reset` if an \
                   earlier run left them"
                .into(),
        })
    }
}

fn identity_template(label: &str, id: &[u8], class: ObjectClass) -> [Attribute; 3] {
    [
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

fn find(session: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, KeyStoreError> {
    session
        .find_objects(template)
        .map_err(|e| ck("search the token", e))
}

fn object_id(session: &Session, h: ObjectHandle) -> Result<Option<Vec<u8>>, KeyStoreError> {
    let attrs = session
        .get_attributes(h, &[AttributeType::Id])
        .map_err(|e| ck("read CKA_ID", e))?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::Id(id) => Some(id),
        _ => None,
    }))
}

fn ec_params(alg: Algorithm) -> &'static [u8] {
    match alg {
        Algorithm::EcdsaP384 => P384_PARAMS,
        _ => P256_PARAMS,
    }
}

/// Which of our algorithms a private key is, from its own attributes.
fn key_algorithm(session: &Session, key: ObjectHandle) -> Result<Algorithm, KeyStoreError> {
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
        hint: "supported: rsa-2048, rsa-3072, ecdsa-p256, ecdsa-p384; \
               run `sdv-provision provision --force`"
            .into(),
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
fn public_der(
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

/// A failed PKCS#11 call, keeping cryptoki's cause (the function and return value).
fn ck(step: impl Into<String>, e: CkError) -> KeyStoreError {
    KeyStoreError::backend(step, describe(&e))
}

/// Like [`ck`] for calls that write to the token (`step` says what was being done,
/// e.g. "generate an ecdsa-p256 key pair"): storage errors get a hint.
fn write_error(step: &str, token: &str, e: CkError) -> KeyStoreError {
    let cause = describe(&e);
    match e {
        CkError::Pkcs11(RvError::DeviceMemory, _) => KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} is full: cannot {step} ({cause})"),
            hint: "remove unused objects from the token, or use another token".into(),
        },
        CkError::Pkcs11(RvError::TokenWriteProtected, _) => KeyStoreError::Rejected {
            what: format!("PKCS#11 token {token} is write-protected: cannot {step} ({cause})"),
            hint: "make the token writable, or choose another one with --pkcs11-token".into(),
        },
        CkError::Pkcs11(
            RvError::GeneralError | RvError::DeviceError | RvError::FunctionFailed,
            _,
        ) => KeyStoreError::Rejected {
            what: format!(
                "PKCS#11 token {token} could not store the change: cannot {step} ({cause})"
            ),
            hint: "check that the token's storage is writable and not full \
                   (SoftHSM: directories.tokendir in SOFTHSM2_CONF)"
                .into(),
        },
        e => ck(format!("{step} in PKCS#11 token {token}"), e),
    }
}

/// `C_Login: CKR_PIN_INCORRECT` — short, and greppable against the PKCS#11 spec.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => {
            format!(
                "C_{function:?}: CKR_{}",
                screaming_snake(&format!("{rv:?}"))
            )
        }
        other => other.to_string(),
    }
}

fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_cryptoki_errors_by_spec_name() {
        let e = CkError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login);
        assert_eq!(describe(&e), "C_Login: CKR_PIN_INCORRECT");
        let e = CkError::Pkcs11(
            RvError::TokenWriteProtected,
            cryptoki::context::Function::GenerateKeyPair,
        );
        assert_eq!(describe(&e), "C_GenerateKeyPair: CKR_TOKEN_WRITE_PROTECTED");
    }

    #[test]
    fn random_ids_differ() {
        let (a, b) = (random_id().unwrap(), random_id().unwrap());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn labels() {
        assert_eq!(label(Role::Primary, false), "device-primary");
        assert_eq!(label(Role::Secondary, true), "device-secondary.next");
    }

    #[test]
    fn pin_file_inside_cert_dir() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let inside = layout.host_cert_file("my.pin");
        assert_eq!(
            inside_cert_dir(&layout, &inside),
            Some(PathBuf::from("/data/var/certificates/my.pin"))
        );
        assert_eq!(inside_cert_dir(&layout, &d.path().join("etc/pin")), None);
        assert_eq!(inside_cert_dir(&layout, &layout.host_cert_dir()), None);
    }

    #[test]
    fn pin_file_strips_one_newline() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pin");
        for (content, want) in [
            ("1234\n", "1234"),
            ("1234\r\n", "1234"),
            ("12 34\n\n", "12 34\n"),
            ("1234", "1234"),
        ] {
            std::fs::write(&p, content).unwrap();
            assert_eq!(read_pin_file(&p, "--x").unwrap().expose_secret(), want);
        }
        std::fs::write(&p, "\n").unwrap();
        assert!(read_pin_file(&p, "--x").is_err());
    }
}
