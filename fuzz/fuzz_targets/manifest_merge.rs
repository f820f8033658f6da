//! Any JSON as the connector manifest the tool edits (DESIGN §3): the merge is
//! refused with an error, or every field the tool does not own is unchanged: other
//! top-level keys, other `config` keys, foreign env entries (in order), foreign
//! mounts (in order), other `host_config` keys and devices. Merging the result again
//! changes nothing.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use sdv_provision::manifest::{apply, Desired, KeyRef, OWNED_ENV, TPM_DEVICE};
use sdv_provision::paths::CERT_DIR;
use serde_json::Value;

const TOOL_KEYS: [&str; 4] = ["config", "mounts", "mount_points", "host_config"];

fn desired(tpm: bool) -> Desired {
    let cert = |n: &str| PathBuf::from(CERT_DIR).join(n);
    Desired {
        cloud: ("ID_SCOPE", "0ne0012345A".into()),
        cert: cert("device.crt"),
        key: if tpm {
            KeyRef::Tpm {
                handle: 0x8101_0010,
                srk: 0x8100_0001,
                pub_blob: cert("device.tpm.pub"),
                priv_blob: cert("device.tpm.priv"),
            }
        } else {
            KeyRef::File {
                key_file: cert("device.key"),
            }
        },
        previously_owned: Vec::new(),
    }
}

fn foreign_env(v: &Value) -> Vec<Value> {
    let env = v
        .get("config")
        .and_then(|c| c.get("env"))
        .and_then(Value::as_array);
    env.into_iter()
        .flatten()
        .filter(|e| {
            let s = e.as_str().unwrap_or_default();
            let key = s.split_once('=').map_or(s, |(k, _)| k);
            !OWNED_ENV.contains(&key)
        })
        .cloned()
        .collect()
}

fn foreign_mounts(v: &Value, key: &str) -> Vec<Value> {
    let m = v.get(key).and_then(Value::as_array);
    m.into_iter()
        .flatten()
        .filter(|m| match m.get("source").and_then(Value::as_str) {
            Some(src) => !Path::new(src).starts_with(CERT_DIR),
            None => true,
        })
        .cloned()
        .collect()
}

fn others<'a>(v: Option<&'a Value>, skip: &[&str]) -> Vec<(&'a String, &'a Value)> {
    v.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .collect()
}

fn foreign_devices(v: &Value) -> Vec<Value> {
    let d = v
        .get("host_config")
        .and_then(|h| h.get("devices"))
        .and_then(Value::as_array);
    d.into_iter()
        .flatten()
        .filter(|d| d.get("path_on_host").and_then(Value::as_str) != Some(TPM_DEVICE))
        .cloned()
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((first, json)) = data.split_first() else {
        return;
    };
    let Ok(base) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let want = desired(first & 1 == 1);
    let Ok(out) = apply(&base, &want) else { return };
    assert_eq!(
        others(Some(&out), &TOOL_KEYS),
        others(Some(&base), &TOOL_KEYS)
    );
    assert_eq!(
        others(out.get("config"), &["env"]),
        others(base.get("config"), &["env"])
    );
    assert_eq!(foreign_env(&out), foreign_env(&base));
    for key in ["mounts", "mount_points"] {
        assert_eq!(
            foreign_mounts(&out, key),
            foreign_mounts(&base, key),
            "{key}"
        );
    }
    assert_eq!(
        others(out.get("host_config"), &["devices"]),
        others(base.get("host_config"), &["devices"])
    );
    assert_eq!(foreign_devices(&out), foreign_devices(&base));
    assert_eq!(apply(&out, &want).expect("the result merges again"), out);
});
