//! The TPM objects behind a slot: the ESAPI context, the SRK, persisting, evicting,
//! loading, Names, and installing a new key (with its undo).

use super::*;

impl TpmKeyStore {
    pub(super) fn ctx(&mut self) -> &mut Context {
        self.ctx.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Is persistent handle `h` taken? Asked through GetCapability, which (unlike a
    /// failed lookup) makes no noise and needs no session.
    pub(super) fn persistent_exists(&mut self, h: u32) -> Result<bool, KeyStoreError> {
        let (data, _) = self
            .ctx()
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, h, 1))
            .map_err(|e| tss_error("list the TPM's persistent handles", e))?;
        Ok(match data {
            CapabilityData::Handles(list) => list
                .into_inner()
                .first()
                .is_some_and(|t| u32::from(*t) == h),
            _ => false,
        })
    }

    /// The ESYS resource and public area of persistent handle `h`, or `None`.
    ///
    /// Both calls run without the password session: ESAPI refuses
    /// `Esys_TR_FromTPMPublic` / `ReadPublic` with one (checked on bookworm's TSS).
    pub(super) fn read_persistent(
        &mut self,
        h: u32,
    ) -> Result<Option<(ObjectHandle, Public)>, KeyStoreError> {
        if !self.persistent_exists(h)? {
            return Ok(None);
        }
        let ph = persistent(h)?;
        let step = format!("read TPM handle 0x{h:08x}");
        let ctx = self.ctx();
        let mut object = ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ph)))
            .map_err(|e| tss_error(&step, e))?;
        match ctx.execute_without_session(|c| c.read_public(object.into())) {
            Ok((public, _, _)) => Ok(Some((object, public))),
            Err(e) => {
                let _ = ctx.tr_close(&mut object);
                Err(tss_error(&step, e))
            }
        }
    }

    /// Release an ESYS resource we looked up. ESYS hands out the *same* resource for
    /// every lookup of one TPM handle, so the cached SRK resource is never closed here.
    pub(super) fn close(&mut self, mut object: ObjectHandle) {
        if Some(object) != self.srk_object {
            let _ = self.ctx().tr_close(&mut object);
        }
    }

    /// The SRK, checked (an existing one must be a storage key) or created and
    /// persisted.
    pub(super) fn srk(&mut self) -> Result<ObjectHandle, KeyStoreError> {
        if let Some(o) = self.srk_object {
            return Ok(o);
        }
        let srk = self.srk;
        let object = match self.read_persistent(srk)? {
            Some((object, public)) => {
                if !key::is_storage_key(&public) {
                    self.close(object);
                    return Err(KeyStoreError::Rejected {
                        what: format!(
                            "TPM handle 0x{srk:08x} holds a key that is not a storage key \
                             (restricted decryption), so device keys cannot be made under it"
                        ),
                        hint: "have the TPM owner put a storage root key there, or use \
                               --keystore file"
                            .into(),
                    });
                }
                object
            }
            None => {
                let template = key::srk_template()?;
                let ph = persistent(srk)?;
                let ctx = self.ctx();
                let made = ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                    })
                    .map_err(|e| {
                        tss_error("create the storage root key (TPM2_CreatePrimary)", e)
                    })?;
                let persisted = ctx.execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(
                        Provision::Owner,
                        made.key_handle.into(),
                        Persistent::Persistent(ph),
                    )
                });
                let _ = ctx.flush_context(made.key_handle.into());
                persisted.map_err(|e| {
                    tss_error(&format!("persist the storage root key at 0x{srk:08x}"), e)
                })?
            }
        };
        self.srk_object = Some(object);
        Ok(object)
    }

    /// Fail with [`KeyStoreError::UnsupportedAlgorithm`] if this TPM cannot make `alg`
    /// keys (RSA-3072 and P-384 are optional in the TPM profile).
    pub(super) fn check_supported(&mut self, alg: Algorithm) -> Result<(), KeyStoreError> {
        let parms = key::device_key_parameters(alg);
        match self.ctx().execute_without_session(|c| c.test_parms(parms)) {
            Ok(()) => Ok(()),
            Err(e) if means_unsupported(&e) => Err(KeyStoreError::UnsupportedAlgorithm {
                alg,
                keystore: "TPM",
            }),
            // An old TPM without TestParms: let TPM2_Create decide.
            Err(_) => Ok(()),
        }
    }

    pub(super) fn persist(
        &mut self,
        object: ObjectHandle,
        h: u32,
    ) -> Result<ObjectHandle, KeyStoreError> {
        let ph = persistent(h)?;
        self.ctx()
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.evict_control(Provision::Owner, object, Persistent::Persistent(ph))
            })
            .map_err(|e| tss_error(&format!("persist the key at TPM handle 0x{h:08x}"), e))
    }

    /// Evict persistent handle `h` (whose ESYS resource is `object`).
    ///
    /// ESYS keeps its resource (with the evicted key's name) after `EvictControl` and
    /// would later refuse a new key at the same handle ("name mismatch"), so the
    /// resource is closed too. tss-esapi has already forgotten it: the error is moot.
    pub(super) fn evict(&mut self, object: ObjectHandle, h: u32) -> Result<(), KeyStoreError> {
        self.persist(object, h).map_err(|e| match e {
            KeyStoreError::Backend { detail, .. } => {
                KeyStoreError::backend(format!("evict TPM handle 0x{h:08x}"), detail)
            }
            KeyStoreError::Tss { source, .. } => KeyStoreError::Tss {
                step: format!("evict TPM handle 0x{h:08x}"),
                source,
            },
            other => other,
        })?;
        let mut stale = object;
        let _ = self.ctx().tr_close(&mut stale);
        if Some(object) == self.srk_object {
            self.srk_object = None;
        }
        Ok(())
    }

    /// Load a key (public + private blob) under the SRK and persist it at `h`. What
    /// was made so far is recorded in `undo`.
    pub(super) fn load_and_persist(
        &mut self,
        srk: ObjectHandle,
        h: u32,
        public: Public,
        private: Private,
        undo: &mut Undo,
    ) -> Result<ObjectHandle, KeyStoreError> {
        let transient = self.load(srk, public, private, undo)?;
        self.persist_loaded(transient, h, undo)
    }

    /// Load a key under the SRK (a transient object, recorded in `undo`).
    pub(super) fn load(
        &mut self,
        srk: ObjectHandle,
        public: Public,
        private: Private,
        undo: &mut Undo,
    ) -> Result<ObjectHandle, KeyStoreError> {
        let transient = self
            .ctx()
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk.into(), private, public)
            })
            .map_err(|e| tss_error("load the key under the SRK (TPM2_Load)", e))?;
        undo.transient = Some(transient.into());
        Ok(transient.into())
    }

    /// Persist a loaded key at `h`, then flush the transient copy.
    pub(super) fn persist_loaded(
        &mut self,
        transient: ObjectHandle,
        h: u32,
        undo: &mut Undo,
    ) -> Result<ObjectHandle, KeyStoreError> {
        let persisted = self.persist(transient, h)?;
        undo.persistent = Some((persisted, h));
        self.ctx()
            .flush_context(transient)
            .map_err(|e| tss_error("flush the transient key", e))?;
        undo.transient = None;
        Ok(persisted)
    }

    /// The TPM's Name of a loaded object (read without a session, like `read_public`).
    pub(super) fn name_of(&mut self, object: ObjectHandle) -> Result<TpmName, KeyStoreError> {
        let (_, name, _) = self
            .ctx()
            .execute_without_session(|c| c.read_public(object.into()))
            .map_err(|e| tss_error("read the key's Name", e))?;
        TpmName::new(name.value().to_vec())
            .map_err(|e| KeyStoreError::backend("read the key's Name", e))
    }

    /// The Name of what persistent handle `h` holds now, or `None` when it is empty.
    pub(super) fn persistent_name(&mut self, h: u32) -> Result<Option<TpmName>, KeyStoreError> {
        let Some((object, _)) = self.read_persistent(h)? else {
            return Ok(None);
        };
        let name = self.name_of(object);
        self.close(object);
        name.map(Some)
    }

    /// The Name is recorded (through `record`) while the key is only loaded, before it
    /// is persisted: a run killed at any instant has either recorded the Name of a key
    /// that may sit at the handle, or persisted nothing. Only our key has that Name.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &mut self,
        srk: ObjectHandle,
        uri: &KeyUri,
        slot: Slot,
        created: &tss_esapi::structures::CreateKeyResult,
        record: &mut dyn FnMut(&OwnedKey) -> Result<(), KeyStoreError>,
        undo: &mut Undo,
    ) -> Result<ObjectHandle, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let transient = self.load(
            srk,
            created.out_public.clone(),
            created.out_private.clone(),
            undo,
        )?;
        let name = self.name_of(transient)?;
        record(&OwnedKey {
            uri: uri.clone(),
            tpm_name: Some(name),
        })?;
        let object = self.persist_loaded(transient, h, undo)?;
        self.write_blobs(slot, &created.out_public, &created.out_private, undo)?;
        Ok(object)
    }

    /// Take back what a failed installation made: no orphan handles, no stray blobs.
    pub(super) fn rollback(&mut self, undo: Undo) {
        if let Some(t) = undo.transient {
            if let Err(e) = self.ctx().flush_context(t) {
                tracing::warn!("cleanup: could not flush a transient TPM object: {e}");
            }
        }
        if let Some((object, h)) = undo.persistent {
            if let Err(e) = self.evict(object, h) {
                tracing::warn!("cleanup: could not evict TPM handle 0x{h:08x}: {e}");
            }
        }
        for f in undo.files {
            if let Err(e) = fsutil::remove_file(&f) {
                tracing::warn!("cleanup: could not remove {}: {e}", f.display());
            }
        }
    }
}
