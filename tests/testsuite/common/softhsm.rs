//! SoftHSM2 for tests: one private store per test binary, one token per test.
//!
//! Why not one SoftHSM store per test (as rust-cryptoki's tests do per process):
//! - SoftHSM reads `SOFTHSM2_CONF` once, in `C_Initialize`, and a module is initialised
//!   once per process; the keystore keeps it initialised for the life of the process
//!   (as any PKCS#11 application must, since `C_Finalize` would end every other
//!   user's sessions). A second store in the same process would never be read.
//! - Changing `SOFTHSM2_CONF` while other test threads run C code is a data race on
//!   the environment.
//!
//! So the first test that asks sets `SOFTHSM2_CONF` (and the SO PIN file variable)
//! exactly once, before any module is loaded, to a store in `CARGO_TARGET_TMPDIR`; every
//! test then gets **its own token** (its own label) in that store, and tests still run
//! in parallel without sharing objects.
//!
//! Tokens are initialised in-process through cryptoki (`C_InitToken` on the blank
//! slot), not with `softhsm2-util`: SoftHSM 2.6 does not see tokens another process
//! creates after its `C_Initialize` (checked on Debian bookworm). All tests share the
//! one blank slot, so token creation is serialised by [`blank_slot_lock`]. The store
//! itself, with the default `leda` token, is made by `softhsm/setup-token` before the
//! module is loaded, which also exercises that script.
#![allow(dead_code)]
#![cfg(feature = "pkcs11")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sdv_provision::keystore::{Pkcs11Config, Purpose};
use tempfile::TempDir;

pub const USER_PIN: &str = "1234-user";
pub const SO_PIN: &str = "5678-so";
/// The token `softhsm/setup-token` makes in the shared store.
pub const DEFAULT_TOKEN: &str = "leda";

/// The per-binary SoftHSM store.
pub struct Store {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub tokendir: PathBuf,
    pub module: PathBuf,
    /// `OPENSSL_CONF` loading libp11's `pkcs11` engine for [`Store::module`].
    pub openssl_conf: PathBuf,
    pub so_pin_file: PathBuf,
    ctx: Pkcs11,
}

/// The SoftHSM module: Debian's compatibility path, then the multiarch one.
pub fn module_path() -> Option<PathBuf> {
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    [
        PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
        PathBuf::from(format!("/usr/lib/{multiarch}/softhsm/libsofthsm2.so")),
        PathBuf::from("/usr/local/lib/softhsm/libsofthsm2.so"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// libp11's engine, `pkcs11.so` in OpenSSL's ENGINESDIR.
pub fn engine_path() -> Option<PathBuf> {
    let out = Command::new("openssl")
        .args(["version", "-e"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text.split('"').nth(1)?;
    Some(Path::new(dir).join("pkcs11.so")).filter(|p| p.is_file())
}

/// The shared store; made (and the environment set) on first use.
pub fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale_stores(base);
        let dir = base.join(format!("softhsm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let module = module_path().expect("SoftHSM module");
        let so_pin_file = dir.join("so.pin");
        std::fs::write(&so_pin_file, format!("{SO_PIN}\n")).unwrap();
        std::fs::write(dir.join("user.pin"), format!("{USER_PIN}\n")).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm/setup-token");
        let out = super::run_ok(
            Command::new(&script)
                .arg(&dir)
                .arg(DEFAULT_TOKEN)
                .env("PKCS11_MODULE_PATH", &module)
                .env_remove("SDV_PROVISION_PKCS11_PIN")
                .env_remove("SDV_PROVISION_PKCS11_SO_PIN"),
        );
        let exports = String::from_utf8_lossy(&out.stdout);
        let conf = dir.join("softhsm2.conf");
        assert!(
            exports.contains(&format!("SOFTHSM2_CONF='{}'", conf.display())),
            "setup-token printed {exports}"
        );
        let openssl_conf = dir.join("openssl.cnf");
        write_openssl_conf(&openssl_conf, &module);
        // Set once, before any module is loaded in this process (see the module docs).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var("SDV_PROVISION_PKCS11_SO_PIN_FILE", &so_pin_file);
        let ctx = Pkcs11::new(&module).expect("load SoftHSM");
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        Store {
            tokendir: dir.join("tokens"),
            conf,
            module,
            openssl_conf,
            so_pin_file,
            dir,
            ctx,
        }
    })
}

/// An `OPENSSL_CONF` that loads libp11's `pkcs11` engine for `module` (Debian's
/// libengine-pkcs11-openssl: `dynamic_path` is the engine, `MODULE_PATH` the token's
/// module; `init = 0` leaves initialisation to the first use).
pub fn write_openssl_conf(path: &Path, module: &Path) {
    std::fs::write(
        path,
        format!(
            "openssl_conf = openssl_init\n\
             [openssl_init]\nengines = engine_section\n\
             [engine_section]\npkcs11 = pkcs11_section\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {}\nMODULE_PATH = {}\ninit = 0\n",
            engine_path().expect("libp11 engine").display(),
            module.display()
        ),
    )
    .unwrap();
}

/// A SoftHSM store of its own, for tests that run the built binary: every child
/// process gets this store's `SOFTHSM2_CONF` in its environment, so nothing is shared
/// and nothing in the test process changes. Made by `softhsm/setup-token`.
pub struct PrivateStore {
    pub dir: TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
    pub openssl_conf: PathBuf,
    /// [`USER_PIN`] plus a newline.
    pub pin_file: PathBuf,
    pub label: String,
}

impl PrivateStore {
    pub fn new(label: &str) -> PrivateStore {
        let dir = tempfile::tempdir().unwrap();
        let hsm = dir.path().join("hsm");
        let module = module_path().expect("SoftHSM module");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm/setup-token");
        super::run_ok(
            Command::new(&script)
                .arg(&hsm)
                .arg(label)
                .env("PKCS11_MODULE_PATH", &module)
                .env("SDV_PROVISION_PKCS11_PIN", USER_PIN)
                .env("SDV_PROVISION_PKCS11_SO_PIN", SO_PIN),
        );
        let pin_file = dir.path().join("user.pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
        let openssl_conf = dir.path().join("openssl.cnf");
        write_openssl_conf(&openssl_conf, &module);
        PrivateStore {
            conf: hsm.join("softhsm2.conf"),
            module,
            openssl_conf,
            pin_file,
            label: label.to_owned(),
            dir,
        }
    }

    pub fn tokendir(&self) -> PathBuf {
        self.dir.path().join("hsm/tokens")
    }

    /// Environment for any process using this store (the binary, OpenSSL, pkcs11-tool).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOFTHSM2_CONF", self.conf.display().to_string()),
            ("OPENSSL_CONF", self.openssl_conf.display().to_string()),
        ]
    }

    /// `pkcs11-tool` logged in to this store's token.
    pub fn pkcs11_tool(&self) -> Command {
        let mut c = Command::new("pkcs11-tool");
        c.arg("--module")
            .arg(&self.module)
            .args(["--token-label", &self.label, "--login", "--pin", USER_PIN])
            .env("SOFTHSM2_CONF", &self.conf);
        c
    }

    /// Another application's EC P-256 key pair on this token: `label`, CKA_ID `id` (hex).
    pub fn foreign_keypair(&self, label: &str, id: &str) {
        super::run_ok(self.pkcs11_tool().args([
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            label,
            "--id",
            id,
        ]));
    }

    /// Labels of all objects in the token, one per object, as `pkcs11-tool` lists them.
    pub fn object_labels(&self) -> Vec<String> {
        let out = super::run_ok(
            Command::new("pkcs11-tool")
                .arg("--module")
                .arg(&self.module)
                .args([
                    "--token-label",
                    &self.label,
                    "--login",
                    "--list-objects",
                    "--pin",
                ])
                .arg(USER_PIN)
                .env("SOFTHSM2_CONF", &self.conf),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:").map(str::trim))
            // pkcs11-tool prints a data object's missing label as "<empty>".
            .map(|v| {
                if v == "<empty>" {
                    String::new()
                } else {
                    v.to_owned()
                }
            })
            .collect()
    }
}

/// Stores of earlier test runs whose process is gone.
fn remove_stale_stores(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("softhsm-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Held while a token is initialised: all tests share SoftHSM's one blank slot.
pub fn blank_slot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One test's token in the shared store, plus a temp dir for its files.
pub struct SoftHsm {
    pub label: String,
    /// Per-test files: `root/` (the `--root`), PIN files, certificates.
    pub dir: TempDir,
    /// Holds [`USER_PIN`] plus a newline.
    pub pin_file: PathBuf,
    pub store: &'static Store,
}

impl SoftHsm {
    /// A fresh token labelled `label` (1–32 bytes, unique in the test binary).
    pub fn new(label: &str) -> SoftHsm {
        let store = store();
        {
            let _guard = blank_slot_lock();
            let slot = store
                .ctx
                .get_slots_with_token()
                .unwrap()
                .into_iter()
                .find(|s| !store.ctx.get_token_info(*s).unwrap().token_initialized())
                .expect("SoftHSM always offers a blank slot");
            store
                .ctx
                .init_token(slot, &AuthPin::from(SO_PIN), label)
                .unwrap();
            let slot = find_slot(&store.ctx, label).expect("token just made");
            let s = store.ctx.open_rw_session(slot).unwrap();
            s.login(UserType::So, Some(&AuthPin::from(SO_PIN))).unwrap();
            s.init_pin(&AuthPin::from(USER_PIN)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("user.pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        SoftHsm {
            label: label.to_owned(),
            dir,
            pin_file,
            store,
        }
    }

    /// The `--root` of this test.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Flags as the CLI would merge them: module, token, PIN file, non-interactive.
    /// (A provisioning run's: it may choose and write the connector's PIN file.)
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: Some(self.store.module.clone()),
            token: Some(self.label.clone()),
            pin_file: Some(self.pin_file.clone()),
            purpose: Purpose::Provision,
            ..Pkcs11Config::default()
        }
    }

    pub fn slot(&self) -> Slot {
        find_slot(&self.store.ctx, &self.label).expect("test token")
    }

    /// A logged-in session of the test's own, to read what the keystore left behind.
    pub fn session(&self) -> Session {
        let s = self.store.ctx.open_rw_session(self.slot()).unwrap();
        match s.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("test login: {e}"),
        }
        s
    }

    pub fn token_info(&self) -> cryptoki::slot::TokenInfo {
        self.store.ctx.get_token_info(self.slot()).unwrap()
    }

    /// Handles of all objects labelled `label`, whatever their class.
    pub fn objects(&self, session: &Session, label: &str) -> Vec<ObjectHandle> {
        session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap()
    }

    /// The directory SoftHSM keeps this token's objects in (named by a UUID; found by
    /// the label inside its `token.object`).
    pub fn token_dir(&self) -> PathBuf {
        let padded = format!("{:<32}", self.label);
        std::fs::read_dir(&self.store.tokendir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                std::fs::read(p.join("token.object"))
                    .is_ok_and(|b| b.windows(padded.len()).any(|w| w == padded.as_bytes()))
            })
            .expect("token directory")
    }

    /// A copy of this token, alone in a store of its own, for another process to read
    /// (OpenSSL with libp11, pkcs11-tool): returns its `SOFTHSM2_CONF` and
    /// `OPENSSL_CONF`. Another process must not read the shared store: it loads every
    /// token in it, and other tests are writing theirs (SoftHSM's `C_GetSlotList` then
    /// fails with CKR_GENERAL_ERROR, and libp11 crashes on that). This test's own token
    /// is quiet while the copy is made (its operations run on this thread).
    pub fn external_store(&self) -> (PathBuf, PathBuf) {
        let base = self.dir.path().join("external");
        let _ = std::fs::remove_dir_all(&base);
        let token = self.token_dir();
        let copy = base.join("tokens").join(token.file_name().unwrap());
        std::fs::create_dir_all(&copy).unwrap();
        for e in std::fs::read_dir(&token).unwrap().flatten() {
            std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
        }
        let conf = base.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                base.join("tokens").display()
            ),
        )
        .unwrap();
        let openssl_conf = base.join("openssl.cnf");
        write_openssl_conf(&openssl_conf, &self.store.module);
        (conf, openssl_conf)
    }

    /// Environment for an OpenSSL consumer using libp11 and a copy of this token
    /// ([`SoftHsm::external_store`]).
    pub fn openssl_env(&self) -> Vec<(&'static str, String)> {
        let (conf, openssl_conf) = self.external_store();
        vec![
            ("OPENSSL_CONF", openssl_conf.display().to_string()),
            ("SOFTHSM2_CONF", conf.display().to_string()),
        ]
    }

    /// A `pkcs11-tool` command on a copy of this token ([`SoftHsm::external_store`]).
    pub fn pkcs11_tool(&self) -> Command {
        let (conf, _) = self.external_store();
        let mut c = Command::new("pkcs11-tool");
        c.arg("--module")
            .arg(&self.store.module)
            .args(["--token-label", &self.label])
            .env("SOFTHSM2_CONF", conf);
        c
    }
}

pub fn find_slot(ctx: &Pkcs11, label: &str) -> Option<Slot> {
    ctx.get_slots_with_token().unwrap().into_iter().find(|s| {
        ctx.get_token_info(*s)
            .is_ok_and(|i| i.token_initialized() && i.label() == label)
    })
}

/// The attributes of an object, by type (those the token reveals).
pub fn attrs(session: &Session, h: ObjectHandle, types: &[AttributeType]) -> Vec<Attribute> {
    session.get_attributes(h, types).unwrap()
}

pub fn bool_attr(session: &Session, h: ObjectHandle, t: AttributeType) -> Option<bool> {
    attrs(session, h, &[t]).into_iter().find_map(|a| match a {
        Attribute::Token(b)
        | Attribute::Private(b)
        | Attribute::Sensitive(b)
        | Attribute::Extractable(b)
        | Attribute::Sign(b)
        | Attribute::SignRecover(b)
        | Attribute::Decrypt(b)
        | Attribute::Unwrap(b)
        | Attribute::Derive(b)
        | Attribute::Verify(b)
        | Attribute::Encrypt(b)
        | Attribute::Wrap(b)
        | Attribute::AlwaysSensitive(b)
        | Attribute::NeverExtractable(b)
        | Attribute::Local(b) => Some(b),
        _ => None,
    })
}
