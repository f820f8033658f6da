//! [`KeyStore::promote`] for the TPM: a staged key moves to its live handle by
//! reloading its blobs under the SRK; the blobs follow the key.

use super::*;

impl TpmKeyStore {
    pub(super) fn promote_key(
        &mut self,
        from: &KeyUri,
        role: Role,
    ) -> Result<KeyUri, KeyStoreError> {
        let from_h = tpm_handle(from)?;
        let to_h = self.handle_for(Slot::live(role));
        let to = KeyUri::TpmHandle(to_h);
        if from_h == to_h {
            return Ok(to);
        }
        // Usually a staged key; `rotate --promote` also moves the live secondary.
        let from_slot = self.configured_slot(from_h)?;
        let live_public = self.move_object(from, from_slot, role)?;
        self.move_blobs(from_slot, role, &live_public)?;
        Ok(to)
    }

    /// The key at `from` ends at `role`'s live handle (finishing an interrupted move);
    /// returns its public area.
    fn move_object(
        &mut self,
        from: &KeyUri,
        from_slot: Slot,
        role: Role,
    ) -> Result<Public, KeyStoreError> {
        let from_h = tpm_handle(from)?;
        let to_h = self.handle_for(Slot::live(role));
        let staged = self.read_persistent(from_h)?;
        let live = self.read_persistent(to_h)?;
        match (staged, live) {
            (Some((s_obj, s_pub)), None) => {
                // The move proper: reload the staged key's blobs, persist at the live
                // handle, then drop the staging slot.
                let (staged_pub, staged_priv) = self.host_blobs(from_slot);
                let blob_pub = self.read_public_blob(&staged_pub)?;
                if blob_pub.as_ref() != Some(&s_pub) {
                    self.close(s_obj);
                    return Err(KeyStoreError::Rejected {
                        what: format!(
                            "{} does not hold the key at TPM handle 0x{from_h:08x}",
                            staged_pub.display()
                        ),
                        hint: Fix::NewIdentity.into(),
                    });
                }
                let private = self.read_private_blob(&staged_priv)?;
                let srk = self.srk()?;
                let mut undo = Undo::default();
                match self.load_and_persist(srk, to_h, s_pub.clone(), private, &mut undo) {
                    Ok(new_obj) => self.close(new_obj),
                    Err(e) => {
                        self.rollback(undo);
                        self.close(s_obj);
                        return Err(e);
                    }
                }
                self.evict(s_obj, from_h)?;
                Ok(s_pub)
            }
            (Some((s_obj, s_pub)), Some((l_obj, l_pub))) if s_pub == l_pub => {
                // Interrupted after the copy: finish by dropping the staging slot.
                self.close(l_obj);
                self.evict(s_obj, from_h)?;
                Ok(l_pub)
            }
            (Some((s_obj, _)), Some((l_obj, _))) => {
                self.close(s_obj);
                self.close(l_obj);
                Err(occupied(to_h, Slot::live(role)))
            }
            (None, Some((l_obj, l_pub))) => {
                self.close(l_obj);
                Ok(l_pub)
            }
            (None, None) => Err(KeyStoreError::NotFound {
                uri: from.to_string(),
            }),
        }
    }

    /// Blobs follow the key. priv before pub, so a staged pub left behind always
    /// means the move is unfinished. The live blobs must end holding `live_public`.
    fn move_blobs(
        &mut self,
        from_slot: Slot,
        role: Role,
        live_public: &Public,
    ) -> Result<(), KeyStoreError> {
        let to = Slot::live(role);
        let to_h = self.handle_for(to);
        let (staged_pub, staged_priv) = self.host_blobs(from_slot);
        let (live_pub, live_priv) = self.host_blobs(to);
        if let Some(p) = self.read_public_blob(&staged_pub)? {
            if &p != live_public {
                return Err(KeyStoreError::Rejected {
                    what: format!(
                        "{} does not hold the key at TPM handle 0x{to_h:08x}",
                        staged_pub.display()
                    ),
                    hint: Fix::NewIdentity.into(),
                });
            }
            let mv = |e: crate::Error| KeyStoreError::backend("move the key blobs", e.to_string());
            if fsutil::exists_nofollow(&staged_priv) {
                fsutil::rename(&staged_priv, &live_priv).map_err(mv)?;
            }
            fsutil::rename(&staged_pub, &live_pub).map_err(mv)?;
        }
        match self.read_public_blob(&live_pub)? {
            Some(p) if &p == live_public => Ok(()),
            _ => Err(KeyStoreError::Rejected {
                what: format!(
                    "the key blobs for TPM handle 0x{to_h:08x} ({}) are missing or stale",
                    live_pub.display()
                ),
                hint: Fix::NewIdentity.into(),
            }),
        }
    }
}
