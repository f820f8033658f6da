//! The test suite's DPS stand-in (tests/common/dps.rs) as a program, for
//! `scripts/bench`: answers "assigned" with `Retry-After: 0`, prints
//! `ENDPOINT CA_FILE` on one line, and serves until killed.
#[allow(dead_code)]
#[path = "../tests/common/dps.rs"]
mod dps;

fn main() {
    let dps = dps::Dps::start(dps::Mode::Assigned);
    dps.set_retry_after(0);
    println!("{} {}", dps.endpoint(), dps.ca_file.display());
    loop {
        std::thread::park();
    }
}
