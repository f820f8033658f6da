//! One file per subcommand. Shared here: the run context, crash recovery, and the
//! steps every mutating command ends with (manifest, restart).

use std::io::IsTerminal;
use std::time::Duration;

use crate::cli::{Cli, Command, KeystoreChoice};
use crate::cloud::Cloud;
use crate::connector::{self, Change};
use crate::error::{Error, Result};
use crate::fsutil::{self, RunLock};
use crate::identity::{self, Journal, Phase, State};
use crate::keystore::{self, KeyStore, KeystoreConfig, KeystoreKind, Role};
use crate::manifest::{Desired, Manifest};
use crate::output::Out;
use crate::paths::Layout;

pub mod csr;
pub mod import_cert;
pub mod provision;
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
    pub interactive: bool,
    pub restart: bool,
    pub out: Out,
}

impl Ctx {
    pub fn from_cli(cli: &Cli) -> Ctx {
        let g = &cli.global;
        let interactive = !g.non_interactive && std::io::stdin().is_terminal();
        let tcti = g
            .tcti
            .clone()
            .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
            .or_else(|| std::env::var("TCTI").ok())
            .filter(|t| !t.is_empty());
        Ctx {
            // Absolute, so every printed path can be opened from anywhere.
            layout: Layout::new(std::fs::canonicalize(&g.root).unwrap_or_else(|_| g.root.clone())),
            keystore: match g.keystore {
                KeystoreChoice::Auto => None,
                KeystoreChoice::Tpm => Some(KeystoreKind::Tpm),
                KeystoreChoice::Pkcs11 => Some(KeystoreKind::Pkcs11),
                KeystoreChoice::File => Some(KeystoreKind::File),
            },
            ks_config: KeystoreConfig {
                tcti,
                primary_handle: g.tpm_primary_handle,
                secondary_handle: g.tpm_secondary_handle,
                pkcs11_module: g.pkcs11_module.clone(),
                pkcs11_token: g.pkcs11_token.clone(),
                pkcs11_pin_file: g.pkcs11_pin_file.clone(),
                pkcs11_init_token: g.pkcs11_init_token,
                interactive,
                read_only: false,
                manage_pin_file: false,
                recorded: Default::default(),
            },
            json: g.json,
            interactive,
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
    pub fn check_root(&self) -> Result<()> {
        let root = self.layout.root();
        if !root.is_dir() {
            return Err(Error::input(
                format!("--root {} is not an existing directory", root.display()),
                "create it or pass the right --root",
            ));
        }
        Ok(())
    }

    /// Take the run lock (mutating commands only; `status` never blocks). The wait
    /// can be changed with env `SDV_PROVISION_LOCK_TIMEOUT` (seconds; 0 = fail at once).
    pub fn lock(&self) -> Result<RunLock> {
        self.check_root()?;
        let timeout = std::env::var("SDV_PROVISION_LOCK_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(LOCK_TIMEOUT);
        let lock = RunLock::acquire(self.layout.root(), timeout)?;
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
        self.open_keystore_with(kind, state, false, false)
    }

    /// [`Ctx::open_keystore`] for `provision`, the one command that may choose the
    /// connector's PIN file (and then converges the manifest).
    pub fn open_keystore_to_provision(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
    ) -> Result<Box<dyn KeyStore>> {
        self.open_keystore_with(kind, state, false, true)
    }

    /// [`Ctx::open_keystore`] for commands that only read and take no lock (`verify`,
    /// `csr`): the keystore writes nothing while opening.
    pub fn open_keystore_to_read(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
    ) -> Result<Box<dyn KeyStore>> {
        self.open_keystore_with(kind, state, true, false)
    }

    fn open_keystore_with(
        &self,
        kind: KeystoreKind,
        state: Option<&State>,
        read_only: bool,
        manage_pin_file: bool,
    ) -> Result<Box<dyn KeyStore>> {
        let mut cfg = self.ks_config.clone();
        cfg.read_only = read_only;
        cfg.manage_pin_file = manage_pin_file;
        if let Some(s) = state {
            cfg.recorded = s.backend.clone();
        }
        tracing::info!(keystore = %kind, tcti = ?cfg.tcti, module = ?cfg.pkcs11_module, "opening keystore");
        Ok(keystore::open(kind, &cfg, &self.layout)?)
    }
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
    }
}

/// Every mutating command starts here (through [`recover`]): a symbolic link at any
/// of our paths in the certificates directory is refused before anything is made or
/// removed. The writers already refuse to write through a link, but a run that failed
/// on one would roll back its half-made identity, and that removes the planted link
/// (a file it did not make); `--force` would replace it.
fn refuse_planted_links(layout: &Layout) -> Result<()> {
    use crate::paths::{stem, CONNECTION_STRING_FILE, ID_SCOPE_FILE, PKCS11_PIN_FILE, STATE_FILE};
    let mut names: Vec<String> = [
        STATE_FILE,
        crate::identity::JOURNAL_FILE,
        ID_SCOPE_FILE,
        CONNECTION_STRING_FILE,
        PKCS11_PIN_FILE,
    ]
    .map(String::from)
    .to_vec();
    for role in Role::ALL {
        for staged in [false, true] {
            let s = stem(role, staged);
            for ext in ["crt", "key", "tpm.pub", "tpm.priv"] {
                names.push(format!("{s}.{ext}"));
            }
        }
    }
    for name in names {
        let path = layout.host_cert_file(&name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Symlink { path });
        }
    }
    Ok(())
}

/// Finish or undo what a killed run left behind (see `identity` module docs).
/// Call with the lock held.
pub fn recover(ctx: &Ctx) -> Result<()> {
    refuse_planted_links(&ctx.layout)?;
    fsutil::remove_stale_temps(&ctx.layout.host_cert_dir());
    let Some(journal) = Journal::load(&ctx.layout)? else {
        return Ok(());
    };
    let state = State::load(&ctx.layout)?;
    ctx.out.say("- Finishing an interrupted run");
    match journal.phase {
        Phase::Prepared => {
            tracing::info!(?journal, "rolling back an interrupted run");
            let mut ks = ctx.open_keystore(journal.keystore, state.as_ref())?;
            journal.roll_back(&ctx.layout, ks.as_mut())
        }
        Phase::Committed => {
            tracing::info!(?journal, "rolling forward an interrupted run");
            let next = journal.next_state.clone();
            // Once the old keys are gone (`old_removed`) the state may already be the
            // new identity's, which cannot open the old keystore: it is not needed.
            let mut old_ks = match journal.old_keystore {
                Some(k) if k != journal.keystore && !journal.old_removed => {
                    Some(ctx.open_keystore(k, state.as_ref())?)
                }
                _ => None,
            };
            let mut ks = ctx.open_keystore(journal.keystore, next.as_ref().or(state.as_ref()))?;
            journal
                .roll_forward(
                    &ctx.layout,
                    ks.as_mut(),
                    old_ks.as_deref_mut().map(|k| k as &mut dyn KeyStore),
                )
                .map(|_| ())
        }
    }
}

/// What the manifest should say for this identity and cloud.
pub fn desired_manifest(state: &State, cloud: &Cloud) -> Option<Desired> {
    let key = identity::key_ref(state, Role::Primary)?;
    let (k, v) = cloud.env();
    Some(Desired {
        cloud: (k, v),
        cert: crate::paths::Layout::cert_file(&crate::paths::cert_name(Role::Primary, false)),
        key,
        previously_owned: state.backend.mounts.clone(),
    })
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
    let wrote = m.save(&new, cloud.has_secret())?;
    if wrote {
        ctx.out.say(format!(
            "- Updated the Cloud Connector manifest {}",
            m.path.display()
        ));
    }
    Ok(Some(wrote))
}

/// Bring the manifest in line and restart the connector as needed. `certs_changed`
/// says whether this run changed keys or certificates; `manifest_changed` whether it
/// already rewrote the manifest earlier.
pub fn converge(
    ctx: &Ctx,
    state: &State,
    cloud: &Cloud,
    certs_changed: bool,
    manifest_changed: bool,
) -> Result<()> {
    let manifest_changed = match update_manifest(ctx, state, cloud)? {
        None => {
            ctx.out.warn(format!(
                "no cloud connector manifest at {}; skipping the manifest update",
                ctx.layout.host(crate::paths::MANIFEST).display()
            ));
            false
        }
        Some(wrote) => wrote || manifest_changed,
    };
    let change = if manifest_changed {
        Change::Manifest
    } else if certs_changed {
        Change::Certificates
    } else {
        Change::Nothing
    };
    if ctx.restart {
        connector::restart(change, &ctx.out);
    }
    Ok(())
}

/// One warning line when today's Leda connector cannot use the identity, naming every
/// reason (DESIGN §3: PKCS#11 keys, a TPM key that is not RSA, DPS with a hardware
/// key).
pub fn compatibility_warnings(ctx: &Ctx, state: &State, cloud: &Cloud) {
    let mut reasons = Vec::new();
    match state.keystore {
        KeystoreKind::Pkcs11 => reasons.push(
            "it cannot use PKCS#11 keys yet (the manifest carries KEY_URI for URI-aware consumers)",
        ),
        KeystoreKind::Tpm if !state.algorithm.is_rsa() => {
            reasons.push("it signs TPM keys with RSA-PSS only (use --algorithm rsa-2048 for it)")
        }
        _ => {}
    }
    if state.keystore != KeystoreKind::File && matches!(cloud, Cloud::Dps { .. }) {
        reasons.push(
            "it needs a key file for DPS (with a hardware key it can only use a Hub connection string)",
        );
    }
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
    let manifest_exists = fsutil::exists_nofollow(&ctx.layout.host(crate::paths::MANIFEST));
    if ctx.json {
        crate::output::Report::new(&ctx.layout, &id, manifest_exists, problems.clone())
            .print_json();
    } else {
        crate::output::print_identity(&ctx.out, &ctx.layout, &id);
    }
    Ok(problems)
}

/// A key and certificate made by [`build_keys`].
pub struct Built {
    pub role: Role,
    pub uri: keystore::KeyUri,
    pub cert_file: String,
}

/// Make keys and self-signed certificates for `roles`, journaled so a crash at any
/// point is rolled back by the next run, and a failure here is rolled back now (no
/// orphan keys, token objects or handles). `staged` builds beside a live identity.
#[allow(clippy::too_many_arguments)]
pub fn build_keys(
    ctx: &Ctx,
    ks: &mut dyn KeyStore,
    roles: &[Role],
    staged: bool,
    alg: keystore::Algorithm,
    device_id: &str,
    days: u32,
) -> Result<(Journal, Vec<Built>)> {
    let mut journal = Journal::prepared(ks.kind());
    let mut built = Vec::new();
    for &role in roles {
        let uri = ks.plan(role, staged)?;
        let cert_file = crate::paths::cert_name(role, staged);
        journal.new_keys.push(uri.clone());
        journal.new_files.push(cert_file.clone());
        built.push(Built {
            role,
            uri,
            cert_file,
        });
    }
    journal.save(&ctx.layout)?;
    let result = (|| -> Result<()> {
        for b in &built {
            ctx.out.say(format!(
                "- Generating the {} key ({alg}) in the {} keystore",
                b.role,
                ks.kind()
            ));
            let t = std::time::Instant::now();
            let spinner = crate::progress::spinner(
                &ctx.out,
                &format!("Generating the {} key in the {}", b.role, ks.kind()),
            );
            let key = ks.generate(&b.uri, alg)?;
            drop(spinner);
            tracing::info!(role = %b.role, uri = %b.uri, elapsed = ?t.elapsed(), "key generated");
            let pem = crate::cert::self_signed(key.as_ref(), device_id, days)?;
            drop(key);
            let path = ctx.layout.host_cert_file(&b.cert_file);
            fsutil::atomic_write(&path, pem.as_bytes(), fsutil::PUBLIC)?;
            let info = crate::cert::CertInfo::from_pem(&path, pem.as_bytes())?;
            ks.attach_certificate(&b.uri, &info.der)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("rolling back after: {e}");
        if let Err(cleanup) = journal.roll_back(&ctx.layout, ks) {
            ctx.out.warn(format!(
                "could not clean up after the failure ({cleanup}); the next run will retry"
            ));
        }
        return Err(e);
    }
    Ok((journal, built))
}

/// Make built keys part of the identity: directly for fresh roles; for staged ones by
/// committing the journal and moving them into place (old keys removed only then).
/// `provision` records the store's settings in the next state (it converges the
/// manifest afterwards); `rotate` keeps the recorded ones (`record_backend` false),
/// so the state never names settings the manifest was not converged to.
pub fn commit(
    ctx: &Ctx,
    ks: &mut dyn KeyStore,
    mut journal: Journal,
    built: Vec<Built>,
    mut next: State,
    old: Option<(&State, Vec<keystore::KeyUri>)>,
    record_backend: bool,
) -> Result<State> {
    if record_backend {
        next.backend = ks.record();
    }
    // Fresh roles go straight into the next state; staged ones are moved into
    // place by the roll-forward. Either way the committed journal, not the state
    // file, is the commit point: a kill between writing the state and clearing a
    // "prepared" journal would otherwise roll back keys the state already names.
    let (fresh, staged): (Vec<Built>, Vec<Built>) = built
        .into_iter()
        .partition(|b| b.cert_file == crate::paths::cert_name(b.role, false));
    for b in fresh {
        next.keys.insert(b.role, b.uri);
    }
    let (old_kind, old_keys) = match &old {
        Some((s, keys)) => (s.keystore, keys.clone()),
        None => (ks.kind(), Vec::new()),
    };
    let mut old_ks = match old {
        Some((s, _)) if old_kind != ks.kind() && !old_keys.is_empty() => {
            Some(ctx.open_keystore(old_kind, Some(s))?)
        }
        _ => None,
    };
    journal.phase = Phase::Committed;
    journal.old_keys = old_keys;
    journal.old_keystore = Some(old_kind);
    journal.moves = staged
        .into_iter()
        .map(|b| (b.uri, b.role, b.cert_file))
        .collect();
    journal.next_state = Some(next);
    journal.save(&ctx.layout)?;
    let state = journal.roll_forward(
        &ctx.layout,
        ks,
        old_ks.as_deref_mut().map(|k| k as &mut dyn KeyStore),
    )?;
    Ok(state.expect("a journal with a next state yields it"))
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
        "run `sdv-provision` (provision) first",
    ))
}
