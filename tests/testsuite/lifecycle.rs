//! The identity lifecycle of issue 5 (`verify`, `rotate [--promote]`, `csr`,
//! `import-cert`, `reset`, `status`) on **every keystore**: plain files, SoftHSM2 and
//! swtpm. Each scenario is written once against [`Device`], a scratch device root
//! plus one backend, and the [`on_every_keystore!`] macro makes one `#[test]` per
//! scenario and backend (`file::…`, `softhsm::…`, `swtpm::…`).
//!
//! The backend abstraction knows only what differs between keystores: how to start
//! it, the flags and environment the binary needs, how to list the objects the tool
//! made (key files / token objects / persistent handles), how to put a foreign one
//! beside them, and how to take the primary key away behind the tool's back.
//!
//! Everything runs the built binary against a temp root, `--non-interactive` and
//! (except where a test counts restarts) `--no-restart`. ECDSA P-256 keeps it fast;
//! `rsa_2048_lifecycle` is the one RSA case per backend.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::device::{Backend, Device, Kind};
use common::fake_root::{
    assert_same_tree, env_values, read_json, FakeRoot, Run, CERTS, ETH0_ID, GOOD_SCOPE, MANIFEST,
    TEMPLATE,
};
#[cfg(feature = "pkcs11")]
use common::softhsm::USER_PIN;
use common::{openssl_out, run_ok};
use serde_json::Value;

#[cfg(feature = "tpm")]
const SRK: u32 = 0x8100_0001;
#[cfg(feature = "tpm")]
const PRIMARY_HANDLE: u32 = 0x8100_0010;
/// A persistent handle another TPM user owns.
#[cfg(feature = "tpm")]
const FOREIGN_HANDLE: u32 = 0x8100_0020;
/// The label of a key pair another token user owns.
#[cfg(feature = "pkcs11")]
const FOREIGN_LABEL: &str = "someone-elses-key";

const STOP: &str = "kanto-cm stop -n cloudconnector -f --timeout 5";
const START: &str = "kanto-cm start -n cloudconnector";
const REMOVE: &str = "kanto-cm remove -n cloudconnector";
const REDEPLOY: &str = "systemctl restart kanto-auto-deployer";

/// A device on `kind`, provisioned with ECDSA keys (DPS).
fn provisioned(kind: Kind) -> Option<Device> {
    let d = Device::start(kind)?;
    d.provision("ecdsa-p256");
    Some(d)
}

impl Device {
    /// `csr --role ROLE --out CSR`: openssl verifies its signature, and its public key
    /// is the one of the certificate `crt`.
    fn csr_verifies(&self, role: &str, crt: &str, csr: &Path) {
        self.run(&["csr", "--role", role, "--out", csr.to_str().unwrap()])
            .ok();
        run_ok(
            Command::new("openssl")
                .args(["req", "-verify", "-noout", "-in"])
                .arg(csr),
        );
        assert_eq!(
            openssl_out(&["req", "-pubkey", "-noout", "-in"], csr),
            common::openssl_cert_pubkey(&self.cert(crt)),
            "{role} CSR key"
        );
    }

    /// `verify --json`: (exit code, check name -> (ok, detail)).
    fn verify(&self) -> (Option<i32>, BTreeMap<String, (bool, String)>, Run) {
        let r = self.run(&["--json", "verify"]);
        let j = r.json();
        let checks = j["checks"]
            .as_array()
            .unwrap_or_else(|| panic!("verify --json has no checks:\n{r}"))
            .iter()
            .map(|c| {
                (
                    c["check"].as_str().unwrap().to_owned(),
                    (
                        c["ok"].as_bool().unwrap(),
                        c["detail"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect::<BTreeMap<_, _>>();
        assert_eq!(
            j["ok"].as_bool(),
            Some(checks.values().all(|(ok, _)| *ok)),
            "verify's overall ok must be the AND of its checks:\n{r}"
        );
        (r.code, checks, r)
    }

    fn verify_passes(&self) {
        let (code, checks, r) = self.verify();
        assert_eq!(code, Some(0), "verify must pass:\n{r}");
        for name in [
            "cloud",
            "primary.certificate.subject",
            "primary.certificate.validity",
            "primary.key",
            "secondary.certificate.subject",
            "secondary.certificate.validity",
            "secondary.key",
            "manifest",
        ] {
            assert!(checks.get(name).is_some_and(|c| c.0), "{name} not ok:\n{r}");
        }
        // The TPM blobs today's connector loads are checked too; other keystores have
        // no such copies.
        for name in ["primary.key.copies", "secondary.key.copies"] {
            match self.kind() {
                #[cfg(feature = "tpm")]
                Kind::Swtpm => {
                    assert!(checks.get(name).is_some_and(|c| c.0), "{name} not ok:\n{r}")
                }
                _ => assert!(
                    !checks.contains_key(name),
                    "{name} on {:?}:\n{r}",
                    self.kind()
                ),
            }
        }
        // A token's connector PIN file is checked too.
        match self.kind() {
            #[cfg(feature = "pkcs11")]
            Kind::SoftHsm => assert!(
                checks.get("keystore.pin_file").is_some_and(|c| c.0),
                "keystore.pin_file not ok:\n{r}"
            ),
            _ => assert!(!checks.contains_key("keystore.pin_file"), "{r}"),
        }
    }

    /// Verify fails (exit 1), exactly the checks in `failing` fail, and each one's
    /// detail contains its expected words.
    fn verify_fails(&self, failing: &[(&str, &[&str])]) {
        let (code, checks, r) = self.verify();
        assert_eq!(code, Some(1), "verify must fail:\n{r}");
        for (name, (ok, detail)) in &checks {
            match failing.iter().find(|(n, _)| n == name) {
                Some((_, words)) => {
                    assert!(!ok, "{name} should fail:\n{r}");
                    for w in *words {
                        assert!(detail.contains(w), "{name}: {detail:?} lacks {w:?}");
                    }
                }
                None => assert!(ok, "only {failing:?} should fail, but {name} did:\n{r}"),
            }
        }
        for (name, _) in failing {
            assert!(checks.contains_key(*name), "no check {name}:\n{r}");
        }
        // The human form names the failure too.
        let text = self.run(&["verify"]);
        assert_eq!(text.code, Some(1), "{text}");
        for (name, _) in failing {
            assert!(
                text.stdout.contains(&format!("FAIL {name}:")),
                "human verify lacks FAIL {name}:\n{text}"
            );
        }
        assert!(text.stdout.contains("Verification FAILED"), "{text}");
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.fr.cert_file(name)
    }

    fn manifest(&self) -> Vec<u8> {
        fs::read(self.fr.p(MANIFEST)).unwrap()
    }

    fn manifest_key_uri(&self) -> String {
        let m = read_json(&self.fr.p(MANIFEST));
        let v = env_values(&m, "KEY_URI");
        assert_eq!(v.len(), 1, "one KEY_URI in the manifest: {v:?}");
        v[0].clone()
    }

    /// What the manifest's `KEY_URI` must be for a primary whose `status --json`
    /// `key_uri` is `status_uri` (host-side form).
    fn expected_manifest_key_uri(&self, status_uri: &str) -> String {
        match self.kind() {
            // The device path (the mount's destination), not the host path under --root.
            Kind::File => {
                assert!(
                    status_uri.ends_with("/data/var/certificates/device.key"),
                    "{status_uri}"
                );
                "file:/var/certificates/device.key".into()
            }
            #[cfg(feature = "pkcs11")]
            Kind::SoftHsm => {
                format!("{status_uri}?pin-source=file:/var/certificates/pkcs11.pin")
            }
            #[cfg(feature = "tpm")]
            Kind::Swtpm => status_uri.into(),
        }
    }

    /// The key material the tool made, as the backend itself lists it: key files in
    /// the certificates directory, token objects labelled `device-…` (one entry per
    /// object), persistent handles other than the SRK and [`FOREIGN_HANDLE`].
    fn ours(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.backend {
            Backend::File => fs::read_dir(self.fr.p(CERTS))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("device") && n.ends_with(".key"))
                        .collect()
                })
                .unwrap_or_default(),
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(s) => s
                .object_labels()
                .into_iter()
                .filter(|l| l.starts_with("device-"))
                .collect(),
            #[cfg(feature = "tpm")]
            Backend::Swtpm(t) => t
                .persistent_handles()
                .into_iter()
                .filter(|h| *h != SRK && *h != FOREIGN_HANDLE)
                .map(|h| format!("0x{h:08x}"))
                .collect(),
        };
        v.sort();
        v
    }

    /// What a complete identity holds in the keystore.
    fn expected_ours(&self) -> Vec<String> {
        let v: Vec<&str> = match self.kind() {
            Kind::File => vec!["device.key", "device2.key"],
            #[cfg(feature = "pkcs11")]
            Kind::SoftHsm => vec![
                "device-primary",
                "device-primary",
                "device-primary",
                "device-secondary",
                "device-secondary",
                "device-secondary",
            ],
            #[cfg(feature = "tpm")]
            Kind::Swtpm => vec!["0x81000010", "0x81000011"],
        };
        v.into_iter().map(str::to_owned).collect()
    }

    /// Each role's key, as the keystore itself shows it, belongs to the role's
    /// certificate file: the key file's public key (file); the token's certificate
    /// object (SoftHSM); the persistent handle's public key *and* the
    /// `device*.tpm.pub` blob today's connector loads (swtpm).
    fn assert_keystore_agrees(&self) {
        for (stem, _label, _handle) in [
            ("device", "device-primary", 0x8100_0010u32),
            ("device2", "device-secondary", 0x8100_0011u32),
        ] {
            let crt = self.cert(&format!("{stem}.crt"));
            let cert_pub = common::openssl_cert_pubkey(&crt);
            match &self.backend {
                Backend::File => assert_eq!(
                    common::fake_root::openssl_key_pubkey(&self.cert(&format!("{stem}.key"))),
                    cert_pub,
                    "{stem}.key"
                ),
                #[cfg(feature = "pkcs11")]
                Backend::SoftHsm(s) => {
                    let der = self.fr.dir.path().join(format!("{_label}.der"));
                    run_ok(
                        Command::new("pkcs11-tool")
                            .arg("--module")
                            .arg(&s.module)
                            .args(["--token-label", &s.label, "--login", "--pin", USER_PIN])
                            .args(["--read-object", "--type", "cert", "--label", _label])
                            .arg("--output-file")
                            .arg(&der)
                            .env("SOFTHSM2_CONF", &s.conf),
                    );
                    let file = run_ok(
                        Command::new("openssl")
                            .args(["x509", "-outform", "DER", "-in"])
                            .arg(&crt),
                    );
                    assert_eq!(
                        fs::read(&der).unwrap(),
                        file.stdout,
                        "the token's certificate object {_label} is not {stem}.crt"
                    );
                }
                #[cfg(feature = "tpm")]
                Backend::Swtpm(t) => {
                    assert_eq!(t.public_pem(_handle), cert_pub, "0x{_handle:08x}");
                    let blob = run_ok(
                        t.tool("tpm2_print")
                            .args(["-t", "TPM2B_PUBLIC", "-f", "pem"])
                            .arg(self.cert(&format!("{stem}.tpm.pub"))),
                    );
                    assert_eq!(
                        String::from_utf8(blob.stdout).unwrap(),
                        cert_pub,
                        "{stem}.tpm.pub"
                    );
                }
            }
        }
    }

    /// Put something the tool did not make beside its objects: an unrelated file (every
    /// backend) and a foreign key file / token key pair / persistent handle. Returns a
    /// fingerprint of all of it for [`Device::foreign`].
    fn add_foreign(&self) -> String {
        self.fr
            .write(&format!("{CERTS}/unrelated.txt"), "not ours\n");
        match &self.backend {
            Backend::File => {
                let key = self.fr.cert_file("vendor.key");
                new_p256_key(&key);
            }
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(s) => {
                s.foreign_keypair(FOREIGN_LABEL, "4242");
            }
            #[cfg(feature = "tpm")]
            Backend::Swtpm(t) => t.foreign_key_at(FOREIGN_HANDLE, true),
        }
        self.foreign()
    }

    /// The foreign things of [`Device::add_foreign`], as they are now.
    fn foreign(&self) -> String {
        let mut s = fs::read_to_string(self.fr.cert_file("unrelated.txt")).unwrap_or_default();
        match &self.backend {
            Backend::File => {
                s += &fs::read_to_string(self.fr.cert_file("vendor.key")).unwrap_or_default();
            }
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(st) => {
                let n = st
                    .object_labels()
                    .iter()
                    .filter(|l| *l == FOREIGN_LABEL)
                    .count();
                s += &format!("{n} objects labelled {FOREIGN_LABEL}");
            }
            #[cfg(feature = "tpm")]
            Backend::Swtpm(t) => {
                if t.persistent_handles().contains(&FOREIGN_HANDLE) {
                    s += &t.public_pem(FOREIGN_HANDLE);
                }
            }
        }
        s
    }

    /// Take the primary key away behind the tool's back: a key file replaced by
    /// another key, the token's private key object deleted, the persistent handle
    /// evicted. Returns words the failing `primary.key` check must name.
    fn break_primary_key(&self) -> Vec<&'static str> {
        match &self.backend {
            Backend::File => {
                let key = self.fr.cert_file("device.key");
                let before = common::fake_root::openssl_key_pubkey(&key);
                new_p256_key(&key);
                assert_ne!(common::fake_root::openssl_key_pubkey(&key), before);
                vec!["device.key", "does not match", "device.crt"]
            }
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(s) => {
                run_ok(
                    Command::new("pkcs11-tool")
                        .arg("--module")
                        .arg(&s.module)
                        .args(["--token-label", &s.label, "--login", "--pin", USER_PIN])
                        .args(["--delete-object", "--type", "privkey"])
                        .args(["--label", "device-primary"])
                        .env("SOFTHSM2_CONF", &s.conf),
                );
                assert_eq!(
                    s.object_labels()
                        .iter()
                        .filter(|l| *l == "device-primary")
                        .count(),
                    2,
                    "pkcs11-tool deleted the private key object only"
                );
                vec!["device-primary"]
            }
            #[cfg(feature = "tpm")]
            Backend::Swtpm(t) => {
                run_ok(
                    t.tool("tpm2_evictcontrol")
                        .args(["-C", "o", "-c"])
                        .arg(format!("0x{PRIMARY_HANDLE:08x}")),
                );
                assert!(!t.persistent_handles().contains(&PRIMARY_HANDLE));
                vec!["0x81000010"]
            }
        }
    }
}

/// A fresh P-256 key (PKCS#8 PEM, 0600) at `path`, made by openssl.
fn new_p256_key(path: &Path) {
    run_ok(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(path),
    );
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

fn cert_entry<'a>(status: &'a Value, role: &str) -> &'a Value {
    status["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .find(|c| c["role"] == role)
        .unwrap_or_else(|| panic!("no {role} in {status}"))
}

fn field<'a>(status: &'a Value, role: &str, key: &str) -> &'a str {
    cert_entry(status, role)[key]
        .as_str()
        .unwrap_or_else(|| panic!("{role}.{key} missing in {status}"))
}

// ---------------------------------------------------------------------------------
// A throwaway CA (openssl), for CA-signed enrollment
// ---------------------------------------------------------------------------------

struct Ca {
    dir: tempfile::TempDir,
}

impl Ca {
    const NAME: &'static str = "Lifecycle Test CA";

    fn new() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        common::openssl_self_signed(d, "ca", Ca::NAME, 2);
        fs::create_dir(d.join("newcerts")).unwrap();
        fs::write(d.join("index.txt"), "").unwrap();
        fs::write(
            d.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = test_ca\n\
                 [test_ca]\ndir = {dir}\ndatabase = {dir}/index.txt\nnew_certs_dir = {dir}/newcerts\n\
                 rand_serial = yes\ndefault_md = sha256\npolicy = policy_any\nunique_subject = no\n\
                 x509_extensions = client\n\
                 [policy_any]\ncommonName = supplied\n\
                 [client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n\
                 extendedKeyUsage = clientAuth\n",
                dir = d.display()
            ),
        )
        .unwrap();
        Ca { dir }
    }

    fn crt(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Sign `csr` (`openssl ca`); `extra` e.g. `-days 30`, `-subj /CN=x`,
    /// `-startdate … -enddate …`. Returns a PEM file: the leaf, then the CA.
    fn sign(&self, csr: &Path, name: &str, extra: &[&str]) -> PathBuf {
        let d = self.dir.path();
        let leaf = d.join(format!("{name}.leaf.pem"));
        run_ok(
            Command::new("openssl")
                .args(["ca", "-batch", "-notext", "-config"])
                .arg(d.join("ca.cnf"))
                .arg("-cert")
                .arg(self.crt())
                .arg("-keyfile")
                .arg(d.join("ca.key"))
                .arg("-in")
                .arg(csr)
                .arg("-out")
                .arg(&leaf)
                .args(extra),
        );
        let chain = d.join(format!("{name}.chain.pem"));
        let mut pem = fs::read(&leaf).unwrap();
        pem.extend(fs::read(self.crt()).unwrap());
        fs::write(&chain, pem).unwrap();
        chain
    }

    /// A CSR for a fresh key that is not the device's (CN = the device id).
    fn foreign_csr(&self) -> PathBuf {
        let d = self.dir.path();
        let csr = d.join("foreign.csr");
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                ])
                .args(["-subj", &format!("/CN={ETH0_ID}"), "-keyout"])
                .arg(d.join("foreign.key"))
                .arg("-out")
                .arg(&csr),
        );
        csr
    }
}

// ---------------------------------------------------------------------------------
// Scenarios: each runs on every backend (see the macro at the end)
// ---------------------------------------------------------------------------------

/// `verify` on a fresh identity: exit 0, every check listed with `ok: true`; the human
/// form says so too.
fn verify_passes_on_a_fresh_identity(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    d.verify_passes();
    d.assert_keystore_agrees();
    let text = d.run(&["verify"]).ok();
    assert!(text.stdout.contains("ok   primary.key:"), "{text}");
    assert!(text.stdout.contains("Verification passed"), "{text}");
}

/// `device.crt` and `device2.crt` swapped: both keys fail against the other's
/// certificate, and nothing else is reported wrong.
fn verify_fails_when_the_certificates_are_swapped(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let (a, b) = (d.cert("device.crt"), d.cert("device2.crt"));
    let tmp = d.cert("swap.tmp");
    fs::rename(&a, &tmp).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmp, &b).unwrap();
    d.verify_fails(&[
        ("primary.key", &["does not match", "device.crt"]),
        ("secondary.key", &["does not match", "device2.crt"]),
    ]);
}

/// The primary key taken away behind the tool's back (file replaced by another key,
/// token object deleted, TPM handle evicted): `primary.key` fails and names it.
fn verify_fails_when_the_primary_key_is_gone_or_replaced(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    d.verify_passes();
    let words = d.break_primary_key();
    d.verify_fails(&[("primary.key", &words)]);
}

/// The manifest's `KEY_URI` edited by hand: the `manifest` check fails and names
/// `KEY_URI`; the keys still verify.
fn verify_fails_when_the_manifest_key_uri_is_edited(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let old = d.manifest_key_uri();
    let text = String::from_utf8(d.manifest()).unwrap();
    let edited = text.replace(
        &format!("KEY_URI={old}"),
        "KEY_URI=file:/var/certificates/somebody-elses.key",
    );
    assert_ne!(text, edited);
    d.fr.write(MANIFEST, edited);
    d.verify_fails(&[("manifest", &["KEY_URI", "does not agree"])]);
}

/// `rotate` makes a new secondary and nothing else changes: primary thumbprint, key
/// URI and certificate, the manifest bytes; no restart.
fn rotate_changes_only_the_secondary(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let before = d.status();
    let manifest = d.manifest();
    let primary_crt = fs::read(d.cert("device.crt")).unwrap();
    let secondary_pub = common::openssl_cert_pubkey(&d.cert("device2.crt"));
    d.fr.clear_calls();

    let out = d.run_restarting(&["rotate"]).ok();
    let after = d.status();
    let new_secondary = field(&after, "secondary", "sha1_thumbprint");
    assert_ne!(
        new_secondary,
        field(&before, "secondary", "sha1_thumbprint")
    );
    assert!(
        out.stdout.contains(new_secondary),
        "rotate prints the new secondary thumbprint for registration:\n{out}"
    );
    assert_ne!(
        common::openssl_cert_pubkey(&d.cert("device2.crt")),
        secondary_pub,
        "a new secondary key, not just a new certificate"
    );
    for k in [
        "sha1_thumbprint",
        "sha256_thumbprint",
        "key_uri",
        "not_after",
    ] {
        assert_eq!(
            field(&after, "primary", k),
            field(&before, "primary", k),
            "primary {k}"
        );
    }
    assert_eq!(fs::read(d.cert("device.crt")).unwrap(), primary_crt);
    assert_eq!(d.manifest(), manifest, "rotate must not touch the manifest");
    assert_eq!(
        d.fr.calls(),
        Vec::<String>::new(),
        "rotate restarted the connector"
    );
    assert_eq!(d.ours(), d.expected_ours(), "no staged leftovers");
    d.verify_passes();
    d.assert_keystore_agrees();
}

/// `rotate --promote`: the secondary becomes the primary (certificate, key, manifest),
/// the connector restarts, and a fresh secondary follows.
fn rotate_promote_swaps_roles_and_updates_the_manifest(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let before = d.status();
    let manifest_before = d.manifest();
    let old_secondary_pub = common::openssl_cert_pubkey(&d.cert("device2.crt"));
    d.fr.clear_calls();

    d.run_restarting(&["rotate", "--promote"]).ok();
    let after = d.status();
    assert_eq!(
        field(&after, "primary", "sha1_thumbprint"),
        field(&before, "secondary", "sha1_thumbprint"),
        "the old secondary is the new primary"
    );
    assert_eq!(
        common::openssl_cert_pubkey(&d.cert("device.crt")),
        old_secondary_pub
    );
    let new_secondary = field(&after, "secondary", "sha1_thumbprint");
    assert_ne!(new_secondary, field(&before, "primary", "sha1_thumbprint"));
    assert_ne!(
        new_secondary,
        field(&before, "secondary", "sha1_thumbprint")
    );
    assert_ne!(
        common::openssl_cert_pubkey(&d.cert("device2.crt")),
        old_secondary_pub,
        "a fresh secondary key"
    );
    // The manifest names the new primary; verify agrees with every part.
    assert_eq!(
        d.manifest_key_uri(),
        d.expected_manifest_key_uri(field(&after, "primary", "key_uri"))
    );
    let m = read_json(&d.fr.p(MANIFEST));
    assert_eq!(
        env_values(&m, "CERT_FILE"),
        ["/var/certificates/device.crt"]
    );
    assert_eq!(env_values(&m, "ID_SCOPE"), [GOOD_SCOPE]);
    d.verify_passes();
    assert_eq!(
        d.ours(),
        d.expected_ours(),
        "old primary removed, no leftovers"
    );
    d.assert_keystore_agrees();
    // The connector restarts: recreated if the manifest changed (a PKCS#11 URI names
    // the key's CKA_ID), else stopped and started for the new certificate.
    let changed = d.manifest() != manifest_before;
    #[cfg(feature = "pkcs11")]
    if kind == Kind::SoftHsm {
        assert!(changed, "the PKCS#11 KEY_URI carries the promoted key's id");
    }
    let want: &[&str] = if changed {
        &[STOP, REMOVE, REDEPLOY]
    } else {
        &[STOP, START]
    };
    assert_eq!(d.fr.calls(), want);
}

/// `csr --role primary|secondary`: `openssl req -verify` passes, the public key is the
/// role's certificate key, CN = device id, clientAuth requested.
fn csr_is_signed_by_the_roles_key(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let snap = d.fr.snapshot();
    let out_dir = tempfile::tempdir().unwrap();
    for (role, crt) in [("primary", "device.crt"), ("secondary", "device2.crt")] {
        let csr = out_dir.path().join(format!("{role}.csr"));
        d.csr_verifies(role, crt, &csr);
        let subject = openssl_out(
            &["req", "-noout", "-subject", "-nameopt", "RFC2253", "-in"],
            &csr,
        );
        assert_eq!(subject.trim(), format!("subject=CN={ETH0_ID}"));
        let text = openssl_out(&["req", "-noout", "-text", "-in"], &csr);
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }
    // To stdout: the same key.
    let stdout = d.run(&["csr", "--role", "secondary"]).ok();
    assert!(stdout
        .stdout
        .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    let csr = out_dir.path().join("stdout.csr");
    fs::write(&csr, &stdout.stdout).unwrap();
    assert_eq!(
        openssl_out(&["req", "-pubkey", "-noout", "-in"], &csr),
        common::openssl_cert_pubkey(&d.cert("device2.crt"))
    );
    // --json: the request and the key URI as `status --json` shows it (host side).
    let doc = d.run(&["--json", "csr", "--role", "primary"]).ok().json();
    assert_eq!(doc["role"], "primary");
    assert!(doc["csr"]
        .as_str()
        .is_some_and(|c| c.starts_with("-----BEGIN CERTIFICATE REQUEST-----")));
    assert_eq!(doc["key_uri"], field(&d.status(), "primary", "key_uri"));
    assert_same_tree(&snap, &d.fr.snapshot(), "csr");
    assert_eq!(d.ours(), d.expected_ours());
}

/// CA-signed enrollment: CSR, signed by a throwaway CA, imported with its chain;
/// `verify` passes, `status` shows the CA as issuer and the new thumbprint. A
/// certificate for another key, an expired one and one with the wrong CN are refused
/// with a clear error, and nothing changes.
fn import_cert_installs_a_ca_signed_certificate_and_refuses_bad_ones(kind: Kind) {
    #[cfg(feature = "tpm")]
    let tpm = matches!(kind, Kind::Swtpm);
    #[cfg(not(feature = "tpm"))]
    let tpm = false;
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let ca = Ca::new();
    let csr = ca.dir.path().join("device.csr");
    d.run(&["csr", "--role", "primary", "--out", csr.to_str().unwrap()])
        .ok();

    // Refusals first, each with the tree and the keystore untouched.
    let before = d.fr.snapshot();
    let ours = d.ours();
    let mismatched = ca.sign(&ca.foreign_csr(), "mismatched", &["-days", "30"]);
    let expired = ca.sign(
        &csr,
        "expired",
        &[
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20210101000000Z",
        ],
    );
    let wrong_cn = ca.sign(
        &csr,
        "wrong-cn",
        &["-days", "30", "-subj", "/CN=someone-else"],
    );
    for (file, words) in [
        (&mismatched, &["public key", "primary"][..]),
        (&expired, &["not valid now"][..]),
        (&wrong_cn, &["someone-else", ETH0_ID][..]),
    ] {
        let r = d.run_restarting(&["import-cert", "--role", "primary", file.to_str().unwrap()]);
        let line = r.one_error(1);
        assert!(line.contains("refusing"), "{line}");
        for w in words {
            assert!(line.contains(w), "{line:?} lacks {w:?}");
        }
        assert_same_tree(
            &before,
            &d.fr.snapshot(),
            &format!("refused {}", file.display()),
        );
        assert_eq!(d.ours(), ours);
        assert_eq!(d.fr.calls(), Vec::<String>::new());
    }

    let old = d.status();
    let self_signed = fs::read(d.cert("device.crt")).unwrap();
    let good = ca.sign(&csr, "good", &["-days", "30"]);
    let imported = d
        .run_restarting(&["import-cert", "--role", "primary", good.to_str().unwrap()])
        .ok();
    // Today's connector sends only the leaf in TPM mode: the chain is a reason it
    // cannot use this identity there, and only there.
    let compat: Vec<&str> = imported.stderr_lines_with("today's Leda cloud connector");
    assert!(compat.len() <= 1, "{imported}");
    assert_eq!(
        compat
            .iter()
            .any(|l| l.contains("only the leaf certificate")),
        tpm,
        "{imported}"
    );
    // The connector presents the primary certificate: it restarts (the manifest is
    // unchanged: the certificate file keeps its name).
    assert_eq!(d.fr.calls(), [STOP, START]);
    assert_eq!(
        fs::read(d.cert("device.crt")).unwrap(),
        fs::read(&good).unwrap()
    );
    d.verify_passes();
    let status = d.status();
    let issuer = field(&status, "primary", "issuer");
    assert!(issuer.contains(Ca::NAME), "issuer {issuer:?}");
    assert_eq!(cert_entry(&status, "primary")["self_signed"], false);
    let thumb = field(&status, "primary", "sha1_thumbprint");
    assert_eq!(thumb, common::openssl_sha1(&good));
    assert_ne!(thumb, field(&old, "primary", "sha1_thumbprint"));
    assert_eq!(
        field(&status, "secondary", "sha1_thumbprint"),
        field(&old, "secondary", "sha1_thumbprint")
    );
    assert_eq!(
        field(&status, "primary", "key_uri"),
        field(&old, "primary", "key_uri")
    );
    assert_eq!(cert_entry(&status, "secondary")["self_signed"], true);
    // A token keeps the certificate beside the key (libp11 loads both by URI): the
    // imported one must have replaced the self-signed one there too.
    d.assert_keystore_agrees();
    let text = d.run(&["status"]).ok();
    assert!(
        text.stdout.contains(&format!("issuer: CN={}", Ca::NAME)),
        "{text}"
    );
    assert!(text.stdout.contains(thumb), "{text}");
    assert_eq!(d.ours(), ours);

    // Importing the same file again changes nothing and restarts nothing.
    let reimport = || {
        d.fr.clear_calls();
        d.run_restarting(&["import-cert", "--role", "primary", good.to_str().unwrap()])
            .ok()
    };
    let installed = d.fr.snapshot();
    let again = reimport();
    assert!(again.stdout.contains("already installed"), "{again}");
    assert_eq!(d.fr.calls(), Vec::<String>::new());
    assert_same_tree(&installed, &d.fr.snapshot(), "re-import");
    assert_eq!(d.ours(), ours);

    // An import stopped after the keystore and before the file (the order it
    // works in) is finished by the next one: the file is written, the connector
    // restarts.
    fs::write(d.cert("device.crt"), &self_signed).unwrap();
    reimport();
    assert_eq!(
        fs::read(d.cert("device.crt")).unwrap(),
        fs::read(&good).unwrap()
    );
    assert_eq!(d.fr.calls(), [STOP, START]);
    d.assert_keystore_agrees();
    // A token that lost the certificate object gets it back from a re-import, even
    // though the file is already in place.
    #[cfg(feature = "pkcs11")]
    if let Backend::SoftHsm(s) = &d.backend {
        run_ok(
            Command::new("pkcs11-tool")
                .arg("--module")
                .arg(&s.module)
                .args(["--token-label", &s.label, "--login", "--pin", USER_PIN])
                .args([
                    "--delete-object",
                    "--type",
                    "cert",
                    "--label",
                    "device-primary",
                ])
                .env("SOFTHSM2_CONF", &s.conf),
        );
        let again = reimport();
        assert!(again.stdout.contains("already installed"), "{again}");
        assert_eq!(d.fr.calls(), Vec::<String>::new());
        d.assert_keystore_agrees();
    }
}

/// `reset --yes` removes every file, object and handle of ours, restores the manifest
/// from its template, and leaves foreign objects, handles and files alone.
fn reset_removes_ours_and_keeps_foreign(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let foreign = d.add_foreign();
    assert_eq!(d.ours(), d.expected_ours());
    d.fr.clear_calls();
    d.run_restarting(&["reset", "--yes"]).ok();
    // The manifest lost its identity entries: the container is recreated from it.
    assert_eq!(d.fr.calls(), [STOP, REMOVE, REDEPLOY]);
    assert_eq!(
        d.ours(),
        Vec::<String>::new(),
        "left behind in the keystore"
    );
    assert_eq!(d.foreign(), foreign, "a foreign object was touched");
    let mut left: Vec<String> = fs::read_dir(d.fr.p(CERTS))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let expect: &[&str] = match kind {
        Kind::File => &["unrelated.txt", "vendor.key"],
        #[allow(unreachable_patterns)]
        _ => &["unrelated.txt"],
    };
    assert_eq!(left, expect, "files left in the certificates directory");
    // Nowhere else either: outside the fake sysfs only the device id (not part of the
    // identity), the template, the restored manifest and the foreign files remain.
    let mut files: Vec<String> = d
        .fr
        .snapshot()
        .into_iter()
        .filter(|(p, n)| matches!(n, common::fake_root::Node::File { .. }) && !p.starts_with("sys"))
        .map(|(p, _)| p.display().to_string())
        .collect();
    files.sort();
    let mut want: Vec<String> = ["etc/deviceid", MANIFEST, TEMPLATE]
        .iter()
        .map(|s| s.to_string())
        .chain(expect.iter().map(|f| format!("{CERTS}/{f}")))
        .collect();
    want.sort();
    assert_eq!(files, want, "files under the root after reset");
    assert_eq!(
        d.fr.read(MANIFEST),
        d.fr.read(TEMPLATE),
        "manifest restored"
    );
    #[cfg(feature = "tpm")]
    if let Backend::Swtpm(t) = &d.backend {
        let mut h = t.persistent_handles();
        h.sort();
        assert_eq!(h, [SRK, FOREIGN_HANDLE]);
    }
    #[cfg(feature = "pkcs11")]
    if let Backend::SoftHsm(s) = &d.backend {
        let mut l = s.object_labels();
        l.sort();
        assert_eq!(l, [FOREIGN_LABEL, FOREIGN_LABEL]);
    }
    let st = d.run(&["--json", "status"]);
    assert_eq!(st.code, Some(1), "not provisioned any more:\n{st}");
    // And the device can be provisioned again from scratch.
    d.provision("ecdsa-p256");
    d.verify_passes();
    d.assert_keystore_agrees();
    assert_eq!(d.foreign(), foreign);
}

/// `reset` without `--yes` and without a terminal: a usage error naming `--yes`, and
/// nothing changes.
fn reset_without_yes_is_a_usage_error(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let snap = d.fr.snapshot();
    let ours = d.ours();
    let r = d.run_restarting(&["reset"]);
    let line = r.one_error(2);
    assert!(line.contains("--yes"), "{line}");
    assert_same_tree(&snap, &d.fr.snapshot(), "reset without --yes");
    assert_eq!(d.ours(), ours);
    assert_eq!(d.fr.calls(), Vec::<String>::new());
    d.verify_passes();
}

/// `status` for each role: keystore, key URI, algorithm, issuer, not-after and both
/// thumbprints, in `--json` and in the human text.
fn status_shows_every_field_per_role(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    let prov = d.provision("ecdsa-p256");
    let s = d.status();
    let ks = match kind {
        Kind::File => "file",
        #[cfg(feature = "pkcs11")]
        Kind::SoftHsm => "pkcs11",
        #[cfg(feature = "tpm")]
        Kind::Swtpm => "tpm",
    };
    assert_eq!(s["keystore"], ks);
    assert_eq!(s["device_id"], ETH0_ID);
    assert_eq!(s["provisioned"], true);
    assert_eq!(
        s["certificates"], prov["certificates"],
        "status == provision report"
    );
    let text = d.run(&["status"]).ok().stdout;
    assert!(
        text.contains(&format!("- Keystore: {ks} (ecdsa-p256)")),
        "{text}"
    );
    for (role, crt, name) in [
        ("primary", "device.crt", "Primary"),
        ("secondary", "device2.crt", "Secondary"),
    ] {
        let path = d.cert(crt);
        assert_eq!(field(&s, role, "path"), path.to_str().unwrap());
        assert_eq!(field(&s, role, "algorithm"), "ecdsa-p256");
        let uri = field(&s, role, "key_uri");
        match kind {
            Kind::File => assert_eq!(
                uri,
                format!("file:{}", d.cert(&crt.replace(".crt", ".key")).display())
            ),
            #[cfg(feature = "pkcs11")]
            Kind::SoftHsm => assert!(
                uri.starts_with(&format!("pkcs11:token=leda;object=device-{role};id=%"))
                    && uri.ends_with(";type=private"),
                "{uri}"
            ),
            #[cfg(feature = "tpm")]
            Kind::Swtpm => assert_eq!(
                uri,
                if role == "primary" {
                    "handle:0x81000010"
                } else {
                    "handle:0x81000011"
                }
            ),
        }
        let sha1 = field(&s, role, "sha1_thumbprint");
        let sha256 = field(&s, role, "sha256_thumbprint");
        assert_eq!(sha1, common::openssl_sha1(&path));
        assert_eq!(sha256, common::openssl_sha256(&path));
        let issuer = field(&s, role, "issuer");
        assert_eq!(issuer, format!("CN={ETH0_ID}"));
        assert_eq!(cert_entry(&s, role)["self_signed"], true);
        let not_after = field(&s, role, "not_after");
        let parsed =
            time::OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("not_after {not_after:?}: {e}"));
        let days = (parsed - time::OffsetDateTime::now_utc()).whole_days();
        assert!((364..=365).contains(&days), "{days} days left");
        let enddate = openssl_out(&["x509", "-noout", "-enddate", "-in"], &path);
        assert!(
            enddate.contains(&parsed.year().to_string()),
            "{enddate} vs {not_after}"
        );
        for line in [
            format!("- {name} device certificate: {}", path.display()),
            format!("- {name} device key: {uri}"),
            format!("  issuer: self-signed; valid until {not_after}"),
            format!("- {name} thumbprint: {sha1}"),
            format!("- {name} SHA-256 thumbprint: {sha256}"),
        ] {
            assert!(text.contains(&line), "status text lacks {line:?}:\n{text}");
        }
    }
}

/// The one RSA case per backend: provision, verify, rotate, promote, CSR, verify.
fn rsa_2048_lifecycle(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    let prov = d.provision("rsa-2048");
    assert_eq!(field(&prov, "primary", "algorithm"), "rsa-2048");
    d.verify_passes();
    d.run(&["rotate", "--promote"]).ok();
    let s = d.status();
    assert_eq!(
        field(&s, "primary", "sha1_thumbprint"),
        field(&prov, "secondary", "sha1_thumbprint")
    );
    for role in ["primary", "secondary"] {
        assert_eq!(field(&s, role, "algorithm"), "rsa-2048");
    }
    d.verify_passes();
    d.assert_keystore_agrees();
    d.csr_verifies("primary", "device.crt", &d.fr.dir.path().join("rsa.csr"));
    assert_eq!(d.ours(), d.expected_ours());
}

/// One `#[test]` per scenario and keystore: `file::NAME`, `softhsm::NAME`, `swtpm::NAME`.
macro_rules! on_every_keystore {
    ($($scenario:ident),* $(,)?) => {
        mod file {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::File) } )*
        }
        #[cfg(feature = "pkcs11")]
        mod softhsm {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::SoftHsm) } )*
        }
        #[cfg(feature = "tpm")]
        mod swtpm {
            $( #[test] fn $scenario() { super::$scenario(super::Kind::Swtpm) } )*
        }
    };
}

on_every_keystore!(
    verify_passes_on_a_fresh_identity,
    verify_fails_when_the_certificates_are_swapped,
    verify_fails_when_the_primary_key_is_gone_or_replaced,
    verify_fails_when_the_manifest_key_uri_is_edited,
    rotate_changes_only_the_secondary,
    rotate_promote_swaps_roles_and_updates_the_manifest,
    csr_is_signed_by_the_roles_key,
    import_cert_installs_a_ca_signed_certificate_and_refuses_bad_ones,
    reset_removes_ours_and_keeps_foreign,
    reset_without_yes_is_a_usage_error,
    status_shows_every_field_per_role,
    rsa_2048_lifecycle,
);

// ---------------------------------------------------------------------------------
// Hardware keystores only: a foreign key where ours used to be
// ---------------------------------------------------------------------------------

/// The blobs today's connector loads (`TPM_KEY`, `TPM_KEY_PUB`) replaced behind the
/// tool's back while the handle keeps the right key: only `primary.key.copies`
/// fails, naming the blob. Both blobs of another key (the secondary's), then only the
/// private blob (it no longer loads as the handle's key).
#[cfg(feature = "tpm")]
#[test]
fn swtpm_verify_fails_when_the_connectors_blobs_are_not_the_handles_key() {
    let Some(d) = Device::start(Kind::Swtpm) else {
        return;
    };
    d.provision("ecdsa-p256");
    d.verify_passes();
    let blob = |name: &str| d.fr.cert_file(name);
    let saved: Vec<Vec<u8>> = ["device.tpm.pub", "device.tpm.priv"]
        .iter()
        .map(|n| fs::read(blob(n)).unwrap())
        .collect();
    fs::copy(blob("device2.tpm.pub"), blob("device.tpm.pub")).unwrap();
    fs::copy(blob("device2.tpm.priv"), blob("device.tpm.priv")).unwrap();
    d.verify_fails(&[(
        "primary.key.copies",
        &["device.tpm.pub", "not the public area", "0x81000010"],
    )]);
    fs::write(blob("device.tpm.pub"), &saved[0]).unwrap();
    d.verify_fails(&[("primary.key.copies", &["device.tpm.priv", "does not load"])]);
    fs::write(blob("device.tpm.priv"), &saved[1]).unwrap();
    d.verify_passes();
    // verify flushed what it loaded: no transient objects left behind.
    let t = d.tpm();
    assert_eq!(t.transient_handles(), Vec::<u32>::new());
}

/// Our primary handle evicted behind the tool's back and another TPM user's key
/// persisted at the same handle: `verify` reports the mismatch, and `reset` removes
/// our blobs, our other handle and our files, but leaves that key alone.
#[cfg(feature = "tpm")]
#[test]
fn swtpm_reset_leaves_a_foreign_key_at_a_recorded_handle() {
    let Some(d) = provisioned(Kind::Swtpm) else {
        return;
    };
    let t = d.tpm();
    d.break_primary_key();
    t.foreign_key_at(PRIMARY_HANDLE, true);
    let foreign = t.public_pem(PRIMARY_HANDLE);
    d.verify_fails(&[("primary.key", &["0x81000010", "does not match"])]);
    let r = d.run(&["reset", "--yes"]).ok();
    assert!(
        r.stderr.contains("0x81000010") && r.stderr.contains("did not make"),
        "reset says why it left the handle:\n{r}"
    );
    let mut h = t.persistent_handles();
    h.sort();
    assert_eq!(
        h,
        [SRK, PRIMARY_HANDLE],
        "the foreign key must survive the reset"
    );
    assert_eq!(t.public_pem(PRIMARY_HANDLE), foreign);
    for f in [
        "device.tpm.pub",
        "device.tpm.priv",
        "device2.tpm.pub",
        "device2.tpm.priv",
    ] {
        assert!(!d.cert(f).exists(), "{f} left behind");
    }
    assert_eq!(d.fr.read(MANIFEST), d.fr.read(TEMPLATE));
}

/// The same on a token: our primary objects deleted behind the tool's back and a
/// foreign key pair created under the same label (another CKA_ID): `reset` removes
/// ours by label *and* id, so the foreign pair survives.
#[cfg(feature = "pkcs11")]
#[test]
fn softhsm_reset_leaves_a_foreign_key_under_our_label() {
    let Some(d) = provisioned(Kind::SoftHsm) else {
        return;
    };
    let s = d.token();
    for class in ["privkey", "pubkey", "cert"] {
        run_ok(
            s.pkcs11_tool()
                .args(["--delete-object", "--type", class])
                .args(["--label", "device-primary"]),
        );
    }
    s.foreign_keypair("device-primary", "4243");
    d.verify_fails(&[("primary.key", &["device-primary"])]);
    d.run(&["reset", "--yes"]).ok();
    assert_eq!(
        s.object_labels(),
        ["device-primary", "device-primary"],
        "the foreign pair must survive the reset"
    );
}

// ---------------------------------------------------------------------------------
// DPS registration through the device key (issue 16, DESIGN §3b), against the
// stand-in of tests/testsuite/common/dps.rs
// ---------------------------------------------------------------------------------

use common::dps::{Dps, Mode, HUB_A};

impl Device {
    /// `register` against `dps`, with its CA, with the fake `kanto-cm` in reach.
    fn register(&self, dps: &Dps, extra_env: &[(&str, &str)]) -> Run {
        let mut c = self.base_cmd();
        c.args([
            "register",
            "--dps-endpoint",
            &dps.endpoint(),
            "--dps-ca-file",
        ])
        .arg(&dps.ca_file);
        for (k, v) in extra_env {
            c.env(k, v);
        }
        Run::from(c.output().expect("run sdv-provision"))
    }

    /// Run without the harness's DPS endpoint, so the one the state recorded is used.
    fn run_recorded(&self, args: &[&str]) -> Run {
        Run::from(
            self.base_cmd()
                .env_remove("SDV_PROVISION_DPS_ENDPOINT")
                .arg("--no-restart")
                .args(args)
                .output()
                .expect("run sdv-provision"),
        )
    }

    fn hardware(&self) -> bool {
        self.kind() != Kind::File
    }

    fn primary_sha256(&self) -> String {
        field(&self.status(), "primary", "sha256_thumbprint").to_owned()
    }

    fn state_json(&self) -> Value {
        read_json(&self.cert("sdv-provision.state.json"))
    }
}

/// The cloud entries of the manifest: for a registered hardware key the hub's x509
/// connection string instead of ID_SCOPE; the file keystore keeps ID_SCOPE.
fn assert_manifest_cloud(d: &Device, hub: Option<&str>) {
    let m = read_json(&d.fr.p(MANIFEST));
    let cs = env_values(&m, "CONNECTION_STRING");
    let scope = env_values(&m, "ID_SCOPE");
    match hub {
        Some(h) if d.hardware() => {
            assert_eq!(cs, [format!("HostName={h};DeviceId={ETH0_ID};x509=true")]);
            assert!(scope.is_empty(), "{scope:?}");
        }
        _ => {
            assert!(cs.is_empty(), "{cs:?}");
            assert_eq!(scope, [GOOD_SCOPE]);
        }
    }
}

/// Registers `d` (already provisioned) with a fresh stand-in; checks the protocol.
fn register_and_check(d: &Device, dps: &Dps) {
    dps.expect_client(&d.cert("device.crt"));
    let r = d.register(dps, &[]).ok();
    assert_eq!(dps.violations(), Vec::<String>::new());
    assert_eq!(dps.client_thumbprints(), [d.primary_sha256()], "{r}");
    assert_eq!(
        dps.connections(),
        1,
        "one TLS connection for the PUT and the polls"
    );
    let reqs = dps.requests();
    assert_eq!(
        reqs.iter().map(|q| q.method.as_str()).collect::<Vec<_>>(),
        ["PUT", "GET"]
    );
    assert!(reqs[0].target.starts_with(&format!(
        "/{GOOD_SCOPE}/registrations/{ETH0_ID}/register?api-version="
    )));
    assert!(
        reqs[1].at - reqs[0].at >= std::time::Duration::from_millis(950),
        "Retry-After: 1 was not honoured"
    );
    let s = d.status();
    assert_eq!(s["cloud"]["assigned_hub"], HUB_A, "{s}");
    assert_eq!(s["cloud"]["assigned_device_id"], ETH0_ID);
    assert_manifest_cloud(d, Some(HUB_A));
}

/// `register` through the primary key on every keystore (ECDSA P-256, TLS 1.3): the
/// stand-in sees the primary's certificate on one connection; state, status and
/// manifest record the assignment. Again with the same assignment: nothing on disk
/// changes and nothing restarts. A new hub: manifest updated, connector restarted.
fn dps_register_records_the_assignment(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let before = d.status();
    assert_eq!(before["cloud"]["assigned_hub"], Value::Null, "{before}");
    assert_eq!(before["cloud"]["assigned_device_id"], Value::Null);
    assert_manifest_cloud(&d, None);
    let dps = Dps::start(Mode::Assigned);
    d.fr.clear_calls();
    register_and_check(&d, &dps);
    let restarted = !d.fr.calls().is_empty();
    assert_eq!(restarted, d.hardware(), "{:?}", d.fr.calls());
    d.verify_passes();

    let snap = d.fr.snapshot();
    d.fr.clear_calls();
    d.register(&dps, &[]).ok();
    assert_same_tree(&snap, &d.fr.snapshot(), "the same assignment again");
    assert_eq!(d.fr.calls(), Vec::<String>::new());

    dps.set_hub("hub-b.azure-devices.net");
    d.register(&dps, &[]).ok();
    assert_eq!(
        d.status()["cloud"]["assigned_hub"],
        "hub-b.azure-devices.net"
    );
    assert_manifest_cloud(&d, Some("hub-b.azure-devices.net"));
    if d.hardware() {
        assert!(
            d.fr.calls().iter().any(|c| c == REMOVE),
            "{:?}",
            d.fr.calls()
        );
    } else {
        assert_eq!(d.fr.calls(), Vec::<String>::new());
    }
}

/// RSA-2048 keys register with RSA-PSS (TLS 1.3) and PKCS#1 v1.5 (TLS 1.2).
fn dps_register_rsa_2048_tls13_and_tls12(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("rsa-2048");
    register_and_check(&d, &Dps::start(Mode::Assigned));
    let dps12 = Dps::start_tls12(Mode::Assigned);
    dps12.expect_client(&d.cert("device.crt"));
    d.register(&dps12, &[]).ok();
    assert_eq!(dps12.client_thumbprints(), [d.primary_sha256()]);
}

/// Every way a registration can fail: exit 1, one `error:` line saying what to do,
/// and the tree byte for byte as before.
fn dps_register_failures_change_nothing(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let timeout = [("SDV_PROVISION_DPS_TIMEOUT", "3")];
    let mut cases: Vec<(Mode, &str)> = vec![(Mode::NotEnrolled, "not enrolled")];
    if kind == Kind::File {
        cases.extend([
            (Mode::ServerError, "answered 503"),
            (
                Mode::Failed,
                "failed the registration (Custom allocation failed?with",
            ),
            (
                Mode::Assigning,
                "did not finish the registration within 3 s",
            ),
            (Mode::Malformed, "not a registration result"),
            (Mode::Slow, "did not finish the registration within 3 s"),
        ]);
    }
    let snap = d.fr.snapshot();
    for (mode, words) in cases {
        let dps = Dps::start(mode);
        dps.expect_client(&d.cert("device.crt"));
        let r = d.register(&dps, &timeout);
        let line = r.one_error(1);
        assert!(line.contains(words), "{mode:?}: {line}");
        assert!(
            line.contains("sdv-provision register") || line.contains("--dps"),
            "{line}"
        );
        assert_same_tree(&snap, &d.fr.snapshot(), &format!("{mode:?}"));
    }
    // DPS refuses the device certificate. Under TLS 1.3 it says so with an alert
    // after the client's handshake is over, so the tool may learn of it while
    // writing its request (a broken pipe) rather than reading: the message must
    // name the refusal either way. Several tries, because which comes first varies.
    let refusing = Dps::start(Mode::Assigned);
    refusing.expect_client(&d.cert("device2.crt"));
    for _ in 0..if kind == Kind::File { 12 } else { 2 } {
        let r = d.register(&refusing, &timeout);
        common::pin_file(
            &r.one_error(1),
            &[("[DPS]", refusing.endpoint())],
            "lifecycle/dps_certificate_refused",
        );
    }
    assert!(refusing.requests().is_empty());
    assert_same_tree(&snap, &d.fr.snapshot(), "certificate refused");
    // A server whose certificate the CA file does not vouch for.
    let dps = Dps::start(Mode::Assigned);
    let other = Dps::start(Mode::Assigned);
    let r = Run::from(
        d.base_cmd()
            .args([
                "register",
                "--dps-endpoint",
                &dps.endpoint(),
                "--dps-ca-file",
            ])
            .arg(&other.ca_file)
            .output()
            .unwrap(),
    );
    assert!(r.one_error(1).contains("not trusted"), "{r}");
    common::pin_file(
        &r.one_error(1),
        &[("[DPS]", dps.endpoint())],
        "lifecycle/dps_untrusted",
    );
    assert!(dps.requests().is_empty());
    // Nobody listening.
    let r = Run::from(d.base_cmd().arg("register").output().unwrap());
    assert!(
        r.one_error(1).contains("cannot reach DPS at 127.0.0.1:1"),
        "{r}"
    );
    common::pin_file(&r.one_error(1), &[], "lifecycle/dps_unreachable");
    assert_same_tree(&snap, &d.fr.snapshot(), "untrusted / unreachable");
}

/// `import-cert --role primary` of a registered identity registers the CA-issued
/// certificate at once, with its chain.
fn dps_import_cert_registers_the_new_primary(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let dps = Dps::start(Mode::Assigned);
    register_and_check(&d, &dps);
    let ca = Ca::new();
    let csr = ca.dir.path().join("device.csr");
    d.run(&["csr", "--role", "primary", "--out", csr.to_str().unwrap()])
        .ok();
    let issued = ca.sign(&csr, "issued", &["-days", "30"]);
    dps.reset_log();
    dps.expect_client(&issued);
    let r = d.run_recorded(&["import-cert", "--role", "primary", issued.to_str().unwrap()]);
    let primary = d.primary_sha256();
    assert_eq!(
        dps.client_thumbprints(),
        std::slice::from_ref(&primary),
        "{r}"
    );
    assert_eq!(dps.chain_lens(), [2], "the leaf and its CA");
    assert_eq!(d.state_json()["dps"]["assignment"]["thumbprint"], primary);
    // Nothing changed since: no registration.
    dps.reset_log();
    d.run_recorded(&["import-cert", "--role", "primary", issued.to_str().unwrap()])
        .ok();
    assert_eq!(dps.connections(), 0);
}

/// `provision` keeps the DPS assignment while the ID scope stays, and forgets it
/// under another ID scope (it was made under the old one); a hardware key then
/// registers again, here with a DPS that does not know the device yet.
fn dps_another_id_scope_forgets_the_assignment(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let dps = Dps::start(Mode::Assigned);
    register_and_check(&d, &dps);
    let r = d
        .run_recorded(&["provision", "--id-scope", GOOD_SCOPE])
        .ok();
    assert_eq!(d.status()["cloud"]["assigned_hub"], HUB_A, "{r}");
    assert_eq!(dps.connections(), 1, "kept, so not registered again: {r}");

    dps.set_mode(Mode::NotEnrolled);
    let r = d
        .run_recorded(&["provision", "--id-scope", "0ne00ABCDEF"])
        .ok();
    assert_eq!(d.status()["cloud"]["assigned_hub"], Value::Null, "{r}");
    assert_eq!(d.state_json()["dps"]["assignment"], Value::Null, "{r}");
    let tried = if d.hardware() { 2 } else { 1 };
    assert_eq!(dps.connections(), tried, "{r}");
}

mod dps {
    use super::*;
    on_every_keystore!(
        dps_another_id_scope_forgets_the_assignment,
        dps_import_cert_registers_the_new_primary,
        dps_register_records_the_assignment,
        dps_register_rsa_2048_tls13_and_tls12,
        dps_register_failures_change_nothing,
    );
}

/// `provision` with DPS and a hardware key registers by itself and records where;
/// not enrolled: exit 0, identity complete and verified, the next step printed;
/// `--no-register`: DPS is not contacted.
#[cfg(any(feature = "tpm", feature = "pkcs11"))]
fn dps_provision_registers_by_itself(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    let pending = Dps::start(Mode::NotEnrolled);
    let dps_flags = |dps: &Dps| {
        vec![
            "--dps-endpoint".to_string(),
            dps.endpoint(),
            "--dps-ca-file".into(),
            dps.ca_file.display().to_string(),
        ]
    };
    let mut args: Vec<String> = [
        "provision",
        "--id-scope",
        GOOD_SCOPE,
        "--algorithm",
        "ecdsa-p256",
    ]
    .map(String::from)
    .to_vec();
    let mut no_register = args.clone();
    no_register.push("--no-register".into());
    let r = d
        .run(&no_register.iter().map(String::as_str).collect::<Vec<_>>())
        .ok();
    assert!(r.stdout.contains("--no-register"), "{r}");
    d.run(&["reset", "--yes"]).ok();

    args.extend(dps_flags(&pending));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = d.run(&argv).ok();
    assert!(r.stdout.contains("az iot dps enrollment create"), "{r}");
    assert!(
        r.stdout.contains("then run `sdv-provision register`"),
        "{r}"
    );
    assert!(r.stderr.contains("not enrolled"), "{r}");
    assert!(r.stderr.contains("needs a key file for DPS"), "{r}");
    common::pin_file(
        &common::lines_with(&r.stderr, "DPS"),
        &[("[DPS]", pending.endpoint())],
        "lifecycle/dps_not_enrolled",
    );
    assert_eq!(pending.client_thumbprints(), [d.primary_sha256()]);
    let r = d.run(&["status"]).ok();
    assert!(
        r.stdout.contains("DPS assignment: not registered yet"),
        "{r}"
    );
    d.verify_passes();
    assert_eq!(d.status()["cloud"]["assigned_hub"], Value::Null);
    assert_eq!(d.state_json()["dps"]["endpoint"], pending.endpoint());

    // Enrolled now: a re-run registers (with the recorded endpoint and CA) and the
    // compatibility warning about DPS with a hardware key is gone.
    pending.set_mode(Mode::Assigned);
    let r = d.run_recorded(&["provision"]).ok();
    assert_eq!(d.status()["cloud"]["assigned_hub"], HUB_A, "{r}");
    assert!(!r.stderr.contains("needs a key file for DPS"), "{r}");
    assert_manifest_cloud(&d, Some(HUB_A));
    let r = d.run(&["status"]).ok();
    assert!(
        r.stdout
            .contains(&format!("DPS assignment: device {ETH0_ID} on hub {HUB_A}")),
        "{r}"
    );
    let snap = d.fr.snapshot();
    d.run_recorded(&["provision"]).ok();
    assert_same_tree(&snap, &d.fr.snapshot(), "provision again once registered");
    assert_eq!(
        pending.connections(),
        2,
        "a registered identity is not registered again"
    );
}

/// `rotate --promote` registers the new primary; when DPS refuses it, the run still
/// succeeds, says so, and keeps the recorded assignment.
#[cfg(any(feature = "tpm", feature = "pkcs11"))]
fn dps_promote_registers_the_new_primary(kind: Kind) {
    let Some(d) = Device::start(kind) else { return };
    d.provision("ecdsa-p256");
    let dps = Dps::start(Mode::Assigned);
    register_and_check(&d, &dps);
    dps.reset_log();
    d.run(&["rotate"]).ok();
    dps.expect_client(&d.cert("device2.crt"));
    d.run_recorded(&["rotate", "--promote"]).ok();
    let primary = d.primary_sha256();
    assert_eq!(dps.client_thumbprints(), std::slice::from_ref(&primary));
    assert_eq!(d.state_json()["dps"]["assignment"]["thumbprint"], primary);

    // DPS does not know the next primary: the promotion stands, the run says so.
    d.run(&["rotate"]).ok();
    let r = d.run_recorded(&["rotate", "--promote"]).ok();
    assert!(r.stderr.contains("not registered with DPS yet"), "{r}");
    // This line; the refusal's own line is pinned in dps_register_failures_change_nothing.
    common::pin_file(
        &common::lines_with(&r.stderr, "not registered with DPS yet"),
        &[],
        "lifecycle/dps_new_primary_not_registered",
    );
    assert!(r.stdout.contains("sdv-provision register"), "{r}");
    assert_eq!(d.status()["cloud"]["assigned_hub"], HUB_A);
    assert_manifest_cloud(&d, Some(HUB_A));
}

#[cfg(feature = "tpm")]
mod swtpm_dps {
    #[test]
    fn dps_provision_registers_by_itself() {
        super::dps_provision_registers_by_itself(super::Kind::Swtpm)
    }
    #[test]
    fn dps_promote_registers_the_new_primary() {
        super::dps_promote_registers_the_new_primary(super::Kind::Swtpm)
    }
}

#[cfg(feature = "pkcs11")]
mod softhsm_dps {
    #[test]
    fn dps_provision_registers_by_itself() {
        super::dps_provision_registers_by_itself(super::Kind::SoftHsm)
    }
    #[test]
    fn dps_promote_registers_the_new_primary() {
        super::dps_promote_registers_the_new_primary(super::Kind::SoftHsm)
    }
}

/// `register` needs a provisioned DPS identity: otherwise one error line, exit 1,
/// nothing touched.
#[test]
fn dps_register_needs_a_dps_identity() {
    let fr = FakeRoot::with_template();
    let r = fr.run(&["register"]);
    assert!(r.one_error(1).contains("not provisioned"), "{r}");
    fr.run(&[
        "--keystore",
        "file",
        "--no-restart",
        "--connection-string",
        &common::fake_root::hub_cs(ETH0_ID),
    ])
    .ok();
    let snap = fr.snapshot();
    let r = fr.run(&["register"]);
    assert!(r.one_error(1).contains("not through DPS"), "{r}");
    assert_same_tree(&snap, &fr.snapshot(), "register on a Hub identity");
    let r = fr.run(&["register", "--dps-endpoint", "https://x"]);
    assert!(r.one_error(1).contains("--dps-endpoint"), "{r}");
}
