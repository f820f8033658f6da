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
    Algorithm, BackendRecord, DeviceKey, KeyRef, KeyStore, KeyStoreError, KeyUri, KeystoreConfig,
    KeystoreKind, Pkcs11Uri, Role,
};
use crate::paths::Layout;

mod key;
mod pin;
mod token;

use key::{ec_params, key_algorithm, public_der, Pkcs11Key};
use pin::{check_user_pin_state, connector_pin_file, login, user_pin};
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
/// `C_CopyObject(CKA_TOKEN=true)` stores it in two transactions (SoftHSM commits the
/// copied attributes, then applies the template): 19 instead of 175 file rewrites for
/// a provisioning, and about a third of the time with the store on ext4
/// (`bench/results.md`). PKCS#11 lets `CKA_TOKEN` change in a copy precisely to copy a
/// session object to the token.
///
/// The copy keeps the key's history: `CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE` and
/// `CKA_NEVER_EXTRACTABLE` stay true (PKCS#11 defines a copy of a locally generated
/// key as local), and the key never leaves the token; the copy's protection is read
/// back, and a token that loses any of it gets the key made again directly. Many
/// hardware tokens (OpenSC cards, tpm2-pkcs11, YubiKey PIV) have no session objects or
/// no `C_CopyObject`; they get [`Placement::Direct`], as every token did before.
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
    /// Does that file hold the PIN the token accepted? (Read-only commands do not
    /// rewrite it; `verify` reports a stale one.)
    pin_file_current: bool,
    /// Extra host paths a containerised consumer needs (SoftHSM's token store and
    /// config); the module itself is added by the manifest code.
    mounts: Vec<PathBuf>,
    /// How new objects are made; probed at the first write (status and verify never
    /// write, so they never probe), and switched to `Direct` if a copy fails.
    placement: Option<Placement>,
    /// Set by [`Pkcs11KeyStore::set_placement`]: also decides how `promote` moves
    /// objects (otherwise it always tries a copy first).
    forced: Option<Placement>,
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
    /// certificates directory (the connector then reads that file), nor by commands
    /// that only read ([`KeystoreConfig::read_only`]: `verify`, `csr`).
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
            Err(_) if config.pkcs11_init_token && !config.read_only => {
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
        let session = if config.read_only {
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
                hint: "make the token writable, or choose another one with --pkcs11-token".into(),
            },
            e => ck(format!("open a session on PKCS#11 token {token}"), e),
        })?;
        login(&session, &token, &pin)?;

        let (pin_file, pin_file_current) = connector_pin_file(config, layout, &pin)?;
        let mounts = consumer_mounts(&ctx);
        Ok(Pkcs11KeyStore {
            module,
            token,
            session: Mutex::new(session),
            pin_file,
            pin_file_current,
            mounts,
            placement: None,
            forced: None,
        })
    }

    /// Choose how new objects are made (and staged ones moved) instead of probing
    /// the token. The tests use it to take, on SoftHSM, the path of tokens that
    /// cannot copy objects.
    pub fn set_placement(&mut self, placement: Placement) {
        self.forced = Some(placement);
    }

    /// How new objects are made on this token: probed once, with a session data
    /// object that is created, copied and destroyed (nothing reaches the token).
    pub fn placement(&mut self) -> Placement {
        if let Some(p) = self.forced.or(self.placement) {
            return p;
        }
        let p = probe_placement(self.session());
        tracing::debug!(placement = ?p, "PKCS#11 object placement");
        self.placement = Some(p);
        p
    }

    /// Make objects with `make(on_token)` so that they end up on the token, each
    /// stored whole where the token allows it (see [`Placement`]). `make(false)` must
    /// create session objects, `make(true)` the same objects on the token; `check`
    /// vets the token copies (e.g. a key's protection) before they are kept.
    ///
    /// Until the copies are made and vetted nothing of ours is on the token, so any
    /// failure on the way (no session keys, copy refused or failed, a copy that lost
    /// protection) destroys what was made, switches the store to
    /// [`Placement::Direct`] and makes the objects on the token directly; the error
    /// reported is that path's. Session objects are always destroyed here, and a killed
    /// process loses them with its session.
    fn make_on_token(
        &mut self,
        step: &str,
        make: impl Fn(&Session, bool) -> Result<Vec<ObjectHandle>, CkError>,
        check: impl Fn(&Session, &[ObjectHandle]) -> Result<(), String>,
    ) -> Result<Vec<ObjectHandle>, KeyStoreError> {
        let token = self.token.clone();
        if self.placement() == Placement::CopyFromSession {
            match copy_from_session(self.session(), &make, &check)? {
                Ok(copies) => return Ok(copies),
                Err(why) => {
                    tracing::debug!("token {token}: {why}; making objects on the token");
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
        let made = self.make_on_token(
            &step,
            |session, on_token| {
                let with = |t: &[Attribute]| {
                    let mut t = t.to_vec();
                    t.push(Attribute::Token(on_token));
                    t
                };
                let (pub_h, priv_h) =
                    session.generate_key_pair(&mechanism, &with(&public), &with(&private))?;
                Ok(vec![priv_h, pub_h])
            },
            |session, copies| protected(session, copies[0]),
        )?;
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
    /// the move. Without a copy (a token set to [`Placement::Direct`], a token that
    /// does not copy, or a key copy that lost its protection) the staged objects are
    /// relabelled in place; a storage failure stops the move (with a hint), for the
    /// next run.
    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError> {
        let u = self.uri(from)?.clone();
        let live = label(role, false);
        let to = KeyUri::Pkcs11(Pkcs11Uri {
            token: u.token.clone(),
            object: live.to_owned(),
            id: u.id.clone(),
        });
        // Copy unless the token is known not to (forced, or found this run): a token
        // that fails every copy would otherwise report a storage failure here.
        let copies = self.forced.or(self.placement) != Some(Placement::Direct);
        let session = self.session();
        let step = format!("move {} to {live}", u.object);
        let live_label = Attribute::Label(live.as_bytes().to_vec());
        if u.object != live {
            for class in IDENTITY_CLASSES {
                let staged = find(session, &identity_template(&u.object, &u.id, class))?;
                let Some(&first) = staged.first() else {
                    continue;
                };
                let mut copied = find(session, &identity_template(live, &u.id, class))?;
                if class == ObjectClass::PRIVATE_KEY {
                    // A copy an interrupted run made but never vetted is vetted now.
                    for &h in &copied {
                        if let Err(why) = protected(session, h) {
                            session.destroy_object(h).map_err(|e| {
                                ck(format!("remove a copy that lost protection ({why})"), e)
                            })?;
                        }
                    }
                    copied = find(session, &identity_template(live, &u.id, class))?;
                }
                if copied.is_empty()
                    && !(copies
                        && copy_keeping_protection(session, first, class, &live_label)
                            .map_err(|e| write_error(&step, &u.token, e))?)
                {
                    // No copy (a token that cannot copy, or a key copy that lost its
                    // protection): relabel the staged objects in place.
                    for h in &staged {
                        session
                            .update_attributes(*h, slice::from_ref(&live_label))
                            .map_err(|e| write_error(&step, &u.token, e))?;
                    }
                    continue;
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
        self.make_on_token(
            &step,
            |session, on_token| {
                let mut t = template.to_vec();
                t.push(Attribute::Token(on_token));
                Ok(vec![session.create_object(&t)?])
            },
            |_, _| Ok(()),
        )?;
        let session = self.session();
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
        let outcome = if self.pin_file_current {
            Ok(format!(
                "{} holds the PIN token {} accepted",
                self.pin_file.display(),
                self.token
            ))
        } else {
            Err(KeyStoreError::Rejected {
                what: format!(
                    "{} does not hold the PIN token {} accepted; the connector's login would fail",
                    self.pin_file.display(),
                    self.token
                ),
                hint: "run sdv-provision with the current PIN to update it".into(),
            })
        };
        Some(("pin_file", outcome))
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

/// Make objects in the session with `make(false)`, copy each to the token and vet
/// the copies with `check`. `Ok(Err(why))`: it did not work and nothing of ours is left
/// on the token (try directly); `Err`: a partial copy could not be destroyed (stop:
/// making the objects again would duplicate its label and CKA_ID).
fn copy_from_session(
    session: &Session,
    make: &impl Fn(&Session, bool) -> Result<Vec<ObjectHandle>, CkError>,
    check: &impl Fn(&Session, &[ObjectHandle]) -> Result<(), String>,
) -> Result<Result<Vec<ObjectHandle>, String>, KeyStoreError> {
    let made = match make(session, false) {
        Ok(made) => made,
        Err(e) => return Ok(Err(format!("no session objects ({})", describe(&e)))),
    };
    let mut copies = Vec::with_capacity(made.len());
    let mut failed = None;
    for &h in &made {
        match session.copy_object(h, &[Attribute::Token(true)]) {
            Ok(c) => copies.push(c),
            Err(e) => {
                failed = Some(format!("cannot copy to the token ({})", describe(&e)));
                break;
            }
        }
    }
    destroy_all(session, &made);
    let failed = failed.or_else(|| check(session, &copies).err());
    let Some(why) = failed else {
        return Ok(Ok(copies));
    };
    for h in copies {
        session.destroy_object(h).map_err(|e| {
            ck(
                format!("remove a partial copy on the token after: {why}"),
                e,
            )
        })?;
    }
    Ok(Err(why))
}

/// A token copy of a private key must be protected as the key was made: on the
/// token, private, sensitive, never extractable, and local.
fn protected(session: &Session, key: ObjectHandle) -> Result<(), String> {
    use AttributeType as T;
    let want = [
        (T::Token, true),
        (T::Private, true),
        (T::Sensitive, true),
        (T::Extractable, false),
        (T::AlwaysSensitive, true),
        (T::NeverExtractable, true),
        (T::Local, true),
    ];
    let types: Vec<T> = want.iter().map(|(t, _)| *t).collect();
    let attrs = session
        .get_attributes(key, &types)
        .map_err(|e| format!("cannot read the copy's attributes ({})", describe(&e)))?;
    for (t, expected) in want {
        let got = attrs.iter().find_map(|a| match (a, t) {
            (Attribute::Token(b), T::Token)
            | (Attribute::Private(b), T::Private)
            | (Attribute::Sensitive(b), T::Sensitive)
            | (Attribute::Extractable(b), T::Extractable)
            | (Attribute::AlwaysSensitive(b), T::AlwaysSensitive)
            | (Attribute::NeverExtractable(b), T::NeverExtractable)
            | (Attribute::Local(b), T::Local) => Some(*b),
            _ => None,
        });
        if got != Some(expected) {
            return Err(format!("the copy has {t} = {got:?}, not {expected}"));
        }
    }
    Ok(())
}

/// Copy `object` under `label`; a private key's copy must keep its protection
/// ([`protected`]). `Ok(false)`, with nothing left behind, when the copy did not work
/// or lost protection: relabel instead. A storage failure ([`storage_failure`]) is
/// returned instead: a relabel rewrites the object in place, which on a full or
/// failing store can lose it, while the failed move is retried by the next run once
/// the storage is fixed. `Err` also if a copy that lost protection cannot be
/// destroyed.
fn copy_keeping_protection(
    session: &Session,
    object: ObjectHandle,
    class: ObjectClass,
    label: &Attribute,
) -> Result<bool, CkError> {
    let copy = match session.copy_object(object, slice::from_ref(label)) {
        Ok(copy) => copy,
        Err(e) if storage_failure(&e) => return Err(e),
        Err(e) => {
            tracing::debug!("no copy ({}); relabelling in place", describe(&e));
            return Ok(false);
        }
    };
    if class == ObjectClass::PRIVATE_KEY {
        if let Err(why) = protected(session, copy) {
            tracing::warn!(
                "a copy of the staged key lost its protection ({why}); relabelling in place"
            );
            session.destroy_object(copy)?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// The token could not store a change: out of space, write-protected, or failing.
fn storage_failure(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::DeviceMemory
                | RvError::DeviceError
                | RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::TokenWriteProtected,
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
}
