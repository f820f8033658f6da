//! Any bytes as the state file and as the journal: loaded into typed data or
//! refused with an error naming the file, never a panic (DESIGN §6 "State and
//! journal are validated input"). A loaded state saves and loads back the same.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdv_provision::identity::{Journal, State, JOURNAL_FILE};
use sdv_provision::paths::{Layout, STATE_FILE};

fn layout() -> &'static Layout {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    // On tmpfs where there is one: saving fsyncs, which on a disk would make each
    // execution take milliseconds.
    let dir = DIR.get_or_init(|| {
        tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temp dir")
    });
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let l = Layout::new(dir.path());
        std::fs::create_dir_all(l.host_cert_dir()).expect("the certificates dir");
        l
    })
}

fuzz_target!(|data: &[u8]| {
    let l = layout();
    let state = l.host_cert_file(STATE_FILE);
    std::fs::write(&state, data).unwrap();
    match State::load(l) {
        Ok(Some(s)) => {
            s.save(l).expect("a loaded state saves");
            let again = State::load(l)
                .expect("a saved state loads")
                .expect("present");
            assert_eq!(again, s);
        }
        Ok(None) => unreachable!("the file exists"),
        Err(e) => assert!(e.to_string().contains(STATE_FILE), "{e}"),
    }
    std::fs::write(l.host_cert_file(JOURNAL_FILE), data).unwrap();
    if let Err(e) = Journal::load(l) {
        assert!(e.to_string().contains(JOURNAL_FILE), "{e}");
    }
});
