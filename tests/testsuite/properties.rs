//! Property tests ("fuzzing" that runs in CI on stable Rust; cargo-fuzz needs nightly,
//! which this project's toolchain does not have). Each property runs `PROPTEST_CASES`
//! cases (default 256 here; the README gives the command for long runs).
//!
//! Targets: the connection-string parser, the key URI parser/printer, the manifest
//! merge, device-id validation, the ID-scope check.

use proptest::prelude::*;
use serde_json::{json, Value};

use sdv_provision::cloud::{check_id_scope, ConnectionString};
use sdv_provision::device_id;
use sdv_provision::keystore::{KeyRef, KeyUri, Pkcs11Uri};
use sdv_provision::manifest::{apply, env_value, to_bytes, Desired, OWNED_ENV};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Arbitrary JSON, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A manifest-like object: random fields plus a config.env of random KEY=VALUE
/// strings (some of them owned keys, some duplicated) and random mounts.
fn arb_manifest() -> impl Strategy<Value = Value> {
    let env_key = prop_oneof![
        prop::sample::select(OWNED_ENV.to_vec()).prop_map(str::to_owned),
        "[A-Z_]{1,10}",
    ];
    let env = prop::collection::vec((env_key, ".{0,20}"), 0..12).prop_map(|v| {
        v.into_iter()
            .map(|(k, val)| Value::String(format!("{k}={val}")))
            .collect::<Vec<_>>()
    });
    let mount = (
        prop_oneof![
            Just("/data/var/certificates/device.crt".to_string()),
            Just("/data/var/certificates/x".to_string()),
            "/[a-z/]{1,20}"
        ],
        "/[a-z/]{1,20}",
    )
        .prop_map(|(s, d)| json!({"source": s, "destination": d, "propagation_mode": "rprivate"}));
    (
        prop::collection::vec(("[a-z_]{1,8}", arb_json()), 0..6),
        env,
        prop::collection::vec(mount, 0..5),
        any::<bool>(),
    )
        .prop_map(|(fields, env, mounts, kanto)| {
            let mut m = serde_json::Map::new();
            for (k, v) in fields {
                if !["config", "mounts", "mount_points", "host_config"].contains(&k.as_str()) {
                    m.insert(k, v);
                }
            }
            m.insert(
                if kanto { "mounts" } else { "mount_points" }.into(),
                Value::Array(mounts),
            );
            m.insert("config".into(), json!({"env": env, "cmd": []}));
            Value::Object(m)
        })
}

fn desired(scope: String) -> Desired {
    Desired {
        cloud: ("ID_SCOPE", scope),
        cert: "/data/var/certificates/device.crt".into(),
        key: KeyRef::File {
            key_file: "/data/var/certificates/device.key".into(),
        },
        previously_owned: vec![],
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn connection_string_parser_never_panics_and_never_leaks(s in ".{0,200}", key in "[A-Za-z0-9+/]{8,40}") {
        let _ = ConnectionString::parse(&s);
        let full = format!("HostName=h.example;DeviceId=d1;SharedAccessKey={key}=");
        let cs = ConnectionString::parse(&full).unwrap();
        prop_assert!(!cs.to_string().contains(&key));
        let debug = format!("{:?}", cs);
        prop_assert!(!debug.contains(&key));
        // Any error text never echoes the key either.
        let bad = format!("HostName=h;DeviceId=d;SharedAccessKey={key}; x");
        if let Err(e) = ConnectionString::parse(&bad) {
            prop_assert!(!e.contains(&key));
        }
    }

    #[test]
    fn accepted_connection_strings_are_clean(s in "[ -~]{0,120}") {
        if let Ok(cs) = ConnectionString::parse(&s) {
            prop_assert!(!cs.expose().chars().any(|c| c.is_whitespace() || c.is_control() || c == '"'));
            prop_assert!(device_id::validate(&cs.device_id).is_ok());
        }
    }

    #[test]
    fn key_uri_round_trips(token in ".{1,20}", object in ".{1,20}", id in prop::collection::vec(any::<u8>(), 1..20), h in 0x8100_0000u32..0x8200_0000) {
        let u = KeyUri::Pkcs11(Pkcs11Uri { token, object, id });
        prop_assert_eq!(u.to_string().parse::<KeyUri>().unwrap(), u.clone());
        let t = KeyUri::TpmHandle(h);
        prop_assert_eq!(t.to_string().parse::<KeyUri>().unwrap(), t);
    }

    #[test]
    fn key_uri_parser_never_panics(s in ".{0,80}", p in "(pkcs11:|handle:|file:).{0,60}") {
        for input in [&s, &p] {
            if let Ok(u) = input.parse::<KeyUri>() {
                // Whatever parses prints to something that parses to the same thing.
                prop_assert_eq!(u.to_string().parse::<KeyUri>().unwrap(), u);
            }
        }
    }

    #[test]
    fn device_id_validation_matches_the_rule(s in ".{0,70}") {
        let ok = device_id::validate(&s).is_ok();
        let rule = !s.is_empty()
            && s.len() <= 64
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
        prop_assert_eq!(ok, rule);
    }

    #[test]
    fn id_scope_check_never_panics(s in ".{0,80}") {
        if check_id_scope(&s).is_ok() {
            prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn manifest_merge_is_safe(base in arb_manifest(), scope in ".{0,40}") {
        let out = apply(&base, &desired(scope.clone())).unwrap();
        // Valid JSON that reads back identically: no value can change the structure.
        let back: Value = serde_json::from_slice(&to_bytes(&out)).unwrap();
        prop_assert_eq!(&back, &out);
        // Owned keys set exactly once.
        let env: Vec<&str> = out["config"]["env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
        for k in ["ID_SCOPE", "CERT_FILE", "KEY_URI", "KEY_FILE"] {
            prop_assert_eq!(env.iter().filter(|e| e.split_once('=').map(|x| x.0) == Some(k)).count(), 1, "{}", k);
        }
        prop_assert_eq!(env_value(&out, "ID_SCOPE"), Some(scope.as_str()));
        // Foreign env entries kept, in order.
        let foreign = |v: &Value| -> Vec<String> {
            v["config"]["env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned())
                .filter(|e| !OWNED_ENV.contains(&e.split_once('=').map_or(e.as_str(), |x| x.0))).collect()
        };
        prop_assert_eq!(foreign(&out), foreign(&base));
        // Every other top-level field untouched, in order.
        for (k, v) in base.as_object().unwrap() {
            if !["config", "mounts", "mount_points", "host_config"].contains(&k.as_str()) {
                prop_assert_eq!(&out[k], v);
            }
        }
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        prop_assert_eq!(keys(&out), keys(&base));
        // Idempotent.
        prop_assert_eq!(apply(&out, &desired(scope)).unwrap(), out);
    }

    #[test]
    fn manifest_merge_rejects_or_handles_any_json(v in arb_json()) {
        // Any JSON at all: an error for shapes we won't guess about, never a panic.
        if let Ok(out) = apply(&v, &desired("s".into())) {
            prop_assert!(out.is_object());
        }
    }
}
