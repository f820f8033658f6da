//! Any text as a key URI: it parses and round-trips through its printed form, or
//! it is refused with an error that shows no PIN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::keystore::KeyUri;

fuzz_target!(|s: &str| {
    match s.parse::<KeyUri>() {
        Ok(uri) => {
            let printed = uri.to_string();
            let again: KeyUri = printed.parse().expect("a printed URI parses");
            assert_eq!(again, uri, "{printed}");
        }
        Err(e) => {
            // Every `pin-value` the error shows is the redacted one (perhaps cut
            // by the length limit, just before the closing quote).
            let e = e.to_string().to_ascii_lowercase();
            for (i, _) in e.match_indices("pin-value") {
                let shown = e[i..].split('"').next().unwrap_or_default();
                assert!(
                    shown.starts_with("pin-value=***") || "pin-value=***".starts_with(shown),
                    "the error shows a PIN: {e}"
                );
            }
        }
    }
});
