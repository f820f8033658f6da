//! In-process PKCS#11 keystore tests: their own binary because the shared SoftHSM store
//! ([`common::softhsm::store`]) sets `SOFTHSM2_CONF` and
//! `SDV_PROVISION_PKCS11_SO_PIN_FILE` in this process's environment, once, before the
//! module is loaded (SoftHSM reads its configuration in `C_Initialize`). In the main
//! suite those variables would leak into every child process of every other test.

#[macro_use]
#[path = "../testsuite/common/mod.rs"]
mod common;

mod pkcs11_keystore;
