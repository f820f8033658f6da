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
            let e = e.to_string();
            if let Some(i) = s.to_ascii_lowercase().find("pin-value=") {
                let pin: String = s[i + 10..]
                    .chars()
                    .take_while(|c| *c != ';' && *c != '?')
                    .collect();
                if pin.len() >= 4 && pin != "***" {
                    assert!(!e.contains(&pin), "the error shows the PIN: {e}");
                }
            }
        }
    }
});
