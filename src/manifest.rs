//! The cloud connector's Kanto container manifest (DESIGN §3).
//!
//! The manifest is edited as a JSON tree (serde_json with `preserve_order`), never by
//! splicing strings, so no value can change its structure. The tool owns a fixed set of
//! `config.env` keys, the mounts whose source is in the certificates directory (plus
//! the PKCS#11 extras it added), and the `/dev/tpmrm0` device entry; everything else is
//! kept exactly as it was, in its order. Both Leda shapes are handled as they are:
//! Kanto's internal form (`mounts`, `CERT_PATH`/`KEY_PATH`) and the
//! kanto-auto-deployer form (`mount_points`, `/device.crt`, `CERT_FILE`/`KEY_FILE`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::fsutil;
pub use crate::keystore::KeyRef;
use crate::paths::{Layout, CERT_DIR, CONTAINER_CERT_DIR, MANIFEST, MANIFEST_TEMPLATE};

/// Manifests larger than this are refused rather than parsed.
pub const MAX_SIZE: usize = 4 << 20;

pub const TPM_DEVICE: &str = "/dev/tpmrm0";
/// The connector's JSON settings file, TPM mode only (DESIGN §3): today's connector
/// drops its `-tpm*` flags and reads the TPM settings only from the file named by
/// `CLOUD_CONNECTOR_CONFIG`.
pub const CONNECTOR_CONFIG_FILE: &str = "cloudconnector.config.json";
const CONNECTOR_CONFIG_ENV: &str = "CLOUD_CONNECTOR_CONFIG";
pub const TPM_TCTI: &str = "device:/dev/tpmrm0";

/// Every env key the tool owns. Anything else in `config.env` is left alone.
pub const OWNED_ENV: &[&str] = &[
    "ID_SCOPE",
    "CONNECTION_STRING",
    "CERT_FILE",
    "CERT_PATH",
    "KEY_URI",
    "KEY_FILE",
    "KEY_PATH",
    "TPM_DEVICE",
    "TPM_HANDLE",
    "TPM_KEY",
    "TPM_KEY_PUB",
    "TPM2OPENSSL_TCTI",
    "PKCS11_MODULE_PATH",
    // Owned only while it names our config file; see [`foreign_connector_config`].
    CONNECTOR_CONFIG_ENV,
];

/// What the manifest should say.
#[derive(Debug, Clone)]
pub struct Desired {
    /// `("ID_SCOPE", scope)` or `("CONNECTION_STRING", cs)`.
    pub cloud: (&'static str, String),
    /// Device path of the primary certificate.
    pub cert: PathBuf,
    pub key: KeyRef,
    /// Extra mount sources outside the certificates directory that an earlier run
    /// added (PKCS#11) and the tool therefore owns.
    pub previously_owned: Vec<PathBuf>,
}

/// A loaded manifest: where it lives, what it holds now, and what we start from.
#[derive(Debug)]
pub struct Manifest {
    pub path: PathBuf,
    /// Current content (None if the file does not exist yet).
    pub current: Option<Value>,
    /// The base for our edits: the template if there is one, else the current file.
    pub base: Value,
    pub from_template: bool,
}

impl Manifest {
    /// Load the manifest under `layout`, validating it. `Ok(None)` when neither the
    /// manifest nor its template exists (no connector installed).
    pub fn load(layout: &Layout) -> Result<Option<Manifest>> {
        let path = layout.host(MANIFEST);
        let current = read_json(&path)?;
        let template = read_json(&layout.host(MANIFEST_TEMPLATE))?;
        let from_template = template.is_some();
        let Some(base) = template.or_else(|| current.clone()) else {
            return Ok(None);
        };
        Ok(Some(Manifest {
            path,
            current,
            base,
            from_template,
        }))
    }

    /// Compute the new content. Errors if the base has the wrong shape.
    pub fn render(&self, want: &Desired) -> Result<Value> {
        apply(&self.base, want).map_err(|detail| Error::InvalidManifest {
            path: self.path.clone(),
            detail,
        })
    }

    /// The manifest without the tool's entries: the template when there is one, else
    /// the current content with owned env keys, owned mounts and the TPM device removed.
    pub fn stripped(&self, previously_owned: &[PathBuf]) -> Result<Value> {
        let mut v = self.base.clone();
        if self.from_template {
            return Ok(v);
        }
        let our_config_dest = config_destination(&v);
        let root = v.as_object_mut().expect("checked when loaded");
        if let Some(env) = root
            .get_mut("config")
            .and_then(|c| c.get_mut("env"))
            .and_then(Value::as_array_mut)
        {
            env.retain(|e| {
                let s = e.as_str().unwrap_or_default();
                let (key, value) = s.split_once('=').unwrap_or((s, ""));
                !OWNED_ENV.contains(&key)
                    || (key == CONNECTOR_CONFIG_ENV && value != our_config_dest)
            });
        }
        for key in ["mounts", "mount_points"] {
            if let Some(m) = root.get_mut(key).and_then(Value::as_array_mut) {
                m.retain(|m| {
                    let src = m.get("source").and_then(Value::as_str).unwrap_or_default();
                    !(in_cert_dir(src) || previously_owned.iter().any(|p| p.as_os_str() == src))
                });
            }
        }
        if let Some(d) = root
            .get_mut("host_config")
            .and_then(|h| h.get_mut("devices"))
            .and_then(Value::as_array_mut)
        {
            let ours = tpm_device_entry();
            d.retain(|e| *e != ours);
        }
        Ok(v)
    }

    /// Write `new` with file `mode` ([`fsutil::SECRET`] when it holds a
    /// SharedAccessKey, else [`fsutil::PUBLIC`]) if it differs from the current
    /// content. Returns whether it wrote.
    pub fn save(&self, new: &Value, mode: u32) -> Result<bool> {
        if self.current.as_ref() == Some(new) {
            return Ok(false);
        }
        // The bytes may hold the SharedAccessKey: wiped once written.
        fsutil::atomic_write(&self.path, &zeroize::Zeroizing::new(to_bytes(new)), mode)?;
        Ok(true)
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let Some(bytes) = fsutil::read_optional(path)? else {
        return Ok(None);
    };
    let bad = |detail: String| Error::InvalidManifest {
        path: path.to_owned(),
        detail,
    };
    if bytes.len() > MAX_SIZE {
        return Err(bad(format!("larger than {} MiB", MAX_SIZE >> 20)));
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    check_shape(&v).map_err(bad)?;
    Ok(Some(v))
}

/// Pretty JSON with the 4-space indent Leda's manifests use, newline-terminated.
pub fn to_bytes(v: &Value) -> Vec<u8> {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)
        .expect("serialising a Value cannot fail");
    out.push(b'\n');
    out
}

/// Refuse shapes we would have to guess about.
fn check_shape(v: &Value) -> std::result::Result<(), String> {
    let root = v.as_object().ok_or("the top level is not a JSON object")?;
    if let Some(config) = root.get("config") {
        let config = config.as_object().ok_or("`config` is not an object")?;
        if let Some(env) = config.get("env") {
            let env = env.as_array().ok_or("`config.env` is not a list")?;
            if env.iter().any(|e| !e.is_string()) {
                return Err("`config.env` holds something that is not a string".into());
            }
        }
    }
    for key in ["mounts", "mount_points"] {
        if let Some(m) = root.get(key) {
            let m = m.as_array().ok_or(format!("`{key}` is not a list"))?;
            if m.iter().any(|e| !e.is_object()) {
                return Err(format!("`{key}` holds something that is not an object"));
            }
        }
    }
    if let Some(hc) = root.get("host_config") {
        let hc = hc.as_object().ok_or("`host_config` is not an object")?;
        if let Some(d) = hc.get("devices") {
            if !d.is_array() {
                return Err("`host_config.devices` is not a list".into());
            }
        }
    }
    Ok(())
}

fn in_cert_dir(source: &str) -> bool {
    Path::new(source).starts_with(CERT_DIR)
}

fn tpm_device_entry() -> Value {
    json!({
        "path_on_host": TPM_DEVICE,
        "path_in_container": TPM_DEVICE,
        "cgroup_permissions": "rwm"
    })
}

/// The device path of our connector config file.
pub fn connector_config_source() -> PathBuf {
    crate::paths::Layout::cert_file(CONNECTOR_CONFIG_FILE)
}

/// Where our config file appears in the container: the destination of its existing
/// mount, else the default under `/var/certificates/`.
fn config_destination(manifest: &Value) -> String {
    let source = connector_config_source();
    ["mounts", "mount_points"]
        .iter()
        .filter_map(|k| manifest.get(*k).and_then(Value::as_array))
        .flatten()
        .find(|m| m.get("source").and_then(Value::as_str) == source.to_str())
        .and_then(|m| m.get("destination").and_then(Value::as_str))
        .map_or_else(
            || format!("{CONTAINER_CERT_DIR}/{CONNECTOR_CONFIG_FILE}"),
            str::to_owned,
        )
}

/// The `CLOUD_CONNECTOR_CONFIG` of `manifest` when it names a file of its own (not
/// ours): that entry is the template author's and is left alone, with a warning.
pub fn foreign_connector_config(manifest: &Value) -> Option<String> {
    let value = env_value(manifest, CONNECTOR_CONFIG_ENV)?;
    (value != config_destination(manifest)).then(|| value.to_owned())
}

/// The connector's TPM settings for a rendered manifest, or `None` outside TPM mode:
/// `tpmHandle` is the SRK as a JSON number (the connector's field is a `uint64`),
/// `tpmKey`/`tpmKeyPub` the container paths the manifest gives the blobs.
pub fn connector_config(rendered: &Value, want: &Desired) -> Option<Value> {
    let KeyRef::Tpm { srk, .. } = &want.key else {
        return None;
    };
    Some(json!({
        "tpmDevice": TPM_DEVICE,
        "tpmHandle": srk,
        "tpmKey": env_value(rendered, "TPM_KEY")?,
        "tpmKeyPub": env_value(rendered, "TPM_KEY_PUB")?,
    }))
}

/// Host files the connector needs: (source, destination when no mount names it yet).
type Needed = Vec<(String, String)>;

/// Apply the tool's owned entries to `base`. Pure: the same input gives the same output.
///
/// The steps: the connector config (ours unless the template names its own), the
/// needed mounts, reconciling the mounts, the env entries, the TPM device node.
pub fn apply(base: &Value, want: &Desired) -> std::result::Result<Value, String> {
    check_shape(base)?;
    let own_config = own_connector_config(base);
    let mut v = base.clone();
    let root = v.as_object_mut().expect("checked");
    let needed = needed_mounts(want, own_config.as_deref());
    let dest_of = reconcile_mounts(root, &needed, want);
    let dest = |p: &Path| dest_of[&*p.to_string_lossy()].clone();
    let (env_want, only_if_present) = env_entries(want, &dest, own_config.as_deref());
    merge_env(root, &env_want, &only_if_present, own_config.as_deref());
    tpm_device(root, want)?;
    Ok(v)
}

/// Where our connector config file appears in the container, or `None` when the
/// template's `CLOUD_CONNECTOR_CONFIG` names a file of its own.
fn own_connector_config(base: &Value) -> Option<String> {
    foreign_connector_config(base)
        .is_none()
        .then(|| config_destination(base))
}

/// Mounts: which host files the connector needs, and where they appear inside.
fn needed_mounts(want: &Desired, own_config: Option<&str>) -> Needed {
    let mut needed: Needed = Vec::new();
    let mut need = |source: &Path, dest: Option<&Path>| {
        let src = source.to_string_lossy().into_owned();
        let dest = match dest {
            Some(d) => d.to_string_lossy().into_owned(),
            None => Path::new(CONTAINER_CERT_DIR)
                .join(source.file_name().unwrap_or_default())
                .to_string_lossy()
                .into_owned(),
        };
        if !needed.iter().any(|(s, _)| *s == src) {
            needed.push((src, dest));
        }
    };
    need(&want.cert, None);
    match &want.key {
        KeyRef::File { key_file } => need(key_file, None),
        KeyRef::Tpm {
            pub_blob,
            priv_blob,
            ..
        } => {
            need(pub_blob, None);
            need(priv_blob, None);
            if let Some(config_dest) = own_config {
                need(&connector_config_source(), Some(Path::new(config_dest)));
            }
        }
        KeyRef::Pkcs11 {
            module,
            pin_file,
            mounts,
            ..
        } => {
            need(pin_file, None);
            need(module, Some(module));
            for m in mounts {
                need(m, Some(m));
            }
        }
    }
    needed
}

/// Our mounts are the needed ones, once each; a needed mount keeps the destination
/// it has. Returns each needed source's destination.
fn reconcile_mounts(
    root: &mut Map<String, Value>,
    needed: &Needed,
    want: &Desired,
) -> HashMap<String, String> {
    let mounts_key = if root.contains_key("mounts") {
        "mounts"
    } else {
        "mount_points"
    };
    let owned_source = |s: &str| {
        in_cert_dir(s)
            || needed.iter().any(|(n, _)| n == s)
            || want.previously_owned.iter().any(|p| p.as_os_str() == s)
    };
    let mounts = root
        .entry(mounts_key)
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .expect("checked");
    let mut seen: Vec<String> = Vec::new();
    mounts.retain(|m| {
        let Some(src) = m.get("source").and_then(Value::as_str) else {
            return true;
        };
        if !owned_source(src) {
            return true;
        }
        // One of ours without a destination is replaced, not kept beside the new one.
        let keep = needed.iter().any(|(n, _)| n == src)
            && !seen.iter().any(|s| s == src)
            && m.get("destination").is_some_and(Value::is_string);
        seen.push(src.to_owned());
        keep
    });
    let mut dest_of = HashMap::new();
    for (src, default_dest) in needed {
        let existing = mounts.iter().find_map(|m| {
            (m.get("source").and_then(Value::as_str) == Some(src))
                .then(|| {
                    m.get("destination")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .flatten()
        });
        let dest = match existing {
            Some(d) => d,
            None => {
                mounts.push(json!({
                    "source": src,
                    "destination": default_dest,
                    "propagation_mode": "rprivate"
                }));
                default_dest.clone()
            }
        };
        dest_of.insert(src.clone(), dest);
    }
    dest_of
}

/// An env key and its value.
type EnvEntries = Vec<(&'static str, String)>;

/// Env: the owned keys this mode needs, by value; and those written only where the
/// manifest already has them.
fn env_entries(
    want: &Desired,
    dest: &dyn Fn(&Path) -> String,
    own_config: Option<&str>,
) -> (EnvEntries, EnvEntries) {
    let cert_dest = dest(&want.cert);
    let mut env_want: EnvEntries = vec![
        (want.cloud.0, want.cloud.1.clone()),
        ("CERT_FILE", cert_dest.clone()),
    ];
    let mut only_if_present: EnvEntries = vec![("CERT_PATH", cert_dest)];
    match &want.key {
        KeyRef::File { key_file } => {
            let d = dest(key_file);
            env_want.push(("KEY_URI", format!("file:{d}")));
            env_want.push(("KEY_FILE", d.clone()));
            only_if_present.push(("KEY_PATH", d));
        }
        KeyRef::Tpm {
            handle,
            srk,
            pub_blob,
            priv_blob,
        } => {
            env_want.push(("KEY_URI", format!("handle:0x{handle:08x}")));
            // Today's connector exits without a non-empty KEY_FILE, even in TPM mode.
            env_want.push(("KEY_FILE", dest(priv_blob)));
            env_want.push(("TPM_DEVICE", TPM_DEVICE.into()));
            env_want.push(("TPM_HANDLE", format!("0x{srk:08x}")));
            env_want.push(("TPM_KEY", dest(priv_blob)));
            env_want.push(("TPM_KEY_PUB", dest(pub_blob)));
            env_want.push(("TPM2OPENSSL_TCTI", TPM_TCTI.into()));
            if own_config.is_some() {
                env_want.push((CONNECTOR_CONFIG_ENV, dest(&connector_config_source())));
            }
        }
        KeyRef::Pkcs11 {
            uri,
            module,
            pin_file,
            ..
        } => {
            env_want.push(("KEY_URI", uri.with_pin_source(&dest(pin_file))));
            env_want.push(("PKCS11_MODULE_PATH", dest(module)));
        }
    }
    (env_want, only_if_present)
}

/// Owned env entries are rewritten in place (duplicates dropped), missing ones
/// appended; everything else, and a foreign `CLOUD_CONNECTOR_CONFIG`, is kept.
fn merge_env(
    root: &mut Map<String, Value>,
    env_want: &EnvEntries,
    only_if_present: &EnvEntries,
    own_config: Option<&str>,
) {
    let config = root
        .entry("config")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .expect("checked");
    let env = config
        .entry("env")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .expect("checked");
    let mut done: Vec<&str> = Vec::new();
    let mut out: Vec<Value> = Vec::with_capacity(env.len() + env_want.len());
    for e in env.iter() {
        let s = e.as_str().expect("checked");
        let key = s.split_once('=').map_or(s, |(k, _)| k);
        let foreign = key == CONNECTOR_CONFIG_ENV && own_config.is_none();
        let Some(owned) = OWNED_ENV.iter().find(|k| **k == key && !foreign) else {
            out.push(e.clone());
            continue;
        };
        if done.contains(owned) {
            continue; // a duplicate (the original script appended ID_SCOPE again)
        }
        let value = env_want
            .iter()
            .chain(only_if_present.iter())
            .find(|(k, _)| k == owned);
        if let Some((k, val)) = value {
            out.push(Value::String(format!("{k}={val}")));
            done.push(owned);
        }
    }
    for (k, val) in env_want {
        if !done.contains(k) {
            out.push(Value::String(format!("{k}={val}")));
        }
    }
    *env = out;
}

/// The TPM device node: added in TPM mode, our entry removed otherwise.
fn tpm_device(root: &mut Map<String, Value>, want: &Desired) -> std::result::Result<(), String> {
    let tpm = matches!(want.key, KeyRef::Tpm { .. });
    let ours = tpm_device_entry();
    let has_devices = root
        .get("host_config")
        .and_then(|h| h.get("devices"))
        .is_some();
    if tpm || has_devices {
        let hc = root
            .entry("host_config")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or("`host_config` is not an object")?;
        let devices = hc
            .entry("devices")
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("checked");
        let is_ours = |d: &Value| d.get("path_on_host").and_then(Value::as_str) == Some(TPM_DEVICE);
        if tpm {
            if !devices.iter().any(is_ours) {
                devices.push(ours);
            }
        } else {
            devices.retain(|d| *d != ours);
        }
    }
    Ok(())
}

/// The value of an env key in a manifest, for `status`/`verify`.
pub fn env_value<'a>(manifest: &'a Value, key: &str) -> Option<&'a str> {
    manifest
        .get("config")?
        .get("env")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leda_utils() -> Value {
        serde_json::from_str(include_str!(
            "../tests/fixtures/cloudconnector.kanto.json.template"
        ))
        .unwrap()
    }
    fn meta_leda() -> Value {
        serde_json::from_str(include_str!(
            "../tests/fixtures/cloudconnector.auto-deployer.json"
        ))
        .unwrap()
    }

    fn file_want(scope: &str) -> Desired {
        Desired {
            cloud: ("ID_SCOPE", scope.into()),
            cert: "/data/var/certificates/device.crt".into(),
            key: KeyRef::File {
                key_file: "/data/var/certificates/device.key".into(),
            },
            previously_owned: vec![],
        }
    }

    fn env(v: &Value) -> Vec<String> {
        v["config"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect()
    }

    /// Found by fuzz/fuzz_targets/manifest_merge.rs: a mount of ours without a
    /// destination was kept and a second one appended; the next merge moved it, so
    /// every run rewrote the manifest (and restarted the connector).
    #[test]
    fn an_owned_mount_without_destination_is_replaced_and_the_merge_is_stable() {
        let base = json!({
            "mount_points": [
                {"source": "/data/var/certificates/device.crt", "desthnation": "/device.crt"},
                {"source": "/data/var/mosquitto", "destination": "/mosquitto"}
            ]
        });
        let want = file_want("0ne0012345A");
        let once = apply(&base, &want).unwrap();
        assert_eq!(apply(&once, &want).unwrap(), once);
        let crt: Vec<&Value> = once["mount_points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["source"] == "/data/var/certificates/device.crt")
            .collect();
        assert_eq!(crt.len(), 1, "{once}");
        assert_eq!(crt[0]["destination"], "/var/certificates/device.crt");
    }

    #[test]
    fn kanto_shape_file_mode() {
        let base = leda_utils();
        let out = apply(&base, &file_want("0ne0012345A")).unwrap();
        let e = env(&out);
        assert_eq!(e[0], "CERT_PATH=/var/certificates/device.crt");
        assert_eq!(e[1], "KEY_PATH=/var/certificates/device.key");
        assert_eq!(e[2..e.len() - 4], env(&base)[2..]);
        assert_eq!(
            e[e.len() - 4..],
            [
                "ID_SCOPE=0ne0012345A",
                "CERT_FILE=/var/certificates/device.crt",
                "KEY_URI=file:/var/certificates/device.key",
                "KEY_FILE=/var/certificates/device.key"
            ]
        );
        assert_eq!(out["mounts"], base["mounts"]);
        // Every other field is untouched and in order.
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&out), keys(&base));
        for k in keys(&base) {
            if k != "config" {
                assert_eq!(out[&k], base[&k], "{k}");
            }
        }
        // Idempotent.
        assert_eq!(apply(&out, &file_want("0ne0012345A")).unwrap(), out);
    }

    #[test]
    fn auto_deployer_shape_keeps_destinations() {
        let base = meta_leda();
        let out = apply(&base, &file_want("0ne0012345A")).unwrap();
        assert_eq!(out["mount_points"], base["mount_points"]);
        let e = env(&out);
        assert!(e.contains(&"CERT_FILE=/device.crt".to_string()));
        assert!(e.contains(&"KEY_FILE=/device.key".to_string()));
        assert!(e.contains(&"KEY_URI=file:/device.key".to_string()));
        assert!(!e
            .iter()
            .any(|x| x.starts_with("CERT_PATH") || x.starts_with("KEY_PATH")));
        assert!(out["host_config"].get("devices").is_none());
    }

    #[test]
    fn duplicates_collapse_and_stale_keys_go() {
        let mut base = leda_utils();
        let env_arr = base["config"]["env"].as_array_mut().unwrap();
        env_arr.push("ID_SCOPE=old".into());
        env_arr.push("ID_SCOPE=old".into());
        env_arr.push("CONNECTION_STRING=HostName=x;DeviceId=y".into());
        let out = apply(&base, &file_want("new")).unwrap();
        let e = env(&out);
        assert_eq!(e.iter().filter(|x| x.starts_with("ID_SCOPE=")).count(), 1);
        assert!(e.contains(&"ID_SCOPE=new".to_string()));
        assert!(!e.iter().any(|x| x.starts_with("CONNECTION_STRING")));
    }

    #[test]
    fn injection_cannot_change_structure() {
        let base = meta_leda();
        let evil = "x\",\"KEY_FILE=/etc/shadow\"],\"privileged\":true,\"a\":[\"";
        let out = apply(&base, &file_want(evil)).unwrap();
        let bytes = to_bytes(&out);
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, out);
        assert_eq!(env_value(&back, "ID_SCOPE"), Some(evil));
        assert_eq!(back["host_config"]["privileged"], false);
        assert_eq!(env_value(&back, "KEY_FILE"), Some("/device.key"));
    }

    fn tpm_want() -> Desired {
        Desired {
            cloud: (
                "CONNECTION_STRING",
                "HostName=h;DeviceId=d;x509=true".into(),
            ),
            cert: "/data/var/certificates/device.crt".into(),
            key: KeyRef::Tpm {
                handle: 0x8100_0010,
                srk: 0x8100_0001,
                pub_blob: "/data/var/certificates/device.tpm.pub".into(),
                priv_blob: "/data/var/certificates/device.tpm.priv".into(),
            },
            previously_owned: vec![],
        }
    }

    #[test]
    fn tpm_mode() {
        let base = leda_utils();
        let want = tpm_want();
        let out = apply(&base, &want).unwrap();
        let e = env(&out);
        assert_eq!(
            env_value(&out, "KEY_FILE"),
            Some("/var/certificates/device.tpm.priv")
        );
        assert_eq!(
            env_value(&out, "CLOUD_CONNECTOR_CONFIG"),
            Some("/var/certificates/cloudconnector.config.json")
        );
        assert_eq!(
            connector_config(&out, &want).unwrap(),
            json!({
                "tpmDevice": "/dev/tpmrm0",
                "tpmHandle": 2164260865u64,
                "tpmKey": "/var/certificates/device.tpm.priv",
                "tpmKeyPub": "/var/certificates/device.tpm.pub"
            })
        );
        assert_eq!(apply(&out, &want).unwrap(), out, "idempotent");
        assert!(
            !e.iter().any(|x| x.starts_with("KEY_PATH=")),
            "read by nothing"
        );
        assert_eq!(env_value(&out, "KEY_URI"), Some("handle:0x81000010"));
        assert_eq!(env_value(&out, "TPM_HANDLE"), Some("0x81000001"));
        assert_eq!(
            env_value(&out, "TPM_KEY"),
            Some("/var/certificates/device.tpm.priv")
        );
        let sources: Vec<&str> = out["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["source"].as_str().unwrap())
            .collect();
        assert!(!sources.contains(&"/data/var/certificates/device.key"));
        assert!(sources.contains(&"/data/var/certificates/device.tpm.pub"));
        assert_eq!(out["host_config"]["devices"], json!([tpm_device_entry()]));
        assert!(sources.contains(&"/data/var/certificates/cloudconnector.config.json"));
        // Back to file mode removes the TPM entries again.
        let back = apply(&out, &file_want("s")).unwrap();
        assert!(env_value(&back, "TPM_KEY").is_none());
        assert!(env_value(&back, "CLOUD_CONNECTOR_CONFIG").is_none());
        assert!(connector_config(&back, &file_want("s")).is_none());
        // A template's own CLOUD_CONNECTOR_CONFIG is left alone, and not mounted over.
        let mut theirs = base.clone();
        theirs["config"]["env"]
            .as_array_mut()
            .unwrap()
            .push("CLOUD_CONNECTOR_CONFIG=/etc/cc/mine.json".into());
        assert_eq!(
            foreign_connector_config(&theirs).as_deref(),
            Some("/etc/cc/mine.json")
        );
        let kept = apply(&theirs, &want).unwrap();
        assert_eq!(
            env_value(&kept, "CLOUD_CONNECTOR_CONFIG"),
            Some("/etc/cc/mine.json")
        );
        assert!(!to_bytes(&kept)
            .windows(26)
            .any(|w| w == b"cloudconnector.config.json"));
        assert_eq!(
            env_value(
                &apply(&kept, &file_want("s")).unwrap(),
                "CLOUD_CONNECTOR_CONFIG"
            ),
            Some("/etc/cc/mine.json")
        );
        assert!(foreign_connector_config(&out).is_none());
        assert_eq!(back["host_config"]["devices"], json!([]));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        for bad in [
            json!([]),
            json!({"config": {"env": "x"}}),
            json!({"config": {"env": [1]}}),
            json!({"mounts": {}}),
            json!({"config": []}),
        ] {
            assert!(apply(&bad, &file_want("s")).is_err(), "{bad}");
        }
    }

    /// Our test fixtures must have the shapes Leda ships (../shared/fixtures), when
    /// that directory is beside the checkout.
    #[test]
    fn fixtures_match_leda_shapes() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
        let pairs = [
            ("cloudconnector.leda-utils.json.template", leda_utils()),
            ("cloudconnector.meta-leda.json", meta_leda()),
        ];
        for (name, ours) in pairs {
            let Ok(text) = std::fs::read_to_string(shared.join(name)) else {
                continue;
            };
            let theirs: Value = serde_json::from_str(&text).unwrap();
            let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            for k in keys(&theirs) {
                assert!(ours.get(&k).is_some(), "{name}: fixture lacks {k}");
            }
            let out = apply(&theirs, &file_want("0ne0012345A")).unwrap();
            assert_eq!(apply(&out, &file_want("0ne0012345A")).unwrap(), out);
            // TPM mode: KEY_FILE and the config file's mount and env entry, idempotent.
            let want = tpm_want();
            let out = apply(&theirs, &want).unwrap();
            assert_eq!(apply(&out, &want).unwrap(), out, "{name}");
            let config = connector_config(&out, &want).unwrap();
            assert_eq!(
                env_value(&out, "KEY_FILE"),
                config["tpmKey"].as_str(),
                "{name}"
            );
            assert_eq!(
                env_value(&out, "CLOUD_CONNECTOR_CONFIG"),
                Some("/var/certificates/cloudconnector.config.json"),
                "{name}"
            );
            assert!(config["tpmHandle"].is_u64(), "{name}");
        }
    }
}
