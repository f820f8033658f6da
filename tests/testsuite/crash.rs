//! Crash consistency: `provision`, `rotate`, `rotate --promote`, `reset` and
//! `provision --force` are SIGKILLed at random moments, over and over. After every
//! kill, the manifest must be valid JSON, and the next `provision` must end in a
//! complete identity that `verify` accepts, with no orphan key, temp file or journal.
//!
//! The seed is printed; `SDV_CRASH_SEED=<n>` replays a run, `SDV_CRASH_KILLS=<n>`
//! changes the number of kills (default 120 on the file keystore; the TPM variant
//! lives in tpm_crash.rs).
use crate::common;

use common::crash::hammer;
use common::device::{Device, Kind};

/// What the certificates directory may hold once a file-keystore identity recovered.
const FILE_IDENTITY: [&str; 6] = [
    "device.crt",
    "device2.crt",
    "device.key",
    "device2.key",
    "azure.idscope",
    "sdv-provision.state.json",
];

fn kills(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// ECDSA keeps each run short, so many kills fit.
#[test]
fn file_keystore_survives_random_kills() {
    let n = kills("SDV_CRASH_KILLS", 120);
    let Some(dev) = Device::start(Kind::File) else {
        return;
    };
    let t = hammer(&dev, "ecdsa-p256", n, &FILE_IDENTITY, &|| {});
    assert_eq!(t.recovered, n);
}

/// RSA puts kills inside a longer key generation.
#[test]
fn file_keystore_rsa_survives_random_kills() {
    let n = kills("SDV_CRASH_KILLS_RSA", 30);
    let Some(dev) = Device::start(Kind::File) else {
        return;
    };
    let t = hammer(&dev, "rsa-2048", n, &FILE_IDENTITY, &|| {});
    assert_eq!(t.recovered, n);
}
