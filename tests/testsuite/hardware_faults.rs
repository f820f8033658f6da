//! Hardware faults, end to end through the binary: each gives one clear error, and a
//! later run succeeds once the fault is gone.
//!
//! - the swtpm is killed while an RSA-3072 provisioning runs (here);
//! - a malformed TCTI string, then the right one (here; the library-level cases are
//!   `tpm_keystore::malformed_tcti_gives_one_clear_error` and
//!   `unreachable_tcti_gives_one_clear_error`, `tpm_e2e::unreachable_tpm_is_one_clear_error`);
//! - the SoftHSM token directory read-only: `pkcs11_keystore::
//!   read_only_token_storage_fails_cleanly_without_orphans`;
//! - the PKCS#11 module path at a non-module file: `pkcs11_keystore::
//!   missing_or_bogus_module_is_named`.
#![cfg(feature = "tpm")]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fake_root::*;
use common::swtpm::Swtpm;

const SRK: u32 = 0x8100_0001;
const PRIMARY: u32 = 0x8100_0010;
const SECONDARY: u32 = 0x8100_0011;

fn tpm_args(tpm: &Swtpm) -> Vec<String> {
    ["--keystore", "tpm", "--tcti", &tpm.tcti()]
        .map(String::from)
        .to_vec()
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort();
    v
}

#[test]
fn swtpm_killed_mid_run_then_restarted() {
    require_tools!(Swtpm, Tpm2Tools, Openssl);
    let mut errors = 0;
    for (marker, delay_ms) in [
        ("Generating the primary key", 0),
        ("Generating the primary key", 100),
        ("Generating the primary key", 300),
        ("Generating the secondary key", 0),
        ("Generating the secondary key", 150),
    ] {
        errors += kill_once(marker, delay_ms) as usize;
    }
    // A kill that lands after the last TPM command lets the run succeed; most must not.
    assert!(errors >= 3, "only {errors} of 5 kills hit a TPM command");
}

/// One provisioning, the TPM killed `delay_ms` after `marker` is printed; then the
/// TPM is restarted and the next run must finish. True if the killed run failed.
fn kill_once(marker: &str, delay_ms: u64) -> bool {
    let mut tpm = Swtpm::start();
    let fr = FakeRoot::with_template();
    let prov = ["--id-scope", GOOD_SCOPE, "--algorithm", "rsa-3072"];
    // Kill the TPM once the tool says it is generating a key (TPM2_Create of an
    // RSA-3072 key takes swtpm a while: the kill lands inside the TPM work).
    let mut child = fr
        .cmd()
        .args(tpm_args(&tpm))
        .args(prov)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(marker) {
            std::thread::sleep(Duration::from_millis(delay_ms));
            tpm.kill();
            break;
        }
    }
    // It must end by itself, promptly (no hang on a dead socket).
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the run hung after the TPM died:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let run = Run {
        code: status.code(),
        stdout: seen,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "it panicked when the TPM died:\n{run}"
    );
    let failed = run.code != Some(0);
    if failed {
        let err = run.one_error(1);
        assert!(
            err.contains("TPM"),
            "the error does not name the TPM:\n{run}"
        );
        println!("swtpm killed {delay_ms} ms after {marker:?}: {err}");
    } else {
        println!("swtpm killed {delay_ms} ms after {marker:?}: the run had finished");
    }

    // The TPM comes back with its NV state: the next run finishes (or cleans up) by
    // itself, and verify passes.
    tpm.restart();
    let tcti = tpm_args(&tpm);
    let mut args: Vec<&str> = tcti.iter().map(String::as_str).collect();
    args.extend_from_slice(&prov);
    fr.run(&args).ok();
    let mut v: Vec<&str> = tcti.iter().map(String::as_str).collect();
    v.push("verify");
    fr.run(&v).ok();
    assert_eq!(
        sorted(tpm.persistent_handles()),
        vec![SRK, PRIMARY, SECONDARY],
        "exactly the SRK and the two live keys"
    );
    common::openssl_verify(&fr.cert_file("device.crt"));
    common::openssl_verify(&fr.cert_file("device2.crt"));
    failed
}

#[test]
fn malformed_tcti_then_the_right_one() {
    require_tools!(Swtpm, Tpm2Tools, Openssl);
    let tpm = Swtpm::start();
    let fr = FakeRoot::with_template();
    for (bad, pinned) in [
        ("swtpm:port=banana", "hardware_faults/malformed_tcti_port"),
        ("tpm:/dev/tpm0", "hardware_faults/malformed_tcti_unknown"),
        ("nonsense", "hardware_faults/malformed_tcti_nonsense"),
    ] {
        let before = fr.snapshot();
        let run = fr.run(&[
            "--keystore",
            "tpm",
            "--tcti",
            bad,
            "--id-scope",
            GOOD_SCOPE,
            "--algorithm",
            "ecdsa-p256",
        ]);
        let err = run.one_error(1);
        assert!(err.contains("--tcti") && err.contains(bad), "{run}");
        common::pin_file(&run.stderr, &[], pinned);
        assert_same_tree(&before, &fr.snapshot(), bad);
    }
    assert!(tpm.persistent_handles().is_empty());
    let tcti = tpm.tcti();
    fr.run(&[
        "--keystore",
        "tpm",
        "--tcti",
        &tcti,
        "--id-scope",
        GOOD_SCOPE,
        "--algorithm",
        "ecdsa-p256",
    ])
    .ok();
    fr.run(&["--keystore", "tpm", "--tcti", &tcti, "verify"])
        .ok();
}
