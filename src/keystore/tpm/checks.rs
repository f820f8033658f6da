//! `verify`'s TPM checks: the blobs hold the handle's key, and the key has noDA.

use super::*;

impl TpmKeyStore {
    /// See [`KeyStore::check_copies`].
    pub(super) fn check_blobs(&mut self, uri: &KeyUri) -> Result<String, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let (pub_path, priv_path) = self.host_blobs(self.configured_slot(h)?);
        let stale = |what: String| KeyStoreError::Rejected {
            what,
            hint: format!(
                "today's connector would load another key than the handle's; {}",
                Fix::NewIdentity
            ),
        };
        let Some((object, handle_public)) = self.read_persistent(h)? else {
            return Err(KeyStoreError::NotFound {
                uri: uri.to_string(),
            });
        };
        self.close(object);
        let blob_public = self
            .read_public_blob(&pub_path)?
            .ok_or_else(|| stale(format!("{} is missing", pub_path.display())))?;
        if blob_public != handle_public {
            return Err(stale(format!(
                "{} is not the public area of the key at TPM handle 0x{h:08x}",
                pub_path.display()
            )));
        }
        let private = self.read_private_blob(&priv_path)?;
        let srk = self.srk;
        let Some((srk_object, _)) = self.read_persistent(srk)? else {
            return Err(stale(format!(
                "the storage root key 0x{srk:08x} the blobs load under is gone"
            )));
        };
        let ctx = self.ctx();
        let loaded = ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.load(srk_object.into(), private, blob_public)
        });
        self.close(srk_object);
        let transient = loaded.map_err(|e| {
            stale(format!(
                "{} does not load under the SRK 0x{srk:08x} ({})",
                priv_path.display(),
                tss_error("TPM2_Load", e)
            ))
        })?;
        if let Err(e) = self.ctx().flush_context(transient.into()) {
            tracing::warn!("could not flush the transient copy of the key: {e}");
        }
        Ok(format!(
            "{} and {} load under SRK 0x{srk:08x} as the key at 0x{h:08x}",
            pub_path.display(),
            priv_path.display()
        ))
    }

    /// See [`KeyStore::check_key`].
    pub(super) fn check_no_da(&mut self, uri: &KeyUri) -> Result<String, KeyStoreError> {
        let h = tpm_handle(uri)?;
        let Some((object, public)) = self.read_persistent(h)? else {
            return Err(KeyStoreError::NotFound {
                uri: uri.to_string(),
            });
        };
        self.close(object);
        if public.object_attributes().no_da() {
            return Ok(format!(
                "the key at 0x{h:08x} has noDA: a power loss never counts against it"
            ));
        }
        Err(KeyStoreError::Rejected {
            what: format!(
                "the key at 0x{h:08x} lacks noDA (made by an older sdv-provision): every \
                 power loss after it signed counts as a failed authorization, and a few \
                 lock the identity out"
            ),
            hint: "replace both keys: run `sdv-provision rotate --promote`, register the \
                   new thumbprints with the cloud, then run it again and register again"
                .into(),
        })
    }
}
