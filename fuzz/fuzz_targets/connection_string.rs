//! Any text as a connection string: it parses, or the error names no part of the
//! input beyond the key names it knows (DESIGN §6 "Never echo a secret").
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::cloud::ConnectionString;

/// Words an error may repeat from the input.
const VOCABULARY: &str = "HostName DeviceId SharedAccessKey x509 GatewayHostName";

fuzz_target!(|s: &str| {
    match ConnectionString::parse(s) {
        Ok(cs) => {
            let shown = format!("{cs} {cs:?}");
            assert!(!shown.contains("SharedAccessKey=") || shown.contains("SharedAccessKey=***"));
            if let Some((_, key)) = s.split_once("SharedAccessKey=") {
                let key = key.split(';').next().unwrap_or_default();
                if key.len() >= 8 && !VOCABULARY.contains(key) {
                    assert!(!shown.contains(key), "{shown}");
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
