//! The TPM keystore against a real swtpm (one per test), checked by independent tools:
//! tpm2-tools (handles, public keys, blob loading), `openssl verify`, and a mutual-TLS
//! 1.3 handshake with the OpenSSL `tpm2` provider loading the key by its URI through
//! tpm2-abrmd.
#![cfg(feature = "tpm")]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::device::{Device, Kind};
use common::fake_root::FakeRoot;
use common::swtpm::{cert_file, Abrmd, Swtpm};
use sdv_provision::cert::{self, CertInfo};
use sdv_provision::keystore::tpm::TpmKeyStore;
use sdv_provision::keystore::{
    Algorithm, KeyRef, KeyStore, KeyStoreError, KeyUri, Role, TpmConfig,
};
use sdv_provision::model::Slot;
use sdv_provision::paths::Layout;

const SRK: u32 = 0x8100_0001;
const PRIMARY: u32 = 0x8100_0010;
const SECONDARY: u32 = 0x8100_0011;
const PRIMARY_STAGED: u32 = 0x8100_0110;

/// An empty device root with a swtpm of its own (`None` when a tool is missing on a
/// developer machine); the keystore runs in this process.
fn device() -> Option<Device> {
    Device::on(Kind::Swtpm, FakeRoot::bare)
}

fn config(tcti: &str) -> TpmConfig {
    TpmConfig {
        tcti: Some(tcti.into()),
        ..TpmConfig::default()
    }
}

fn open(tpm: &Swtpm, root: &Path) -> TpmKeyStore {
    TpmKeyStore::open(&config(&tpm.tcti()), &Layout::new(root)).expect("open the TPM keystore")
}

/// Make a key at the planned slot and a self-signed certificate through it; returns
/// the key URI and the certificate path.
fn provision(
    ks: &mut TpmKeyStore,
    root: &Path,
    slot: Slot,
    alg: Algorithm,
) -> (KeyUri, std::path::PathBuf) {
    let uri = ks.plan(slot).expect("plan");
    let key = ks.generate(&uri, alg).expect("generate");
    assert_eq!(key.uri(), uri);
    assert_eq!(key.alg(), alg);
    let pem = cert::self_signed(key.as_ref(), "dev-tpm-1", 30).expect("self-signed cert");
    let info = CertInfo::from_pem(Path::new("new"), pem.as_bytes()).unwrap();
    assert_eq!(info.algorithm(), Some(alg));
    assert!(cert::key_matches(key.as_ref(), &info.spki).unwrap());
    let stem = slot.stem();
    let path = cert_file(root, &format!("{stem}.crt"));
    std::fs::write(&path, pem).unwrap();
    (uri, path)
}

/// The keystore with the primary at `handle` (what `--tpm-primary-handle` sets) and
/// an ECDSA primary key made there.
fn primary_at(tpm: &Swtpm, root: &Path, handle: u32) -> (TpmKeyStore, KeyUri) {
    let mut cfg = config(&tpm.tcti());
    cfg.primary_handle = Some(handle);
    let mut ks = TpmKeyStore::open(&cfg, &Layout::new(root)).unwrap();
    let (uri, _) = provision(
        &mut ks,
        root,
        Slot::live(Role::Primary),
        Algorithm::EcdsaP256,
    );
    (ks, uri)
}

fn spki_of(cert_path: &Path) -> Vec<u8> {
    let pem = std::fs::read(cert_path).unwrap();
    CertInfo::from_pem(cert_path, &pem).unwrap().spki
}

fn tpm_pubkey_pem(tpm: &Swtpm, handle: u32) -> String {
    tpm.public_pem(handle)
}

fn tpm2_load_blobs(tpm: &Swtpm, root: &Path, stem: &str) {
    tpm.load_blobs(
        SRK,
        &cert_file(root, &format!("{stem}.tpm.pub")),
        &cert_file(root, &format!("{stem}.tpm.priv")),
    );
}

fn foreign_key_at(tpm: &Swtpm, handle: u32, signing: bool) {
    tpm.foreign_key_at(handle, signing);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Everything for one algorithm: both keys, handles, public keys, certs, blobs, and
/// re-opening the persisted keys in a new keystore.
fn algorithm_round_trip(alg: Algorithm) {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let (p_uri, p_crt) = provision(&mut ks, root, Slot::live(Role::Primary), alg);
    let (s_uri, s_crt) = provision(&mut ks, root, Slot::live(Role::Secondary), alg);
    assert_eq!(p_uri, KeyUri::TpmHandle(PRIMARY));
    assert_eq!(s_uri, KeyUri::TpmHandle(SECONDARY));
    assert_eq!(
        ks.key_ref(&p_uri).unwrap(),
        KeyRef::Tpm {
            handle: PRIMARY,
            srk: SRK,
            pub_blob: "/data/var/certificates/device.tpm.pub".into(),
            priv_blob: "/data/var/certificates/device.tpm.priv".into(),
        }
    );
    assert_eq!(ks.record().tpm().unwrap().srk, Some(SRK));
    // Both slots are ours now: planning them again is refused.
    assert!(matches!(
        ks.plan(Slot::live(Role::Primary)),
        Err(KeyStoreError::Occupied { .. })
    ));
    drop(ks); // swtpm serves one client at a time

    let handles = tpm.persistent_handles();
    for h in [SRK, PRIMARY, SECONDARY] {
        assert!(handles.contains(&h), "0x{h:08x} missing from {handles:x?}");
    }
    for (h, crt) in [(PRIMARY, &p_crt), (SECONDARY, &s_crt)] {
        assert_eq!(
            common::openssl_cert_pubkey(crt),
            tpm_pubkey_pem(tpm, h),
            "certificate key differs from the TPM's key at 0x{h:08x}"
        );
        common::openssl_verify(crt);
    }
    for stem in ["device", "device2"] {
        tpm2_load_blobs(tpm, root, stem);
        assert_eq!(mode(&cert_file(root, &format!("{stem}.tpm.priv"))), 0o600);
    }

    // A later run finds and reuses the same persistent keys.
    let mut ks = open(tpm, root);
    for (uri, crt) in [(&p_uri, &p_crt), (&s_uri, &s_crt)] {
        let key = ks.open(uri).expect("re-open the persisted key");
        assert_eq!(key.alg(), alg);
        assert!(cert::key_matches(key.as_ref(), &spki_of(crt)).unwrap());
    }
}

per_algorithm!(algorithm_round_trip:
    rsa_2048_round_trip,
    rsa_3072_round_trip,
    ecdsa_p256_round_trip,
    ecdsa_p384_round_trip,
);

/// The OpenSSL `tpm2` provider loads each key by its URI (`handle:0x…`) through
/// tpm2-abrmd and completes a mutual TLS 1.3 handshake (RSA-PSS for the RSA key,
/// ECDSA for the EC key), against a server that trusts only the device certificate.
#[test]
fn mutual_tls13_with_provider_through_abrmd() {
    let Some(d) = Device::swtpm_with_abrmd(FakeRoot::bare) else {
        return;
    };
    let tpm = d.tpm();
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let (p_uri, p_crt) = provision(&mut ks, root, Slot::live(Role::Primary), Algorithm::Rsa2048);
    let (s_uri, s_crt) = provision(
        &mut ks,
        root,
        Slot::live(Role::Secondary),
        Algorithm::EcdsaP256,
    );
    drop(ks);

    let abrmd = Abrmd::start(tpm);
    for (uri, crt) in [(&p_uri, &p_crt), (&s_uri, &s_crt)] {
        abrmd.mtls13(crt, crt, &uri.to_string());
    }
}

#[test]
fn occupied_foreign_handle_is_refused_and_left_intact() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    foreign_key_at(tpm, PRIMARY, true);
    let before = tpm_pubkey_pem(tpm, PRIMARY);
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let err = ks.plan(Slot::live(Role::Primary)).unwrap_err();
    assert!(matches!(err, KeyStoreError::Occupied { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("0x81000010") && msg.contains("--tpm-primary-handle"),
        "{msg}"
    );
    // generate() checks again, in case a caller skipped plan().
    assert!(matches!(
        ks.generate(&KeyUri::TpmHandle(PRIMARY), Algorithm::EcdsaP256),
        Err(KeyStoreError::Occupied { .. })
    ));
    // The other slot is free.
    assert_eq!(
        ks.plan(Slot::live(Role::Secondary)).unwrap(),
        KeyUri::TpmHandle(SECONDARY)
    );
    drop(ks);
    assert_eq!(tpm_pubkey_pem(tpm, PRIMARY), before);
    assert!(!cert_file(root, "device.tpm.pub").exists());

    // With another handle chosen (what --tpm-primary-handle sets), it works.
    let (_ks, uri) = primary_at(tpm, root, 0x8100_0020);
    assert_eq!(uri, KeyUri::TpmHandle(0x8100_0020));
}

#[test]
fn a_non_storage_key_at_the_srk_handle_is_refused() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    foreign_key_at(tpm, SRK, true);
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    let msg = match ks.generate(&uri, Algorithm::EcdsaP256) {
        Err(e @ KeyStoreError::Rejected { .. }) => e.to_string(),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("made a key under a signing key"),
    };
    assert!(
        msg.contains("0x81000001") && msg.contains("not a storage key"),
        "{msg}"
    );
    drop(ks);
    assert_eq!(tpm.persistent_handles(), vec![SRK]);
}

#[test]
fn unreachable_tcti_gives_one_clear_error() {
    // No TPM listens on this port.
    let tcti = format!("swtpm:host=127.0.0.1,port={}", common::free_port());
    let root = tempfile::tempdir().unwrap();
    let err = TpmKeyStore::open(&config(&tcti), &Layout::new(root.path()))
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, KeyStoreError::Unavailable { .. }), "{msg}");
    assert!(msg.contains(&tcti), "names the TCTI: {msg}");
    assert!(
        msg.contains("--tcti") && msg.contains("--keystore file"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains("nothing answers at 127.0.0.1:"),
        "says why: {msg}"
    );

    let err = TpmKeyStore::open(
        &config("device:/nonexistent/tpmrm0"),
        &Layout::new(root.path()),
    )
    .err()
    .expect("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("device:/nonexistent/tpmrm0") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn malformed_tcti_gives_one_clear_error() {
    let root = tempfile::tempdir().unwrap();
    for tcti in [
        "swtpm:path=/tmp/tpm.sock",
        "tpm:/dev/tpm0",
        "swtpm:port=banana",
    ] {
        let err = TpmKeyStore::open(&config(tcti), &Layout::new(root.path()))
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(matches!(err, KeyStoreError::Unavailable { .. }), "{msg}");
        assert!(
            msg.contains("malformed TCTI") && msg.contains(tcti),
            "{msg}"
        );
        assert!(
            msg.contains("--tcti") && msg.contains("--keystore file"),
            "{msg}"
        );
    }
}

/// A failure after the key was made (here: a symlink planted where the private blob
/// goes, which the atomic writer refuses) leaves no persistent handle and no blob.
#[test]
fn failure_after_create_leaves_no_orphans() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    let root = d.fr.path();
    let certs = cert_file(root, "");
    std::fs::create_dir_all(&certs).unwrap();
    let trap = cert_file(root, "device.tpm.priv");
    std::os::unix::fs::symlink("/dev/null", &trap).unwrap();

    let mut ks = open(tpm, root);
    let uri = ks.plan(Slot::live(Role::Primary)).unwrap();
    assert!(ks.generate(&uri, Algorithm::EcdsaP256).is_err());
    // The slot is free again: the key was evicted.
    assert_eq!(ks.plan(Slot::live(Role::Primary)).unwrap(), uri);
    drop(ks);
    assert_eq!(
        tpm.persistent_handles(),
        vec![SRK],
        "only the SRK may remain"
    );
    assert!(!cert_file(root, "device.tpm.pub").exists());
    assert!(
        trap.symlink_metadata().is_ok(),
        "a file we did not write stays"
    );

    std::fs::remove_file(&trap).unwrap();
    let mut ks = open(tpm, root);
    provision(
        &mut ks,
        root,
        Slot::live(Role::Primary),
        Algorithm::EcdsaP256,
    );
}

#[test]
fn remove_evicts_only_the_named_key() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    foreign_key_at(tpm, SECONDARY, true);
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let (uri, _) = provision(
        &mut ks,
        root,
        Slot::live(Role::Primary),
        Algorithm::EcdsaP256,
    );
    ks.remove(&uri).unwrap();
    ks.remove(&uri).expect("removing a missing key is fine");
    assert!(matches!(ks.open(&uri), Err(KeyStoreError::NotFound { .. })));
    assert!(matches!(
        ks.remove(&KeyUri::TpmHandle(SRK)),
        Err(KeyStoreError::Rejected { .. })
    ));
    drop(ks);
    let mut handles = tpm.persistent_handles();
    handles.sort();
    assert_eq!(handles, vec![SRK, SECONDARY]);
    assert!(!cert_file(root, "device.tpm.pub").exists());
    assert!(!cert_file(root, "device.tpm.priv").exists());
}

/// Rotation: a staged key (live handle + 0x100, `device.next.*` blobs) is built while
/// the old one stays live, then promoted; an interrupted promotion is finished by a
/// second call.
#[test]
fn promote_moves_a_staged_key_to_the_live_handle() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    let root = d.fr.path();
    let mut ks = open(tpm, root);
    let (old, _) = provision(
        &mut ks,
        root,
        Slot::live(Role::Primary),
        Algorithm::EcdsaP256,
    );
    let (staged, staged_crt) = provision(
        &mut ks,
        root,
        Slot::staged(Role::Primary),
        Algorithm::EcdsaP256,
    );
    assert_eq!(staged, KeyUri::TpmHandle(PRIMARY_STAGED));
    assert!(cert_file(root, "device.next.tpm.priv").exists());
    // Live slot taken: promote refuses to overwrite it.
    assert!(matches!(
        ks.promote(&staged, Role::Primary),
        Err(KeyStoreError::Occupied { .. })
    ));

    ks.remove(&old).unwrap(); // the caller retires the old key first
    let live = ks.promote(&staged, Role::Primary).unwrap();
    assert_eq!(live, KeyUri::TpmHandle(PRIMARY));
    let key = ks.open(&live).unwrap();
    assert!(cert::key_matches(key.as_ref(), &spki_of(&staged_crt)).unwrap());
    drop(key);
    assert!(matches!(
        ks.open(&staged),
        Err(KeyStoreError::NotFound { .. })
    ));
    assert!(!cert_file(root, "device.next.tpm.pub").exists());

    // Killed between evicting the staging slot and moving the blobs: finish it.
    for ext in ["pub", "priv"] {
        std::fs::rename(
            cert_file(root, &format!("device.tpm.{ext}")),
            cert_file(root, &format!("device.next.tpm.{ext}")),
        )
        .unwrap();
    }
    assert_eq!(ks.promote(&staged, Role::Primary).unwrap(), live);
    assert_eq!(
        ks.promote(&staged, Role::Primary).unwrap(),
        live,
        "idempotent"
    );
    drop(ks);

    let mut handles = tpm.persistent_handles();
    handles.sort();
    assert_eq!(handles, vec![SRK, PRIMARY]);
    assert_eq!(
        common::openssl_cert_pubkey(&staged_crt),
        tpm_pubkey_pem(tpm, PRIMARY)
    );
    tpm2_load_blobs(tpm, root, "device");
}

/// A key made at a handle chosen by flag, removed by a run without the flag (and
/// without a record of it): the handle is evicted and its blobs, found by their public
/// area, go too.
#[test]
fn remove_finds_the_blobs_of_a_handle_outside_the_configured_slots() {
    let Some(d) = device() else { return };
    let tpm = d.tpm();
    let root = d.fr.path();
    let (ks, uri) = primary_at(tpm, root, 0x8100_0030);
    assert_eq!(ks.record().tpm().unwrap().primary_handle, Some(0x8100_0030));
    drop(ks);
    let mut ks = open(tpm, root);
    ks.remove(&uri).unwrap();
    drop(ks);
    assert_eq!(tpm.persistent_handles(), vec![SRK]);
    assert!(!cert_file(root, "device.tpm.pub").exists());
    assert!(!cert_file(root, "device.tpm.priv").exists());
}
