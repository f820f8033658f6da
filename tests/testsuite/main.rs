//! The test suite: one binary (cargo's `tests/testsuite/main.rs` pattern), so aws-lc,
//! the TSS and cryptoki are linked once, not once per file. One module per area; the
//! shared harness is [`common`] (real tools started in temp dirs, the [`common::Device`]
//! over every keystore, the [`require_tools!`] gate).
//!
//! Nothing here changes process-global state: every environment variable, umask or
//! working directory a test needs is set on the child `Command`. The one exception,
//! the in-process PKCS#11 tests (SoftHSM reads `SOFTHSM2_CONF` from this process's
//! environment, once), is its own binary: `tests/pkcs11_inproc`.

#[macro_use]
mod common;

mod cli_file;
mod cli_snapshots;
mod concurrency;
mod crash;
mod hardware_faults;
mod hostile;
mod interactive;
mod layout;
mod lifecycle;
mod permissions;
mod pkcs11_crash;
mod pkcs11_e2e;
mod process;
mod properties;
mod secrets;
mod storage_faults;
mod tls_smoke;
mod tpm_crash;
mod tpm_e2e;
mod tpm_keystore;
