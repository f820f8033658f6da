//! A real software TPM per test: `swtpm socket --tpm2` in a `TempDir`, on free loopback
//! ports, killed on drop. Plus, for the OpenSSL `tpm2` provider (which needs a resource
//! manager), `tpm2-abrmd` on a private D-Bus session bus.
//!
//! Why TCP and not a unix socket: the swtpm TCTI of Debian bookworm's TSS (3.2) and
//! tss-esapi 7.7's TCTI parser only know `host=` and `port=`; the TCTI expects the
//! control channel at `port + 1`.
//!
//! swtpm serves one connection at a time: a second client (tpm2-tools, abrmd) waits
//! until the first closes. Drop the keystore before running tpm2-tools against the
//! same swtpm, and run tpm2-tools only before `Abrmd::start` or after it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Swtpm {
    dir: TempDir,
    child: Child,
    port: u16,
}

impl Swtpm {
    /// Start a fresh TPM (state in its own temp dir) and wait until it answers.
    pub fn start() -> Swtpm {
        let dir = tempfile::tempdir().expect("temp dir for swtpm");
        let (child, port) = Self::spawn(dir.path(), None);
        Swtpm { dir, child, port }
    }

    /// SIGKILL the swtpm process (a TPM that goes away mid-command).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start swtpm again on the same state directory (what the device had in NV:
    /// persistent handles, hierarchy passwords), on the same port when it is free again.
    pub fn restart(&mut self) {
        self.kill();
        let (child, port) = Self::spawn(self.dir.path(), Some(self.port));
        self.child = child;
        self.port = port;
    }

    fn spawn(dir: &Path, fixed_port: Option<u16>) -> (Child, u16) {
        // swtpm binds without SO_REUSEADDR, so a port with a connection in TIME_WAIT
        // is refused. Client connections (every TCTI and tpm2-tools run of the
        // parallel tests) leave their TIME_WAITs on ports of the kernel's ephemeral
        // range, where `free_port` also picks: there, port + 1 was often taken and
        // all attempts failed under load. So pick below the ephemeral range (Linux
        // default 32768-60999), and retry when a parallel test or an old swtpm port
        // gets in the way: swtpm then exits at once.
        for attempt in 0..64u64 {
            // The swtpm TCTI talks to the control channel at port + 1. A fixed port
            // (restart) still held by the killed process's sockets: after 4 tries,
            // another port (callers re-read `tcti()`).
            let port = fixed_port
                .filter(|_| attempt < 4)
                .unwrap_or_else(|| unprivileged_port_below_ephemeral(attempt));
            let ctrl = port + 1;
            let mut child = spawn_quiet(
                Command::new("swtpm")
                    .args(["socket", "--tpm2", "--tpmstate"])
                    .arg(format!("dir={}", dir.display()))
                    .arg("--server")
                    .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                    .arg("--ctrl")
                    .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                    .args(["--flags", "not-need-init,startup-clear"]),
            );
            let end = Instant::now() + Duration::from_secs(10);
            let addr = ([127, 0, 0, 1], port).into();
            loop {
                if child.try_wait().expect("swtpm status").is_some() {
                    // Lost the port race: retry (a fixed port: give the old socket a
                    // moment to go).
                    if fixed_port.is_some() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    break;
                }
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return (child, port);
                }
                if Instant::now() > end {
                    let _ = child.kill();
                    panic!("swtpm did not listen on 127.0.0.1:{port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("could not start swtpm on a free port");
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A tpm2-tools command aimed at this TPM.
    pub fn tool(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("TPM2TOOLS_TCTI", self.tcti())
            .env("TSS2_LOG", "all+none");
        c
    }

    /// Persistent handles as `tpm2_getcap handles-persistent` lists them.
    pub fn persistent_handles(&self) -> Vec<u32> {
        self.handles("handles-persistent")
    }

    /// Transient objects loaded in the TPM (a bare swtpm has no resource manager to
    /// flush what a client left behind).
    pub fn transient_handles(&self) -> Vec<u32> {
        self.handles("handles-transient")
    }

    fn handles(&self, capability: &str) -> Vec<u32> {
        let out = super::run_ok(self.tool("tpm2_getcap").arg(capability));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("0x"))
            .map(|h| u32::from_str_radix(h, 16).expect("hex handle"))
            .collect()
    }
}

impl Swtpm {
    /// Put a key that sdv-provision did not make at `handle` (tpm2-tools), as another
    /// TPM user on the device would.
    pub fn foreign_key_at(&self, handle: u32, signing: bool) {
        let ctx = self.dir().join(format!("foreign-{handle:08x}.ctx"));
        let mut create = self.tool("tpm2_createprimary");
        create.args(["-C", "o", "-c"]).arg(&ctx);
        if signing {
            create
                .args(["-G", "ecc256:ecdsa-sha256", "-a"])
                .arg("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign");
        }
        super::run_ok(&mut create);
        super::run_ok(
            self.tool("tpm2_evictcontrol")
                .args(["-C", "o", "-c"])
                .arg(&ctx)
                .arg(format!("0x{handle:08x}")),
        );
        super::run_ok(self.tool("tpm2_flushcontext").arg("-t"));
    }

    /// `tpm2_readpublic -f pem` of a persistent handle.
    pub fn public_pem(&self, handle: u32) -> String {
        let out = self.dir().join(format!("{handle:08x}.pub.pem"));
        self.read_public(handle, &["-f", "pem", "-o"], &out);
        std::fs::read_to_string(out).unwrap()
    }

    /// The Name of a persistent handle (`tpm2_readpublic -n`), in hex: the same Name,
    /// the same object.
    pub fn name_hex(&self, handle: u32) -> String {
        let out = self.dir().join(format!("{handle:08x}.name"));
        self.read_public(handle, &["-n"], &out);
        let bytes = std::fs::read(out).unwrap();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn read_public(&self, handle: u32, args: &[&str], out: &Path) {
        super::run_ok(
            self.tool("tpm2_readpublic")
                .arg("-c")
                .arg(format!("0x{handle:08x}"))
                .args(args)
                .arg(out),
        );
    }

    /// `tpm2_load` key blobs under `parent`, then flush: without a resource manager a
    /// loaded object would keep one of the TPM's few object slots.
    pub fn load_blobs(&self, parent: u32, public: &Path, private: &Path) {
        let ctx = self.dir().join("loaded.ctx");
        super::run_ok(
            self.tool("tpm2_load")
                .arg("-C")
                .arg(format!("0x{parent:08x}"))
                .arg("-u")
                .arg(public)
                .arg("-r")
                .arg(private)
                .arg("-c")
                .arg(&ctx),
        );
        super::run_ok(self.tool("tpm2_flushcontext").arg("-t"));
    }
}

/// Start a daemon with no terminal: stdin, stdout and stderr on /dev/null.
fn spawn_quiet(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"))
}

/// A pseudo-random port in 20000..32000 (even, so `port + 1` stays in range), different
/// per process, call and attempt.
fn unprivileged_port_below_ephemeral(attempt: u64) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_usize(CALLS.fetch_add(1, Ordering::Relaxed));
    h.write_u64(attempt);
    20000 + 2 * (h.finish() % 6000) as u16
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tpm2-abrmd` on a private D-Bus session bus, in front of one swtpm, for consumers
/// that need a resource manager (the OpenSSL `tpm2` provider). Holds the swtpm
/// connection while it runs.
pub struct Abrmd {
    _dir: TempDir,
    dbus: Child,
    abrmd: Child,
    bus_address: String,
    bus_name: String,
}

impl Abrmd {
    pub fn start(tpm: &Swtpm) -> Abrmd {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = tempfile::tempdir().expect("temp dir for dbus");
        let socket = dir.path().join("bus.sock");
        let config = dir.path().join("session.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut dbus = spawn_quiet(
            Command::new("dbus-daemon")
                .arg(format!("--config-file={}", config.display()))
                .arg("--nofork"),
        );
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if dbus.try_wait().unwrap().is_some() || Instant::now() > end {
                let _ = dbus.kill();
                panic!("private dbus-daemon did not come up");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let bus_address = format!("unix:path={}", socket.display());
        let bus_name = format!(
            "org.eclipse.leda.SdvProvisionTest.P{}N{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let abrmd = Command::new("tpm2-abrmd")
            .arg("--session")
            .arg(format!("--dbus-name={bus_name}"))
            .arg(format!("--tcti={}", tpm.tcti()))
            .arg("--allow-root")
            .env("DBUS_SESSION_BUS_ADDRESS", &bus_address)
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tpm2-abrmd");
        let mut me = Abrmd {
            _dir: dir,
            dbus,
            abrmd,
            bus_address,
            bus_name,
        };
        // Ready when a real TPM query through it succeeds.
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("tpm2_getcap")
                .arg("properties-fixed")
                .env("TPM2TOOLS_TCTI", me.tcti())
                .env("DBUS_SESSION_BUS_ADDRESS", &me.bus_address)
                .env("TSS2_LOG", "all+none")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return me;
            }
            if let Some(status) = me.abrmd.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = me.abrmd.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("tpm2-abrmd exited ({status}): {err}");
            }
            if Instant::now() > end {
                panic!("tpm2-abrmd did not answer within 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn tcti(&self) -> String {
        format!("tabrmd:bus_name={},bus_type=session", self.bus_name)
    }

    /// A mutual-TLS 1.3 handshake ([`super::mtls_handshake_trusting`]) against a server
    /// that trusts `ca_file`, the client presenting `cert` with its key `key` (a
    /// `handle:0x…` URI) loaded by the OpenSSL tpm2 provider through this abrmd.
    pub fn mtls13(&self, ca_file: &Path, cert: &Path, key: &str) {
        let env = self.provider_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let dir = tempfile::tempdir().unwrap();
        let client_key = ["-provider", "tpm2", "-provider", "default", "-key", key];
        super::mtls_handshake_trusting(dir.path(), ca_file, cert, &client_key, true, &env);
    }

    /// Environment for `openssl … -provider tpm2` to reach the TPM through abrmd.
    pub fn provider_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TPM2OPENSSL_TCTI", self.tcti()),
            ("DBUS_SESSION_BUS_ADDRESS", self.bus_address.clone()),
            ("TSS2_LOG", "all+none".into()),
        ]
    }
}

impl Drop for Abrmd {
    fn drop(&mut self) {
        let _ = self.abrmd.kill();
        let _ = self.abrmd.wait();
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
    }
}

/// Where a file of the certificates directory lands under a test root.
pub fn cert_file(root: &Path, name: &str) -> PathBuf {
    root.join("data/var/certificates").join(name)
}
