//! The device id: the certificate CN, the Hub device id and the DPS registration id.
//!
//! Sources in order: `--device-id`, a valid `/etc/deviceid`, the MAC address of the
//! first physical network interface. Never empty, never invalid (the original script
//! wrote an empty id and carried on, leda-distro #56).

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};
use crate::paths::{Layout, DEVICE_ID_FILE, SYS_CLASS_NET};

pub const MAX_LEN: usize = 64;

/// Where the id came from, for the transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    File,
    Interface(String),
}

/// Check an id: 1–64 characters of `[A-Za-z0-9._:-]`, not ending in `.`, `_` or `:`.
/// `;` and `=` would break connection strings; `/`, spaces and `..` have no business in
/// a CN that is also a registration id.
pub fn validate(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err("the device id is empty".into());
    }
    if id.len() > MAX_LEN {
        return Err(format!(
            "the device id is {} characters long, at most {MAX_LEN} are allowed",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "the device id contains {c:?}; only letters, digits and . _ : - are allowed"
        ));
    }
    if id.contains("..") {
        return Err("the device id contains \"..\"".into());
    }
    if id.ends_with(['.', '_', ':']) {
        return Err("the device id must end with a letter, digit or '-'".into());
    }
    Ok(())
}

/// Validate a user-given id, as an input error naming the flag.
pub fn check_flag(id: &str) -> Result<()> {
    validate(id).map_err(|why| Error::input(why, "pass a valid --device-id"))
}

/// `/etc/deviceid` must be a regular file or absent. An invalid *content* is
/// regenerated with a warning (DESIGN §3.1), but a symlink, directory, FIFO or device
/// there is refused before anything is made: following a link would read or replace a
/// file elsewhere (on the host, under `--root`), and removing someone's directory or
/// link is not ours to do.
pub fn check_file_kind(layout: &Layout) -> Result<()> {
    let path = layout.host(DEVICE_ID_FILE);
    match fs::symlink_metadata(&path) {
        Ok(m) if !m.is_file() => {
            let kind = if m.file_type().is_symlink() {
                "a symbolic link"
            } else if m.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            Err(Error::input(
                format!(
                    "{} is {kind}; it is neither followed nor replaced",
                    path.display()
                ),
                "remove it (sdv-provision writes a regular file there) and run again",
            ))
        }
        _ => Ok(()),
    }
}

/// The id stored in `/etc/deviceid`, if it is there and valid. An invalid one is
/// reported (warning) and ignored, so it gets regenerated.
pub fn read_file(layout: &Layout, warnings: &mut Vec<String>) -> Option<String> {
    let path = layout.host(DEVICE_ID_FILE);
    match crate::fsutil::read_optional_string(&path) {
        Ok(None) => None,
        Ok(Some(s)) => {
            let id = s.trim();
            match validate(id) {
                Ok(()) => Some(id.to_owned()),
                Err(why) => {
                    warnings.push(format!(
                        "ignoring {}: {why}; deriving a new one",
                        path.display()
                    ));
                    None
                }
            }
        }
        Err(e) => {
            warnings.push(format!("ignoring {}: {e}", path.display()));
            None
        }
    }
}

/// The device id from the first physical interface's MAC: `52-54-21-4c-f9-5a`.
pub fn from_network(layout: &Layout) -> Result<(String, String)> {
    let dir = layout.host(SYS_CLASS_NET);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        // The kernel's `NAME -> ../../devices/…` link, read inside the root: one
        // that leads nowhere there (say, out of the tree) is skipped.
        let Ok(iface) = layout.try_host_dir(Path::new(SYS_CLASS_NET).join(&name)) else {
            continue;
        };
        if let Some(id) = physical_mac(&dir.join(&name), &iface, &name) {
            return Ok((id, name));
        }
    }
    Err(Error::input(
        format!("no physical network interface found in {}", dir.display()),
        "pass --device-id to choose the device id",
    ))
}

/// `link` is the entry in `sys/class/net`, `iface` the directory it resolves to.
fn physical_mac(link: &Path, iface: &Path, name: &str) -> Option<String> {
    if name.starts_with("can") || name.starts_with("vcan") {
        return None;
    }
    if let Ok(target) = fs::read_link(link) {
        if target.to_string_lossy().contains("/virtual/") {
            return None;
        }
    }
    // Read like the tool's other files: never through a link, never blocking.
    let read = |f: &str| {
        crate::fsutil::read_optional_string(&iface.join(f))
            .ok()
            .flatten()
    };
    let kind = read("type").unwrap_or_default();
    if kind.trim() == "280" {
        return None; // ARPHRD_CAN
    }
    let mac = read("address")?;
    let mac = mac.trim().to_ascii_lowercase();
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed || octets.iter().all(|o| *o == "00") {
        return None;
    }
    Some(octets.join("-"))
}

/// Resolve the device id (DESIGN §1.1).
pub fn resolve(
    layout: &Layout,
    flag: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<(String, Source)> {
    if let Some(id) = flag {
        check_flag(id)?;
        return Ok((id.to_owned(), Source::Flag));
    }
    if let Some(id) = read_file(layout, warnings) {
        return Ok((id, Source::File));
    }
    let (id, iface) = from_network(layout)?;
    Ok((id, Source::Interface(iface)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        for ok in ["a", "52-54-21-4c-f9-5a", "dev.1:x-Y", &"a".repeat(64)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a.",
            "a:",
            "a_",
            "a b",
            "a/b",
            "..",
            "a;b",
            "a=b",
            "é",
            &"a".repeat(65),
            "a\n",
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn picks_first_physical_interface() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("sys/class/net");
        let mk = |name: &str, mac: &str, kind: &str| {
            let p = net.join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("address"), format!("{mac}\n")).unwrap();
            fs::write(p.join("type"), format!("{kind}\n")).unwrap();
        };
        mk("can0", "aa:aa:aa:aa:aa:aa", "280");
        mk("dummy0", "00:00:00:00:00:00", "1");
        mk("eth1", "52:54:21:4C:F9:5B", "1");
        mk("eth0", "52:54:21:4C:F9:5A", "1");
        mk("xcan", "bb:bb:bb:bb:bb:bb", "280");
        let layout = Layout::new(d.path());
        assert_eq!(
            from_network(&layout).unwrap(),
            ("52-54-21-4c-f9-5a".to_string(), "eth0".to_string())
        );
    }

    /// `can*` / `vcan*` are skipped by name, whatever type they report.
    #[test]
    fn can_interfaces_are_skipped_by_name() {
        let d = tempfile::tempdir().unwrap();
        let net = d.path().join("sys/class/net");
        for (name, mac) in [
            ("can1", "52:54:21:00:00:01"),
            ("vcan0", "52:54:21:00:00:02"),
            ("wlan0", "52:54:21:4c:f9:5c"),
        ] {
            let p = net.join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("address"), format!("{mac}\n")).unwrap();
            fs::write(p.join("type"), "1\n").unwrap();
        }
        assert_eq!(
            from_network(&Layout::new(d.path())).unwrap(),
            ("52-54-21-4c-f9-5c".to_string(), "wlan0".to_string())
        );
    }
}
