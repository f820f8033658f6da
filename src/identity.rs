//! The device's identity as one model: the state file, the crash journal, and the
//! read-only view every command reports from.
//!
//! **State file** (`sdv-provision.state.json`): which keystore, algorithm and key URIs
//! make up the identity. It is the commit point: an identity exists once its state
//! file names it.
//!
//! **Journal** (`sdv-provision.journal.json`): written *before* a run makes keys, so a
//! run killed at any instant is finished or undone by the next one:
//! - `prepared`: keys and files are being made. Recovery removes them (roll back).
//! - `committed`: the new keys are complete; the old ones must go and staged ones move
//!   into place. Recovery does the remaining steps (roll forward). Each step is
//!   idempotent and the journal records when the destructive one is done.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cert::CertInfo;
use crate::cloud::{self, Cloud};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keystore::{
    file::key_path, Algorithm, BackendRecord, KeyStore, KeyUri, KeystoreKind, Role,
};
use crate::paths::{self, Layout, CERT_DIR, STATE_FILE};

pub const JOURNAL_FILE: &str = "sdv-provision.journal.json";
const VERSION: u32 = 1;

/// The committed identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    pub device_id: String,
    pub keystore: KeystoreKind,
    pub algorithm: Algorithm,
    /// Key URI per role (device paths for file keys).
    pub keys: BTreeMap<Role, KeyUri>,
    #[serde(default)]
    pub backend: BackendRecord,
    /// The keys were made by the original shell script and adopted as they were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
    /// DPS endpoint, trust and assignment (DESIGN §3b); absent until `register` or
    /// `provision --dps-*` records them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps: Option<crate::dps::DpsRecord>,
}

impl State {
    pub fn new(device_id: &str, keystore: KeystoreKind, algorithm: Algorithm) -> State {
        State {
            version: VERSION,
            device_id: device_id.to_owned(),
            keystore,
            algorithm,
            keys: BTreeMap::new(),
            backend: BackendRecord::default(),
            adopted: false,
            dps: None,
        }
    }

    pub fn load(layout: &Layout) -> Result<Option<State>> {
        let path = layout.host_cert_file(STATE_FILE);
        let Some(text) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        let bad = |detail: String| Error::InvalidState {
            path: path.clone(),
            detail,
        };
        let s: State = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if s.version != VERSION {
            return Err(bad(format!("unknown version {}", s.version)));
        }
        crate::device_id::validate(&s.device_id).map_err(bad)?;
        if let Some(d) = &s.dps {
            d.validate().map_err(|e| bad(format!("dps: {e}")))?;
        }
        for (role, uri) in &s.keys {
            let fits = matches!(
                (s.keystore, uri),
                (KeystoreKind::File, KeyUri::File(_))
                    | (KeystoreKind::Tpm, KeyUri::TpmHandle(_))
                    | (KeystoreKind::Pkcs11, KeyUri::Pkcs11(_))
            );
            if !fits {
                return Err(bad(format!(
                    "{role} key {uri} does not fit keystore {}",
                    s.keystore
                )));
            }
            if let KeyUri::File(p) = uri {
                // A key file sits directly in the certificates directory: a path
                // that merely starts with it (the directory itself, a subdirectory)
                // is not one of ours.
                if p.parent() != Some(std::path::Path::new(CERT_DIR)) {
                    return Err(bad(format!(
                        "{role} key {} is outside {CERT_DIR}",
                        p.display()
                    )));
                }
            }
        }
        Ok(Some(s))
    }

    pub fn save(&self, layout: &Layout) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(self).expect("state serialises");
        text.push(b'\n');
        fsutil::atomic_write(&layout.host_cert_file(STATE_FILE), &text, fsutil::PUBLIC)
    }

    pub fn remove(layout: &Layout) -> Result<()> {
        fsutil::remove_file(&layout.host_cert_file(STATE_FILE))
    }

    pub fn is_complete(&self) -> bool {
        Role::ALL.iter().all(|r| self.keys.contains_key(r))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prepared,
    Committed,
}

/// In-flight work; see the module docs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub phase: Phase,
    pub keystore: KeystoreKind,
    /// Keys this run makes. Rolled back (removed) while `prepared`.
    pub new_keys: Vec<KeyUri>,
    /// Certificate-directory files this run writes; removed on roll-back.
    pub new_files: Vec<String>,
    /// `committed`: live keys that the new identity replaces.
    #[serde(default)]
    pub old_keys: Vec<KeyUri>,
    /// The keystore holding `old_keys`, when it differs (`--force` to another backend).
    #[serde(default)]
    pub old_keystore: Option<KeystoreKind>,
    #[serde(default)]
    pub old_removed: bool,
    /// `committed`: (source key, role it becomes live as, source cert file name).
    #[serde(default)]
    pub moves: Vec<(KeyUri, Role, String)>,
    /// `committed`: the state to write once the moves are done (key URIs of moved
    /// roles are filled in by the move). `None` for a reset: the identity goes.
    #[serde(default)]
    pub next_state: Option<State>,
    /// `committed`: certificate-directory files to remove once the old keys are gone
    /// (a reset's certificates, cloud configuration, PIN file).
    #[serde(default)]
    pub remove_files: Vec<String>,
}

impl Journal {
    pub fn prepared(keystore: KeystoreKind) -> Journal {
        Journal {
            phase: Phase::Prepared,
            keystore,
            new_keys: Vec::new(),
            new_files: Vec::new(),
            old_keys: Vec::new(),
            old_keystore: None,
            old_removed: false,
            moves: Vec::new(),
            next_state: None,
            remove_files: Vec::new(),
        }
    }

    pub fn load(layout: &Layout) -> Result<Option<Journal>> {
        let path = layout.host_cert_file(JOURNAL_FILE);
        let Some(text) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::InvalidState {
                path,
                detail: e.to_string(),
            })
    }

    pub fn save(&self, layout: &Layout) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("journal serialises");
        fsutil::atomic_write(&layout.host_cert_file(JOURNAL_FILE), &text, fsutil::PUBLIC)
    }

    pub fn clear(layout: &Layout) -> Result<()> {
        fsutil::remove_file(&layout.host_cert_file(JOURNAL_FILE))
    }

    /// Undo a `prepared` run: remove what it made. Best effort per item, so one
    /// missing object does not strand the rest.
    pub fn roll_back(&self, layout: &Layout, ks: &mut dyn KeyStore) -> Result<()> {
        for uri in &self.new_keys {
            ks.remove(uri)?;
        }
        for f in &self.new_files {
            fsutil::remove_file(&layout.host_cert_file(f))?;
        }
        Journal::clear(layout)
    }

    /// Finish a `committed` run: remove the replaced keys, move staged keys and certs
    /// into place, write the new state. A reset (no next state) removes the state.
    pub fn roll_forward(
        mut self,
        layout: &Layout,
        ks: &mut dyn KeyStore,
        old_ks: Option<&mut dyn KeyStore>,
    ) -> Result<Option<State>> {
        if !self.old_removed {
            let old: &mut dyn KeyStore = match old_ks {
                Some(o) => o,
                None => &mut *ks,
            };
            for uri in &self.old_keys {
                old.remove(uri)?;
            }
            // Nothing was removed for a fresh identity: no need to record (and fsync)
            // progress; redoing an empty removal after a crash is harmless.
            if !self.old_keys.is_empty() {
                self.old_removed = true;
                self.save(layout)?;
            }
        }
        for f in &self.remove_files {
            fsutil::remove_file(&layout.host_cert_file(f))?;
        }
        let Some(mut state) = self.next_state.clone() else {
            State::remove(layout)?;
            Journal::clear(layout)?;
            return Ok(None);
        };
        for (from, role, cert_file) in &self.moves {
            let live = ks.promote(from, *role)?;
            let live_cert = paths::cert_name(*role, false);
            if cert_file != &live_cert {
                let src = layout.host_cert_file(cert_file);
                if fsutil::exists_nofollow(&src) {
                    fsutil::rename(&src, &layout.host_cert_file(&live_cert))?;
                }
            }
            state.keys.insert(*role, live);
        }
        state.save(layout)?;
        Journal::clear(layout)?;
        Ok(Some(state))
    }
}

/// Certificate of one role, as found on disk.
#[derive(Debug, Clone)]
pub struct RoleView {
    pub role: Role,
    /// Host path of the certificate.
    pub cert_path: PathBuf,
    pub key_uri: Option<KeyUri>,
    pub cert: std::result::Result<CertInfo, String>,
}

/// Everything configured, read without side effects (for `status`, reports, and as
/// the starting point of every command).
#[derive(Debug)]
pub struct Identity {
    pub state: Option<State>,
    /// Keys were found as the original script left them (no state file yet).
    pub legacy: bool,
    pub cloud: Option<Cloud>,
    pub device_id: Option<String>,
    pub roles: Vec<RoleView>,
}

impl Identity {
    /// Read the identity under `layout`. Never writes.
    pub fn load(layout: &Layout) -> Result<Identity> {
        let mut warnings = Vec::new();
        let state = State::load(layout)?;
        let cloud = cloud::load(layout)?;
        let legacy = state.is_none() && legacy_files_present(layout);
        let device_id = match &state {
            Some(s) => Some(s.device_id.clone()),
            None => crate::device_id::read_file(layout, &mut warnings),
        };
        let roles = Role::ALL
            .iter()
            .map(|&role| {
                let key_uri = match (&state, legacy) {
                    (Some(s), _) => s.keys.get(&role).cloned(),
                    (None, true) => Some(KeyUri::File(key_path(role, false))),
                    (None, false) => None,
                };
                role_view(layout, role, key_uri)
            })
            .collect();
        Ok(Identity {
            state,
            legacy,
            cloud,
            device_id,
            roles,
        })
    }

    pub fn role(&self, role: Role) -> &RoleView {
        &self.roles[role as usize]
    }
}

pub fn role_view(layout: &Layout, role: Role, key_uri: Option<KeyUri>) -> RoleView {
    let cert_path = layout.host_cert_file(&paths::cert_name(role, false));
    let cert = match fsutil::read_optional(&cert_path) {
        Ok(Some(pem)) => CertInfo::from_pem(&cert_path, &pem).map_err(|e| e.to_string()),
        Ok(None) => Err(format!("{} is missing", cert_path.display())),
        Err(e) => Err(e.to_string()),
    };
    RoleView {
        role,
        cert_path,
        key_uri,
        cert,
    }
}

/// The state the original script's files amount to (file keys at the fixed paths).
pub fn legacy_state(device_id: &str) -> State {
    let mut s = State::new(device_id, KeystoreKind::File, Algorithm::Rsa2048);
    for role in Role::ALL {
        s.keys.insert(role, KeyUri::File(key_path(role, false)));
    }
    s.adopted = true;
    s
}

/// The original script's files: `device.crt` + `device.key`.
pub fn legacy_files_present(layout: &Layout) -> bool {
    let crt = layout.host_cert_file(&paths::cert_name(Role::Primary, false));
    let key = layout.host(key_path(Role::Primary, false));
    fsutil::exists_nofollow(&crt) && fsutil::exists_nofollow(&key)
}

/// How the connector reaches `role`'s key, from the state alone (no keystore access).
pub fn key_ref(state: &State, role: Role) -> Option<crate::keystore::KeyRef> {
    use crate::keystore::KeyRef;
    let uri = state.keys.get(&role)?;
    let stem = paths::stem(role, false);
    Some(match uri {
        KeyUri::File(p) => KeyRef::File {
            key_file: p.clone(),
        },
        KeyUri::TpmHandle(h) => KeyRef::Tpm {
            handle: *h,
            srk: state.backend.tpm_srk.unwrap_or(DEFAULT_SRK),
            pub_blob: Layout::cert_file(&format!("{stem}.tpm.pub")),
            priv_blob: Layout::cert_file(&format!("{stem}.tpm.priv")),
        },
        KeyUri::Pkcs11(u) => KeyRef::Pkcs11 {
            uri: u.clone(),
            module: state.backend.pkcs11_module.clone()?,
            pin_file: state.backend.pkcs11_pin_file.clone()?,
            mounts: state.backend.mounts.clone(),
        },
    })
}

/// The storage root key's persistent handle (TCG provisioning guidance).
pub const DEFAULT_SRK: u32 = 0x8100_0001;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_validation() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let mut s = State::new("dev-1", KeystoreKind::File, Algorithm::Rsa2048);
        s.keys
            .insert(Role::Primary, KeyUri::File(key_path(Role::Primary, false)));
        s.save(&layout).unwrap();
        assert_eq!(State::load(&layout).unwrap(), Some(s.clone()));

        let path = layout.host_cert_file(STATE_FILE);
        for bad in [
            r#"{"version":1}"#,
            "not json",
            r#"{"version":1,"device_id":"a b","keystore":"file","algorithm":"rsa-2048","keys":{}}"#,
            r#"{"version":1,"device_id":"d","keystore":"file","algorithm":"rsa-2048","keys":{"primary":"handle:0x81000010"}}"#,
            r#"{"version":1,"device_id":"d","keystore":"file","algorithm":"rsa-2048","keys":{"primary":"file:/etc/shadow"}}"#,
            r#"{"version":2,"device_id":"d","keystore":"file","algorithm":"rsa-2048","keys":{}}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(State::load(&layout), Err(Error::InvalidState { .. })),
                "{bad}"
            );
        }
    }
}
