//! Any bytes as the state file and as the journal: parsed into typed, validated
//! data or refused with an error, never a panic (DESIGN §6 "State and journal are
//! validated input"). A state that parses serialises and parses back equal, and a
//! journal that parses serialises into one that parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdv_provision::identity::State;
use sdv_provision::txn::Journal;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = State::parse(data) {
        let text = serde_json::to_vec_pretty(&s).expect("a state serialises");
        assert_eq!(State::parse(&text).expect("a written state parses"), s);
    }
    if let Ok(j) = Journal::parse(data) {
        let text = serde_json::to_vec(&j).expect("a journal serialises");
        Journal::parse(&text).expect("a written journal parses");
    }
});
