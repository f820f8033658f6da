//! Thin entry point: logging, parse, run, exit code. Everything else is in the library.

use clap::Parser;

fn main() {
    let cli = sdv_provision::cli::Cli::parse();
    init_logging(cli.global.verbose);
    let code = match sdv_provision::commands::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, what is wrong and what to do. The cause chain goes to the log.
            tracing::debug!(error = ?e, "failed");
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

/// `-v`: steps with timings; `-vv`: debug. Logs go to stderr, never stdout (which
/// may carry the `--json` document), without colour unless stderr is a terminal and
/// NO_COLOR is unset.
fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    let level = match verbose {
        0 => return,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}
