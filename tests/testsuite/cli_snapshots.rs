//! Every user-facing error message, pinned (trycmd): the cases are `tests/cmd/*.toml`,
//! each with its expected `.stdout`/`.stderr` and, where it needs one, a scratch
//! `--root` in `NAME.in/` (run in a sandbox copy, so nothing on disk changes between
//! runs). None needs hardware: they are the bad-input paths, which fail before any
//! keystore is opened. `TRYCMD=overwrite cargo test --test testsuite cli_snapshots`
//! rewrites the snapshots after a deliberate change of wording.

#[test]
fn cli_snapshots() {
    trycmd::TestCases::new()
        .register_bin(
            "sdv-provision",
            std::path::Path::new(env!("CARGO_BIN_EXE_sdv-provision")),
        )
        .case("tests/cmd/*.toml");
}
