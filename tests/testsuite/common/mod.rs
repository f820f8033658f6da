//! Shared test helpers: real tools, started by the tests, in temp dirs.
//!
//! A test names the tools it needs with [`require_tools!`] ([`tools`]): a missing one
//! skips the test with one loud `SKIPPED` line on a developer machine, and *fails* it
//! when `CI=true` (DESIGN §7): a skipped hardware test is never a pass in CI.
#![allow(dead_code)]

#[macro_use]
pub mod tools;

/// One `#[test]` per case of a scenario: `tests_of!(full_cycle: rsa_2048_full_cycle =>
/// (Algorithm::Rsa2048), ...)` makes
/// `#[test] fn rsa_2048_full_cycle() { full_cycle(Algorithm::Rsa2048) }`.
macro_rules! tests_of {
    ($scenario:ident: $($name:ident => ($($arg:expr),* $(,)?)),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                $scenario($($arg),*)
            }
        )+
    };
}

/// One `#[test]` per key algorithm of an in-process keystore scenario taking an
/// `Algorithm`: `per_algorithm!(full_cycle: rsa_2048_full_cycle, rsa_3072_full_cycle,
/// ecdsa_p256_full_cycle, ecdsa_p384_full_cycle)`. The one list of the algorithms the
/// keystores make.
macro_rules! per_algorithm {
    ($scenario:ident: $rsa2048:ident, $rsa3072:ident, $p256:ident, $p384:ident $(,)?) => {
        tests_of!($scenario:
            $rsa2048 => (Algorithm::Rsa2048),
            $rsa3072 => (Algorithm::Rsa3072),
            $p256 => (Algorithm::EcdsaP256),
            $p384 => (Algorithm::EcdsaP384),
        );
    };
}

pub mod crash;
pub mod device;
pub mod dps;
pub mod fake_root;
pub mod pty;
pub mod softhsm;
pub mod swtpm;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The built binary as a command whose DPS registration (hardware keys) goes to a
/// closed local port: never to Azure, and it fails at once.
pub fn tool() -> Command {
    let mut c = Command::new(bin());
    c.env("SDV_PROVISION_DPS_ENDPOINT", "127.0.0.1:1");
    c
}

/// The built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sdv-provision"))
}

/// Pin a user-facing message exactly (snapbox): `expected` is a `snapbox::str![..]`
/// or a file ([`pin_file`]),
/// with `[..]` for what varies within a line and the placeholders of `redact` (e.g.
/// `("[ROOT]", root)`, `("[TCTI]", tcti)`) for temp paths and ports.
/// `SNAPSHOTS=overwrite cargo test ...` rewrites the expected text in place.
pub fn pin(actual: &str, redact: &[(&'static str, String)], expected: impl snapbox::IntoData) {
    let mut r = snapbox::Redactions::new();
    for (placeholder, value) in redact {
        r.insert(placeholder, value.clone())
            .expect("a [PLACEHOLDER] name");
    }
    snapbox::Assert::new()
        .action_env(snapbox::assert::DEFAULT_ACTION_ENV)
        .redact_with(r)
        .eq(actual, expected);
}

/// [`pin`] against `tests/snapshots/NAME.txt`.
pub fn pin_file(actual: &str, redact: &[(&'static str, String)], name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    pin(actual, redact, snapbox::Data::read_from(&path, None));
}

/// The lines of `text` that contain `needle`.
pub fn lines_containing<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

/// The lines of `text` that contain `needle`, each with its newline: the part of a
/// run's output a [`pin`] is about, where the rest differs by keystore.
pub fn lines_with(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Run a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something accepts on `addr`, with a deadline (no polling sleeps of
/// fixed length: each attempt is a real connect).
pub fn wait_for_port(addr: SocketAddr, deadline: Duration) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listened on {addr} within {deadline:?}");
}

/// Wait until a unix socket exists.
pub fn wait_for_path(path: &Path, deadline: Duration) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not appear within {deadline:?}", path.display());
}

/// What `openssl ARGS FILE` prints on stdout (it must succeed).
pub fn openssl_out(args: &[&str], file: &Path) -> String {
    let out = run_ok(Command::new("openssl").args(args).arg(file));
    String::from_utf8(out.stdout).unwrap()
}

/// `openssl verify -CAfile cert cert` must pass.
pub fn openssl_verify(cert: &Path) {
    let out = run_ok(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(cert)
            .arg(cert),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

/// SHA-1 thumbprint as openssl prints it, without colons.
pub fn openssl_sha1(cert: &Path) -> String {
    openssl_fingerprint(cert, "-sha1")
}

/// SHA-256 thumbprint as openssl prints it, without colons.
pub fn openssl_sha256(cert: &Path) -> String {
    openssl_fingerprint(cert, "-sha256")
}

fn openssl_fingerprint(cert: &Path, digest: &str) -> String {
    openssl_out(&["x509", "-noout", "-fingerprint", digest, "-in"], cert)
        .trim()
        .split_once('=')
        .expect("fingerprint line")
        .1
        .replace(':', "")
}

/// The public key (SPKI PEM) of a certificate, as openssl extracts it.
pub fn openssl_cert_pubkey(cert: &Path) -> String {
    openssl_out(&["x509", "-noout", "-pubkey", "-in"], cert)
}

/// A throwaway server key and certificate for the TLS tests.
pub fn server_identity(dir: &Path) -> (PathBuf, PathBuf) {
    openssl_self_signed(dir, "server", "127.0.0.1", 1)
}

/// A self-signed P-256 certificate and its key made by openssl, as
/// `dir/STEM.crt` and `dir/STEM.key`.
pub fn openssl_self_signed(dir: &Path, stem: &str, cn: &str, days: u32) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    run_ok(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days"])
            .arg(days.to_string())
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&crt),
    );
    (crt, key)
}

/// A mutual-TLS handshake on 127.0.0.1: `openssl s_server -Verify 1 -CAfile device.crt`
/// against `openssl s_client`, whose key arguments (`client_key_args`, e.g.
/// `["-engine","pkcs11","-keyform","engine","-key",uri]`) load the device key the way a
/// real consumer would. Asserts the server verified the client certificate.
pub fn mtls_handshake(
    dir: &Path,
    device_cert: &Path,
    client_key_args: &[&str],
    tls13: bool,
    client_env: &[(&str, &str)],
) {
    mtls_handshake_trusting(
        dir,
        device_cert,
        device_cert,
        client_key_args,
        tls13,
        client_env,
    )
}

/// [`mtls_handshake`] with a server that trusts `ca_file` (e.g. both of a device's
/// certificates in one file) rather than the client's own certificate alone.
pub fn mtls_handshake_trusting(
    dir: &Path,
    ca_file: &Path,
    device_cert: &Path,
    client_key_args: &[&str],
    tls13: bool,
    client_env: &[(&str, &str)],
) {
    let (srv_crt, srv_key) = server_identity(dir);
    let port = free_port();
    let version = if tls13 { "-tls1_3" } else { "-tls1_2" };
    let mut server = Command::new("openssl")
        .args(["s_server", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&srv_crt)
        .arg("-key")
        .arg(&srv_key)
        .args([
            "-Verify",
            "1",
            "-verify_return_error",
            "-naccept",
            "1",
            version,
        ])
        .arg("-CAfile")
        .arg(ca_file)
        // s_server shuts down on EOF of its stdin: keep it open until the end.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start openssl s_server");
    // s_server prints ACCEPT once it listens. Probing the port instead would use up
    // its one -naccept connection.
    let _server_stdin = server.stdin.take();
    let server_stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(server_stdout).lines().map_while(Result::ok) {
            if line.contains("ACCEPT") {
                let _ = tx.send(String::new());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("openssl s_server did not start listening");
    let mut client = Command::new("openssl");
    client
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(device_cert)
        .args(client_key_args)
        .args([version, "-verify_return_error", "-CAfile"])
        .arg(&srv_crt)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in client_env {
        client.env(k, v);
    }
    let mut child = client.spawn().expect("start openssl s_client");
    // Say something, then close: the server's reply proves the session came up.
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"hello from the device\n");
        std::thread::sleep(Duration::from_millis(300));
    }
    let client_out = child.wait_with_output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let server_out = reader.join().unwrap();
    let mut server_err = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut server_err)
        .unwrap();
    let client_text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&client_out.stdout),
        String::from_utf8_lossy(&client_out.stderr)
    );
    let all = format!(
        "server status {status:?}\nserver stdout:\n{server_out}\nserver stderr:\n{server_err}\nclient:\n{client_text}"
    );
    assert!(
        server_out.contains("hello from the device"),
        "the server never received data over a verified session:\n{all}"
    );
    assert!(
        server_out.contains("Client certificate") || server_err.contains("depth=0"),
        "the server did not see a client certificate:\n{all}"
    );
}
