//! One scratch device on any keystore: the harness every end-to-end test shares.
//! A [`Device`] is a [`FakeRoot`] (Kanto manifest template, fake `kanto-cm` and
//! `systemctl`, a fake `eth0` whose MAC gives the device id `ETH0_ID`) plus one
//! backend ([`Kind`]): plain files, a private SoftHSM2 store, or a swtpm. It knows only
//! what differs between keystores: how to start one and the flags and environment the
//! binary needs. Area modules add their own `impl Device` blocks for what only they use.

use std::process::Command;

use serde_json::Value;

use super::fake_root::{FakeRoot, Run, GOOD_SCOPE};
#[cfg(feature = "pkcs11")]
use super::softhsm::PrivateStore;
#[cfg(feature = "tpm")]
use super::swtpm::Swtpm;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    #[cfg(feature = "pkcs11")]
    SoftHsm,
    #[cfg(feature = "tpm")]
    Swtpm,
}

pub enum Backend {
    File,
    #[cfg(feature = "pkcs11")]
    SoftHsm(PrivateStore),
    #[cfg(feature = "tpm")]
    Swtpm(Swtpm),
}

/// One scratch device (Kanto manifest template, fake `kanto-cm`/`systemctl`, a fake
/// `eth0` whose MAC gives the device id [`ETH0_ID`]) with its keystore.
pub struct Device {
    pub fr: FakeRoot,
    pub backend: Backend,
}

impl Device {
    /// `None` when a tool is missing on a developer machine (under `CI=true`,
    /// [`require_tools!`] panics instead).
    pub fn start(kind: Kind) -> Option<Device> {
        Device::on(kind, FakeRoot::with_template)
    }

    /// [`Device::start`] on a root of the test's own making (e.g.
    /// [`FakeRoot::with_manifest`]), made once the tools are known to be here.
    pub fn on(kind: Kind, root: impl FnOnce() -> FakeRoot) -> Option<Device> {
        require_tools!(Openssl => None);
        let backend = match kind {
            Kind::File => Backend::File,
            #[cfg(feature = "pkcs11")]
            Kind::SoftHsm => {
                require_tools!(SoftHsm => None);
                Backend::SoftHsm(PrivateStore::new("leda"))
            }
            #[cfg(feature = "tpm")]
            Kind::Swtpm => {
                require_tools!(Swtpm, Tpm2Tools => None);
                Backend::Swtpm(Swtpm::start())
            }
        };
        Some(Device {
            fr: root(),
            backend,
        })
    }

    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::File => Kind::File,
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(_) => Kind::SoftHsm,
            #[cfg(feature = "tpm")]
            Backend::Swtpm(_) => Kind::Swtpm,
        }
    }

    /// A swtpm device on `root` for a test that also needs tpm2-abrmd (the OpenSSL
    /// tpm2 provider reaches the TPM through it).
    #[cfg(feature = "tpm")]
    pub fn swtpm_with_abrmd(root: impl FnOnce() -> FakeRoot) -> Option<Device> {
        require_tools!(Abrmd => None);
        Device::on(Kind::Swtpm, root)
    }

    /// The swtpm of a [`Kind::Swtpm`] device.
    #[cfg(feature = "tpm")]
    pub fn tpm(&self) -> &Swtpm {
        match &self.backend {
            Backend::Swtpm(t) => t,
            _ => panic!("not a swtpm device"),
        }
    }

    /// The swtpm of a [`Kind::Swtpm`] device, to kill or restart it.
    #[cfg(feature = "tpm")]
    pub fn tpm_mut(&mut self) -> &mut Swtpm {
        match &mut self.backend {
            Backend::Swtpm(t) => t,
            _ => panic!("not a swtpm device"),
        }
    }

    /// The SoftHSM store of a [`Kind::SoftHsm`] device.
    #[cfg(feature = "pkcs11")]
    pub fn token(&self) -> &PrivateStore {
        match &self.backend {
            Backend::SoftHsm(s) => s,
            _ => panic!("not a SoftHSM device"),
        }
    }

    /// The binary with `--root` and the keystore's environment, but no flags: for
    /// tests that give the keystore flags themselves.
    pub fn env_cmd(&self) -> Command {
        let mut c = self.fr.cmd();
        #[cfg(feature = "pkcs11")]
        if let Backend::SoftHsm(s) = &self.backend {
            c.env_remove("SDV_PROVISION_PKCS11_SO_PIN")
                .env_remove("SDV_PROVISION_PKCS11_SO_PIN_FILE")
                .envs(s.env());
        }
        c
    }

    /// The binary with `--root`, the keystore flags and environment, non-interactive.
    pub fn base_cmd(&self) -> Command {
        let mut c = self.env_cmd();
        c.arg("--non-interactive");
        match &self.backend {
            Backend::File => {
                c.args(["--keystore", "file"]);
            }
            #[cfg(feature = "pkcs11")]
            Backend::SoftHsm(s) => {
                c.args(["--keystore", "pkcs11", "--pkcs11-module"])
                    .arg(&s.module)
                    .arg("--pkcs11-pin-file")
                    .arg(&s.pin_file);
            }
            #[cfg(feature = "tpm")]
            Backend::Swtpm(t) => {
                c.args(["--keystore", "tpm", "--tcti", &t.tcti()])
                    .env("TSS2_LOG", "all+none");
            }
        }
        c
    }

    /// Run with `--no-restart`.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(
            self.base_cmd()
                .arg("--no-restart")
                .args(args)
                .output()
                .expect("run sdv-provision"),
        )
    }

    /// Run with the fake `kanto-cm`/`systemctl` in reach, recording restarts.
    pub fn run_restarting(&self, args: &[&str]) -> Run {
        Run::from(
            self.base_cmd()
                .args(args)
                .output()
                .expect("run sdv-provision"),
        )
    }

    /// Provision (DPS) with `alg`; returns the `--json` report.
    pub fn provision(&self, alg: &str) -> Value {
        self.run(&[
            "--json",
            "provision",
            "--id-scope",
            GOOD_SCOPE,
            "--algorithm",
            alg,
        ])
        .ok()
        .json()
    }

    pub fn status(&self) -> Value {
        self.run(&["--json", "status"]).ok().json()
    }
}
