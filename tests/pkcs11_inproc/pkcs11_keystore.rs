//! The PKCS#11 keystore against a real SoftHSM2 token, through the library API.
//!
//! Every algorithm: keys generated in the token with the right attributes, certificates
//! that `openssl verify` accepts and whose public key is the token's (read back
//! independently with `pkcs11-tool`), and a mutual-TLS handshake in which
//! `openssl s_client` loads the key through libp11 **by the URI the keystore reports**.
//! Then the failure paths SoftHSM can simulate, and cleanup.
#![cfg(feature = "pkcs11")]
use crate::common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::softhsm::{bool_attr, SoftHsm, USER_PIN};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use sdv_provision::cert::{self, CertInfo};
use sdv_provision::keystore::pkcs11::Pkcs11KeyStore;
use sdv_provision::keystore::{
    self, Algorithm, BlankToken, KeyRef, KeyStore, KeyStoreError, KeyUri, KeystoreConfig,
    Pkcs11Config, Pkcs11Uri, Role,
};
use sdv_provision::model::Slot;
use sdv_provision::paths::Layout;

/// DER namedCurve prime256v1, for foreign keys the tests make themselves.
const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Open as the commands do: log in, then the connector's PIN file for the purpose.
fn open(hsm: &SoftHsm, config: &Pkcs11Config) -> Result<Pkcs11KeyStore, KeyStoreError> {
    let layout = Layout::new(hsm.root());
    let mut ks = Pkcs11KeyStore::open(config, &layout)?;
    keystore::choose_pin_file(&mut ks, config, &layout)?;
    Ok(ks)
}

/// [`open`] must fail (`what` says what it must not have done); returns the error.
fn open_fails(hsm: &SoftHsm, config: &Pkcs11Config, what: &str) -> KeyStoreError {
    match open(hsm, config) {
        Ok(_) => panic!("{what}"),
        Err(e) => e,
    }
}

fn pk(uri: &KeyUri) -> &Pkcs11Uri {
    match uri {
        KeyUri::Pkcs11(u) => u,
        other => panic!("not a PKCS#11 URI: {other}"),
    }
}

/// One line, naming what is wrong; never the PIN.
fn assert_one_line(e: &KeyStoreError, must_contain: &[&str]) -> String {
    let msg = e.to_string();
    eprintln!("error message: {msg}");
    assert!(!msg.contains('\n'), "error spans lines: {msg}");
    assert!(!msg.contains(USER_PIN), "error shows the PIN: {msg}");
    for s in must_contain {
        assert!(msg.contains(s), "error {msg:?} should mention {s:?}");
    }
    msg
}

fn class_of(s: &Session, h: ObjectHandle) -> ObjectClass {
    match &s.get_attributes(h, &[AttributeType::Class]).unwrap()[..] {
        [Attribute::Class(c)] => *c,
        other => panic!("no class: {other:?}"),
    }
}

fn id_of(s: &Session, h: ObjectHandle) -> Vec<u8> {
    match &s.get_attributes(h, &[AttributeType::Id]).unwrap()[..] {
        [Attribute::Id(id)] => id.clone(),
        other => panic!("no id: {other:?}"),
    }
}

/// The public key the token holds for `uri`, as SPKI PEM, read by libp11 (the TLS
/// consumer's engine, not our code) and printed by `openssl pkey`.
fn token_public_key_pem(hsm: &SoftHsm, uri: &Pkcs11Uri) -> String {
    let public = uri.to_string().replace(";type=private", ";type=public");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "pkey", "-engine", "pkcs11", "-inform", "engine", "-pubin", "-pubout", "-in",
    ])
    .arg(&public);
    for (k, v) in hsm.openssl_env() {
        cmd.env(k, v);
    }
    String::from_utf8(common::run_ok(&mut cmd).stdout).unwrap()
}

/// The same, read by OpenSC's `pkcs11-tool` as DER and converted by `openssl pkey`.
fn token_public_key_pem_opensc(hsm: &SoftHsm, uri: &Pkcs11Uri, dir: &Path) -> String {
    let der = dir.join(format!("{}.pub.der", uri.object));
    common::run_ok(
        hsm.pkcs11_tool()
            .args([
                "--read-object",
                "--type",
                "pubkey",
                "--id",
                &hex::encode(&uri.id),
            ])
            .arg("--output-file")
            .arg(&der),
    );
    let out = common::run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubin", "-inform", "DER", "-in"])
            .arg(&der),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Provision both roles with `alg` (objects made on the token directly) and check
/// everything a consumer relies on.
fn full_cycle(alg: Algorithm) {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new(&format!("cycle-{alg}"));
    let layout = Layout::new(hsm.root());
    let mut uris = Vec::new();
    let mut certs = Vec::new();
    {
        let mut ks = open(&hsm, &hsm.config()).unwrap();
        for role in Role::ALL {
            let uri = ks.plan(Slot::live(role)).unwrap();
            assert_eq!(pk(&uri).object, format!("device-{role}"));
            assert_eq!(pk(&uri).id.len(), 16);
            assert_eq!(pk(&uri).token, hsm.label);
            let key = ks.generate(&uri, alg).unwrap();
            assert_eq!(key.alg(), alg);
            assert_eq!(key.uri(), uri);
            let pem = cert::self_signed(key.as_ref(), "52-54-21-4c-f9-5a", 30).unwrap();
            let path = layout.host_cert_file(&Slot::live(role).cert_file());
            let info = CertInfo::from_pem(&path, pem.as_bytes()).unwrap();
            assert_eq!(info.algorithm(), Some(alg));
            assert!(cert::key_matches(key.as_ref(), &info.spki).unwrap());
            drop(key);
            ks.attach_certificate(&uri, &info.der).unwrap();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &pem).unwrap();
            uris.push(uri);
            certs.push((path, info));
        }
        // The two identities never share an id.
        assert_ne!(pk(&uris[0]).id, pk(&uris[1]).id);
        // Attaching the same certificate again keeps the object (no rewrite).
        let s = hsm.session();
        let cert_of = |uri: &KeyUri| {
            s.find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Label(pk(uri).object.as_bytes().to_vec()),
            ])
            .unwrap()
        };
        let before = cert_of(&uris[0]);
        assert_eq!(before.len(), 1);
        ks.attach_certificate(&uris[0], &certs[0].1.der).unwrap();
        assert_eq!(
            cert_of(&uris[0]),
            before,
            "the certificate object was re-made"
        );
        // No session object is left behind, while the store's session still lives
        // (session objects are visible to every session of the process).
        assert_eq!(
            hsm.session()
                .find_objects(&[Attribute::Token(false)])
                .unwrap(),
            Vec::<ObjectHandle>::new(),
            "session objects left over"
        );

        // What the manifest and state file get.
        let KeyRef::Pkcs11 {
            uri,
            module,
            pin_file,
            mounts,
        } = ks.key_ref(&uris[0]).unwrap()
        else {
            panic!("not a PKCS#11 key ref")
        };
        assert_eq!(&uri, pk(&uris[0]));
        assert_eq!(module, hsm.store.module);
        assert_eq!(pin_file, PathBuf::from("/data/var/certificates/pkcs11.pin"));
        assert_eq!(
            mounts,
            vec![hsm.store.tokendir.clone(), hsm.store.conf.clone()]
        );
        let rec = ks.record().pkcs11().cloned().unwrap();
        assert_eq!(rec.module.as_ref(), Some(&hsm.store.module));
        assert_eq!(rec.token.as_deref(), Some(hsm.label.as_str()));
        assert_eq!(rec.pin_file.as_ref(), Some(&pin_file));
        assert_eq!(rec.mounts, mounts);
    }

    // The connector's PIN file: the PIN only (no newline), 0600.
    let pin_path = layout.host_cert_file("pkcs11.pin");
    assert_eq!(std::fs::read_to_string(&pin_path).unwrap(), USER_PIN);
    let meta = std::fs::metadata(&pin_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The objects, read back through cryptoki in a session of the test's own.
    {
        let s = hsm.session();
        for (uri, (_, info)) in uris.iter().zip(&certs) {
            let u = pk(uri);
            let objs = hsm.objects(&s, &u.object);
            assert_eq!(objs.len(), 3, "{uri}: private, public and certificate");
            for h in &objs {
                assert_eq!(id_of(&s, *h), u.id, "all three share the CKA_ID");
            }
            for h in objs {
                let b = |t| bool_attr(&s, h, t);
                match class_of(&s, h) {
                    ObjectClass::PRIVATE_KEY => {
                        assert_eq!(b(AttributeType::Token), Some(true));
                        assert_eq!(b(AttributeType::Private), Some(true));
                        assert_eq!(b(AttributeType::Sensitive), Some(true));
                        assert_eq!(b(AttributeType::Extractable), Some(false));
                        assert_eq!(b(AttributeType::Sign), Some(true));
                        assert_eq!(b(AttributeType::Decrypt), Some(false));
                        assert_eq!(b(AttributeType::Unwrap), Some(false));
                        assert_eq!(b(AttributeType::Derive), Some(false));
                        // Made in the token, never seen outside it.
                        assert_eq!(b(AttributeType::Local), Some(true));
                        assert_eq!(b(AttributeType::AlwaysSensitive), Some(true));
                        assert_eq!(b(AttributeType::NeverExtractable), Some(true));
                    }
                    ObjectClass::PUBLIC_KEY => {
                        assert_eq!(b(AttributeType::Token), Some(true));
                        assert_eq!(b(AttributeType::Verify), Some(true));
                    }
                    ObjectClass::CERTIFICATE => {
                        assert_eq!(b(AttributeType::Token), Some(true));
                        let value = s.get_attributes(h, &[AttributeType::Value]).unwrap();
                        assert_eq!(value, vec![Attribute::Value(info.der.clone())]);
                    }
                    other => panic!("unexpected object class {other}"),
                }
            }
        }
    }

    for (uri, (path, info)) in uris.iter().zip(&certs) {
        // Certificates: openssl accepts them, and their key is the token's key.
        common::openssl_verify(path);
        let cert_key = common::openssl_cert_pubkey(path);
        assert_eq!(
            cert_key,
            token_public_key_pem(&hsm, pk(uri)),
            "{uri}: certificate and token (read by libp11) disagree on the public key"
        );
        // A second reader, except for P-384: pkcs11-tool 0.23 (bookworm) fails to build
        // an EVP_PKEY for P-384 public keys ("cannot create EVP_PKEY").
        if alg != Algorithm::EcdsaP384 {
            assert_eq!(
                cert_key,
                token_public_key_pem_opensc(&hsm, pk(uri), hsm.dir.path()),
                "{uri}: certificate and token (read by pkcs11-tool) disagree on the public key"
            );
        }
        // Re-opening finds the key by URI, with its algorithm, and it still signs.
        let mut ks = open(&hsm, &hsm.config()).unwrap();
        let key = ks.open(uri).unwrap();
        assert_eq!(key.alg(), alg);
        assert!(cert::key_matches(key.as_ref(), &info.spki).unwrap());
    }

    // Re-opening does not rewrite an unchanged PIN file.
    assert_eq!(std::fs::metadata(&pin_path).unwrap().ino(), meta.ino());

    // A real consumer: s_client loads the key through libp11 by the URI we report,
    // with the PIN from our PIN file (pin-source, as in the manifest).
    let (cert_path, _) = &certs[0];
    let key_uri = pk(&uris[0]).with_pin_source(pin_path.to_str().unwrap());
    let env = hsm.openssl_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::mtls_handshake(
        hsm.dir.path(),
        cert_path,
        &["-engine", "pkcs11", "-keyform", "engine", "-key", &key_uri],
        true,
        &env,
    );
}

per_algorithm!(full_cycle:
    rsa_2048_full_cycle,
    rsa_3072_full_cycle,
    ecdsa_p256_full_cycle,
    ecdsa_p384_full_cycle,
);

/// Opening only logs in and keeps the PIN the token accepted; the connector's PIN
/// file is the command's step after it (`keystore::choose_pin_file`).
#[test]
fn open_only_logs_in_and_the_command_writes_the_pin_file() {
    use secrecy::ExposeSecret;
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("open-logs-in");
    let layout = Layout::new(hsm.root());
    let config = hsm.config();
    let mut ks = Pkcs11KeyStore::open(&config, &layout).unwrap();
    let ours = layout.host_cert_file("pkcs11.pin");
    assert!(
        !ours.exists(),
        "opening the token wrote the connector's PIN file"
    );
    assert_eq!(ks.record().pkcs11().unwrap().pin_file, None);
    let login = ks.connector_pin().expect("a PKCS#11 store keeps its login");
    assert_eq!(login.accepted().unwrap().expose_secret(), USER_PIN);
    keystore::choose_pin_file(&mut ks, &config, &layout).unwrap();
    // Chosen: the PIN itself is forgotten (the session stays logged in).
    assert!(ks.connector_pin().unwrap().accepted().is_none());
    assert_eq!(std::fs::read_to_string(&ours).unwrap(), USER_PIN);
    assert_eq!(
        ks.record().pkcs11().unwrap().pin_file,
        Some(PathBuf::from("/data/var/certificates/pkcs11.pin"))
    );
}

#[test]
fn wrong_pin_is_one_clear_error_and_does_not_lock() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("wrong-pin");
    let bad = hsm.dir.path().join("bad.pin");
    std::fs::write(&bad, "0000-wrong\n").unwrap();
    let mut config = hsm.config();
    config.pin_file = Some(bad);
    let e = open_fails(&hsm, &config, "a wrong PIN was accepted");
    assert!(matches!(e, KeyStoreError::Rejected { .. }), "{e:?}");
    let msg = assert_one_line(
        &e,
        &[
            "PIN was rejected",
            &hsm.label,
            "CKR_PIN_INCORRECT",
            "does not retry",
        ],
    );
    assert!(!msg.contains("0000-wrong"), "{msg}");
    // Nothing written, token not locked, and the right PIN still works.
    assert!(!Layout::new(hsm.root())
        .host_cert_file("pkcs11.pin")
        .exists());
    assert!(!hsm.token_info().user_pin_locked());
    open(&hsm, &hsm.config()).unwrap();
}

#[test]
fn missing_token_lists_the_labels_found() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("present-token");
    let mut config = hsm.config();
    config.token = Some("no-such-token".into());
    let e = open_fails(&hsm, &config, "opened a missing token");
    assert_one_line(
        &e,
        &[
            "no-such-token",
            "present-token",
            "--pkcs11-token",
            "--pkcs11-init-token",
        ],
    );
    common::pin_file(&e.to_string(), &[], "pkcs11_keystore/missing_token");
}

#[test]
fn missing_or_bogus_module_is_named() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("bogus-module");
    let mut config = hsm.config();

    config.module = None;
    let e = open_fails(&hsm, &config, "opened without a module");
    assert!(matches!(e, KeyStoreError::Unavailable { .. }), "{e:?}");
    assert_one_line(&e, &["--pkcs11-module", "PKCS11_MODULE_PATH"]);
    common::pin_file(&e.to_string(), &[], "pkcs11_keystore/no_module");

    let missing = hsm.dir.path().join("libmissing.so");
    config.module = Some(missing.clone());
    let e = open_fails(&hsm, &config, "opened a missing module");
    assert_one_line(
        &e,
        &[
            &missing.display().to_string(),
            "does not exist",
            "--pkcs11-module",
        ],
    );
    let dir = ("[DIR]", hsm.dir.path().display().to_string());
    common::pin_file(
        &e.to_string(),
        std::slice::from_ref(&dir),
        "pkcs11_keystore/missing_module",
    );

    let text = hsm.dir.path().join("not-a-module.so");
    std::fs::write(&text, "this is not a shared library\n").unwrap();
    config.module = Some(text.clone());
    let e = open_fails(&hsm, &config, "opened a text file as a module");
    assert_one_line(
        &e,
        &[
            &text.display().to_string(),
            "is not a PKCS#11 module",
            "--pkcs11-module",
        ],
    );
    common::pin_file(&e.to_string(), &[dir], "pkcs11_keystore/not_a_module");
}

#[test]
fn no_pin_source_names_the_flag_and_env() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("no-pin");
    let mut config = hsm.config();
    config.pin_file = None;
    let e = open_fails(&hsm, &config, "opened without a PIN");
    assert_one_line(
        &e,
        &[
            "non-interactive",
            "--pkcs11-pin-file",
            "SDV_PROVISION_PKCS11_PIN",
        ],
    );
    common::pin_file(&e.to_string(), &[], "pkcs11_keystore/no_pin_source");
}

#[test]
fn default_token_label_is_leda() {
    require_tools!(SoftHsm);
    let store = common::softhsm::store();
    let dir = tempfile::tempdir().unwrap();
    let config = Pkcs11Config {
        module: Some(store.module.clone()),
        pin_file: Some(store.dir.join("user.pin")),
        ..Pkcs11Config::default()
    };
    let ks = Pkcs11KeyStore::open(&config, &Layout::new(dir.path())).unwrap();
    assert_eq!(ks.token(), "leda");
}

#[test]
fn recorded_settings_are_used_without_flags() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("recorded");
    let record = open(&hsm, &hsm.config()).unwrap().record();
    // A later run (status, verify) with no PKCS#11 flags at all.
    let mut config = KeystoreConfig::default();
    config.set_recorded(&record);
    let ks = open(&hsm, &config.pkcs11).unwrap();
    assert_eq!(ks.token(), hsm.label);
}

#[test]
fn pin_file_inside_the_certificates_directory_is_used_as_is() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("pin-in-certdir");
    let layout = Layout::new(hsm.root());
    let own = layout.host_cert_file("token.pin");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::write(&own, format!("{USER_PIN}\n")).unwrap();
    let mut config = hsm.config();
    config.pin_file = Some(own);
    let mut ks = open(&hsm, &config).unwrap();
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    let KeyRef::Pkcs11 { pin_file, .. } = ks.key_ref(&uri).unwrap() else {
        panic!()
    };
    assert_eq!(pin_file, PathBuf::from("/data/var/certificates/token.pin"));
    assert!(!layout.host_cert_file("pkcs11.pin").exists());
}

#[test]
fn init_token_initialises_a_blank_slot_once() {
    require_tools!(SoftHsm);
    // SO PIN: the store set SDV_PROVISION_PKCS11_SO_PIN_FILE once for the binary.
    let store = common::softhsm::store();
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "4321-new\n").unwrap();
    let mut config = Pkcs11Config {
        module: Some(store.module.clone()),
        token: Some("initialised-by-us".into()),
        pin_file: Some(pin_file),
        ..Pkcs11Config::default()
    };
    let layout = Layout::new(dir.path().join("root"));
    // Without the flag: the token is missing.
    assert!(Pkcs11KeyStore::open(&config, &layout).is_err());
    config.blank_token = BlankToken::Initialise;
    let uri = {
        let _blank = common::softhsm::blank_slot_lock();
        let mut ks = Pkcs11KeyStore::open(&config, &layout).unwrap();
        let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
        ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
        uri
    };
    // Again with the flag: the token exists, so it is used, not wiped.
    let mut ks = Pkcs11KeyStore::open(&config, &layout).unwrap();
    assert_eq!(ks.open(&uri).unwrap().alg(), Algorithm::EcdsaP256);
}

/// A label is not a lock: a foreign object under it neither blocks planning nor is
/// touched by what this tool does with its own (CKA_ID-proven) objects.
#[test]
fn a_foreign_object_under_our_label_is_left_alone() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("occupied");
    let s = hsm.session();
    let foreign = s
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"device-primary".to_vec()),
            Attribute::Value(b"someone else's".to_vec()),
        ])
        .unwrap();
    let mut ks = open(&hsm, &hsm.config()).unwrap();
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
    assert_eq!(hsm.objects(&s, "device-primary").len(), 3);
    ks.remove(&uri).unwrap();
    // Ours are gone; the foreign object is untouched.
    assert_eq!(hsm.objects(&s, "device-primary"), vec![foreign]);
}

#[test]
fn remove_after_a_failed_step_leaves_no_orphans_and_spares_foreign_objects() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("cleanup");
    let mut ks = open(&hsm, &hsm.config()).unwrap();
    let keep = ks.plan(Slot::live(Role::Secondary)).unwrap();
    ks.generate(&keep, Algorithm::EcdsaP256).unwrap();
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    ks.generate(&uri, Algorithm::Rsa2048).unwrap();
    // Injected failure after the key exists: the certificate step fails...
    let Err(e) = ks.attach_certificate(&uri, b"not a certificate") else {
        panic!("stored garbage as a certificate")
    };
    assert_one_line(&e, &["certificate"]);
    let s = hsm.session();
    // ...foreign objects appear beside ours (same id other label, same label other id)...
    let id = pk(&uri).id.clone();
    let key_pair = |label: &[u8], id: &[u8]| {
        let common = [
            Attribute::Token(true),
            Attribute::Label(label.to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let mut public = common.to_vec();
        public.push(Attribute::EcParams(P256.to_vec()));
        let (p, q) = s
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &common)
            .unwrap();
        let mut both = vec![p, q];
        both.sort_by_key(|h| h.handle());
        both
    };
    let same_id = key_pair(b"someone-else", &id);
    let same_label = key_pair(b"device-primary", b"other-id");
    // ...and the caller cleans up, as the provisioning flow does.
    ks.remove(&uri).unwrap();
    ks.remove(&uri).unwrap(); // already gone: fine
    let sorted = |mut v: Vec<ObjectHandle>| {
        v.sort_by_key(|h| h.handle());
        v
    };
    assert_eq!(sorted(hsm.objects(&s, "device-primary")), same_label);
    assert_eq!(sorted(hsm.objects(&s, "someone-else")), same_id);
    assert_eq!(hsm.objects(&s, "device-secondary").len(), 2);
    assert!(matches!(ks.open(&uri), Err(KeyStoreError::NotFound { .. })));
    ks.open(&keep).unwrap();
}

#[test]
fn promote_copies_and_is_idempotent() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("promote");
    let mut ks = open(&hsm, &hsm.config()).unwrap();
    let make = |ks: &mut Pkcs11KeyStore, staged: bool| {
        let uri = ks
            .plan(Slot {
                role: Role::Primary,
                staged,
            })
            .unwrap();
        let key = ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
        let pem = cert::self_signed(key.as_ref(), "dev", 1).unwrap();
        drop(key);
        let info = CertInfo::from_pem(Path::new("x"), pem.as_bytes()).unwrap();
        ks.attach_certificate(&uri, &info.der).unwrap();
        (uri, info)
    };
    let (old, _) = make(&mut ks, false);
    let (next, next_cert) = make(&mut ks, true);
    assert_eq!(pk(&next).object, "device-primary.next");
    let handles = |label: &str| {
        let s = hsm.session();
        let mut h: Vec<_> = hsm.objects(&s, label).iter().map(|h| h.handle()).collect();
        h.sort();
        h
    };
    let staged = handles("device-primary.next");

    // The caller retires the old key first (by its CKA_ID); the move never sweeps
    // the live label.
    ks.remove(&old).unwrap();
    let live = ks.promote(&next, Role::Primary).unwrap();
    assert_eq!(pk(&live).object, "device-primary");
    assert_eq!(pk(&live).id, pk(&next).id);
    // Copied: new objects under the live label.
    assert!(handles("device-primary")
        .iter()
        .all(|h| !staged.contains(h)));
    let s = hsm.session();
    assert!(hsm.objects(&s, "device-primary.next").is_empty());
    let objs = hsm.objects(&s, "device-primary");
    assert_eq!(objs.len(), 3, "the staged key, public key and certificate");
    for h in objs {
        assert_eq!(id_of(&s, h), pk(&next).id, "the old primary was replaced");
        if class_of(&s, h) == ObjectClass::PRIVATE_KEY {
            // The moved key keeps what it was born with (it is copied, not re-made).
            let b = |t| bool_attr(&s, h, t);
            assert_eq!(b(AttributeType::Sensitive), Some(true));
            assert_eq!(b(AttributeType::Extractable), Some(false));
            assert_eq!(b(AttributeType::Decrypt), Some(false));
            assert_eq!(b(AttributeType::Local), Some(true));
            assert_eq!(b(AttributeType::AlwaysSensitive), Some(true));
            assert_eq!(b(AttributeType::NeverExtractable), Some(true));
        }
    }
    assert!(matches!(ks.open(&old), Err(KeyStoreError::NotFound { .. })));
    let key = ks.open(&live).unwrap();
    assert!(cert::key_matches(key.as_ref(), &next_cert.spki).unwrap());
    drop(key);
    // An interrupted run finishing the move: already done is fine.
    assert_eq!(ks.promote(&next, Role::Primary).unwrap(), live);
    assert_eq!(ks.promote(&live, Role::Primary).unwrap(), live);
    // A URI of another token is refused.
    let mut foreign = pk(&live).clone();
    foreign.token = "elsewhere".into();
    assert!(matches!(
        ks.remove(&KeyUri::Pkcs11(foreign)),
        Err(KeyStoreError::ForeignUri(_))
    ));
}

/// Root ignores directory modes, so the token directory is made immutable
/// (`chattr +i`, needs CAP_LINUX_IMMUTABLE) to simulate read-only token storage.
#[test]
fn read_only_token_storage_fails_cleanly_without_orphans() {
    require_tools!(SoftHsm, Chattr);
    let hsm = SoftHsm::new("read-only");
    let mut ks = open(&hsm, &hsm.config()).unwrap();
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    let token_dir = hsm.token_dir();

    let Some(guard) = common::tools::immutable(&token_dir) else {
        return;
    };
    // Root ignores a 0500 mode, but not the immutable flag: check it bites.
    assert!(std::fs::write(token_dir.join("probe"), b"x").is_err());

    let Err(e) = ks.generate(&uri, Algorithm::EcdsaP256) else {
        panic!("generated a key on read-only storage")
    };
    assert_one_line(&e, &[&hsm.label]);
    eprintln!("read-only token: {e}");
    drop(guard);
    // Nothing half-made stays behind, and the storage works again.
    let s = hsm.session();
    assert!(hsm.objects(&s, "device-primary").is_empty());
    drop(s);
    ks.generate(&uri, Algorithm::EcdsaP256).unwrap();
}

#[test]
fn foreign_uris_are_refused() {
    require_tools!(SoftHsm);
    let hsm = SoftHsm::new("foreign-uri");
    let mut ks = open(&hsm, &hsm.config()).unwrap();
    let file = KeyUri::File("/data/var/certificates/device.key".into());
    assert!(matches!(
        ks.generate(&file, Algorithm::EcdsaP256),
        Err(KeyStoreError::ForeignUri(_))
    ));
    assert!(matches!(
        ks.key_ref(&file),
        Err(KeyStoreError::ForeignUri(_))
    ));
}

#[test]
fn setup_token_script_makes_a_private_store() {
    require_tools!(SoftHsm);
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm/setup-token");
    let run = || {
        common::run_ok(
            Command::new(&script)
                .arg(dir.path())
                .arg("demo")
                .env_remove("SDV_PROVISION_PKCS11_PIN")
                .env_remove("SDV_PROVISION_PKCS11_SO_PIN"),
        )
    };
    let out = run();
    let exports = String::from_utf8_lossy(&out.stdout);
    let conf = dir.path().canonicalize().unwrap().join("softhsm2.conf");
    assert!(exports.contains(&format!("export SOFTHSM2_CONF='{}'", conf.display())));
    assert!(exports.contains("export PKCS11_MODULE_PATH="));
    let pin = dir.path().join("user.pin");
    assert_eq!(
        std::fs::metadata(&pin).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Re-running keeps the token (and its PIN).
    run();
    let slots = common::run_ok(
        Command::new("softhsm2-util")
            .arg("--show-slots")
            .env("SOFTHSM2_CONF", &conf),
    );
    let text = String::from_utf8_lossy(&slots.stdout);
    assert_eq!(text.matches("Label:            demo ").count(), 1, "{text}");
    // The generated PIN logs in (checked by pkcs11-tool, another PKCS#11 consumer).
    let pin_value = std::fs::read_to_string(&pin).unwrap();
    common::run_ok(
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(common::softhsm::module_path().unwrap())
            .args([
                "--token-label",
                "demo",
                "--login",
                "--list-objects",
                "--pin",
            ])
            .arg(pin_value.trim())
            .env("SOFTHSM2_CONF", &conf),
    );
}
