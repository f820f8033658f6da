//! The interactive mode, driven through a real pseudo-terminal (rexpect): the
//! dialoguer backend choice, validated input that re-asks, hidden input for the
//! connection string (DESIGN §1.2, §7).
use crate::common;

use std::fs;
use std::process::{Command, Stdio};

use common::fake_root::*;
use rexpect::process::wait::WaitStatus;
use rexpect::session::PtySession;

const TIMEOUT_MS: u64 = 30_000;
const DOWN: &str = "\x1b[B";
const ENTER: &str = "\r";

/// Start the binary on a pty. `FakeRoot::cmd` points stdin at /dev/null; here stdin,
/// stdout and stderr must all stay on the terminal.
fn spawn(fr: &FakeRoot, extra: &[&str]) -> PtySession {
    let mut cmd: Command = fr.cmd();
    cmd.args(["--keystore", "file", "--algorithm", "ecdsa-p256"])
        .args(extra)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    rexpect::session::spawn_command(cmd, Some(TIMEOUT_MS)).expect("spawn on a pty")
}

/// Wait for `needle`, returning what came before it; panic with context otherwise.
fn expect(p: &mut PtySession, needle: &str, seen: &mut String) {
    match p.exp_string(needle) {
        Ok(before) => {
            seen.push_str(&before);
            seen.push_str(needle);
        }
        Err(e) => panic!("did not see {needle:?} ({e}); output so far:\n{seen}"),
    }
}

fn finish(p: &mut PtySession, seen: &mut String) -> WaitStatus {
    match p.exp_eof() {
        Ok(rest) => seen.push_str(&rest),
        Err(e) => panic!("the program did not finish ({e}); output so far:\n{seen}"),
    }
    p.process().wait().expect("wait")
}

/// [`finish`], and the program must have exited with `code`.
fn finish_with(p: &mut PtySession, seen: &mut String, code: i32) {
    let status = finish(p, seen);
    assert!(
        matches!(status, WaitStatus::Exited(_, c) if c == code),
        "{status:?}\n{seen}"
    );
}

fn choose(p: &mut PtySession, seen: &mut String) {
    expect(p, "Neither Id Scope file nor ConnectionString found", seen);
    expect(p, "h) Azure IoT Hub with Connection String", seen);
}

/// The backend question, answered with its second choice (IoT Hub).
fn choose_hub(p: &mut PtySession, seen: &mut String) {
    choose(p, seen);
    p.send(DOWN).unwrap();
    p.send(ENTER).unwrap();
    p.flush().unwrap();
}

const CS_PROMPT: &str = "Connection String of the device";

/// A device with the auto-deployer manifest, the binary on a pty, IoT Hub chosen:
/// what the connection-string tests start from.
fn at_the_hub_prompt() -> (FakeRoot, PtySession, String) {
    let fr = FakeRoot::with_manifest();
    let mut p = spawn(&fr, &[]);
    let mut seen = String::new();
    choose_hub(&mut p, &mut seen);
    (fr, p, seen)
}

/// This device's connection string at the hidden prompt; the run must then succeed.
fn give_the_hub_string(p: &mut PtySession, seen: &mut String) {
    answer_hidden(p, seen, CS_PROMPT, &hub_cs(ETH0_ID));
    expect(p, "Primary thumbprint: ", seen);
    finish_with(p, seen, 0);
}

/// Wait for `prompt`, then type `answer` once the terminal's echo is off.
fn answer_hidden(p: &mut PtySession, seen: &mut String, prompt: &str, answer: &str) {
    expect(p, prompt, seen);
    common::pty::wait_for_hidden_input(p);
    p.send_line(answer).unwrap();
}

#[test]
fn interactive_dps_reasks_on_a_bad_scope() {
    let fr = FakeRoot::with_template();
    let mut p = spawn(&fr, &[]);
    let mut seen = String::new();
    choose(&mut p, &mut seen);
    // Enter takes the first item, DPS.
    p.send(ENTER).unwrap();
    p.flush().unwrap();
    expect(&mut p, "Please enter your Id Scope", &mut seen);
    p.send_line("bad scope!").unwrap();
    // The validation message, and the same question again.
    expect(&mut p, "only letters and digits are allowed", &mut seen);
    expect(&mut p, "Please enter your Id Scope", &mut seen);
    p.send_line(GOOD_SCOPE).unwrap();
    expect(&mut p, "Primary thumbprint: ", &mut seen);
    finish_with(&mut p, &mut seen, 0);

    assert_eq!(
        fr.read("data/var/certificates/azure.idscope").trim(),
        GOOD_SCOPE
    );
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(env_values(&m, "ID_SCOPE"), [GOOD_SCOPE]);
    for f in ["device.crt", "device.key", "device2.crt", "device2.key"] {
        assert!(fr.cert_file(f).is_file(), "{f} missing");
    }
    assert_eq!(mode(&fr.cert_file("device.key")), 0o600);
    assert_eq!(fr.read("etc/deviceid").trim(), ETH0_ID);
    assert!(!fr.cert_file("azure.connectionstring").exists());
    let sha1 = common::openssl_sha1(&fr.cert_file("device.crt"));
    assert!(seen.contains(&sha1), "thumbprint {sha1} not shown:\n{seen}");
    // The bad scope never reached the disk.
    assert!(!fs::read_to_string(fr.p(MANIFEST))
        .unwrap()
        .contains("bad scope"));
    // Once configured, nothing is asked: a re-run on the terminal finishes by itself.
    let before = fr.snapshot();
    let mut p = spawn(&fr, &[]);
    let mut again = String::new();
    expect(&mut p, "Id Scope file found", &mut again);
    finish_with(&mut p, &mut again, 0);
    assert!(!again.contains("Please enter"), "{again}");
    assert_same_tree(&before, &fr.snapshot(), "interactive re-run");
}

#[test]
fn interactive_hub_hidden_connection_string() {
    let (fr, mut p, mut seen) = at_the_hub_prompt();
    // Another device's string is refused, and asked again.
    answer_hidden(&mut p, &mut seen, CS_PROMPT, &hub_cs("another-device"));
    expect(&mut p, "is not this device's id", &mut seen);
    give_the_hub_string(&mut p, &mut seen);
    // The screen: the question once, on a line of its own, and the short prompt
    // with the answer. Before, the question was the Select prompt itself: it
    // wrapped, and dialoguer redrew only its last line, so it stood twice.
    assert_eq!(
        seen.matches("Do you want to use the global").count(),
        1,
        "{seen}"
    );
    assert!(
        seen.contains("Your choice: h) Azure IoT Hub with Connection String"),
        "{seen}"
    );
    // Hidden input: the secret never showed on the terminal.
    assert!(
        !seen.contains(SECRET_KEY),
        "the SharedAccessKey was echoed:\n{seen}"
    );
    let csf = fr.cert_file("azure.connectionstring");
    assert_eq!(fs::read_to_string(&csf).unwrap().trim(), hub_cs(ETH0_ID));
    assert_eq!(mode(&csf), 0o600);
    let m = read_json(&fr.p(MANIFEST));
    assert_eq!(env_values(&m, "CONNECTION_STRING"), [hub_cs(ETH0_ID)]);
    assert!(env_values(&m, "ID_SCOPE").is_empty());
}

/// `--non-interactive` on a terminal: no prompt, the usage error instead.
#[test]
fn non_interactive_flag_on_a_terminal_does_not_prompt() {
    let fr = FakeRoot::with_template();
    let before = fr.snapshot();
    let mut p = spawn(&fr, &["--non-interactive"]);
    let mut seen = String::new();
    expect(&mut p, "error:", &mut seen);
    finish_with(&mut p, &mut seen, 2);
    assert!(
        seen.contains("--id-scope") && seen.contains("--connection-string"),
        "{seen}"
    );
    assert!(!seen.contains("Do you want to use"), "{seen}");
    assert_same_tree(&before, &fr.snapshot(), "--non-interactive on a tty");
}

/// DPS with a hardware key, not enrolled yet: on a terminal, provision offers to
/// retry the registration once the user has enrolled (issue 16).
#[cfg(feature = "pkcs11")]
#[test]
fn interactive_provision_retries_the_dps_registration() {
    use common::device::{Device, Kind};
    use common::dps::{Dps, Mode, HUB_A};
    let Some(d) = Device::start(Kind::SoftHsm) else {
        return;
    };
    let (store, fr) = (d.token(), &d.fr);
    let dps = Dps::start(Mode::NotEnrolled);
    let mut cmd: Command = d.env_cmd();
    cmd.args(["--keystore", "pkcs11", "--pkcs11-module"])
        .arg(&store.module)
        .arg("--pkcs11-pin-file")
        .arg(&store.pin_file)
        .args([
            "--no-restart",
            "--algorithm",
            "ecdsa-p256",
            "--id-scope",
            GOOD_SCOPE,
        ])
        .args(["--dps-endpoint", &dps.endpoint(), "--dps-ca-file"])
        .arg(&dps.ca_file)
        .env("TERM", "xterm")
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut p = rexpect::session::spawn_command(cmd, Some(TIMEOUT_MS)).expect("spawn on a pty");
    let mut seen = String::new();
    expect(&mut p, "then run `sdv-provision register`", &mut seen);
    expect(&mut p, "Retry the DPS registration now", &mut seen);
    expect(&mut p, "[y/N]", &mut seen);
    dps.set_mode(Mode::Assigned);
    p.send_line("y").unwrap();
    expect(&mut p, &format!("to hub {HUB_A}"), &mut seen);
    finish_with(&mut p, &mut seen, 0);
    let state = fs::read_to_string(fr.cert_file("sdv-provision.state.json")).unwrap();
    assert!(state.contains(HUB_A), "{state}");
}

/// The hidden prompt's retry message for a malformed connection string names what
/// is wrong, never a part of the SharedAccessKey (DESIGN §6).
#[test]
fn interactive_retry_message_never_echoes_the_key() {
    let (_fr, mut p, mut seen) = at_the_hub_prompt();
    let h = "HostName=hub.azure-devices.net";
    let bad = [
        format!("{h};DeviceId={ETH0_ID};SharedAccessKey{SECRET_KEY}"),
        format!("{h};DeviceId={ETH0_ID};{SECRET_KEY}"),
        format!("{h};DeviceId={ETH0_ID};SharedAccessKey={SECRET_KEY}!"),
        format!("{h};DeviceId={SECRET_KEY}"),
    ];
    // Core dumps are off before any secret is read (DESIGN §6 "The process").
    let limits = fs::read_to_string(format!("/proc/{}/limits", p.process().child_pid)).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    for b in &bad {
        answer_hidden(&mut p, &mut seen, CS_PROMPT, b);
        expect(&mut p, "error: ", &mut seen);
    }
    give_the_hub_string(&mut p, &mut seen);
    for i in 0..=SECRET_KEY.len() - 8 {
        let w = &SECRET_KEY[i..i + 8];
        assert!(!seen.contains(w), "{w:?} of the key was shown:\n{seen}");
    }
}
