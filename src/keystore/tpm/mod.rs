//! The TPM 2.0 keystore (tss-esapi): device keys are made by the TPM, persisted at
//! owner-hierarchy handles, and never leave it.
//!
//! - **Storage root key** at `0x81000001` (or the recorded one): used if present and a
//!   restricted decryption key; otherwise the standard ECC P-256 SRK is created and
//!   persisted, so every later run (and today's connector, which loads our blobs under
//!   it) finds the same parent.
//! - **Device keys** are SRK children, persisted at `0x81000010` / `0x81000011`
//!   (`--tpm-primary-handle` / `--tpm-secondary-handle`). A key is persisted rather
//!   than reloaded from blobs each time so the OpenSSL `tpm2` provider and other
//!   consumers can name it as `handle:0x…` without knowing the SRK.
//! - **Staged keys** (a new identity built while the old one stays in service) use the
//!   live handle + [`STAGED_OFFSET`] (`0x81000110` / `0x81000111` by default), so
//!   adjacent live handles never collide with a staging slot. [`KeyStore::promote`]
//!   moves them to the live handle by reloading their blobs.
//! - **Blobs** `<stem>.tpm.pub` / `<stem>.tpm.priv` (the stem follows the handle:
//!   `device`, `device2`, `device.next`, `device2.next`) are written for today's
//!   connector, size-prefixed as `tpm2_create -u/-r` writes them.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Rc;
use tss_esapi::constants::tss::TPM2_PT_MANUFACTURER;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{CapabilityData, Private, Public};
use tss_esapi::Context;

use super::{
    Algorithm, Backend, DeviceKey, KeyRef, KeyStore, KeyStoreError, KeyUri, KeystoreKind, OwnedKey,
    Role, TpmConfig, TpmName, TpmSettings,
};
use crate::error::Fix;
use crate::fsutil;
use crate::model::Slot;
use crate::paths::Layout;

mod blob;
mod blob_files;
mod checks;
mod da;
mod handles;
mod key;
mod objects;
mod promote;
mod tcti;

pub use tcti::{DEFAULT_TCTI, OWNER_AUTH_ENV, OWNER_AUTH_FILE_ENV};

use handles::{check_handles, occupied, persistent, srk_refused, tpm_handle, warn_foreign};
use key::TpmKey;

pub use super::{DEFAULT_PRIMARY, DEFAULT_SECONDARY, DEFAULT_SRK};
pub use crate::model::STAGED_OFFSET;

pub struct TpmKeyStore {
    /// One ESAPI context per keystore. The keys handed out borrow it; see
    /// [`key::TpmKey`] for why it sits behind a mutex.
    ctx: Mutex<Context>,
    layout: Layout,
    srk: u32,
    primary: u32,
    secondary: u32,
    /// The SRK's ESYS resource, once checked or created.
    srk_object: Option<ObjectHandle>,
}

/// A TSS failure as one line: what we were doing, the TSS's words, and a fix where the
/// response code tells us one.
pub(crate) fn tss_error(step: &str, e: tss_esapi::Error) -> KeyStoreError {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        let rejected = |what: String, hint: &str| KeyStoreError::Rejected {
            what,
            hint: hint.into(),
        };
        match rc.kind() {
            Some(Rc::BadAuth | Rc::AuthFail) => {
                return rejected(
                    format!("the TPM refused the authorization to {step} ({e})"),
                    &format!(
                        "if the owner hierarchy has a password, give it in {OWNER_AUTH_ENV} or \
                         a file named by {OWNER_AUTH_FILE_ENV}"
                    ),
                )
            }
            // Where a context is at hand the caller adds the TPM's counters
            // (`da::Lockout::read`); here only the fact is known.
            Some(Rc::Lockout) => return da::lockout_error(step, None),
            Some(Rc::NvSpace) => {
                return rejected(
                    format!("the TPM has no room for another persistent key ({step})"),
                    "free persistent handles this device no longer needs (see \
                     `tpm2_getcap handles-persistent`), or use --keystore file",
                )
            }
            Some(Rc::ObjectMemory | Rc::ObjectHandles | Rc::SessionMemory) => {
                return rejected(
                    format!("the TPM ran out of object slots ({step})"),
                    "use a resource manager (--tcti device:/dev/tpmrm0, or tpm2-abrmd) and retry",
                )
            }
            // Not a TPM response code at all: the TCTI or TSS layer failed, which is
            // what a TPM (or swtpm, or resource manager) that went away mid-command
            // looks like. tss-esapi 7 only says "response code not recognized".
            None => {
                return KeyStoreError::Unavailable {
                    what: format!("the TPM stopped answering while trying to {step} ({e})"),
                    hint: "check that the TPM (or its resource manager) is up, then run \
                           sdv-provision again: the interrupted run is finished or cleaned \
                           up by itself"
                        .into(),
                }
            }
            _ => {}
        }
    }
    KeyStoreError::Tss {
        step: step.into(),
        source: e,
    }
}

/// TPM answers to `TPM2_TestParms` / `TPM2_Create` that mean "I don't do this algorithm".
fn means_unsupported(e: &tss_esapi::Error) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if matches!(
        rc.kind(),
        Some(Rc::Value | Rc::KeySize | Rc::Curve | Rc::Asymmetric | Rc::Scheme | Rc::Kdf | Rc::Hash)
    ))
}

/// What a half-done key installation made, so a failure can take it back.
#[derive(Default)]
struct Undo {
    transient: Option<ObjectHandle>,
    persistent: Option<(ObjectHandle, u32)>,
    files: Vec<PathBuf>,
}

impl TpmKeyStore {
    /// Connect to the TPM named by `config.tcti` (default [`DEFAULT_TCTI`]).
    ///
    /// Nothing is created here: read-only commands (`status`, `verify`) must not change
    /// the TPM. The SRK is checked or made when the first key is.
    pub fn open(config: &TpmConfig, layout: &Layout) -> Result<TpmKeyStore, KeyStoreError> {
        let tcti_str = config.tcti.clone().unwrap_or_else(|| DEFAULT_TCTI.into());
        let conf = tcti::parse(&tcti_str)?;
        let srk = config.recorded.srk();
        // A flag wins; else what an earlier run chose; else the defaults.
        let primary = config.live_handle(Role::Primary);
        let secondary = config.live_handle(Role::Secondary);
        check_handles(srk, primary, secondary)?;
        let owner_auth = tcti::owner_auth()?;

        tcti::quiet_tss_logging();
        let unreachable = |e: tss_esapi::Error| KeyStoreError::Unavailable {
            what: match tcti::diagnose(&tcti_str) {
                Some(why) => format!("cannot reach the TPM at {tcti_str}: {why}"),
                None => format!("cannot reach the TPM at {tcti_str} ({e})"),
            },
            hint: "is the TPM enabled and accessible to this user? pass --tcti to use another \
                   TPM, or --keystore file to keep the keys in files"
                .into(),
        };
        let mut ctx = Context::new(conf).map_err(unreachable)?;
        // Something that accepts a connection is not yet a TPM: ask it a question.
        ctx.execute_without_session(|c| {
            c.get_capability(CapabilityType::TpmProperties, TPM2_PT_MANUFACTURER, 1)
        })
        .map_err(unreachable)?;
        if let Some(auth) = owner_auth {
            ctx.tr_set_auth(ObjectHandle::Owner, auth)
                .map_err(|e| tss_error("set the owner-hierarchy authorization", e))?;
        }
        Ok(TpmKeyStore {
            ctx: Mutex::new(ctx),
            layout: layout.clone(),
            srk,
            primary,
            secondary,
            srk_object: None,
        })
    }

    /// The SRK handle in use.
    pub fn srk_handle(&self) -> u32 {
        self.srk
    }

    /// The persistent handle for a slot's key.
    pub fn handle_for(&self, slot: Slot) -> u32 {
        slot.tpm_handle(self.primary, self.secondary)
    }

    /// Which of our four slots a handle is, if any (the four handles are distinct,
    /// [`check_handles`]).
    fn slot_of(&self, h: u32) -> Option<Slot> {
        Slot::ALL.into_iter().find(|&s| self.handle_for(s) == h)
    }

    /// [`Self::slot_of`], or an error naming the flags that configure the handles.
    fn configured_slot(&self, h: u32) -> Result<Slot, KeyStoreError> {
        self.slot_of(h).ok_or_else(|| KeyStoreError::Rejected {
            what: format!(
                "TPM handle 0x{h:08x} is not one of the handles configured for device keys"
            ),
            hint: "pass the --tpm-primary-handle / --tpm-secondary-handle used when provisioning"
                .into(),
        })
    }

    fn host_blobs(&self, slot: Slot) -> (PathBuf, PathBuf) {
        let (p, s) = slot.tpm_blobs();
        (
            self.layout.host_cert_file(&p),
            self.layout.host_cert_file(&s),
        )
    }

    /// How the connector reaches the key at `uri`: handle, SRK and blob paths (device
    /// paths). The stem follows the handle, so a staged key names its `.next` blobs.
    pub fn key_ref(&self, uri: &KeyUri) -> Result<KeyRef, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let (p, s) = self.configured_slot(h)?.tpm_blobs();
        Ok(KeyRef::Tpm {
            handle: h,
            srk: self.srk,
            pub_blob: Layout::cert_file(&p),
            priv_blob: Layout::cert_file(&s),
        })
    }

    fn key(&self, object: ObjectHandle, h: u32, alg: Algorithm, public_der: Vec<u8>) -> TpmKey<'_> {
        TpmKey {
            ctx: &self.ctx,
            object,
            handle: h,
            alg,
            public_der,
            last_error: Mutex::new(None),
        }
    }
}

impl KeyStore for TpmKeyStore {
    fn kind(&self) -> KeystoreKind {
        KeystoreKind::Tpm
    }

    fn plan(&mut self, slot: Slot) -> Result<KeyUri, KeyStoreError> {
        let h = self.handle_for(slot);
        if self.persistent_exists(h)? {
            return Err(occupied(h, slot));
        }
        Ok(KeyUri::TpmHandle(h))
    }

    fn generate_recorded(
        &mut self,
        uri: &KeyUri,
        alg: Algorithm,
        record: &mut dyn FnMut(&OwnedKey) -> Result<(), KeyStoreError>,
    ) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let slot = self.slot_of(h).ok_or_else(|| KeyStoreError::Rejected {
            what: format!(
                "TPM handle 0x{h:08x} is not one of the handles configured for device keys"
            ),
            hint: "pass --tpm-primary-handle / --tpm-secondary-handle".into(),
        })?;
        if self.persistent_exists(h)? {
            return Err(occupied(h, slot));
        }
        self.check_supported(alg)?;
        let srk = self.srk()?;
        let template = key::device_key_template(alg)?;
        let created = self
            .ctx()
            .execute_with_session(Some(AuthSession::Password), |c| {
                da::retry_transient(|| {
                    c.create(srk.into(), template.clone(), None, None, None, None)
                })
            })
            .map_err(|e| {
                if means_unsupported(&e) {
                    KeyStoreError::UnsupportedAlgorithm {
                        alg,
                        keystore: "TPM",
                    }
                } else {
                    tss_error("create the device key (TPM2_Create)", e)
                }
            })?;
        // Computed before anything is persisted, so a bad public area leaves nothing.
        let public_der = key::public_der(&created.out_public, alg)?;

        let mut undo = Undo::default();
        match self.install(srk, uri, slot, &created, record, &mut undo) {
            Ok(object) => Ok(Box::new(self.key(object, h, alg, public_der))),
            Err(e) => {
                self.rollback(undo);
                Err(e)
            }
        }
    }

    fn open(&mut self, uri: &KeyUri) -> Result<Box<dyn DeviceKey + '_>, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let (object, public) = self
            .read_persistent(h)?
            .ok_or_else(|| KeyStoreError::NotFound {
                uri: uri.to_string(),
            })?;
        let Some(alg) = key::algorithm_of(&public) else {
            self.close(object);
            return Err(KeyStoreError::Rejected {
                what: format!(
                    "TPM handle 0x{h:08x} does not hold a signing key sdv-provision can use"
                ),
                hint: format!("{}; {}", Fix::Supported, Fix::NewIdentity),
            });
        };
        match key::public_der(&public, alg) {
            Ok(der) => Ok(Box::new(self.key(object, h, alg, der))),
            Err(e) => {
                self.close(object);
                Err(e)
            }
        }
    }

    fn remove(&mut self, uri: &KeyUri) -> Result<(), KeyStoreError> {
        let h = tpm_handle(uri)?;
        if h == self.srk {
            return Err(srk_refused(h));
        }
        let present = self.read_persistent(h)?;
        // The blobs follow the handle. A handle outside the configured slots (chosen
        // by a flag on an earlier run) keeps the blobs whose public area is its key.
        let slots: Vec<Slot> = match (self.slot_of(h), &present) {
            (Some(slot), _) => vec![slot],
            (None, Some((_, public))) => {
                let mut found = Vec::new();
                for slot in Slot::ALL {
                    let (p, _) = self.host_blobs(slot);
                    if matches!(self.read_public_blob(&p), Ok(Some(b)) if &b == public) {
                        found.push(slot);
                    }
                }
                found
            }
            (None, None) => Vec::new(),
        };
        if let Some((object, public)) = present {
            // The slot's public blob is the key this tool persisted there. If the
            // handle now holds another key (ours was evicted behind our back and
            // someone else's persisted in its place), that key is not ours to evict.
            // Without a recorded Name ([`KeyStore::remove_owned`] has one) only a
            // public blob equal to the handle's public area shows the key is ours;
            // no blob, or an unreadable one, proves nothing.
            let foreign = match self.slot_of(h) {
                Some(slot) => !matches!(
                    self.read_public_blob(&self.host_blobs(slot).0),
                    Ok(Some(blob)) if blob == public
                ),
                None => false,
            };
            if foreign {
                self.close(object);
                warn_foreign(h);
            } else {
                self.evict(object, h)?;
            }
        }
        for slot in slots {
            let (p, s) = self.host_blobs(slot);
            for f in [s, p] {
                fsutil::remove_file(&f)
                    .map_err(|e| KeyStoreError::backend("remove the key blob", e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Evict only while the handle's current Name is the recorded one; an empty
    /// handle or one that holds another key (someone else's, persisted after ours was
    /// gone or before ours was made) is left alone. The slot's blobs are ours by name
    /// and go either way.
    fn remove_owned(&mut self, key: &OwnedKey) -> Result<bool, KeyStoreError> {
        let Some(recorded) = &key.tpm_name else {
            // Recorded before proofs existed: the public blob must show it is ours.
            return match self.prove(&key.uri)? {
                Some(_) => self.remove(&key.uri).map(|()| true),
                None => {
                    self.remove_slot_blobs(tpm_handle(&key.uri)?)?;
                    Ok(false)
                }
            };
        };
        let h = tpm_handle(&key.uri)?;
        match self.persistent_name(h)? {
            // The Name is the proof: no blob needs to agree (a run killed between
            // persisting and writing the blobs has none).
            Some(now) if &now == recorded => {
                if h == self.srk {
                    return Err(srk_refused(h));
                }
                if let Some((object, _)) = self.read_persistent(h)? {
                    self.evict(object, h)?;
                }
                self.remove_slot_blobs(h).map(|()| true)
            }
            Some(_) => {
                warn_foreign(h);
                self.remove_slot_blobs(h)?;
                Ok(false)
            }
            None => self.remove_slot_blobs(h).map(|()| true),
        }
    }

    /// A key from a run that recorded no Name is ours if the handle's public area is
    /// the one in the slot's public blob (written by that run beside the key).
    fn prove(&mut self, uri: &KeyUri) -> Result<Option<OwnedKey>, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let Some(slot) = self.slot_of(h) else {
            return Ok(None);
        };
        let Some((object, public)) = self.read_persistent(h)? else {
            return Ok(None);
        };
        let blob = self.read_public_blob(&self.host_blobs(slot).0);
        let proven = matches!(&blob, Ok(Some(b)) if *b == public);
        let name = if proven {
            Some(self.name_of(object))
        } else {
            None
        };
        self.close(object);
        Ok(match name {
            Some(n) => Some(OwnedKey {
                uri: uri.clone(),
                tpm_name: Some(n?),
            }),
            None => None,
        })
    }

    fn promote(&mut self, from: &KeyUri, role: Role) -> Result<KeyUri, KeyStoreError> {
        self.promote_key(from, role)
    }

    /// Today's connector loads the key from its blobs (`TPM_KEY` / `TPM_KEY_PUB`
    /// under the SRK), not from the handle: the blobs must hold the handle's key. The
    /// public blob must equal the handle's public area, and the pair must load under
    /// the SRK into that same key (proving the private blob belongs to it and to this
    /// TPM). The loaded copy is flushed; nothing is created or persisted.
    fn check_copies(&mut self, uri: &KeyUri) -> Option<Result<String, KeyStoreError>> {
        Some(self.check_blobs(uri))
    }

    /// A device key must have noDA (see [`key::device_key_template`]); keys made
    /// before this tool set it are reported with the way to replace them.
    fn check_key(&mut self, uri: &KeyUri) -> Option<Result<String, KeyStoreError>> {
        Some(self.check_no_da(uri))
    }

    fn record(&self) -> Backend {
        // Non-default handles only, so a state file stays minimal in the common case.
        let chosen = |h: u32, default: u32| (h != default).then_some(h);
        Backend::Tpm(TpmSettings {
            srk: Some(self.srk),
            primary_handle: chosen(self.primary, DEFAULT_PRIMARY),
            secondary_handle: chosen(self.secondary, DEFAULT_SECONDARY),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_rules() {
        assert!(check_handles(DEFAULT_SRK, DEFAULT_PRIMARY, DEFAULT_SECONDARY).is_ok());
        // Adjacent live handles are fine: staging slots sit 0x100 above.
        assert!(check_handles(DEFAULT_SRK, 0x8100_0010, 0x8100_0012).is_ok());
        for (p, s) in [
            (0x8100_0010, 0x8100_0010), // same handle twice
            (0x8100_0001, 0x8100_0011), // the SRK
            (0x8100_0010, 0x8100_0110), // secondary == primary's staging slot
            (0x8180_0000, 0x8100_0011), // platform range
            (0x817F_FFF0, 0x8100_0011), // staging slot leaves the owner range
            (0x0100_0010, 0x8100_0011), // not persistent
        ] {
            let e = check_handles(DEFAULT_SRK, p, s).unwrap_err().to_string();
            assert!(e.contains("--tpm-"), "{p:x}/{s:x}: {e}");
        }
    }

    #[test]
    fn occupied_names_the_flag() {
        let e = occupied(0x8100_0011, Slot::live(Role::Secondary)).to_string();
        assert!(
            e.contains("0x81000011") && e.contains("--tpm-secondary-handle"),
            "{e}"
        );
        let e = occupied(0x8100_0110, Slot::staged(Role::Primary)).to_string();
        assert!(e.contains("--tpm-primary-handle"), "{e}");
    }

    #[test]
    fn unsupported_response_codes() {
        // TPM_RC_CURVE | TPM_RC_P | TPM_RC_1 (parameter 1), as a P-384-less TPM answers.
        let e = tss_esapi::Error::Tss2Error(0x0000_01e6.into());
        assert!(means_unsupported(&e), "{e}");
        // TPM_RC_NV_SPACE is not an algorithm problem.
        let e = tss_esapi::Error::Tss2Error(0x0000_014b.into());
        assert!(!means_unsupported(&e));
        assert!(tss_error("persist", e)
            .to_string()
            .contains("handles-persistent"));
    }
}
