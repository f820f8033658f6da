//! Crash consistency: `provision`, `rotate`, `rotate --promote`, `reset` and
//! `provision --force` are SIGKILLed at random moments, over and over. After every
//! kill, the manifest must be valid JSON, and the next `provision` must end in a
//! complete identity that `verify` accepts, with no orphan key, temp file or journal.
//!
//! The seed is printed; `SDV_CRASH_SEED=<n>` replays a run, `SDV_CRASH_KILLS=<n>`
//! changes the number of kills (default 120 on the file keystore; the TPM variant
//! lives in tests/tpm_crash.rs).
mod common;

use common::crash::{hammer, Device};

#[test]
fn file_keystore_survives_random_kills() {
    let kills = std::env::var("SDV_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    // ECDSA keeps each run short, so many kills fit; RSA (below) puts kills inside
    // a longer key generation.
    let dev = Device::new(&["--keystore", "file"], &["--algorithm", "ecdsa-p256"]);
    let allowed = [
        "device.crt",
        "device2.crt",
        "device.key",
        "device2.key",
        "azure.idscope",
        "sdv-provision.state.json",
    ];
    let t = hammer(&dev, kills, &allowed, &|| {});
    assert_eq!(t.recovered, kills);
}

#[test]
fn file_keystore_rsa_survives_random_kills() {
    let kills = std::env::var("SDV_CRASH_KILLS_RSA")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dev = Device::new(&["--keystore", "file"], &["--algorithm", "rsa-2048"]);
    let allowed = [
        "device.crt",
        "device2.crt",
        "device.key",
        "device2.key",
        "azure.idscope",
        "sdv-provision.state.json",
    ];
    let t = hammer(&dev, kills, &allowed, &|| {});
    assert_eq!(t.recovered, kills);
}
