//! The cloud backend: Azure DPS (ID scope) or a direct IoT Hub (connection string).

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::error::{Error, Fix, Result};
use crate::fsutil;
use crate::paths::{Layout, CONNECTION_STRING_FILE, ID_SCOPE_FILE};

pub const MAX_VALUE_LEN: usize = 1024;

/// Exactly one backend.
#[derive(Debug, Clone)]
pub enum Cloud {
    Dps { id_scope: String },
    Hub(ConnectionString),
}

impl Cloud {
    pub fn kind(&self) -> &'static str {
        match self {
            Cloud::Dps { .. } => "dps",
            Cloud::Hub(_) => "hub",
        }
    }

    /// The manifest env entry: `ID_SCOPE=…` or `CONNECTION_STRING=…`.
    pub fn env(&self) -> (&'static str, String) {
        match self {
            Cloud::Dps { id_scope } => ("ID_SCOPE", id_scope.clone()),
            Cloud::Hub(cs) => ("CONNECTION_STRING", cs.expose().to_owned()),
        }
    }

    /// The mode of a file that holds this configuration: [`fsutil::SECRET`] when
    /// it holds a secret (a SharedAccessKey), else [`fsutil::PUBLIC`].
    pub fn file_mode(&self) -> u32 {
        match self {
            Cloud::Hub(cs) if cs.shared_access_key => fsutil::SECRET,
            _ => fsutil::PUBLIC,
        }
    }
}

/// Check an ID scope: 1–64 ASCII alphanumerics. Returns a warning when it does not
/// look like Azure's `0ne` + 8 hex digits (not an error: Azure may change the format).
pub fn check_id_scope(s: &str) -> std::result::Result<Option<String>, String> {
    if s.is_empty() {
        return Err("the ID scope is empty".into());
    }
    if s.len() > 64 {
        return Err(format!(
            "the ID scope is {} characters long, at most 64 are allowed",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_alphanumeric()) {
        return Err(format!(
            "the ID scope contains {c:?}; only letters and digits are allowed"
        ));
    }
    let azure_shape = s.len() == 11
        && s[..3].eq_ignore_ascii_case("0ne")
        && s[3..].chars().all(|c| c.is_ascii_hexdigit());
    Ok((!azure_shape).then(|| {
        format!("ID scope {s:?} does not look like an Azure DPS scope (0ne + 8 hex digits); using it anyway")
    }))
}

/// A Hub device connection string. The raw text is a secret when it carries a
/// SharedAccessKey: it is kept in a [`SecretString`] and only `Display`ed masked.
#[derive(Clone)]
pub struct ConnectionString {
    raw: SecretString,
    pub host_name: String,
    pub device_id: String,
    pub shared_access_key: bool,
    pub x509: bool,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionString({self})")
    }
}

/// Masked form: the SharedAccessKey is never shown.
impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={};DeviceId={}", self.host_name, self.device_id)?;
        if self.shared_access_key {
            f.write_str(";SharedAccessKey=***")?;
        }
        if self.x509 {
            f.write_str(";x509=true")?;
        }
        Ok(())
    }
}

/// The whole connection string's length and character set; none of these errors
/// shows any part of it.
fn check_characters(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err("the connection string is empty".into());
    }
    if s.len() > MAX_VALUE_LEN {
        return Err(format!(
            "the connection string is over {MAX_VALUE_LEN} characters long"
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the connection string contains whitespace or control characters".into());
    }
    if !s.is_ascii() {
        return Err("the connection string contains non-ASCII characters".into());
    }
    Ok(())
}

/// Standard base64: alphabet `A-Za-z0-9+/`, at most two `=` of padding at the end.
fn is_base64(v: &str) -> bool {
    let b64 = v.trim_end_matches('=');
    v.len() - b64.len() <= 2
        && b64
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/'))
}

impl ConnectionString {
    /// Parse and validate. Error texts never repeat the SharedAccessKey.
    pub fn parse(s: &str) -> std::result::Result<ConnectionString, String> {
        check_characters(s)?;
        let (mut host, mut dev, mut key, mut x509) = (None, None, false, false);
        for (i, part) in s.split(';').enumerate() {
            // An empty segment (`;;`, a trailing `;`) is stored verbatim in the
            // manifest, where the connector's own parser would stumble on it.
            if part.is_empty() {
                return Err(
                    "the connection string has an empty segment (`;;` or a trailing `;`)".into(),
                );
            }
            // From here on an error names a key only once it is one of ours: a
            // malformed part may be the SharedAccessKey itself (DESIGN §6).
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| malformed_part(i, part))?;
            if !KEYS.contains(&k) {
                return Err(malformed_part(i, part));
            }
            if v.is_empty() {
                return Err(format!("{k} has an empty value in the connection string"));
            }
            let dup = |seen: bool| {
                if seen {
                    Err(format!("{k} appears twice in the connection string"))
                } else {
                    Ok(())
                }
            };
            match k {
                "HostName" => {
                    dup(host.is_some())?;
                    check_host(k, v)?;
                    host = Some(v.to_owned());
                }
                "DeviceId" => {
                    dup(dev.is_some())?;
                    crate::device_id::validate(v).map_err(|e| format!("DeviceId: {e}"))?;
                    dev = Some(v.to_owned());
                }
                "SharedAccessKey" => {
                    dup(key)?;
                    if !is_base64(v) {
                        return Err("SharedAccessKey is not base64".into());
                    }
                    key = true;
                }
                "x509" => {
                    dup(x509)?;
                    if !v.eq_ignore_ascii_case("true") {
                        return Err("x509 may only be `true`".into());
                    }
                    x509 = true;
                }
                _ => check_host(k, v)?,
            }
        }
        Ok(ConnectionString {
            raw: SecretString::from(s.to_owned()),
            host_name: host.ok_or("the connection string has no HostName")?,
            device_id: dev.ok_or("the connection string has no DeviceId")?,
            shared_access_key: key,
            x509,
        })
    }

    /// The full string, secret included: for the 0600 file and the manifest only.
    pub fn expose(&self) -> &str {
        self.raw.expose_secret()
    }
}

/// The keys a connection string may hold.
const KEYS: [&str; 5] = [
    "HostName",
    "DeviceId",
    "SharedAccessKey",
    "x509",
    "GatewayHostName",
];

/// The error for part `i` (0-based) whose key is not one of [`KEYS`] followed by
/// `=`. It names the part by position and the known key it starts with, never its
/// text: `SharedAccessKeyc2Vj…=` (the `=` forgotten) is the key itself.
fn malformed_part(i: usize, part: &str) -> String {
    let n = i + 1;
    match KEYS.iter().find(|k| part.starts_with(**k)) {
        Some(k) => format!(
            "part {n} of the connection string: the part after `{k}` has no `=` (expected {k}=VALUE)"
        ),
        None => format!(
            "part {n} of the connection string is not Key=Value with a known key (expected HostName, DeviceId, SharedAccessKey, x509 or GatewayHostName, each as Key=Value, separated by ';')"
        ),
    }
}

fn check_host(key: &str, v: &str) -> std::result::Result<(), String> {
    if v.len() > 253
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    {
        return Err(format!("{key} is not a valid host name"));
    }
    Ok(())
}

/// Build the cloud backend from flag values (at most one may be given; clap enforces it).
pub fn from_flags(
    id_scope: Option<&str>,
    connection_string: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Option<Cloud>> {
    if let Some(s) = id_scope {
        if let Some(w) =
            check_id_scope(s).map_err(|e| Error::input(e, "pass a valid --id-scope"))?
        {
            warnings.push(w);
        }
        return Ok(Some(Cloud::Dps {
            id_scope: s.to_owned(),
        }));
    }
    if let Some(s) = connection_string {
        let cs = ConnectionString::parse(s)
            .map_err(|e| {
                Error::input(
                    e,
                    "pass a valid connection string (--connection-string, --connection-string-file or env SDV_PROVISION_CONNECTION_STRING)",
                )
            })?;
        return Ok(Some(Cloud::Hub(cs)));
    }
    Ok(None)
}

/// Read a file that may hold a connection string, trimmed. Every copy of its bytes
/// is zeroized on drop (a non-UTF-8 file too); the error names the file, never its
/// content.
pub fn read_secret_text(path: &std::path::Path) -> Result<Option<Zeroizing<String>>> {
    let Some(bytes) = fsutil::read_optional(path)?.map(Zeroizing::new) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        Error::input(
            format!("{} is not UTF-8 text", path.display()),
            "write the connection string as text into the file",
        )
    })?;
    Ok(Some(Zeroizing::new(text.trim().to_owned())))
}

/// The backend configured on disk, if any.
pub fn load(layout: &Layout) -> Result<Option<Cloud>> {
    let scope_path = layout.host_cert_file(ID_SCOPE_FILE);
    let cs_path = layout.host_cert_file(CONNECTION_STRING_FILE);
    let scope = fsutil::read_optional_string(&scope_path)?;
    let cs = read_secret_text(&cs_path)?;
    match (scope, cs) {
        (Some(_), Some(_)) => Err(Error::input(
            format!(
                "both {} and {} exist",
                scope_path.display(),
                cs_path.display()
            ),
            format!("remove the one you do not want, or {}", Fix::Reset),
        )),
        (Some(s), None) => {
            let s = s.trim();
            check_id_scope(s).map_err(|e| {
                Error::input(format!("{}: {e}", scope_path.display()), Fix::FixCloudFile)
            })?;
            Ok(Some(Cloud::Dps {
                id_scope: s.to_owned(),
            }))
        }
        (None, Some(s)) => {
            let cs = ConnectionString::parse(&s).map_err(|e| {
                Error::input(format!("{}: {e}", cs_path.display()), Fix::FixCloudFile)
            })?;
            Ok(Some(Cloud::Hub(cs)))
        }
        (None, None) => Ok(None),
    }
}

/// Write the backend's file (and remove the other kind's).
pub fn save(layout: &Layout, cloud: &Cloud) -> Result<()> {
    let scope_path = layout.host_cert_file(ID_SCOPE_FILE);
    let cs_path = layout.host_cert_file(CONNECTION_STRING_FILE);
    match cloud {
        Cloud::Dps { id_scope } => {
            fsutil::atomic_write(
                &scope_path,
                format!("{id_scope}\n").as_bytes(),
                fsutil::PUBLIC,
            )?;
            fsutil::remove_file(&cs_path)
        }
        Cloud::Hub(cs) => {
            let text = zeroize::Zeroizing::new(format!("{}\n", cs.expose()));
            fsutil::atomic_write(&cs_path, text.as_bytes(), fsutil::SECRET)?;
            fsutil::remove_file(&scope_path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_scopes() {
        assert_eq!(check_id_scope("0ne0012345A"), Ok(None));
        assert!(check_id_scope("example").unwrap().is_some());
        for bad in ["", "a b", "a\"b", "a;b", "a\nb", "é", &"a".repeat(65)] {
            assert!(check_id_scope(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connection_strings() {
        let cs = ConnectionString::parse(
            "HostName=hub.azure-devices.net;DeviceId=dev1;SharedAccessKey=c2VjcmV0c2VjcmV0==",
        )
        .unwrap();
        assert_eq!(cs.host_name, "hub.azure-devices.net");
        assert_eq!(cs.device_id, "dev1");
        assert!(!cs.to_string().contains("c2Vj"));
        assert!(!format!("{cs:?}").contains("c2Vj"));
        assert!(
            ConnectionString::parse("HostName=h;DeviceId=d;x509=true")
                .unwrap()
                .x509
        );
        for bad in [
            "",
            "HostName=h",
            "DeviceId=d",
            "HostName=h;DeviceId=d;SharedAccessKey=not base64",
            "HostName=h;DeviceId=d\"",
            "HostName=h;DeviceId=d\n",
            "HostName=h;DeviceId=d;Foo=bar",
            "HostName=h;HostName=i;DeviceId=d",
            "HostName=h\";DeviceId=d",
            "HostName=h;DeviceId=d;GatewayHostName=g\"w",
            "HostName=h;DeviceId=d;SharedAccessKey=a%b",
        ] {
            assert!(ConnectionString::parse(bad).is_err(), "{bad:?}");
        }
        let err =
            ConnectionString::parse("HostName=h;DeviceId=d;SharedAccessKey=sec!ret").unwrap_err();
        assert!(!err.contains("sec!ret"));
    }

    /// Before: the `=` after the key name missing, the part was split at the key's
    /// own padding and the error printed 43 of its 44 characters.
    #[test]
    fn malformed_parts_name_the_field_not_the_value() {
        let key = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";
        for bad in [
            format!("HostName=h;DeviceId=d;SharedAccessKey{key}"),
            format!("HostName=h;DeviceId=d;SharedAccessKey{key}="),
            format!("HostName=h;DeviceId=d;{key}"),
            format!("HostName=h;DeviceId=d;Shared{key}"),
            format!("HostName=h;DeviceId=d;SharedAccessKey:{key}"),
        ] {
            let err = ConnectionString::parse(&bad).unwrap_err();
            for w in key.as_bytes().windows(8) {
                assert!(!err.contains(std::str::from_utf8(w).unwrap()), "{err}");
            }
        }
        let err = ConnectionString::parse(&format!("HostName=h;DeviceId=d;SharedAccessKey{key}"))
            .unwrap_err();
        assert!(
            err.contains("the part after `SharedAccessKey` has no `=`"),
            "{err}"
        );
    }
}
