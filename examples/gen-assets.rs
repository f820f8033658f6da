//! Writes the man pages and shell completions for `sdv-provision` into a directory,
//! generated from the clap definitions in `src/cli.rs` (never written by hand).
//!
//! ```text
//! cargo run --example gen-assets -- <outdir>
//! ```
//!
//! Layout (what `[package.metadata.deb]` in Cargo.toml packages from `target/assets/`):
//!
//! ```text
//! <outdir>/man/sdv-provision.1             main page
//! <outdir>/man/sdv-provision-<sub>.1       one page per subcommand
//! <outdir>/completions/sdv-provision.bash
//! <outdir>/completions/_sdv-provision      zsh
//! <outdir>/completions/sdv-provision.fish
//! ```
//!
//! An example rather than a build script or a hidden subcommand: clap_mangen and
//! clap_complete stay dev-dependencies, so the shipped binary carries neither, and
//! `cargo test --all-targets` / `cargo clippy --all-targets` already compile and lint
//! this file with the same dependency build the tests use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use sdv_provision::cli::Cli;

const BIN: &str = "sdv-provision";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example gen-assets -- <outdir>");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: gen-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Generates every asset under `out` and returns the paths written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();

    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir)?;
    // One page for the command and one per subcommand (sdv-provision-status.1, ...).
    // The command is passed unbuilt: generate_to disables the `help` subcommand
    // before building, so no sdv-provision-help.1 appears.
    clap_mangen::generate_to(Cli::command(), &man_dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    written.extend(pages);

    let comp_dir = out.join("completions");
    std::fs::create_dir_all(&comp_dir)?;
    for (shell, file) in [
        (Shell::Bash, format!("{BIN}.bash")),
        (Shell::Zsh, format!("_{BIN}")),
        (Shell::Fish, format!("{BIN}.fish")),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buf);
        let path = comp_dir.join(file);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    Ok(written)
}
