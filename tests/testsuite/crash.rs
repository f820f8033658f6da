//! Crash consistency: `provision`, `rotate`, `rotate --promote`, `reset` and
//! `provision --force` are SIGKILLed at random moments, over and over. After every
//! kill, the manifest must be valid JSON, and the next `provision` must end in a
//! complete identity that `verify` accepts, with no orphan key, temp file or journal.
//!
//! The seed is printed; `SDV_CRASH_SEED=<n>` replays a run, `SDV_CRASH_KILLS=<n>`
//! changes the number of kills (default 120 on the file keystore; the TPM variant
//! lives in tpm_crash.rs).
use crate::common;

use common::crash::{hammer, kills};
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

/// The file keystore under the kill loop, provisioning with `alg`; `var` sets the
/// number of kills. ECDSA keeps each run short, so many kills fit; RSA puts kills
/// inside a longer key generation.
fn file_keystore(alg: &str, var: &str, default: u32) {
    let n = kills(var, default);
    let Some(dev) = Device::start(Kind::File) else {
        return;
    };
    let t = hammer(&dev, alg, n, &FILE_IDENTITY, &|| {});
    assert_eq!(t.recovered, n);
}

tests_of!(file_keystore:
    file_keystore_survives_random_kills => ("ecdsa-p256", "SDV_CRASH_KILLS", 120),
    file_keystore_rsa_survives_random_kills => ("rsa-2048", "SDV_CRASH_KILLS_RSA", 30),
);
