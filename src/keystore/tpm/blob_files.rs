//! A slot's key blob files in the certificates directory (`<stem>.tpm.pub` /
//! `<stem>.tpm.priv`), written for today's connector.

use super::*;

impl TpmKeyStore {
    /// Remove the blobs of the slot handle `h` is (files of a closed set of names in
    /// the certificates directory: the tool's own).
    pub(super) fn remove_slot_blobs(&self, h: u32) -> Result<(), KeyStoreError> {
        let Some(slot) = self.slot_of(h) else {
            return Ok(());
        };
        let (p, s) = self.host_blobs(slot);
        for f in [s, p] {
            fsutil::remove_file(&f)
                .map_err(|e| KeyStoreError::backend("remove the key blob", e.to_string()))?;
        }
        Ok(())
    }

    pub(super) fn write_blobs(
        &self,
        slot: Slot,
        public: &Public,
        private: &Private,
        undo: &mut Undo,
    ) -> Result<(), KeyStoreError> {
        let (pub_path, priv_path) = self.host_blobs(slot);
        let encode = |e: String| KeyStoreError::backend("encode the key blobs", e);
        let pub_blob = blob::encode_public(public).map_err(encode)?;
        let priv_blob = blob::encode_private(private).map_err(encode)?;
        let write = |path: &PathBuf, e: crate::Error| {
            KeyStoreError::backend(format!("write {}", path.display()), e.to_string())
        };
        fsutil::atomic_write(&pub_path, &pub_blob, fsutil::PUBLIC)
            .map_err(|e| write(&pub_path, e))?;
        undo.files.push(pub_path);
        fsutil::atomic_write(&priv_path, &priv_blob, fsutil::SECRET)
            .map_err(|e| write(&priv_path, e))?;
        undo.files.push(priv_path);
        Ok(())
    }

    pub(super) fn read_public_blob(&self, path: &Path) -> Result<Option<Public>, KeyStoreError> {
        let Some(bytes) = fsutil::read_optional(path)
            .map_err(|e| KeyStoreError::backend("read the key blob", e.to_string()))?
        else {
            return Ok(None);
        };
        blob::decode_public(&bytes)
            .map(Some)
            .map_err(|e| KeyStoreError::Rejected {
                what: format!("{} is not a TPM2B_PUBLIC blob ({e})", path.display()),
                hint: Fix::NewIdentity.into(),
            })
    }

    pub(super) fn read_private_blob(&self, path: &Path) -> Result<Private, KeyStoreError> {
        let bytes = fsutil::read_optional(path)
            .map_err(|e| KeyStoreError::backend("read the key blob", e.to_string()))?
            .ok_or_else(|| KeyStoreError::Rejected {
                what: format!("{} is missing", path.display()),
                hint: Fix::NewIdentity.into(),
            })?;
        blob::decode_private(&bytes).map_err(|e| KeyStoreError::Rejected {
            what: format!("{} is not a TPM2B_PRIVATE blob ({e})", path.display()),
            hint: Fix::NewIdentity.into(),
        })
    }
}
