//! Reaching the TPM: the TCTI string, TSS logging, and the owner-hierarchy secret.

use std::str::FromStr;
use std::sync::Once;

use tss_esapi::structures::Auth;
use tss_esapi::tcti_ldr::TctiNameConf;
use zeroize::Zeroizing;

use crate::keystore::KeyStoreError;

/// The TPM used when neither `--tcti` nor `TPM2TOOLS_TCTI` / `TCTI` says otherwise: the
/// kernel's resource manager, so other TPM users (the connector, tpm2-tools) can share.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Owner-hierarchy password, as a value. Env only: argv is world-readable in `/proc`.
pub const OWNER_AUTH_ENV: &str = "SDV_PROVISION_TPM_OWNER_AUTH";
/// Owner-hierarchy password, from a file (first line, trailing newline dropped).
pub const OWNER_AUTH_FILE_ENV: &str = "SDV_PROVISION_TPM_OWNER_AUTH_FILE";

const TCTI_HINT: &str = "pass --tcti device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321 or \
                         tabrmd:bus_type=session, or use --keystore file";

/// Parse a TCTI string strictly.
///
/// tss-esapi's own parser ignores options it does not know: `swtpm:path=/run/tpm.sock`
/// silently becomes `swtpm:host=localhost,port=2321`. A typo must never send our keys to
/// a different TPM than the user named, so every option is checked here first.
pub fn parse(tcti: &str) -> Result<TctiNameConf, KeyStoreError> {
    let bad = |why: String| KeyStoreError::Unavailable {
        what: format!("malformed TCTI {tcti:?}: {why}"),
        hint: TCTI_HINT.into(),
    };
    let (name, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    let options = || conf.split(',').filter(|o| !o.is_empty());
    match name {
        "device" => {
            if !conf.is_empty() && !conf.starts_with('/') {
                return Err(bad(
                    "a device TCTI takes an absolute path, e.g. device:/dev/tpmrm0".into(),
                ));
            }
        }
        "swtpm" | "mssim" => {
            for opt in options() {
                match opt.split_once('=') {
                    Some(("host", h)) if !h.is_empty() => {}
                    Some(("port", p)) if p.parse::<u16>().is_ok() => {}
                    Some(("port", _)) => return Err(bad("port must be a number 0-65535".into())),
                    _ => {
                        return Err(bad(format!(
                            "unsupported option {opt:?}; {name} takes host=… and port=… \
                             (unix sockets are not supported by this TSS)"
                        )))
                    }
                }
            }
        }
        "tabrmd" => {
            for opt in options() {
                match opt.split_once('=') {
                    Some(("bus_name", n)) if !n.is_empty() => {}
                    Some(("bus_type", "session" | "system")) => {}
                    _ => {
                        return Err(bad(format!(
                            "unsupported option {opt:?}; tabrmd takes bus_name=… and \
                             bus_type=session|system"
                        )))
                    }
                }
            }
        }
        "" => return Err(bad("empty TCTI name".into())),
        other => {
            return Err(bad(format!(
                "unknown TCTI {other:?}; supported: device, swtpm, mssim, tabrmd"
            )))
        }
    }
    TctiNameConf::from_str(tcti).map_err(|e| bad(e.to_string()))
}

/// Why the TPM at `tcti` could not be reached, in words the TSS does not give (its
/// TCTI errors print as "response code not recognized"). Asked only after a failure.
pub fn diagnose(tcti: &str) -> Option<String> {
    let (name, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match name {
        "device" => {
            let path = if conf.is_empty() { "/dev/tpm0" } else { conf };
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Some(format!("{path} does not exist"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
                    "no permission to open {path} (run as root or as a member of the tss group)"
                )),
                Err(e) => Some(format!("cannot open {path}: {e}")),
                Ok(_) => None,
            }
        }
        "swtpm" | "mssim" => {
            let (mut host, mut port) = ("localhost", 2321u16);
            for (k, v) in conf.split(',').filter_map(|o| o.split_once('=')) {
                match k {
                    "host" => host = v,
                    "port" => port = v.parse().ok()?,
                    _ => {}
                }
            }
            let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok()?;
            let mut last = None;
            for a in addrs {
                match std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)) {
                    Ok(_) => return None,
                    Err(e) => last = Some(e),
                }
            }
            last.map(|e| format!("nothing answers at {host}:{port} ({e})"))
        }
        _ => None,
    }
}

/// Silence the TSS's own stderr logging unless the user asked for it.
///
/// Looking up a handle that is not there is a normal question for us (is 0x81000010
/// free?), but the TSS logs it as an ERROR line. `TSS2_LOG=all+none` keeps stderr for
/// our own one-line messages. Done once, before the first context, because the TSS
/// reads the variable when it first logs.
pub fn quiet_tss_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TSS2_LOG").is_none() {
            std::env::set_var("TSS2_LOG", "all+none");
        }
    });
}

/// The owner-hierarchy authorization, if the user gave one, from
/// [`OWNER_AUTH_ENV`] or the file named by [`OWNER_AUTH_FILE_ENV`]. Never from argv.
///
/// `hex:` and `str:` prefixes work as in tpm2-tools. The secret lives in zeroizing
/// buffers only.
pub fn owner_auth() -> Result<Option<Auth>, KeyStoreError> {
    let raw: Zeroizing<Vec<u8>> = if let Some(v) = std::env::var_os(OWNER_AUTH_ENV) {
        Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v))
    } else if let Some(path) = std::env::var_os(OWNER_AUTH_FILE_ENV) {
        let path = std::path::PathBuf::from(path);
        let fix = || {
            format!("fix {OWNER_AUTH_FILE_ENV}, or unset it if the owner hierarchy has no password")
        };
        let mut bytes = crate::fsutil::read_optional(&path)
            .map_err(|e| KeyStoreError::Rejected {
                what: format!("cannot read the TPM owner password file: {e}"),
                hint: fix(),
            })?
            .map(Zeroizing::new)
            .ok_or_else(|| KeyStoreError::Rejected {
                what: format!("TPM owner password file {} does not exist", path.display()),
                hint: fix(),
            })?;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        bytes
    } else {
        return Ok(None);
    };
    let bad = |why: &str| KeyStoreError::Rejected {
        what: format!("the TPM owner password {why}"),
        hint: format!("check {OWNER_AUTH_ENV} / {OWNER_AUTH_FILE_ENV}"),
    };
    let value: Zeroizing<Vec<u8>> = if let Some(h) = raw.strip_prefix(b"hex:") {
        let text = std::str::from_utf8(h).map_err(|_| bad("after hex: is not hex"))?;
        Zeroizing::new(hex::decode(text).map_err(|_| bad("after hex: is not hex"))?)
    } else if let Some(s) = raw.strip_prefix(b"str:") {
        Zeroizing::new(s.to_vec())
    } else {
        Zeroizing::new(raw.to_vec())
    };
    if value.is_empty() {
        return Ok(None);
    }
    // Checked here: Auth::try_from would drop a too-long copy without zeroizing it.
    if value.len() > 64 {
        return Err(bad("is longer than the TPM allows (64 bytes)"));
    }
    Auth::try_from(value.to_vec())
        .map(Some)
        .map_err(|_| bad("is longer than the TPM allows (64 bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_usual_forms() {
        for ok in [
            "device:/dev/tpmrm0",
            "device",
            "swtpm:host=127.0.0.1,port=2321",
            "swtpm:port=2321",
            "mssim",
            "tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=session",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_what_the_tss_would_silently_ignore() {
        for bad in [
            "swtpm:path=/tmp/tpm.sock",
            "swtpm:port=99999",
            "device:dev/tpm0",
            "tabrmd:bus_type=both",
            "tpm:/dev/tpm0",
            "",
            ":x",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("malformed TCTI") && e.contains("--tcti"),
                "{bad}: {e}"
            );
        }
    }
}
