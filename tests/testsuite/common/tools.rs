//! The one required-tools gate. A test names the tools it needs,
//! `require_tools!(Swtpm, Tpm2Tools, Openssl);`, as its first line; a missing one
//! **fails** the test under `CI=true` (a skipped hardware test is never a pass in CI,
//! DESIGN §7) and, on a developer machine, prints one loud `SKIPPED` line naming the
//! test and the tool and returns. `scripts/setup-deps` installs them all.

use std::path::{Path, PathBuf};

/// What a test may need from the machine. One home for each tool's name, how it is
/// found and why the tests need it.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    /// `openssl`: certificate checks, CSRs, TLS handshakes.
    Openssl,
    /// `swtpm`: a software TPM per test.
    Swtpm,
    /// tpm2-tools (`tpm2_getcap`, `tpm2_changeauth`, ...): independent reads of the TPM.
    Tpm2Tools,
    /// `tpm2-abrmd` and `dbus-daemon`: the resource manager the OpenSSL tpm2 provider needs.
    Abrmd,
    /// SoftHSM2 (`softhsm2-util` and its module), opensc's `pkcs11-tool` and libp11's
    /// OpenSSL engine.
    SoftHsm,
    /// `chattr`: an immutable (unwritable) file or directory.
    Chattr,
    /// `setpriv` and `flock`: another user holding the lock.
    SetprivFlock,
    /// libfiu's `fiu-run` (Debian fiu-utils): storage faults injected into the binary.
    Fiu,
}

impl Tool {
    /// `Err(what is missing and why it is needed)` when the tool is not here.
    fn check(self) -> Result<(), String> {
        match self {
            Tool::Openssl => program("openssl", "certificates are checked with openssl"),
            Tool::Swtpm => program("swtpm", "a software TPM"),
            Tool::Tpm2Tools => program("tpm2_getcap", "tpm2-tools read what the TPM holds").and(
                program("tpm2_changeauth", "tpm2-tools set hierarchy passwords"),
            ),
            Tool::Abrmd => program(
                "tpm2-abrmd",
                "the OpenSSL tpm2 provider needs a resource manager",
            )
            .and(program("dbus-daemon", "tpm2-abrmd runs on a private D-Bus")),
            Tool::SoftHsm => softhsm(),
            Tool::Chattr => program("chattr", "an unwritable file or directory"),
            Tool::SetprivFlock => program("setpriv", "runs a process as nobody")
                .and(program("flock", "takes the lock as nobody")),
            Tool::Fiu => program(
                "fiu-run",
                "the storage-fault suite (Debian package fiu-utils)",
            ),
        }
    }
}

fn program(name: &str, why: &str) -> Result<(), String> {
    match which(name) {
        Some(_) => Ok(()),
        None => Err(format!("{name} not found ({why})")),
    }
}

fn file(path: Option<PathBuf>, fallback: &str, why: &str) -> Result<(), String> {
    match path {
        Some(p) if p.is_file() => Ok(()),
        _ => Err(format!("{fallback} not found ({why})")),
    }
}

#[cfg(feature = "pkcs11")]
fn softhsm() -> Result<(), String> {
    use super::softhsm::{engine_path, module_path};
    program(
        "softhsm2-util",
        "PKCS#11 keystore tests run against SoftHSM2",
    )?;
    program("openssl", "certificate checks and TLS handshakes")?;
    program(
        "pkcs11-tool",
        "independent read of the token's objects (opensc)",
    )?;
    file(
        module_path(),
        "/usr/lib/softhsm/libsofthsm2.so",
        "the SoftHSM2 PKCS#11 module",
    )?;
    file(
        engine_path(),
        "/usr/lib/engines-3/pkcs11.so",
        "libp11's OpenSSL engine (libengine-pkcs11-openssl)",
    )
}

#[cfg(not(feature = "pkcs11"))]
fn softhsm() -> Result<(), String> {
    Err("the pkcs11 feature is off".to_owned())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.starts_with('/') {
        return Some(PathBuf::from(tool)).filter(|p| Path::new(p).exists());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Are all `tools` here? The first missing one panics under CI; locally it prints one
/// `SKIPPED` line and the answer is `false`. Use it through [`require_tools!`].
pub fn have(tools: &[Tool]) -> bool {
    satisfied(tools.iter().try_for_each(|t| t.check()))
}

/// A condition of the machine rather than a program (no host TPM, an immutable flag
/// that takes): `Err(what is missing)` goes the same way as a missing tool. Use it
/// through `require_tools!(where CHECK)`.
pub fn satisfied(check: Result<(), String>) -> bool {
    let Err(missing) = check else {
        return true;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    if in_ci() {
        panic!("{test}: {missing}, and CI=true: install it (scripts/setup-deps)");
    }
    eprintln!("SKIPPED {test}: {missing}; install it with scripts/setup-deps");
    false
}

/// `require_tools!(Swtpm, Openssl);` returns from the test when a tool is missing (see
/// [`have`]); `require_tools!(Swtpm => None);` returns `None` instead;
/// `require_tools!(where no_host_tpm());` gates on a condition (see [`satisfied`]).
macro_rules! require_tools {
    (where $check:expr $(=> $ret:expr)?) => {
        if !$crate::common::tools::satisfied($check) {
            return $($ret)?;
        }
    };
    ($($tool:ident),+ $(,)? $(=> $ret:expr)?) => {
        if !$crate::common::tools::have(&[$($crate::common::tools::Tool::$tool),+]) {
            return $($ret)?;
        }
    };
}

/// `--keystore auto` takes a host TPM before anything else: tests of what it picks
/// on a machine without one need this machine to have none.
pub fn no_host_tpm() -> Result<(), String> {
    match Path::new("/dev/tpmrm0").exists() {
        true => Err("this machine has a TPM (/dev/tpmrm0), so --keystore auto picks it".into()),
        false => Ok(()),
    }
}

/// `chattr +i` on `path` (root ignores modes, not the immutable flag; it needs
/// CAP_LINUX_IMMUTABLE and a file system that has the flag); cleared again on drop.
/// Use it as `let Some(_guard) = immutable(&p) else { return };`: without the flag the
/// gate fails the test under CI and skips it loudly locally.
pub fn immutable(path: &Path) -> Option<Immutable> {
    require_tools!(Chattr => None);
    let set = std::process::Command::new("chattr")
        .arg("+i")
        .arg(path)
        .output()
        .unwrap();
    let check = match set.status.success() {
        true => Ok(()),
        false => Err(format!(
            "cannot make {} immutable ({})",
            path.display(),
            String::from_utf8_lossy(&set.stderr).trim()
        )),
    };
    require_tools!(where check => None);
    Some(Immutable(path.to_owned()))
}

/// The immutable flag on a path, cleared on drop (see [`immutable`]).
pub struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}
