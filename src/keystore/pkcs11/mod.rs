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
//! - Objects are made directly on the token (`CKA_TOKEN=true`), the path every token
//!   supports, and found and removed by CKA_ID plus label, never by label alone: an
//!   object someone else made under one of our labels is not ours. A label is not a
//!   lock either: a foreign object under it neither blocks a run nor is touched.
//! - Promotion copies the staged objects under the live label (`C_CopyObject`), then
//!   destroys the staged ones: each step leaves a complete set under one label or the
//!   other, so a killed move is finished by the next run. A token without
//!   `C_CopyObject` gets the label changed in place.
//!
//! Here: the store, its objects and their errors. `token` loads the module and finds
//! the token, `pin` gets the PINs and logs in, `key` signs and reads public keys.

use std::path::PathBuf;
use std::slice;
use std::sync::Mutex;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{
    Algorithm, Backend, BlankToken, ConnectorPin, DeviceKey, KeyRef, KeyStore, KeyStoreError,
    KeyUri, KeystoreKind, OwnedKey, PinFile, Pkcs11Config, Pkcs11Settings, Pkcs11Uri, Purpose,
    Role,
};
use crate::error::Fix;
use crate::model::Slot;
use crate::paths::Layout;

mod errors;
mod key;
mod pin;
pub mod pin_file;
mod token;

pub(crate) use errors::describe;
use errors::{ck, write_error};
use key::{ec_params, key_algorithm, public_der, Pkcs11Key};
use pin::{check_user_pin_state, login, user_pin};
use token::{consumer_mounts, find_token, init_token, load_module, not_found, MODULE_HINT};

/// Token label used when neither a flag nor an earlier run names one.
pub const DEFAULT_TOKEN: &str = "leda";
/// The user PIN, when no `--pkcs11-pin-file` is given.
pub const PIN_ENV: &str = "SDV_PROVISION_PKCS11_PIN";
/// The security officer PIN for `--pkcs11-init-token`, or a file holding it.
pub const SO_PIN_ENV: &str = "SDV_PROVISION_PKCS11_SO_PIN";
pub const SO_PIN_FILE_ENV: &str = "SDV_PROVISION_PKCS11_SO_PIN_FILE";
/// The PIN file the connector reads (`pin-source=file:…`), in the certificates directory.
pub use crate::paths::PKCS11_PIN_FILE as PIN_FILE_NAME;
/// The object classes that make up one identity.
const IDENTITY_CLASSES: [ObjectClass; 3] = [
    ObjectClass::PRIVATE_KEY,
    ObjectClass::PUBLIC_KEY,
    ObjectClass::CERTIFICATE,
];

/// What a containerised consumer of `module` must mount besides the module itself
/// (SoftHSM's configuration and token store), read from the module's configuration;
/// loading the module also proves the path is one.
pub fn consumer_mounts_of(module: &std::path::Path) -> Result<Vec<PathBuf>, KeyStoreError> {
    Ok(consumer_mounts(&load_module(module)?))
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
    /// The PIN the token accepted, and the connector's PIN file the command chose
    /// from it ([`super::choose_pin_file`]).
    login: ConnectorPin,
    /// Extra host paths a containerised consumer needs (SoftHSM's token store and
    /// config); the module itself is added by the manifest code.
    mounts: Vec<PathBuf>,
}

impl Pkcs11KeyStore {
    /// Load the module, find the token by label (initialising a blank one with
    /// `--pkcs11-init-token`) and log in, keeping the PIN the token accepted. Nothing
    /// is written here: which PIN file the connector gets is the command's to decide
    /// right after this ([`super::choose_pin_file`]).
    pub fn open(config: &Pkcs11Config, layout: &Layout) -> Result<Pkcs11KeyStore, KeyStoreError> {
        let module = config
            .module
            .clone()
            .or_else(|| config.recorded.module.clone())
            .ok_or_else(|| KeyStoreError::Unavailable {
                what: "no PKCS#11 module configured".into(),
                hint: MODULE_HINT.into(),
            })?;
        let token = config
            .token
            .clone()
            .or_else(|| config.recorded.token.clone())
            .unwrap_or_else(|| DEFAULT_TOKEN.to_owned());
        let ctx = load_module(&module)?;

        // The token's state is checked before the PIN is asked for, and the PIN is
        // asked for once, also when a blank token is initialised with it.
        let (slot, pin) = match find_token(&ctx, &module, &token)? {
            Ok(slot) => {
                check_user_pin_state(&ctx, slot, &token)?;
                (slot, user_pin(config, layout, &token)?)
            }
            Err(_)
                if config.blank_token == BlankToken::Initialise
                    && config.purpose != Purpose::Read =>
            {
                let pin = user_pin(config, layout, &token)?;
                init_token(&ctx, &module, &token, &pin)?;
                let slot = find_token(&ctx, &module, &token)?
                    .map_err(|labels| not_found(&module, &token, &labels))?;
                (slot, pin)
            }
            Err(labels) => return Err(not_found(&module, &token, &labels)),
        };
        // Commands that only read get a read-only session: they work on a
        // write-protected token and cannot change one by mistake.
        let session = if config.purpose == Purpose::Read {
            ctx.open_ro_session(slot)
        } else {
            ctx.open_rw_session(slot)
        };
        let session = session.map_err(|e| match e {
            CkError::Pkcs11(RvError::TokenWriteProtected, _) => KeyStoreError::Rejected {
                what: format!(
                    "PKCS#11 token {token} is write-protected ({})",
                    describe(&e)
                ),
                hint: Fix::TokenWritable.into(),
            },
            e => ck(format!("open a session on PKCS#11 token {token}"), e),
        })?;
        login(&session, &token, &pin)?;
        let mounts = consumer_mounts(&ctx);
        Ok(Pkcs11KeyStore {
            module,
            token,
            session: Mutex::new(session),
            login: ConnectorPin::new(pin),
            mounts,
        })
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
            pin_file: self.pin_file()?.path.clone(),
            mounts: self.mounts.clone(),
        })
    }

    /// The connector's PIN file, once the command chose it.
    fn pin_file(&self) -> Result<&PinFile, KeyStoreError> {
        self.login.file().ok_or_else(|| {
            KeyStoreError::backend(
                "name the connector's PIN file",
                "none was chosen after logging in to the token",
            )
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

    fn plan(&mut self, slot: Slot) -> Result<KeyUri, KeyStoreError> {
        // A label is not a lock: objects someone else made under it stay and do not
        // block (ours are told apart by the random CKA_ID).
        let label = slot.pkcs11_label();
        let token = self.token.clone();
        let id = random_id()?;
        Ok(KeyUri::Pkcs11(Pkcs11Uri {
            token,
            object: label.to_owned(),
            id,
        }))
    }

    /// Made on the token directly; `record` runs right after the pair exists (the
    /// CKA_ID is the proof), and a failure to record destroys the pair again.
    fn generate_recorded(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
        record: &mut dyn FnMut(&OwnedKey) -> Result<(), KeyStoreError>,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let u = self.uri(uri)?.clone();
        ensure_unused_id(self.session(), &u)?;
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
        public.push(Attribute::Token(true));
        private.push(Attribute::Token(true));
        let token = u.token.clone();
        let session = self.session();
        let (pub_h, priv_h) = session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| write_error(&step, &token, e))?;
        // The pair exists now: any failure from here on destroys it (no orphans).
        if let Err(e) = record(&OwnedKey::new(uri.clone())) {
            destroy_all(session, &[priv_h, pub_h]);
            return Err(e);
        }
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
                    hint: Fix::NewIdentity.into(),
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

    /// Move the staged objects to the live label, keeping their CKA_ID: each object is
    /// copied under the live label (`C_CopyObject`), then the staged one destroyed, so
    /// for each class the staged object, its live copy, or both exist at every instant
    /// and a re-run finishes the move. A token without `C_CopyObject`
    /// (`CKR_FUNCTION_NOT_SUPPORTED`) gets the label changed in place. Objects under
    /// the live label with another CKA_ID are never touched: the key this one replaces
    /// is removed by its own recorded CKA_ID before the move.
    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError> {
        let u = self.uri(from)?.clone();
        let live = Slot::live(role).pkcs11_label();
        let to = KeyUri::Pkcs11(Pkcs11Uri {
            token: u.token.clone(),
            object: live.to_owned(),
            id: u.id.clone(),
        });
        let session = self.session();
        let step = format!("move {} to {live}", u.object);
        let live_label = Attribute::Label(live.as_bytes().to_vec());
        if u.object != live {
            for class in IDENTITY_CLASSES {
                let staged = find(session, &identity_template(&u.object, &u.id, class))?;
                let Some(&first) = staged.first() else {
                    continue;
                };
                // A copy an interrupted move already made is kept.
                if find(session, &identity_template(live, &u.id, class))?.is_empty() {
                    match session.copy_object(first, slice::from_ref(&live_label)) {
                        Ok(_) => {}
                        Err(CkError::Pkcs11(RvError::FunctionNotSupported, _)) => {
                            for h in &staged {
                                session
                                    .update_attributes(*h, slice::from_ref(&live_label))
                                    .map_err(|e| write_error(&step, &u.token, e))?;
                            }
                            continue;
                        }
                        Err(e) => return Err(write_error(&step, &u.token, e)),
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
        // Nothing else under the live label is touched: the key this one replaces was
        // removed by its recorded CKA_ID, and any other object there is not ours.
        Ok(to)
    }

    /// Store (or replace) the certificate object next to the key, same label and
    /// CKA_ID. The new object is created before the old one is destroyed, so a failure
    /// never leaves the key without a certificate it had; a run killed in between
    /// leaves two, which the next call replaces by one. Idempotent: a lone object
    /// already holding `cert_der` is kept as it is.
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
        // Already there, alone: nothing to do (a re-run, or an import finishing).
        if let [h] = old[..] {
            let value = self
                .session()
                .get_attributes(h, &[AttributeType::Value])
                .map_err(|e| ck("read the certificate object", e))?;
            if value == [Attribute::Value(cert_der.to_vec())] {
                return Ok(());
            }
        }
        let step = format!("store the certificate of {}", u.object);
        let session = self.session();
        let mut t = template.to_vec();
        t.push(Attribute::Token(true));
        session
            .create_object(&t)
            .map_err(|e| write_error(&step, &u.token, e))?;
        for h in old {
            session
                .destroy_object(h)
                .map_err(|e| write_error(&step, &u.token, e))?;
        }
        Ok(())
    }

    /// The connector's PIN file must hold the PIN the token accepted, or its login
    /// fails (and uses up the token's retries).
    fn check_store(&self) -> Option<(&'static str, Result<String, KeyStoreError>)> {
        let (pin_file, current) = match self.pin_file() {
            Ok(f) => (&f.path, f.holds_pin),
            Err(e) => return Some(("pin_file", Err(e))),
        };
        let outcome = if current {
            Ok(format!(
                "{} holds the PIN token {} accepted",
                pin_file.display(),
                self.token
            ))
        } else {
            Err(KeyStoreError::Rejected {
                what: format!(
                    "{} does not hold the PIN token {} accepted; the connector's login would fail",
                    pin_file.display(),
                    self.token
                ),
                hint: "run sdv-provision with the current PIN to update it".into(),
            })
        };
        Some(("pin_file", outcome))
    }

    fn record(&self) -> Backend {
        Backend::Pkcs11(Pkcs11Settings {
            module: Some(self.module.clone()),
            token: Some(self.token.clone()),
            pin_file: self.login.file().map(|f| f.path.clone()),
            mounts: self.mounts.clone(),
        })
    }

    fn connector_pin(&mut self) -> Option<&mut ConnectorPin> {
        Some(&mut self.login)
    }
}

/// A fresh random 16-byte CKA_ID. It only has to be unique: the URI names the key by
/// label *and* id, and a staged key must never be mistaken for the live one.
fn random_id() -> Result<Vec<u8>, KeyStoreError> {
    let mut id = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut id)
        .map_err(|_| KeyStoreError::backend("make a random CKA_ID", "no randomness available"))?;
    Ok(id)
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

/// `generate` refuses a CKA_ID already in use under the label: the id is the proof
/// that objects are ours, so it must name only what this run makes.
fn ensure_unused_id(session: &Session, u: &Pkcs11Uri) -> Result<(), KeyStoreError> {
    let taken = find(
        session,
        &[
            Attribute::Label(u.object.as_bytes().to_vec()),
            Attribute::Id(u.id.clone()),
        ],
    )?;
    if taken.is_empty() {
        return Ok(());
    }
    Err(KeyStoreError::Occupied {
        what: format!(
            "CKA_ID {} under label {} in PKCS#11 token {}",
            hex::encode(&u.id),
            u.object,
            u.token
        ),
        hint: "run sdv-provision again (it picks a new random CKA_ID)".into(),
    })
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
        assert_eq!(Slot::live(Role::Primary).pkcs11_label(), "device-primary");
        assert_eq!(
            Slot::staged(Role::Secondary).pkcs11_label(),
            "device-secondary.next"
        );
    }
}
