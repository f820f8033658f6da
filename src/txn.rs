//! The transaction: making keys, committing them, and finishing or undoing what a
//! killed run left, all beside the journal that makes it crash-safe.
//!
//! **Journal** (`sdv-provision.journal.json`), one of:
//! - [`Journal`] `prepared`: keys and certificates are being made. It lists the slots
//!   the run planned and, for each key that exists, its ownership proof, recorded
//!   the moment the key exists (TPM: its Name; PKCS#11: the CKA_ID this run drew;
//!   files: their name from a closed set). Recovery rolls back: it removes the
//!   recorded keys whose current identity still matches the proof, and the planned
//!   slots' certificates. A planned key without a proof is not ours: it is left
//!   alone, and reported.
//! - `committed`: the new keys are complete; the old ones (with their proofs) go and
//!   staged ones move into place. Recovery does the remaining steps (roll forward);
//!   each step is idempotent and the journal records when the destructive one is done.
//!
//! The journal is validated input ([`Journal::parse`]): closed sets of file names,
//! labels and slots, URIs of the journal's own keystore. Commands never write one by
//! hand: each operation has its constructor (`prepare` for provision and rotate,
//! `promote`, `reset`), and what is staged is the journal's data, not a file name.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::identity::State;
use crate::keystore::{self, Algorithm, KeyStore, KeyUri, KeystoreKind, NameRule, OwnedKey, Role};
use crate::paths::{self, Layout};

pub use crate::paths::JOURNAL_FILE;
const VERSION: u32 = 1;

pub use crate::model::Slot;

/// A key this run made, in the slot it was made in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Made {
    slot: Slot,
    key: OwnedKey,
}

/// In-flight work; see the module docs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Journal {
    Prepared(Prepared),
    Committed(Box<Committed>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepared {
    version: u32,
    keystore: KeystoreKind,
    /// What the run planned to make (certificates and keys of these slots).
    planned: Vec<Slot>,
    /// The keys that exist, each with its proof.
    made: Vec<Made>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Committed {
    version: u32,
    keystore: KeystoreKind,
    /// The keystore holding `old_keys`, when it differs (`--force` to another backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    old_keystore: Option<KeystoreKind>,
    /// Live keys that the new identity replaces, with their proofs.
    old_keys: Vec<OwnedKey>,
    old_removed: bool,
    /// Keys that move into a live slot: (key, from slot, to role).
    moves: Vec<(Made, Role)>,
    /// The state to write once the moves are done (moved roles are filled in by the
    /// move). `None` for a reset: the identity goes.
    next_state: Option<State>,
    /// Certificate-directory files to remove once the old keys are gone (a reset's).
    remove_files: Vec<String>,
}

impl Journal {
    /// The journal of a run that builds keys for `slots` (provision, rotate).
    pub fn prepare(keystore: KeystoreKind, slots: &[Slot]) -> Journal {
        Journal::Prepared(Prepared {
            version: VERSION,
            keystore,
            planned: slots.to_vec(),
            made: Vec::new(),
        })
    }

    /// `rotate --promote`: the secondary becomes the primary, the primary goes.
    pub fn promote(state: &State) -> Result<Journal> {
        let secondary = state.owned(Role::Secondary).ok_or_else(|| {
            Error::input(
                "there is no secondary key to promote",
                "run `sdv-provision rotate` first",
            )
        })?;
        let mut next = state.clone();
        next.forget(Role::Secondary);
        let from = Slot {
            role: Role::Secondary,
            staged: false,
        };
        Ok(Journal::Committed(Box::new(Committed {
            version: VERSION,
            keystore: state.keystore,
            old_keystore: None,
            old_keys: state.owned(Role::Primary).into_iter().collect(),
            old_removed: false,
            moves: vec![(
                Made {
                    slot: from,
                    key: secondary,
                },
                Role::Primary,
            )],
            next_state: Some(next),
            remove_files: Vec::new(),
        })))
    }

    /// `reset`: the identity's keys (by their proofs) and files go, then the state.
    pub fn reset(state: Option<&State>) -> Journal {
        Journal::Committed(Box::new(Committed {
            version: VERSION,
            keystore: state.map_or(KeystoreKind::File, |s| s.keystore),
            old_keystore: None,
            old_keys: state.map(State::owned_keys).unwrap_or_default(),
            old_removed: false,
            moves: Vec::new(),
            next_state: None,
            remove_files: identity_files(),
        }))
    }

    /// Parse and validate a journal (callable on any bytes, e.g. from a fuzz target).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Journal, String> {
        let j: Journal = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        j.validate()?;
        Ok(j)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Journal::Prepared(p) => {
                check_version(p.version)?;
                for m in &p.made {
                    if !p.planned.contains(&m.slot) {
                        return Err(format!("key {} is in no planned slot", m.key.uri));
                    }
                    keystore::check_recorded_key(
                        p.keystore,
                        Some(m.slot),
                        &m.key,
                        NameRule::Required,
                    )?;
                }
                Ok(())
            }
            Journal::Committed(c) => {
                check_version(c.version)?;
                let old_kind = c.old_keystore.unwrap_or(c.keystore);
                for k in &c.old_keys {
                    keystore::check_recorded_key(old_kind, None, k, NameRule::Optional)?;
                }
                for (m, _) in &c.moves {
                    keystore::check_recorded_key(
                        c.keystore,
                        Some(m.slot),
                        &m.key,
                        NameRule::Optional,
                    )?;
                }
                let own = identity_files();
                if let Some(f) = c.remove_files.iter().find(|f| !own.contains(f)) {
                    return Err(format!("{f:?} is not a file sdv-provision writes"));
                }
                if let Some(s) = &c.next_state {
                    s.validate()?;
                }
                Ok(())
            }
        }
    }

    /// Every key URI the journal names (for checks against the configured slots).
    pub fn uris(&self) -> Vec<&KeyUri> {
        match self {
            Journal::Prepared(p) => p.made.iter().map(|m| &m.key.uri).collect(),
            Journal::Committed(c) => c
                .old_keys
                .iter()
                .chain(c.moves.iter().map(|(m, _)| &m.key))
                .map(|k| &k.uri)
                .collect(),
        }
    }

    pub fn load(layout: &Layout) -> Result<Option<Journal>> {
        let path = layout.host_cert_file(JOURNAL_FILE);
        let Some(text) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        Journal::parse(&text)
            .map(Some)
            .map_err(|detail| Error::InvalidState { path, detail })
    }

    pub fn save(&self, layout: &Layout) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("journal serialises");
        fsutil::atomic_write(&layout.host_cert_file(JOURNAL_FILE), &text, fsutil::PUBLIC)
    }

    pub fn clear(layout: &Layout) -> Result<()> {
        fsutil::remove_file(&layout.host_cert_file(JOURNAL_FILE))
    }

    pub fn keystore(&self) -> KeystoreKind {
        match self {
            Journal::Prepared(p) => p.keystore,
            Journal::Committed(c) => c.keystore,
        }
    }

    /// Record a key this run just made, durably, before anything else happens.
    fn record(&mut self, layout: &Layout, slot: Slot, key: &OwnedKey) -> Result<()> {
        let Journal::Prepared(p) = self else {
            unreachable!("keys are made only while prepared")
        };
        p.made.push(Made {
            slot,
            key: key.clone(),
        });
        self.save(layout)
    }

    /// Undo a `prepared` run: remove the keys it recorded (while they are still what
    /// their proofs name) and its planned certificates. Returns what was planned but
    /// not recorded, and recorded keys whose location now holds something else: left
    /// alone, for the caller to report.
    pub fn roll_back(&self, layout: &Layout, ks: &mut dyn KeyStore) -> Result<Vec<String>> {
        let Journal::Prepared(p) = self else {
            return Ok(Vec::new());
        };
        let mut left = Vec::new();
        for m in &p.made {
            if !ks.remove_owned(&m.key)? {
                left.push(format!(
                    "{} now holds a key sdv-provision did not make",
                    m.key.uri
                ));
            }
        }
        let unrecorded: Vec<Slot> = p
            .planned
            .iter()
            .filter(|s| !p.made.iter().any(|m| m.slot == **s))
            .copied()
            .collect();
        if p.keystore == KeystoreKind::File {
            // A key file's proof is its name: a planned one is ours, recorded or not.
            for s in &unrecorded {
                let key = OwnedKey::new(KeyUri::File(keystore::file::key_path(*s)));
                ks.remove_owned(&key)?;
            }
        } else if let Some(slot) = unrecorded.first() {
            // Keys are made in plan order: the first unrecorded slot is the one the
            // killed run was making (later ones were never started).
            left.push(format!(
                "the {} key{} an interrupted run was making was never recorded, so \
                 anything it left in the keystore is not provably sdv-provision's",
                slot.role,
                if slot.staged { " (staged)" } else { "" }
            ));
        }
        for slot in &p.planned {
            fsutil::remove_file(&layout.host_cert_file(&slot.cert_file()))?;
        }
        Journal::clear(layout)?;
        Ok(left)
    }

    /// Finish a `committed` run: remove the replaced keys, move staged keys and certs
    /// into place, write the new state. A reset (no next state) removes the state.
    pub fn roll_forward(
        self,
        layout: &Layout,
        ks: &mut dyn KeyStore,
        old_ks: Option<&mut dyn KeyStore>,
    ) -> Result<Option<State>> {
        let Journal::Committed(mut c) = self else {
            unreachable!("only a committed journal rolls forward")
        };
        if !c.old_removed {
            let old: &mut dyn KeyStore = match old_ks {
                Some(o) => o,
                None => &mut *ks,
            };
            for k in &c.old_keys {
                if !old.remove_owned(k)? {
                    tracing::warn!(
                        "{} holds a key sdv-provision did not make; left in place",
                        k.uri
                    );
                }
            }
            // Nothing was removed for a fresh identity: no need to record (and fsync)
            // progress; redoing an empty removal after a crash is harmless.
            if !c.old_keys.is_empty() {
                c.old_removed = true;
                Journal::Committed(c.clone()).save(layout)?;
            }
        }
        for f in &c.remove_files {
            fsutil::remove_file(&layout.host_cert_file(f))?;
        }
        let Some(mut state) = c.next_state.clone() else {
            State::remove(layout)?;
            Journal::clear(layout)?;
            return Ok(None);
        };
        for (m, role) in &c.moves {
            let live = ks.promote(&m.key.uri, *role)?;
            let live_cert = Slot::live(*role).cert_file();
            let cert_file = m.slot.cert_file();
            if cert_file != live_cert {
                let src = layout.host_cert_file(&cert_file);
                if fsutil::exists_nofollow(&src) {
                    fsutil::rename(&src, &layout.host_cert_file(&live_cert))?;
                }
            }
            state.set_key(
                *role,
                OwnedKey {
                    uri: live,
                    tpm_name: m.key.tpm_name.clone(),
                },
            );
        }
        state.save(layout)?;
        Journal::clear(layout)?;
        Ok(Some(state))
    }

    /// The old keystore a committed journal still has to remove keys from, when it
    /// is not the journal's own.
    pub fn pending_old_keystore(&self) -> Option<KeystoreKind> {
        match self {
            Journal::Committed(c) if !c.old_removed => c.old_keystore.filter(|k| *k != c.keystore),
            _ => None,
        }
    }

    /// The old keys a committed journal has yet to remove.
    pub fn pending_old_keys(&self) -> &[OwnedKey] {
        match self {
            Journal::Committed(c) if !c.old_removed => &c.old_keys,
            _ => &[],
        }
    }

    pub fn next_state(&self) -> Option<&State> {
        match self {
            Journal::Committed(c) => c.next_state.as_ref(),
            Journal::Prepared(_) => None,
        }
    }
}

fn check_version(v: u32) -> std::result::Result<(), String> {
    if v == VERSION {
        Ok(())
    } else {
        Err(format!("unknown version {v}"))
    }
}

fn all_slots() -> Vec<Slot> {
    Role::ALL
        .into_iter()
        .flat_map(|role| [false, true].map(|staged| Slot { role, staged }))
        .collect()
}

/// The certificate-directory files an identity consists of, besides its keys.
pub fn identity_files() -> Vec<String> {
    let mut files = vec![
        paths::ID_SCOPE_FILE.to_string(),
        paths::CONNECTION_STRING_FILE.to_string(),
    ];
    for s in all_slots() {
        files.push(s.cert_file());
    }
    // The PIN file the tool writes for the connector (the name is the tool's), also
    // when a later run switched the connector to a PIN file the user keeps in the
    // certificates directory; that one is the user's and stays.
    files.push(paths::PKCS11_PIN_FILE.to_string());
    files.push(crate::manifest::CONNECTOR_CONFIG_FILE.to_string());
    files
}

/// A key and certificate made by [`build_keys`].
pub struct Built {
    slot: Slot,
    key: OwnedKey,
}

impl Built {
    pub fn role(&self) -> Role {
        self.slot.role
    }
    pub fn uri(&self) -> &KeyUri {
        &self.key.uri
    }
}

/// What to build: roles, live or staged, algorithm, subject, validity.
pub struct Plan<'a> {
    pub roles: &'a [Role],
    pub staged: bool,
    pub alg: Algorithm,
    pub device_id: &'a str,
    pub days: u32,
}

/// Make keys and self-signed certificates, journaled so a crash at any point is
/// rolled back by the next run, and a failure here is rolled back now (no orphan
/// keys, token objects or handles). Each key's proof is journaled as it is made.
pub fn build_keys(
    out: &crate::output::Out,
    layout: &Layout,
    ks: &mut dyn KeyStore,
    plan: &Plan,
) -> Result<(Journal, Vec<Built>)> {
    let slots: Vec<Slot> = plan
        .roles
        .iter()
        .map(|&role| Slot {
            role,
            staged: plan.staged,
        })
        .collect();
    let mut uris = Vec::new();
    for s in &slots {
        uris.push(ks.plan(*s)?);
    }
    let mut journal = Journal::prepare(ks.kind(), &slots);
    journal.save(layout)?;
    let mut built = Vec::new();
    let result = (|| -> Result<()> {
        for (slot, uri) in slots.iter().zip(&uris) {
            let (role, alg) = (slot.role, plan.alg);
            out.say(format!(
                "- Generating the {role} key ({alg}) in the {} keystore",
                ks.kind()
            ));
            let spinner = crate::progress::spinner(
                out,
                &format!("Generating the {role} key in the {}", ks.kind()),
            );
            let mut proof = None;
            let key = ks.generate_recorded(uri, alg, &mut |k| {
                proof = Some(k.clone());
                journal.record(layout, *slot, k).map_err(|e| {
                    keystore::KeyStoreError::backend("record the new key", e.to_string())
                })
            })?;
            drop(spinner);
            let pem = crate::cert::self_signed(key.as_ref(), plan.device_id, plan.days)?;
            drop(key);
            let path = layout.host_cert_file(&slot.cert_file());
            fsutil::atomic_write(&path, pem.as_bytes(), fsutil::PUBLIC)?;
            let info = crate::cert::CertInfo::from_pem(&path, pem.as_bytes())?;
            ks.attach_certificate(uri, &info.der)?;
            built.push(Built {
                slot: *slot,
                key: proof.expect("a made key was recorded"),
            });
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("rolling back after: {e}");
        if let Err(cleanup) = journal.roll_back(layout, ks) {
            out.warn(format!(
                "could not clean up after the failure ({cleanup}); the next run will retry"
            ));
        }
        return Err(e);
    }
    Ok((journal, built))
}

/// The identity a commit replaces: its state, the keys that go, and (when they are
/// in another keystore) that keystore, opened.
pub struct Old<'a> {
    pub state: &'a State,
    pub keys: Vec<OwnedKey>,
    pub keystore: Option<Box<dyn KeyStore>>,
}

/// Make built keys part of the identity: fresh roles go straight into the next
/// state, staged ones are moved into place by the roll-forward (old keys removed,
/// by their proofs, only then). The committed journal, not the state file, is the
/// commit point.
pub fn commit(
    layout: &Layout,
    ks: &mut dyn KeyStore,
    journal: Journal,
    built: Vec<Built>,
    mut next: State,
    old: Option<Old>,
) -> Result<State> {
    let Journal::Prepared(p) = journal else {
        unreachable!("a commit follows a prepared journal")
    };
    let mut moves = Vec::new();
    for b in built {
        if b.slot.staged {
            moves.push((
                Made {
                    slot: b.slot,
                    key: b.key,
                },
                b.slot.role,
            ));
        } else {
            next.set_key(b.slot.role, b.key);
        }
    }
    let (old_kind, old_keys, mut old_ks) = match old {
        Some(o) => (o.state.keystore, o.keys, o.keystore),
        None => (p.keystore, Vec::new(), None),
    };
    let journal = Journal::Committed(Box::new(Committed {
        version: VERSION,
        keystore: p.keystore,
        old_keystore: Some(old_kind),
        old_keys,
        old_removed: false,
        moves,
        next_state: Some(next),
        remove_files: Vec::new(),
    }));
    journal.save(layout)?;
    let state = journal.roll_forward(
        layout,
        ks,
        old_ks.as_deref_mut().map(|k| k as &mut dyn KeyStore),
    )?;
    Ok(state.expect("a journal with a next state yields it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_round_trip_through_parse() {
        let mut s = State::new("dev", KeystoreKind::File, Algorithm::EcdsaP256);
        s.set_key(
            Role::Primary,
            OwnedKey::new(KeyUri::File(keystore::file::key_path(Slot::live(
                Role::Primary,
            )))),
        );
        s.set_key(
            Role::Secondary,
            OwnedKey::new(KeyUri::File(keystore::file::key_path(Slot::live(
                Role::Secondary,
            )))),
        );
        for j in [
            Journal::prepare(KeystoreKind::File, &all_slots()),
            Journal::promote(&s).unwrap(),
            Journal::reset(Some(&s)),
            Journal::reset(None),
        ] {
            let text = serde_json::to_vec(&j).unwrap();
            Journal::parse(&text)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&text)));
        }
    }

    #[test]
    fn refuses_what_the_tool_never_writes() {
        let good = serde_json::json!({
            "phase": "committed", "version": 1, "keystore": "file",
            "old_keys": [{"uri": "file:/data/var/certificates/device.key"}],
            "old_removed": false, "moves": [], "next_state": null,
            "remove_files": ["device.crt"]
        });
        assert!(Journal::parse(good.to_string().as_bytes()).is_ok());
        let edits: [(&str, serde_json::Value); 9] = [
            ("version", 2.into()),
            ("remove_files", serde_json::json!(["../../etc/passwd"])),
            ("remove_files", serde_json::json!(["/etc/passwd"])),
            (
                "remove_files",
                serde_json::json!(["sdv-provision.state.json"]),
            ),
            ("old_keys", serde_json::json!([{"uri": "file:/etc/shadow"}])),
            (
                "old_keys",
                serde_json::json!([{"uri": "file:/data/var/certificates/../x.key"}]),
            ),
            (
                "old_keys",
                serde_json::json!([{"uri": "handle:0x81000010"}]),
            ),
            ("keystore", "floppy".into()),
            ("extra", true.into()),
        ];
        for (field, value) in edits {
            let mut j = good.clone();
            j[field] = value.clone();
            assert!(
                Journal::parse(j.to_string().as_bytes()).is_err(),
                "{field} = {value}"
            );
        }
        let tpm = serde_json::json!({
            "phase": "prepared", "version": 1, "keystore": "tpm",
            "planned": [{"role": "primary", "staged": false}],
            "made": [{"slot": {"role": "primary", "staged": false},
                      "key": {"uri": "handle:0x81000010"}}]
        });
        assert!(
            Journal::parse(tpm.to_string().as_bytes()).is_err(),
            "a TPM key made without a recorded Name"
        );
    }
}
