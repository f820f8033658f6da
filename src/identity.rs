//! The device's identity as one model: the state file, the crash journal, and the
//! read-only view every command reports from.
//!
//! **State file** (`sdv-provision.state.json`): which keystore, algorithm and key URIs
//! make up the identity. It is the commit point: an identity exists once its state
//! file names it.
//!
//! The state is validated input ([`State::parse`]): closed sets of key file names,
//! labels and handles, URIs of the recorded backend, and each TPM key's Name (its
//! ownership proof, DESIGN §6). Anything else is one error naming the file.
//!
//! **Journal**: see [`crate::txn`].

use std::collections::BTreeMap;
use std::path::{Component, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cert::CertInfo;
use crate::cloud::{self, Cloud};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keystore::{
    file::key_path, Algorithm, Backend, KeyUri, KeystoreKind, OwnedKey, Pkcs11Settings, Role,
    TpmName, TpmSettings,
};
use crate::model::Slot;
use crate::paths::{Layout, STATE_FILE};

pub use crate::paths::JOURNAL_FILE;
const VERSION: u32 = 1;

/// The committed identity. On disk it is [`StateFile`]: the backend settings flat,
/// as every version wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StateFile", into = "StateFile")]
pub struct State {
    pub version: u32,
    pub device_id: String,
    pub keystore: KeystoreKind,
    pub algorithm: Algorithm,
    /// Key URI per role (device paths for file keys).
    pub keys: BTreeMap<Role, KeyUri>,
    /// Ownership proof of each TPM key: its Name, recorded when it was made (or, for
    /// a key an older version made, once its public blob showed it is ours).
    pub tpm_names: BTreeMap<Role, TpmName>,
    /// The keystore's settings; its variant is `keystore`'s.
    pub backend: Backend,
    /// The keys were made by the original shell script and adopted as they were.
    pub adopted: bool,
    /// DPS endpoint, trust and assignment (DESIGN §3b); absent until `register` or
    /// `provision --dps-*` records them.
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
            tpm_names: BTreeMap::new(),
            backend: Backend::empty(keystore),
            adopted: false,
            dps: None,
        }
    }

    pub fn load(layout: &Layout) -> Result<Option<State>> {
        let path = layout.host_cert_file(STATE_FILE);
        let Some(text) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        State::parse(&text)
            .map(Some)
            .map_err(|detail| Error::InvalidState { path, detail })
    }

    /// Parse and validate a state file (callable on any bytes, e.g. a fuzz target).
    pub fn parse(bytes: &[u8]) -> std::result::Result<State, String> {
        let s: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// The closed sets of DESIGN §6: each key is its role's live key of the recorded
    /// keystore (file name, label, handle), on the recorded token; backend paths are
    /// absolute device paths without `..`.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.version != VERSION {
            return Err(format!("unknown version {}", self.version));
        }
        crate::device_id::validate(&self.device_id)?;
        if let Some(d) = &self.dps {
            d.validate().map_err(|e| format!("dps: {e}"))?;
        }
        if self.backend.kind() != self.keystore {
            return Err(format!(
                "backend settings of a {} keystore for a {} identity",
                self.backend.kind(),
                self.keystore
            ));
        }
        let tpm = self.backend.tpm().cloned().unwrap_or_default();
        let token = self.backend.pkcs11().and_then(|p| p.token.as_ref());
        for (role, uri) in &self.keys {
            let key = OwnedKey {
                uri: uri.clone(),
                tpm_name: self.tpm_names.get(role).cloned(),
            };
            let slot = crate::model::Slot {
                role: *role,
                staged: false,
            };
            crate::keystore::check_recorded_key(
                self.keystore,
                Some(slot),
                &key,
                crate::keystore::NameRule::Optional,
            )
            .map_err(|e| format!("{role} key: {e}"))?;
            match uri {
                KeyUri::TpmHandle(h) if *h != tpm.live_handle(*role) => {
                    return Err(format!(
                        "{role} key {uri} is not the {role} handle configured (0x{:08x})",
                        tpm.live_handle(*role)
                    ))
                }
                KeyUri::Pkcs11(u) if token.is_some_and(|t| *t != u.token) => {
                    return Err(format!("{role} key {uri} is not on the recorded token"))
                }
                _ => {}
            }
        }
        if let Some(role) = self.tpm_names.keys().find(|r| !self.keys.contains_key(r)) {
            return Err(format!("a TPM Name for the {role} key, which is not there"));
        }
        for h in [tpm.srk, tpm.primary_handle, tpm.secondary_handle]
            .into_iter()
            .flatten()
        {
            if !(0x8100_0000..=0x817F_FFFF).contains(&h) {
                return Err(format!("0x{h:08x} is not an owner persistent TPM handle"));
            }
        }
        let pkcs11 = self.backend.pkcs11().cloned().unwrap_or_default();
        let paths = [&pkcs11.module, &pkcs11.pin_file];
        for p in paths.into_iter().flatten().chain(&pkcs11.mounts) {
            let clean = p.is_absolute()
                && p.parent().is_some()
                && p.components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if !clean {
                return Err(format!(
                    "{} is not an absolute device path without `..`",
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// `role`'s key with its ownership proof.
    pub fn owned(&self, role: Role) -> Option<OwnedKey> {
        Some(OwnedKey {
            uri: self.keys.get(&role)?.clone(),
            tpm_name: self.tpm_names.get(&role).cloned(),
        })
    }

    /// Every key of the identity, with its proof.
    pub fn owned_keys(&self) -> Vec<OwnedKey> {
        Role::ALL
            .into_iter()
            .filter_map(|r| self.owned(r))
            .collect()
    }

    pub fn set_key(&mut self, role: Role, key: OwnedKey) {
        self.keys.insert(role, key.uri);
        match key.tpm_name {
            Some(n) => self.tpm_names.insert(role, n),
            None => self.tpm_names.remove(&role),
        };
    }

    pub fn forget(&mut self, role: Role) {
        self.keys.remove(&role);
        self.tpm_names.remove(&role);
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

/// The state file as JSON. Kept apart from [`State`] so the file stays what every
/// version wrote (and devices in the field have) while the code sees typed settings.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    device_id: String,
    keystore: KeystoreKind,
    algorithm: Algorithm,
    keys: BTreeMap<Role, KeyUri>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tpm_names: BTreeMap<Role, TpmName>,
    #[serde(default)]
    backend: BackendRecord,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    adopted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dps: Option<crate::dps::DpsRecord>,
}

/// [`Backend`] on disk: one flat object, a field per setting, absent when unset.
#[derive(Default, Serialize, Deserialize)]
struct BackendRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm_srk: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm_primary_handle: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm_secondary_handle: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs11_module: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs11_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs11_pin_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<PathBuf>,
}

impl BackendRecord {
    /// The settings of a `kind` keystore; a setting of another backend is refused
    /// (no version writes one: a state holding one was edited).
    fn typed(self, kind: KeystoreKind) -> std::result::Result<Backend, String> {
        let tpm = [
            ("tpm_srk", self.tpm_srk.is_some()),
            ("tpm_primary_handle", self.tpm_primary_handle.is_some()),
            ("tpm_secondary_handle", self.tpm_secondary_handle.is_some()),
        ];
        let pkcs11 = [
            ("pkcs11_module", self.pkcs11_module.is_some()),
            ("pkcs11_token", self.pkcs11_token.is_some()),
            ("pkcs11_pin_file", self.pkcs11_pin_file.is_some()),
            ("mounts", !self.mounts.is_empty()),
        ];
        let foreign: Vec<_> = match kind {
            KeystoreKind::File => tpm.iter().chain(&pkcs11).collect(),
            KeystoreKind::Tpm => pkcs11.iter().collect(),
            KeystoreKind::Pkcs11 => tpm.iter().collect(),
        };
        if let Some((name, _)) = foreign.into_iter().find(|(_, set)| *set) {
            return Err(format!(
                "backend: {name} is not a setting of a {kind} keystore"
            ));
        }
        Ok(match kind {
            KeystoreKind::File => Backend::File,
            KeystoreKind::Tpm => Backend::Tpm(TpmSettings {
                srk: self.tpm_srk,
                primary_handle: self.tpm_primary_handle,
                secondary_handle: self.tpm_secondary_handle,
            }),
            KeystoreKind::Pkcs11 => Backend::Pkcs11(Pkcs11Settings {
                module: self.pkcs11_module,
                token: self.pkcs11_token,
                pin_file: self.pkcs11_pin_file,
                mounts: self.mounts,
            }),
        })
    }
}

impl From<Backend> for BackendRecord {
    fn from(b: Backend) -> BackendRecord {
        match b {
            Backend::File => BackendRecord::default(),
            Backend::Tpm(t) => BackendRecord {
                tpm_srk: t.srk,
                tpm_primary_handle: t.primary_handle,
                tpm_secondary_handle: t.secondary_handle,
                ..BackendRecord::default()
            },
            Backend::Pkcs11(p) => BackendRecord {
                pkcs11_module: p.module,
                pkcs11_token: p.token,
                pkcs11_pin_file: p.pin_file,
                mounts: p.mounts,
                ..BackendRecord::default()
            },
        }
    }
}

impl TryFrom<StateFile> for State {
    type Error = String;
    fn try_from(f: StateFile) -> std::result::Result<State, String> {
        Ok(State {
            backend: f.backend.typed(f.keystore)?,
            version: f.version,
            device_id: f.device_id,
            keystore: f.keystore,
            algorithm: f.algorithm,
            keys: f.keys,
            tpm_names: f.tpm_names,
            adopted: f.adopted,
            dps: f.dps,
        })
    }
}

impl From<State> for StateFile {
    fn from(s: State) -> StateFile {
        StateFile {
            version: s.version,
            device_id: s.device_id,
            keystore: s.keystore,
            algorithm: s.algorithm,
            keys: s.keys,
            tpm_names: s.tpm_names,
            backend: s.backend.into(),
            adopted: s.adopted,
            dps: s.dps,
        }
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
                    (None, true) => Some(KeyUri::File(key_path(Slot::live(role)))),
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
    let cert_path = layout.host_cert_file(&Slot::live(role).cert_file());
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
        s.keys
            .insert(role, KeyUri::File(key_path(Slot::live(role))));
    }
    s.adopted = true;
    s
}

/// The original script's files: `device.crt` + `device.key`.
pub fn legacy_files_present(layout: &Layout) -> bool {
    let crt = layout.host_cert_file(&Slot::live(Role::Primary).cert_file());
    let key = layout.host(key_path(Slot::live(Role::Primary)));
    fsutil::exists_nofollow(&crt) && fsutil::exists_nofollow(&key)
}

/// How the connector reaches `role`'s key, from the state alone (no keystore access).
pub fn key_ref(state: &State, role: Role) -> Option<crate::keystore::KeyRef> {
    use crate::keystore::KeyRef;
    let uri = state.keys.get(&role)?;
    let stem = Slot::live(role).stem();
    Some(match uri {
        KeyUri::File(p) => KeyRef::File {
            key_file: p.clone(),
        },
        KeyUri::TpmHandle(h) => KeyRef::Tpm {
            handle: *h,
            srk: state.backend.tpm().map_or(DEFAULT_SRK, |t| t.srk()),
            pub_blob: Layout::cert_file(&format!("{stem}.tpm.pub")),
            priv_blob: Layout::cert_file(&format!("{stem}.tpm.priv")),
        },
        KeyUri::Pkcs11(u) => {
            let settings = state.backend.pkcs11()?;
            let module = settings.module.clone()?;
            KeyRef::Pkcs11 {
                uri: u.clone(),
                // What the module needs, derived from its configuration every run;
                // never the state's record of it (DESIGN §6).
                mounts: pkcs11_mounts(&module)?,
                module,
                pin_file: settings.pin_file.clone()?,
            }
        }
    })
}

/// The host paths a containerised consumer of `module` needs besides it; `None`
/// when the path is not a loadable PKCS#11 module.
#[cfg(feature = "pkcs11")]
fn pkcs11_mounts(module: &std::path::Path) -> Option<Vec<PathBuf>> {
    crate::keystore::pkcs11::consumer_mounts_of(module).ok()
}

#[cfg(not(feature = "pkcs11"))]
fn pkcs11_mounts(_module: &std::path::Path) -> Option<Vec<PathBuf>> {
    Some(Vec::new())
}

pub use crate::keystore::DEFAULT_SRK;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_validation() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let mut s = State::new("dev-1", KeystoreKind::File, Algorithm::Rsa2048);
        s.keys.insert(
            Role::Primary,
            KeyUri::File(key_path(Slot::live(Role::Primary))),
        );
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

    /// Keys of the hardware keystores must be their role's slot: the configured
    /// handle, the tool's label on the recorded token; Names only for present keys.
    #[test]
    fn state_keys_are_their_slots() {
        let name = format!("\"000b{}\"", "ab".repeat(32));
        let tpm = |keys: &str, extra: &str| {
            format!(
                r#"{{"version":1,"device_id":"d","keystore":"tpm","algorithm":"rsa-2048","keys":{{{keys}}}{extra}}}"#
            )
        };
        let p11 = |uri: &str| {
            format!(
                r#"{{"version":1,"device_id":"d","keystore":"pkcs11","algorithm":"rsa-2048","keys":{{"primary":"{uri}"}},"backend":{{"pkcs11_token":"leda"}}}}"#
            )
        };
        let good = [
            tpm(r#""primary":"handle:0x81000010""#, ""),
            tpm(
                r#""primary":"handle:0x81000020""#,
                r#","backend":{"tpm_primary_handle":2164260896}"#,
            ),
            tpm(
                r#""primary":"handle:0x81000010""#,
                &format!(r#","tpm_names":{{"primary":{name}}}"#),
            ),
            p11("pkcs11:token=leda;object=device-primary;id=%01;type=private"),
        ];
        for g in &good {
            State::parse(g.as_bytes()).unwrap_or_else(|e| panic!("{e}: {g}"));
        }
        let bad = [
            tpm(r#""primary":"handle:0x81000020""#, ""),
            tpm(r#""primary":"handle:0x81000011""#, ""),
            tpm(r#""primary":"handle:0x81000110""#, ""),
            tpm(
                r#""primary":"handle:0x81000010""#,
                &format!(r#","tpm_names":{{"secondary":{name}}}"#),
            ),
            tpm(
                r#""primary":"handle:0x81000010""#,
                r#","tpm_names":{"primary":"000b00"}"#,
            ),
            p11("pkcs11:token=leda;object=device-secondary;id=%01;type=private"),
            p11("pkcs11:token=other;object=device-primary;id=%01;type=private"),
            p11("pkcs11:token=leda;object=someone-else;id=%01;type=private"),
        ];
        for b in &bad {
            assert!(State::parse(b.as_bytes()).is_err(), "accepted: {b}");
        }
    }

    /// The state file is the flat JSON every version wrote: read into typed settings
    /// and written back byte for byte; a setting of another backend is refused.
    #[test]
    fn state_file_json_is_unchanged_by_typed_settings() {
        let states = [
            r#"{
  "version": 1,
  "device_id": "d",
  "keystore": "tpm",
  "algorithm": "rsa-2048",
  "keys": {
    "primary": "handle:0x81000020"
  },
  "backend": {
    "tpm_srk": 2164260865,
    "tpm_primary_handle": 2164260896
  }
}"#,
            r#"{
  "version": 1,
  "device_id": "d",
  "keystore": "pkcs11",
  "algorithm": "ecdsa-p256",
  "keys": {
    "primary": "pkcs11:token=leda;object=device-primary;id=%01;type=private"
  },
  "backend": {
    "pkcs11_module": "/usr/lib/softhsm/libsofthsm2.so",
    "pkcs11_token": "leda",
    "pkcs11_pin_file": "/data/var/certificates/pkcs11.pin",
    "mounts": [
      "/var/lib/softhsm/tokens"
    ]
  }
}"#,
            r#"{
  "version": 1,
  "device_id": "d",
  "keystore": "file",
  "algorithm": "rsa-2048",
  "keys": {},
  "backend": {}
}"#,
        ];
        for text in states {
            let s = State::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(s.backend.kind(), s.keystore);
            assert_eq!(serde_json::to_string_pretty(&s).unwrap(), text);
        }
        let tpm = State::parse(states[0].as_bytes()).unwrap();
        assert_eq!(
            tpm.backend.tpm().unwrap().live_handle(Role::Primary),
            0x8100_0020
        );
        assert_eq!(
            tpm.backend.tpm().unwrap().live_handle(Role::Secondary),
            0x8100_0011
        );
        let foreign = [
            (
                states[0],
                r#""tpm_srk": 2164260865,"#,
                r#""pkcs11_token": "leda","#,
            ),
            (
                states[1],
                r#""pkcs11_token": "leda","#,
                r#""pkcs11_token": "leda", "tpm_srk": 2164260865,"#,
            ),
            (
                states[2],
                r#""backend": {}"#,
                r#""backend": {"mounts": ["/usr/lib"]}"#,
            ),
        ];
        for (text, from, to) in foreign {
            let edited = text.replace(from, to);
            let e = State::parse(edited.as_bytes()).unwrap_err();
            assert!(e.contains("is not a setting of a"), "{e}: {edited}");
        }
    }
}
