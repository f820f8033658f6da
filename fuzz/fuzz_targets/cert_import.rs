//! Any bytes as the PEM file given to `import-cert` (leaf, then chain): parsed or
//! refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::cert::CertInfo;

fuzz_target!(|pem: &[u8]| {
    if let Ok(c) = CertInfo::from_pem(std::path::Path::new("/fuzz/import.crt"), pem) {
        // What the reports print from it must work.
        let _ = (c.algorithm(), c.not_after_rfc3339(), c.is_current());
        assert_eq!(c.sha1.len(), 40);
    }
});
