//! The domain's words, without clap or a backend in them: the two roles, the key
//! algorithms, the keystore kinds, and the four key slots with the names each backend
//! gives a slot (files, PKCS#11 labels, TPM handles and blobs), and the choices two
//! switches make (`rotate --promote`, `reset --yes`). `cli.rs` maps its flags onto
//! these; the keystores, the commands and the transaction use them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The two identities Azure can roll over between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Primary, Role::Secondary];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backend holds the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeystoreKind {
    File,
    Tpm,
    Pkcs11,
}

impl KeystoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeystoreKind::File => "file",
            KeystoreKind::Tpm => "tpm",
            KeystoreKind::Pkcs11 => "pkcs11",
        }
    }
}

impl fmt::Display for KeystoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key algorithm; also fixes the certificate's signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Rsa2048,
        Algorithm::Rsa3072,
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP384,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rsa2048 => "rsa-2048",
            Algorithm::Rsa3072 => "rsa-3072",
            Algorithm::EcdsaP256 => "ecdsa-p256",
            Algorithm::EcdsaP384 => "ecdsa-p384",
        }
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, Algorithm::Rsa2048 | Algorithm::Rsa3072)
    }

    /// RSA modulus size in bits, or the curve's field size.
    pub fn bits(self) -> usize {
        match self {
            Algorithm::Rsa2048 => 2048,
            Algorithm::Rsa3072 => 3072,
            Algorithm::EcdsaP256 => 256,
            Algorithm::EcdsaP384 => 384,
        }
    }

    /// The certificate signature algorithm: RSA PKCS#1 v1.5 with SHA-256 (what every
    /// TLS stack and Azure accept), ECDSA with the curve's matching hash.
    pub fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Algorithm::Rsa2048 | Algorithm::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
            Algorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    /// Hash the to-be-signed data the way [`Algorithm::rcgen`]'s algorithm needs.
    pub fn digest(self, msg: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Algorithm::EcdsaP384 => sha2::Sha384::digest(msg).to_vec(),
            _ => sha2::Sha256::digest(msg).to_vec(),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown algorithm {s:?}"))
    }
}

/// One of the four key slots: a role, live or staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    pub role: Role,
    pub staged: bool,
}

impl Slot {
    /// The four slots: each role live, then staged.
    pub const ALL: [Slot; 4] = [
        Slot::live(Role::Primary),
        Slot::live(Role::Secondary),
        Slot::staged(Role::Primary),
        Slot::staged(Role::Secondary),
    ];

    pub const fn live(role: Role) -> Slot {
        Slot {
            role,
            staged: false,
        }
    }

    pub const fn staged(role: Role) -> Slot {
        Slot { role, staged: true }
    }

    /// File-name stem: `device` / `device2` as the original script named them, and
    /// `device.next` / `device2.next` for an identity being built while the old one
    /// is still in service (rotation, `--force`).
    pub fn stem(self) -> &'static str {
        match (self.role, self.staged) {
            (Role::Primary, false) => "device",
            (Role::Secondary, false) => "device2",
            (Role::Primary, true) => "device.next",
            (Role::Secondary, true) => "device2.next",
        }
    }

    /// The certificate's file name: `device.crt`, `device2.crt`, …
    pub fn cert_file(self) -> String {
        format!("{}.crt", self.stem())
    }

    /// The file keystore's key file name: `device.key`, …
    pub fn key_file(self) -> String {
        format!("{}.key", self.stem())
    }

    /// The TPM keystore's blob file names (public, private): `device.tpm.pub`, …
    pub fn tpm_blobs(self) -> (String, String) {
        let stem = self.stem();
        (format!("{stem}.tpm.pub"), format!("{stem}.tpm.priv"))
    }

    /// The TPM persistent handle, given the live handles in use: a staged key sits at
    /// its live handle + [`STAGED_OFFSET`].
    pub fn tpm_handle(self, primary: u32, secondary: u32) -> u32 {
        let live = match self.role {
            Role::Primary => primary,
            Role::Secondary => secondary,
        };
        if self.staged {
            live + STAGED_OFFSET
        } else {
            live
        }
    }

    /// The PKCS#11 label the slot's objects share.
    pub fn pkcs11_label(self) -> &'static str {
        match (self.role, self.staged) {
            (Role::Primary, false) => "device-primary",
            (Role::Secondary, false) => "device-secondary",
            (Role::Primary, true) => "device-primary.next",
            (Role::Secondary, true) => "device-secondary.next",
        }
    }
}

/// What `rotate` does before it makes a fresh secondary (`--promote`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Only replace the secondary; the primary stays.
    NewSecondary,
    /// The secondary becomes the primary first (the old primary goes).
    Promote,
}

/// Whether `reset` may remove the identity without asking (`--yes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// Ask on a terminal; refuse without one.
    Ask,
    /// Given on the command line.
    Given,
}

/// A staged TPM key sits at its live handle + this offset.
pub const STAGED_OFFSET: u32 = 0x100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        let names: Vec<_> = Slot::ALL
            .iter()
            .map(|s| {
                (
                    s.cert_file(),
                    s.key_file(),
                    s.tpm_blobs().1,
                    s.pkcs11_label(),
                )
            })
            .collect();
        assert_eq!(
            names[3],
            (
                "device2.next.crt".into(),
                "device2.next.key".into(),
                "device2.next.tpm.priv".into(),
                "device-secondary.next"
            )
        );
        assert_eq!(
            Slot::staged(Role::Primary).tpm_handle(0x8100_0010, 0x8100_0011),
            0x8100_0110
        );
        assert_eq!(
            Slot::live(Role::Secondary).tpm_handle(0x8100_0010, 0x8100_0011),
            0x8100_0011
        );
    }
}
