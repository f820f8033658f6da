//! Any text as a connection string: it parses, or the error names no part of the
//! input beyond the key names it knows (DESIGN §6 "Never echo a secret").
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::cloud::ConnectionString;

/// Text an error may share with the input: the key names, as the errors write them
/// (`` the part after `HostName` has no `=` (expected HostName=VALUE) ``).
const VOCABULARY: &str = "`HostName` HostName=VALUE `DeviceId` DeviceId=VALUE \
    `SharedAccessKey` SharedAccessKey=VALUE `x509` x509=VALUE \
    `GatewayHostName` GatewayHostName=VALUE Key=Value";

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
