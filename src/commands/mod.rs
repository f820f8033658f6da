//! One file per subcommand. Shared here: the run context, crash recovery, and the
//! steps every mutating command ends with (manifest, restart).

use std::io::IsTerminal;
use std::time::Duration;

use crate::cli::{Cli, Command};
use crate::cloud::Cloud;
use crate::connector::{self, Change};
use crate::error::{Error, Fix, Result};
use crate::fsutil::{self, RunLock};
use crate::identity::{self, State};
use crate::keystore::{self, KeyStore, KeystoreConfig, KeystoreKind, Purpose, Role};
use crate::manifest::{Desired, Manifest};
use crate::model::Slot;
use crate::output::Out;
use crate::paths::{self, Layout};
use crate::txn::{self, Journal};

pub mod csr;
pub mod import_cert;
pub mod provision;
pub mod register;
pub mod reset;
pub mod rotate;
pub mod status;
pub mod verify;

/// How long a mutating run waits for another one before giving up.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a command needs to know about this run.
pub struct Ctx {
    pub layout: Layout,
    /// `None` = auto.
    pub keystore: Option<KeystoreKind>,
    pub ks_config: KeystoreConfig,
    pub json: bool,
    /// May the run ask (backend, PIN, confirmations)? Decided here only.
    pub prompt: keystore::Prompt,
    pub restart: bool,
    pub out: Out,
}

impl Ctx {
    /// Whether this run may ask the user.
    pub fn may_prompt(&self) -> bool {
        self.prompt == keystore::Prompt::Allowed
    }

    pub fn from_cli(cli: &Cli) -> Ctx {
        let g = &cli.global;
        // Prompts go to stderr (dialoguer): `--json` keeps stdout to its one document.
        let prompt = match !g.non_interactive && std::io::stdin().is_terminal() {
            true => keystore::Prompt::Allowed,
            false => keystore::Prompt::Never,
        };
        let tcti = g
            .tcti
            .clone()
            .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
            .or_else(|| std::env::var("TCTI").ok())
            .filter(|t| !t.is_empty());
        Ctx {
            // Absolute, so every printed path can be opened from anywhere.
            layout: Layout::new(std::fs::canonicalize(&g.root).unwrap_or_else(|_| g.root.clone())),
            keystore: g.keystore.kind(),
            ks_config: KeystoreConfig {
                tpm: keystore::TpmConfig {
                    tcti,
                    primary_handle: g.tpm_primary_handle,
                    secondary_handle: g.tpm_secondary_handle,
                    recorded: Default::default(),
                },
                pkcs11: keystore::Pkcs11Config {
                    module: g.pkcs11_module.clone(),
                    token: g.pkcs11_token.clone(),
                    pin_file: g.pkcs11_pin_file.clone(),
                    blank_token: if g.pkcs11_init_token {
                        keystore::BlankToken::Initialise
                    } else {
                        keystore::BlankToken::Refuse
                    },
                    prompt,
                    purpose: Purpose::Change,
                    recorded: Default::default(),
                },
            },
            json: g.json,
            prompt,
            restart: !g.no_restart,
            out: {
                crate::output::set_quiet(g.quiet);
                Out {
                    human: !g.json && !g.quiet,
                    warnings: !g.quiet,
                }
            },
        }
    }

    /// `--root` must be an existing directory: a typo must not create a new tree.
    /// Its fixed directories are then resolved inside it, once for the run.
    pub fn check_root(&self) -> Result<()> {
        let root = self.layout.root();
        if !root.is_dir() {
            return Err(Error::input(
                format!("--root {} is not an existing directory", root.display()),
                "create it or pass the right --root",
            ));
        }
        self.layout.resolve_dirs()
    }

    /// Take the run lock (mutating commands only; `status` never blocks). The wait
    /// can be changed with env `SDV_PROVISION_LOCK_TIMEOUT` (seconds; 0 = fail at once).
    /// The directories secrets go into pass the StrictModes check first, before the
    /// lock (or anything else) is made.
    pub fn lock(&self) -> Result<RunLock> {
        self.check_root()?;
        self.layout.check_private_dirs()?;
        let timeout = std::env::var("SDV_PROVISION_LOCK_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(LOCK_TIMEOUT);
        let lock = RunLock::acquire(&self.layout.host_cert_dir(), self.layout.root(), timeout)?;
        // Every mutating command takes the lock: the one place secret modes are
        // enforced on every run (DESIGN §6).
        for l in crate::secret_modes::tighten(&self.layout)? {
            self.out.warn(format!(
                "{} holds a secret but was mode {:04o}; set it back to 0600",
                l.path.display(),
                l.mode
            ));
        }
        Ok(lock)
    }

    /// Open a keystore; settings an earlier run recorded fill in missing flags.
    pub fn open_keystore(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
    ) -> Result<Box<dyn KeyStore>> {
        self.open_keystore_with(kind, state, Purpose::Change)
    }

    /// [`Ctx::open_keystore`] for `provision`, the one command that may choose the
    /// connector's PIN file (and then converges the manifest).
    pub fn open_keystore_to_provision(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
    ) -> Result<Box<dyn KeyStore>> {
        self.open_keystore_with(kind, state, Purpose::Provision)
    }

    /// [`Ctx::open_keystore`] for commands that only read and take no lock (`verify`,
    /// `csr`): the keystore writes nothing while opening.
    pub fn open_keystore_to_read(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
    ) -> Result<Box<dyn KeyStore>> {
        self.open_keystore_with(kind, state, Purpose::Read)
    }

    fn open_keystore_with(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
        purpose: Purpose,
    ) -> Result<Box<dyn KeyStore>> {
        let mut cfg = self.ks_config.clone();
        cfg.pkcs11.purpose = purpose;
        if let Some(s) = state {
            cfg.set_recorded(&s.backend);
        }
        tracing::info!(keystore = %kind, tcti = ?cfg.tpm.tcti, module = ?cfg.pkcs11.module, "opening keystore");
        let mut ks = keystore::open(kind, &cfg, &self.layout)?;
        // Right after the login: the connector's PIN file, as the command may have it.
        keystore::choose_pin_file(ks.as_mut(), &cfg.pkcs11, &self.layout)?;
        Ok(ks)
    }
}

/// Whether a commit records the store's settings in the next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settings {
    /// `provision`: the store's settings (it converges the manifest afterwards).
    Record,
    /// `rotate`: the recorded ones, so the state never names settings the manifest
    /// was not converged to.
    Keep,
}

/// Run the parsed command line; returns the exit code.
pub fn run(cli: &Cli) -> Result<i32> {
    let ctx = Ctx::from_cli(cli);
    let provision_args = cli.provision_args().map_err(Error::Usage)?;
    match &cli.command {
        None | Some(Command::Provision(_)) => provision::run(&ctx, &provision_args),
        Some(Command::Status) => status::run(&ctx),
        Some(Command::Verify) => verify::run(&ctx),
        Some(Command::Rotate { promote, days }) => rotate::run(&ctx, *promote, *days),
        Some(Command::Csr { role, out }) => csr::run(&ctx, *role, out.as_deref()),
        Some(Command::ImportCert { role, file }) => import_cert::run(&ctx, *role, file),
        Some(Command::Reset { yes }) => reset::run(&ctx, *yes),
        Some(Command::Register(_)) => {
            register::run(&ctx, &cli.register_args().map_err(Error::Usage)?)
        }
    }
}

/// Every mutating command starts here (through [`recover`]): a symbolic link at any
/// of our paths in the certificates directory is refused before anything is made or
/// removed. The writers already refuse to write through a link, but a run that failed
/// on one would roll back its half-made identity, and that removes the planted link
/// (a file it did not make); `--force` would replace it.
fn refuse_planted_links(layout: &Layout) -> Result<()> {
    use crate::paths::{CONNECTION_STRING_FILE, ID_SCOPE_FILE, PKCS11_PIN_FILE, STATE_FILE};
    let mut names: Vec<String> = [
        STATE_FILE,
        crate::identity::JOURNAL_FILE,
        ID_SCOPE_FILE,
        CONNECTION_STRING_FILE,
        PKCS11_PIN_FILE,
        crate::manifest::CONNECTOR_CONFIG_FILE,
    ]
    .map(String::from)
    .to_vec();
    for slot in Role::ALL.map(|r| [Slot::live(r), Slot::staged(r)]).concat() {
        let (tpm_pub, tpm_priv) = slot.tpm_blobs();
        names.extend([slot.cert_file(), slot.key_file(), tpm_pub, tpm_priv]);
    }
    for name in names {
        let path = layout.host_cert_file(&name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Symlink { path });
        }
    }
    Ok(())
}

/// Finish or undo what a killed run left behind (`txn` module docs), lock held. The
/// journal and state are checked against the configured slots before anything else.
pub fn recover(ctx: &Ctx) -> Result<()> {
    refuse_planted_links(&ctx.layout)?;
    for d in [paths::CERT_DIR, paths::MANIFEST_DIR, "/etc"] {
        fsutil::remove_stale_temps(&ctx.layout.host(d));
    }
    let Some(journal) = Journal::load(&ctx.layout)? else {
        return upgrade_proofs(ctx);
    };
    let state = State::load(&ctx.layout)?;
    check_slots(ctx, &journal, state.as_ref())?;
    ctx.out.say("- Finishing an interrupted run");
    match &journal {
        Journal::Prepared(_) => {
            tracing::info!(?journal, "rolling back an interrupted run");
            let mut ks = ctx.open_keystore(journal.keystore(), state.as_ref())?;
            for left in journal.roll_back(&ctx.layout, ks.as_mut())? {
                ctx.out.warn(format!(
                    "{left}; left in place (remove it yourself if it is a leftover)"
                ));
            }
        }
        Journal::Committed(_) => {
            tracing::info!(?journal, "rolling forward an interrupted run");
            let next = journal.next_state().cloned();
            // Once the old keys are gone the state may already be the new identity's,
            // which cannot open the old keystore: it is not needed.
            let mut old_ks = match journal.pending_old_keystore() {
                Some(k) => Some(ctx.open_keystore(k, state.as_ref())?),
                None => None,
            };
            let mut ks = ctx.open_keystore(journal.keystore(), next.as_ref().or(state.as_ref()))?;
            journal.roll_forward(
                &ctx.layout,
                ks.as_mut(),
                old_ks.as_deref_mut().map(|k| k as &mut dyn KeyStore),
            )?;
        }
    }
    upgrade_proofs(ctx)
}

/// TPM handles a journal names must be the configured slots (live or staged), as
/// the flags or the state set them: a journal naming any other handle was edited.
fn check_slots(ctx: &Ctx, journal: &Journal, state: Option<&State>) -> Result<()> {
    let mut allowed = Vec::new();
    for recorded in [state, journal.next_state()] {
        let mut tpm = ctx.ks_config.tpm.clone();
        tpm.recorded = recorded
            .and_then(|s| s.backend.tpm())
            .cloned()
            .unwrap_or_default();
        let (p, s) = (
            tpm.live_handle(Role::Primary),
            tpm.live_handle(Role::Secondary),
        );
        allowed.extend(Slot::ALL.map(|slot| slot.tpm_handle(p, s)));
    }
    let bad = |detail: String| Error::InvalidState {
        path: ctx.layout.host_cert_file(identity::JOURNAL_FILE),
        detail,
    };
    for uri in journal.uris() {
        if let keystore::KeyUri::TpmHandle(h) = uri {
            if !allowed.contains(h) {
                return Err(bad(format!(
                    "{uri} is not one of the configured key handles"
                )));
            }
        }
    }
    // The keys a commit replaces are the identity's, as the state (still the old
    // one until they are gone) names them; without a state only the original
    // script's key files can be (an adoption).
    for k in journal.pending_old_keys() {
        let recorded = match state {
            Some(s) => s
                .owned_keys()
                .iter()
                .any(|o| o.uri == k.uri && (o.tpm_name.is_none() || o.tpm_name == k.tpm_name)),
            None => matches!(k.uri, keystore::KeyUri::File(_)),
        };
        if !recorded {
            return Err(bad(format!(
                "old key {} is not one the state records",
                k.uri
            )));
        }
    }
    Ok(())
}

/// A TPM identity an older version recorded without Names gets them now, where the
/// key at each handle is shown to be ours (its public blob); a key that cannot be
/// shown to be ours keeps no proof and is never evicted.
fn upgrade_proofs(ctx: &Ctx) -> Result<()> {
    let Some(mut state) = State::load(&ctx.layout)? else {
        return Ok(());
    };
    let missing: Vec<Role> = Role::ALL
        .into_iter()
        .filter(|r| state.keystore == KeystoreKind::Tpm && state.keys.contains_key(r))
        .filter(|r| !state.tpm_names.contains_key(r))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut ks = ctx.open_keystore(KeystoreKind::Tpm, Some(&state))?;
    let mut changed = false;
    for role in missing {
        let uri = state.keys[&role].clone();
        match ks.prove(&uri)? {
            Some(owned) if owned.tpm_name.is_some() => {
                state.set_key(role, owned);
                changed = true;
            }
            _ => ctx.out.warn(format!(
                "the {role} key {uri} cannot be shown to be the one sdv-provision made; it will not be removed"
            )),
        }
    }
    if changed {
        state.save(&ctx.layout)?;
    }
    Ok(())
}

/// What the manifest should say for this identity and cloud.
pub fn desired_manifest(state: &State, cloud: &Cloud) -> Option<Desired> {
    let key = identity::key_ref(state, Role::Primary)?;
    let (k, v) = cloud_env(state, cloud);
    Some(Desired {
        cloud: (k, v),
        cert: crate::paths::Layout::cert_file(&Slot::live(Role::Primary).cert_file()),
        key,
        // Only to take away mounts an earlier run added; what is mounted comes from
        // the configuration (`key`).
        previously_owned: state.backend.mounts().to_vec(),
    })
}

/// The cloud entry of the manifest: a DPS identity with a hardware key that DPS has
/// assigned gets the hub's `CONNECTION_STRING=…;x509=true` instead of `ID_SCOPE`
/// (DESIGN §3b); the file keystore keeps `ID_SCOPE` (its connector does DPS itself).
pub fn cloud_env(state: &State, cloud: &Cloud) -> (&'static str, String) {
    let assigned = state.dps.as_ref().and_then(|d| d.assignment.as_ref());
    match assigned {
        Some(a) if register::needs_registration(state, cloud) => {
            ("CONNECTION_STRING", a.connection_string())
        }
        _ => cloud.env(),
    }
}

/// Write the manifest for `state` if it differs. `Ok(None)`: no manifest on this
/// device (no connector installed).
pub fn update_manifest(ctx: &Ctx, state: &State, cloud: &Cloud) -> Result<Option<bool>> {
    let Some(m) = Manifest::load(&ctx.layout)? else {
        return Ok(None);
    };
    let want = desired_manifest(state, cloud).ok_or_else(|| Error::InvalidState {
        path: ctx.layout.host_cert_file(crate::paths::STATE_FILE),
        detail: "the primary key or its backend settings are missing".into(),
    })?;
    let new = m.render(&want)?;
    // The config file first, so the manifest never names a file that is not there.
    let config_changed =
        write_connector_config(ctx, crate::manifest::connector_config(&new, &want))?;
    let wrote = m.save(&new, cloud.file_mode())?;
    if let Some(theirs) = crate::manifest::foreign_connector_config(&m.base) {
        ctx.out.warn(format!(
            "the connector manifest sets CLOUD_CONNECTOR_CONFIG={theirs}, a file of its own, \
             so it is left alone; today's connector reads its TPM settings only from there: \
             copy the tpm* keys of {} into it",
            ctx.layout
                .host_cert_file(crate::manifest::CONNECTOR_CONFIG_FILE)
                .display()
        ));
    }
    let wrote = wrote || config_changed;
    if wrote {
        ctx.out.say(format!(
            "- Updated the Cloud Connector manifest {}",
            m.path.display()
        ));
    }
    Ok(Some(wrote))
}

/// Write the connector's TPM config file (0644, atomic) when its content differs, or
/// remove it outside TPM mode. Returns whether anything changed.
fn write_connector_config(ctx: &Ctx, content: Option<serde_json::Value>) -> Result<bool> {
    let path = ctx
        .layout
        .host_cert_file(crate::manifest::CONNECTOR_CONFIG_FILE);
    let current = fsutil::read_optional(&path)?;
    match content {
        Some(v) => {
            let bytes = crate::manifest::to_bytes(&v);
            if current.as_deref() == Some(bytes.as_slice()) {
                return Ok(false);
            }
            fsutil::atomic_write(&path, &bytes, fsutil::PUBLIC)?;
            Ok(true)
        }
        None if current.is_some() => {
            fsutil::remove_file(&path)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Bring the manifest in line and restart the connector as needed. `change` is what
/// this run changed before (keys or certificates, or the manifest already).
pub fn converge(ctx: &Ctx, state: &State, cloud: &Cloud, change: Change) -> Result<()> {
    let manifest_changed = match update_manifest(ctx, state, cloud)? {
        None => {
            ctx.out.warn(format!(
                "no cloud connector manifest at {}; skipping the manifest update",
                ctx.layout.host(crate::paths::MANIFEST).display()
            ));
            false
        }
        Some(wrote) => wrote,
    };
    let change = if manifest_changed {
        Change::Manifest
    } else {
        change
    };
    if ctx.restart {
        connector::restart(change, &ctx.out);
    }
    Ok(())
}

/// One warning line when today's Leda connector cannot use the identity, naming every
/// reason ([`connector::incompatibilities`]), and none when it can.
pub fn compatibility_warnings(ctx: &Ctx, state: &State, cloud: &Cloud) {
    let cert = ctx
        .layout
        .host_cert_file(&Slot::live(Role::Primary).cert_file());
    let cert_chain = fsutil::read_optional(&cert)
        .ok()
        .flatten()
        .and_then(|pem| crate::cert::CertInfo::from_pem(&cert, &pem).ok())
        .is_some_and(|c| c.chain_len > 0);
    let usage = connector::Usage {
        keystore: state.keystore,
        algorithm: state.algorithm,
        dps: matches!(cloud, Cloud::Dps { .. }),
        // DPS registration through the hardware key (DESIGN §3b): recorded.
        dps_registered: state.dps.as_ref().is_some_and(|d| d.assignment.is_some()),
        cert_chain,
        hub_host: match cloud {
            Cloud::Hub(cs) => Some(cs.host_name.as_str()),
            Cloud::Dps { .. } => None,
        },
    };
    let reasons = connector::incompatibilities(&usage);
    if !reasons.is_empty() {
        ctx.out.warn(format!(
            "today's Leda cloud connector cannot use this identity: {}",
            reasons.join("; ")
        ));
    }
}

/// Human or JSON summary of the identity on disk; returns the problems `status`
/// finds (empty when the identity is complete and consistent).
pub fn report(ctx: &Ctx) -> Result<Vec<String>> {
    let id = identity::Identity::load(&ctx.layout)?;
    let problems = status::problems(ctx, &id)?;
    let manifest =
        Some(ctx.layout.host(crate::paths::MANIFEST)).filter(|m| fsutil::exists_nofollow(m));
    if ctx.json {
        crate::output::Report::new(&ctx.layout, &id, manifest.as_deref(), problems.clone())
            .print_json();
    } else {
        crate::output::print_identity(&ctx.out, &ctx.layout, &id);
    }
    Ok(problems)
}

/// [`txn::build_keys`] with this run's output and layout.
pub fn build_keys(
    ctx: &Ctx,
    ks: &mut dyn KeyStore,
    plan: &txn::Plan,
) -> Result<(Journal, Vec<txn::Built>)> {
    txn::build_keys(&ctx.out, &ctx.layout, ks, plan)
}

/// [`txn::commit`]; the old identity's keystore is opened here when it is another
/// one; `settings` says whether the next state records the store's settings.
pub fn commit(
    ctx: &Ctx,
    ks: &mut dyn KeyStore,
    journal: Journal,
    built: Vec<txn::Built>,
    mut next: State,
    old: Option<&State>,
    settings: Settings,
) -> Result<State> {
    if settings == Settings::Record {
        next.backend = ks.record();
    }
    let old = match old {
        Some(s) => {
            let keys = s.owned_keys();
            let keystore = if s.keystore != ks.kind() && !keys.is_empty() {
                Some(ctx.open_keystore(s.keystore, Some(s))?)
            } else {
                None
            };
            Some(txn::Old {
                state: s,
                keys,
                keystore,
            })
        }
        None => None,
    };
    txn::commit(&ctx.layout, ks, journal, built, next, old)
}

/// The identity's state; for a device the original script provisioned (not adopted
/// yet), the state its files amount to. Errors when there is no identity.
pub fn existing_state(id: &identity::Identity) -> Result<State> {
    if let Some(s) = &id.state {
        return Ok(s.clone());
    }
    if id.legacy {
        let dev = id
            .role(Role::Primary)
            .cert
            .as_ref()
            .ok()
            .and_then(|c| c.subject_cn.clone())
            .or_else(|| id.device_id.clone())
            .unwrap_or_default();
        return Ok(identity::legacy_state(&dev));
    }
    Err(Error::input(
        "this device is not provisioned",
        Fix::ProvisionFirst,
    ))
}
