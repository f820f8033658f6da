//! Any text as a connection string: it parses, or the error names no part of the
//! input beyond the key names it knows (DESIGN §6 "Never echo a secret").
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::cloud::ConnectionString;

/// The fixed text of the parser's errors (src/cloud.rs, device_id::validate),
/// placeholders filled with every key name: an error may share these with the
/// input, nothing else.
const VOCABULARY: &str = "`HostName` HostName=VALUE `DeviceId` DeviceId=VALUE \
    `SharedAccessKey` SharedAccessKey=VALUE `x509` x509=VALUE \
    `GatewayHostName` GatewayHostName=VALUE \
    the connection string is not Key=Value with a known key (expected HostName, DeviceId, \
    SharedAccessKey, x509 or GatewayHostName, each as Key=Value, separated by ';') \
    the part after has no `=` (expected  SharedAccessKey is not base64 \
    the connection string contains non-ASCII characters \
    the connection string contains whitespace or control characters \
    the connection string has an empty segment (`;;` or a trailing `;`) \
    the connection string has no DeviceId the connection string has no HostName \
    the connection string is empty the connection string is over characters long \
    x509 may only be `true` appears twice in the connection string \
    has an empty value in the connection string is not a valid host name \
    DeviceId: the device id is empty the device id is characters long, at most are allowed \
    the device id contains ; only letters, digits and . _ : - are allowed \
    the device id must end with a letter, digit or '-' the device id contains \"..\"";

fuzz_target!(|s: &str| {
    match ConnectionString::parse(s) {
        Ok(cs) => {
            // The masked forms never carry the key.
            let shown = format!("{cs} {cs:?}");
            if let Some((_, key)) = s.split_once("SharedAccessKey=") {
                let key = key.split(';').next().unwrap_or_default();
                if key != "***" {
                    assert!(
                        !shown.contains(&format!("SharedAccessKey={key}")),
                        "{shown}"
                    );
                }
            }
            // What is stored is what was given.
            assert_eq!(cs.expose(), s);
        }
        Err(e) => {
            for w in s.as_bytes().windows(8) {
                let Ok(w) = std::str::from_utf8(w) else {
                    continue;
                };
                assert!(
                    !e.contains(w) || VOCABULARY.contains(w),
                    "the error repeats {w:?} of the input: {e}"
                );
            }
        }
    }
});
