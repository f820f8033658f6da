//! Key URIs: how consumers name a device key.
//!
//! - `file:/var/certificates/device.key` — a PKCS#8 PEM file;
//! - `handle:0x81000010` — a TPM persistent handle (OpenSSL `tpm2` provider syntax);
//! - `pkcs11:token=leda;object=device-primary;id=%01%02;type=private` — RFC 7512.
//!   No `slot-id` (SoftHSM renumbers slots between processes) and no `module-path`
//!   (libp11 rejects both); the manifest form adds `?pin-source=file:…`.
//!
//! The URI is data: it parses and prints, and the two round-trip.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// RFC 3986 unreserved characters stay as they are; everything else is `%XX`.
const PK11_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUri {
    File(PathBuf),
    TpmHandle(u32),
    Pkcs11(Pkcs11Uri),
}

/// An RFC 7512 URI naming one private key object in a token found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: String,
    pub object: String,
    pub id: Vec<u8>,
}

impl Pkcs11Uri {
    /// The URI with a PIN source for the connector: `…?pin-source=file:<path>`.
    /// A PIN *value* is never put into a URI we write.
    pub fn with_pin_source(&self, pin_file: &str) -> String {
        format!(
            "{self}?pin-source={}",
            utf8_percent_encode(&format!("file:{pin_file}"), PIN_SOURCE_ENCODE)
        )
    }
}

/// `pin-source` is a query value: keep `:` and `/` readable, encode the rest.
const PIN_SOURCE_ENCODE: &AsciiSet = &PK11_ENCODE.remove(b':').remove(b'/');

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pkcs11:token={};object={};id=",
            utf8_percent_encode(&self.token, PK11_ENCODE),
            utf8_percent_encode(&self.object, PK11_ENCODE)
        )?;
        for b in &self.id {
            write!(f, "%{b:02X}")?;
        }
        f.write_str(";type=private")
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyUri::File(p) => write!(f, "file:{}", p.display()),
            KeyUri::TpmHandle(h) => write!(f, "handle:0x{h:08x}"),
            KeyUri::Pkcs11(u) => u.fmt(f),
        }
    }
}

/// Why a key URI did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key URI {uri:?}: {why}")]
pub struct KeyUriError {
    pub uri: String,
    pub why: &'static str,
}

/// A URI fit for an error message, whatever its scheme (it may be misspelt): it
/// loses its query (RFC 7512 puts `pin-value` there) and any attribute that
/// mentions `pin-value`; at most 256 characters.
fn redacted(s: &str) -> String {
    let shown = {
        let path = s.split_once('?').map_or(s, |(p, _)| p);
        let attrs: Vec<&str> = path
            .split(';')
            .map(|a| {
                if a.to_ascii_lowercase().contains("pin-value") {
                    "pin-value=***"
                } else {
                    a
                }
            })
            .collect();
        let q = if path.len() < s.len() { "?…" } else { "" };
        format!("{}{q}", attrs.join(";"))
    };
    shown.chars().take(256).collect()
}

impl FromStr for KeyUri {
    type Err = KeyUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| KeyUriError {
            uri: redacted(s),
            why,
        };
        if let Some(path) = s.strip_prefix("file:") {
            if !path.starts_with('/') {
                return Err(err("a file URI needs an absolute path"));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(err("a file URI may not contain `..`"));
            }
            return Ok(KeyUri::File(PathBuf::from(path)));
        }
        if let Some(h) = s.strip_prefix("handle:") {
            let hex = h
                .strip_prefix("0x")
                .or_else(|| h.strip_prefix("0X"))
                .ok_or_else(|| err("a TPM handle is written 0x8100xxxx"))?;
            let v = u32::from_str_radix(hex, 16).map_err(|_| err("bad hex in TPM handle"))?;
            if v >> 24 != 0x81 {
                return Err(err("not a persistent TPM handle (0x81xxxxxx)"));
            }
            return Ok(KeyUri::TpmHandle(v));
        }
        if let Some(rest) = s.strip_prefix("pkcs11:") {
            let path = rest.split_once('?').map_or(rest, |(p, _query)| p);
            let (mut token, mut object, mut id) = (None, None, None);
            for attr in path.split(';').filter(|a| !a.is_empty()) {
                let (k, v) = attr
                    .split_once('=')
                    .ok_or_else(|| err("a PKCS#11 URI attribute needs `=`"))?;
                let decoded = || percent_decode_str(v).collect::<Vec<u8>>();
                let text =
                    || String::from_utf8(decoded()).map_err(|_| err("attribute is not UTF-8"));
                match k {
                    "token" => token = Some(text()?),
                    "object" => object = Some(text()?),
                    "id" => id = Some(decoded()),
                    "type" if v == "private" => {}
                    "type" => return Err(err("only type=private names a device key")),
                    "slot-id" | "module-path" => {
                        return Err(err(
                            "slot-id and module-path are not supported (libp11 rejects them)",
                        ))
                    }
                    _ => {}
                }
            }
            return Ok(KeyUri::Pkcs11(Pkcs11Uri {
                token: token.ok_or_else(|| err("missing token="))?,
                object: object.ok_or_else(|| err("missing object="))?,
                id: id
                    .filter(|i| !i.is_empty())
                    .ok_or_else(|| err("missing id="))?,
            }));
        }
        Err(err("expected file:, handle: or pkcs11:"))
    }
}

impl serde::Serialize for KeyUri {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyUri {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "file:/data/var/certificates/device.key",
            "handle:0x81000010",
            "pkcs11:token=leda;object=device-primary;id=%01%AB;type=private",
            "pkcs11:token=my%20token;object=a%3Bb%3Dc;id=%00;type=private",
        ] {
            let u: KeyUri = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
    }

    #[test]
    fn pkcs11_encodes_separators() {
        let u = Pkcs11Uri {
            token: "a;b".into(),
            object: "x=y?z".into(),
            id: vec![0xde, 0xad],
        };
        let s = u.to_string();
        assert_eq!(
            s,
            "pkcs11:token=a%3Bb;object=x%3Dy%3Fz;id=%DE%AD;type=private"
        );
        assert_eq!(s.parse::<KeyUri>().unwrap(), KeyUri::Pkcs11(u.clone()));
        assert_eq!(
            u.with_pin_source("/var/certificates/pkcs11.pin"),
            format!("{s}?pin-source=file:/var/certificates/pkcs11.pin")
        );
    }

    #[test]
    fn rejects() {
        for s in [
            "",
            "handle:81000010",
            "handle:0x01000010",
            "handle:0xzz",
            "file:relative",
            "file:/a/../b",
            "pkcs11:token=a;object=b",
            "pkcs11:token=a;object=b;id=%01;slot-id=1",
            "pkcs11:token=a;object=b;id=%01;type=public",
            "http://x",
        ] {
            assert!(s.parse::<KeyUri>().is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn handle_prints_lower_hex() {
        assert_eq!(
            KeyUri::TpmHandle(0x8100_0011).to_string(),
            "handle:0x81000011"
        );
    }

    /// A malformed PKCS#11 URI carrying a PIN: the error shows neither.
    #[test]
    fn errors_never_show_a_pin_value() {
        for bad in [
            "pkcs11:token=t;object=o;pin-value=s3cr3t-PIN;type=public",
            "pkcs11:token=t;object=o;type=public?pin-value=s3cr3t-PIN",
            "pkcs11:token=t;PIN-VALUE=s3cr3t-PIN;nokey",
            "pk1sc1:token=leda;object=o;pin-value=s3cr3t-PIN;type=public",
            "PKCS11:pin-value=s3cr3t-PIN",
            "file:x;pin-value=s3cr3t-PIN",
            "pkcs11:token=t;oj=o=pin-value=s3cr3t-PIN;type=public",
        ] {
            let e = bad.parse::<KeyUri>().unwrap_err().to_string();
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
