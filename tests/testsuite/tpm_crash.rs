//! Crash consistency on the TPM keystore: the SIGKILL harness of `crash.rs`
//! (provision, rotate, rotate --promote, reset, provision --force, killed at random
//! moments) against a real swtpm. After every recovery the TPM must hold exactly the
//! SRK, the two live keys and a key another application persisted before the first
//! run (same Name, byte for byte): no orphan or staging handle, nothing missing.
#![cfg(feature = "tpm")]

use crate::common;
use common::crash;
use common::device::{Device, Kind};

const SRK: u32 = 0x8100_0001;
const PRIMARY: u32 = 0x8100_0010;
const SECONDARY: u32 = 0x8100_0011;
/// Another application's key.
const FOREIGN: u32 = 0x8100_0020;

#[test]
fn tpm_keystore_survives_random_kills() {
    let kills = crash::kills("SDV_CRASH_KILLS", 60);
    let Some(dev) = Device::start(Kind::Swtpm) else {
        return;
    };
    let tpm = dev.tpm();
    // ECDSA keeps runs short; `SDV_CRASH_ALG=rsa-2048` puts more kills inside
    // TPM2_Create.
    let alg = std::env::var("SDV_CRASH_ALG").unwrap_or_else(|_| "ecdsa-p256".into());
    let allowed = [
        "device.crt",
        "device2.crt",
        "device.tpm.pub",
        "device.tpm.priv",
        "device2.tpm.pub",
        "device2.tpm.priv",
        // The connector's TPM settings (DESIGN §3), written with the manifest.
        "cloudconnector.config.json",
        "azure.idscope",
        "sdv-provision.state.json",
    ];
    tpm.foreign_key_at(FOREIGN, true);
    let name = || tpm.name_hex(FOREIGN);
    let t = crash::hammer_guarding(
        &dev,
        &alg,
        kills,
        &allowed,
        &|_| {},
        &|what| {
            // A killed client can leave a transient object loaded. On a device the kernel
            // resource manager (/dev/tpmrm0) flushes it when the process dies; a bare
            // swtpm has no resource manager, so the test does that part.
            common::run_ok(tpm.tool("tpm2_flushcontext").arg("-t"));
            let mut handles = tpm.persistent_handles();
            handles.sort();
            assert_eq!(
                handles,
                vec![SRK, PRIMARY, SECONDARY, FOREIGN],
                "{what}: persistent handles after recovery"
            );
        },
        &name,
    );
    assert_eq!(t.recovered, kills);
}
