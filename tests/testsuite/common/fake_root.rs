//! A scratch device tree for end-to-end runs of the built binary: a `--root` with a
//! fake `sys/class/net`, the connector manifest (fixture shapes), fake `kanto-cm` and
//! `systemctl` that record their argv, and a byte-exact snapshot of the whole tree.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::bin;

/// The MAC of the fake `eth0` and the device id the tool must derive from it.
pub const ETH0_MAC: &str = "52:54:21:4C:F9:5A";
pub const ETH0_ID: &str = "52-54-21-4c-f9-5a";
pub const GOOD_SCOPE: &str = "0ne0012345A";
/// A syntactically valid SharedAccessKey (base64) that must never be printed.
pub const SECRET_KEY: &str = "c2VjcmV0LWtleS1tdXN0LW5ldmVyLWJlLXByaW50ZWQ=";

pub const MANIFESTS: &str = "data/var/containers/manifests";
pub const MANIFEST: &str = "data/var/containers/manifests/cloudconnector.json";
pub const TEMPLATE: &str = "data/var/containers/manifests/cloudconnector.json.template";
pub const CERTS: &str = "data/var/certificates";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Copy fixture `name` to `rel` under `root` (e.g. the connector template to
/// [`TEMPLATE`]), making its directories.
pub fn put_fixture(root: &Path, name: &str, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::copy(fixture(name), p).unwrap();
}

pub fn hub_cs(device_id: &str) -> String {
    format!("HostName=hub.azure-devices.net;DeviceId={device_id};SharedAccessKey={SECRET_KEY}")
}

/// A file-keystore DPS provisioning with `--device-id ID`.
pub fn file_dps_with_device_id(id: &str) -> [&str; 6] {
    [
        "--keystore",
        "file",
        "--id-scope",
        GOOD_SCOPE,
        "--device-id",
        id,
    ]
}

/// One scratch device: `root/` is what `--root` points at; `bin/` holds the fakes;
/// `calls.log` gets one line per fake invocation (`kanto-cm stop -n …`).
pub struct FakeRoot {
    pub dir: tempfile::TempDir,
    /// `dir/root`.
    root: PathBuf,
}

impl FakeRoot {
    /// An empty root (just the directory), no interfaces, no manifest.
    pub fn bare() -> FakeRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let fr = FakeRoot { dir, root };
        fs::create_dir(fr.bin_dir()).unwrap();
        fr.fake_tool("kanto-cm");
        fr.fake_tool("systemctl");
        fr
    }

    /// A root that looks like a Leda device: a physical `eth0` (behind a real-sysfs
    /// style symlink), and interfaces that must be skipped: a virtual `lo` and
    /// `docker0`, a CAN `can0` (type 280) and a `vcan0`, all sorted before or around
    /// `eth0` so the skipping is actually exercised.
    pub fn new() -> FakeRoot {
        let fr = FakeRoot::bare();
        fr.add_virtual_iface("lo", "00:00:00:00:00:00", "772");
        fr.add_virtual_iface("docker0", "02:42:ac:11:00:01", "1");
        fr.add_iface("can0", "aa:bb:cc:dd:ee:ff", "280");
        fr.add_iface("vcan0", "aa:bb:cc:dd:ee:01", "1");
        fr.add_pci_iface("eth0", ETH0_MAC);
        fr.add_pci_iface("eth1", "52:54:21:4C:F9:5B");
        fr
    }

    /// A device tree with the Kanto-shape template beside a missing manifest.
    pub fn with_template() -> FakeRoot {
        let fr = FakeRoot::new();
        fr.put_fixture("cloudconnector.kanto.json.template", TEMPLATE);
        fr
    }

    /// A device tree with the kanto-auto-deployer shape as the manifest itself.
    pub fn with_manifest() -> FakeRoot {
        let fr = FakeRoot::new();
        fr.put_fixture("cloudconnector.auto-deployer.json", MANIFEST);
        fr
    }

    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// What `--root` names, borrowed (as `TempDir::path`): for code that takes the
    /// device root as a `&Path`, e.g. the keystores run in process.
    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("calls.log")
    }

    /// Host path of a path under the root.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.root().join(rel.trim_start_matches('/'))
    }

    pub fn cert_file(&self, name: &str) -> PathBuf {
        self.p(CERTS).join(name)
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.p(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn write(&self, rel: &str, data: impl AsRef<[u8]>) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    pub fn put_fixture(&self, name: &str, rel: &str) {
        put_fixture(&self.root(), name, rel);
    }

    /// A plain directory interface (as the tool's own unit tests use).
    pub fn add_iface(&self, name: &str, mac: &str, kind: &str) {
        let d = self.p("sys/class/net").join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("address"), format!("{mac}\n")).unwrap();
        fs::write(d.join("type"), format!("{kind}\n")).unwrap();
    }

    /// `sys/class/net/NAME -> ../../devices/virtual/net/NAME`, as the kernel does it.
    pub fn add_virtual_iface(&self, name: &str, mac: &str, kind: &str) {
        self.add_linked_iface(name, mac, kind, "devices/virtual/net");
    }

    /// `sys/class/net/NAME -> ../../devices/pci0000:00/0000:00:03.0/net/NAME`.
    pub fn add_pci_iface(&self, name: &str, mac: &str) {
        self.add_linked_iface(name, mac, "1", "devices/pci0000:00/0000:00:03.0/net");
    }

    fn add_linked_iface(&self, name: &str, mac: &str, kind: &str, under: &str) {
        let target = self.p("sys").join(under).join(name);
        fs::create_dir_all(&target).unwrap();
        fs::write(target.join("address"), format!("{mac}\n")).unwrap();
        fs::write(target.join("type"), format!("{kind}\n")).unwrap();
        let net = self.p("sys/class/net");
        fs::create_dir_all(&net).unwrap();
        symlink(format!("../../{under}/{name}"), net.join(name)).unwrap();
    }

    /// A fake program in `bin/` that appends `NAME ARGV…` to `calls.log` and its
    /// environment to `env.log`.
    pub fn fake_tool(&self, name: &str) {
        let p = self.bin_dir().join(name);
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"{name} $*\" >> '{}'\nenv >> '{}'\nexit 0\n",
            self.log().display(),
            self.dir.path().join("env.log").display()
        );
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub fn remove_fake_tool(&self, name: &str) {
        fs::remove_file(self.bin_dir().join(name)).unwrap();
    }

    /// The environments the fake tools ran with, one `KEY=VALUE` a line.
    pub fn child_env(&self) -> String {
        fs::read_to_string(self.dir.path().join("env.log")).unwrap_or_default()
    }

    /// The recorded calls, one per line, in order.
    pub fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn clear_calls(&self) {
        let _ = fs::remove_file(self.log());
    }

    /// The binary with `--root`, the fakes first on PATH, stdin not a TTY, and no
    /// inherited configuration that could change what it does.
    pub fn cmd(&self) -> Command {
        let mut c = self.cmd_without_root();
        c.arg("--root").arg(self.root());
        c
    }

    /// [`FakeRoot::cmd`] without `--root` (the caller picks the root).
    pub fn cmd_without_root(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("PATH", self.path_env());
        for v in [
            "SDV_PROVISION_ROOT",
            "SDV_PROVISION_CONNECTION_STRING",
            "SDV_PROVISION_PKCS11_PIN",
            "PKCS11_MODULE_PATH",
            "TPM2TOOLS_TCTI",
            "TCTI",
            "RUST_LOG",
            "SDV_PROVISION_DPS_CA_FILE",
            "SDV_PROVISION_DPS_TIMEOUT",
        ] {
            c.env_remove(v);
        }
        // DPS registration (hardware keys) goes to a closed local port unless a test
        // points it at its stand-in: never to Azure, and it fails at once.
        c.env("SDV_PROVISION_DPS_ENDPOINT", "127.0.0.1:1");
        c.stdin(Stdio::null());
        c
    }

    /// `bin/` first, then only the system directories (a developer's own kanto-cm
    /// must not be found).
    pub fn path_env(&self) -> String {
        format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin_dir().display())
    }

    /// Run `cmd()` + `args` and return the output (any exit code).
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd().args(args).output().expect("run sdv-provision"))
    }

    /// A file-keystore provisioning with `--id-scope` (DPS), then `extra`.
    pub fn run_dps(&self, alg: &str, extra: &[&str]) -> Run {
        let mut a = vec![
            "--keystore",
            "file",
            "--id-scope",
            GOOD_SCOPE,
            "--algorithm",
            alg,
        ];
        a.extend_from_slice(extra);
        self.run(&a)
    }

    /// [`FakeRoot::run_dps`]; must succeed.
    pub fn provision_dps(&self, alg: &str, extra: &[&str]) -> Run {
        self.run_dps(alg, extra).ok()
    }

    /// Every file, directory and symlink under the root: bytes (or link target) and
    /// mode. Two equal snapshots mean nothing was created, changed or removed.
    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.root())
    }
}

/// One node of a tree snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        bytes: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: PathBuf,
    },
    /// A FIFO, socket or device node: only its mode (reading it could block).
    Other {
        mode: u32,
    },
}

pub type Snapshot = BTreeMap<PathBuf, Node>;

pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut Snapshot) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_owned();
            let meta = fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    Node::Link {
                        target: fs::read_link(&p).unwrap(),
                    },
                );
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir { mode });
                walk(base, &p, out);
            } else if !meta.is_file() {
                out.insert(rel, Node::Other { mode });
            } else {
                out.insert(
                    rel,
                    Node::File {
                        mode,
                        bytes: fs::read(&p).unwrap(),
                    },
                );
            }
        }
    }
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

/// Assert two snapshots are equal, naming the paths that differ.
pub fn assert_same_tree(before: &Snapshot, after: &Snapshot, what: &str) {
    let mut diffs = Vec::new();
    for (p, n) in before {
        match after.get(p) {
            None => diffs.push(format!("removed: {}", p.display())),
            Some(m) if m != n => diffs.push(format!("changed: {}", p.display())),
            _ => {}
        }
    }
    for p in after.keys() {
        if !before.contains_key(p) {
            diffs.push(format!("created: {}", p.display()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: the tree changed:\n{}",
        diffs.join("\n")
    );
}

/// The output of one run, as text.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Assert exit 0 and return self.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success:\n{self}");
        self
    }

    /// Assert a failure with exactly one `error:` line; return that line.
    pub fn one_error(&self, code: i32) -> String {
        assert_eq!(self.code, Some(code), "expected exit {code}:\n{self}");
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "expected exactly one error: line:\n{self}");
        errors[0].to_owned()
    }

    /// The lines of stderr that contain `needle`.
    pub fn stderr_lines_with(&self, needle: &str) -> Vec<&str> {
        super::lines_containing(&self.stderr, needle)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }

    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Octal permission bits of a file.
pub fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `config.env` of a manifest as strings.
pub fn env_of(manifest: &serde_json::Value) -> Vec<String> {
    manifest["config"]["env"]
        .as_array()
        .expect("config.env")
        .iter()
        .map(|v| v.as_str().expect("env string").to_owned())
        .collect()
}

/// The values of env key `key` (all of them: duplicates must show).
pub fn env_values(manifest: &serde_json::Value, key: &str) -> Vec<String> {
    env_of(manifest)
        .into_iter()
        .filter_map(|e| {
            e.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
        })
        .collect()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// The public key (SPKI PEM) of a private key file, as openssl derives it.
pub fn openssl_key_pubkey(key: &Path) -> String {
    super::openssl_out(&["pkey", "-pubout", "-in"], key)
}

/// `openssl x509 -noout -text` of a certificate.
pub fn openssl_cert_text(cert: &Path) -> String {
    super::openssl_out(
        &["x509", "-noout", "-text", "-nameopt", "RFC2253", "-in"],
        cert,
    )
}

/// The subject of a certificate, RFC 2253 (`CN=…`).
pub fn openssl_subject(cert: &Path) -> String {
    super::openssl_out(
        &["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"],
        cert,
    )
    .trim()
    .trim_start_matches("subject=")
    .to_owned()
}
