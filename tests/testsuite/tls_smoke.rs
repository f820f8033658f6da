//! The TLS helper itself, with a file key: proves `mtls_handshake` can fail and pass.
use crate::common;

use std::process::Command;

#[test]
fn mtls_with_file_key() {
    require_tools!(Openssl);
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("dev.key");
    let crt = d.path().join("dev.crt");
    common::run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dev",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
    );
    common::openssl_verify(&crt);
    common::mtls_handshake(d.path(), &crt, &["-key", key.to_str().unwrap()], true, &[]);
}

#[test]
#[should_panic(expected = "never received data")]
fn mtls_with_wrong_key_fails() {
    if !common::tools::have(&[common::tools::Tool::Openssl]) {
        panic!("never received data (openssl missing)");
    }
    let d = tempfile::tempdir().unwrap();
    let gen = |name: &str| common::openssl_self_signed(d.path(), name, "dev", 1);
    let (crt_a, _) = gen("a");
    let (crt_b, key_b) = gen("b");
    // The client presents b's cert and key, but the server only trusts a.
    common::mtls_handshake(
        d.path(),
        &crt_a,
        &[
            "-cert",
            crt_b.to_str().unwrap(),
            "-key",
            key_b.to_str().unwrap(),
        ],
        true,
        &[],
    );
}
