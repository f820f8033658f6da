//! Thin entry point: hardening, logging, parse, run, exit code. Everything else is
//! in the library.

use clap::Parser;
use sdv_provision::output;

fn main() {
    // Before anything else, and so before any secret is read (src/process.rs).
    if let Err(e) = sdv_provision::process::harden() {
        output::stderr(&format!(
            "error: cannot turn core dumps off ({e}); not running with secrets that could end up in a core file\n"
        ));
        std::process::exit(1);
    }
    std::panic::set_hook(Box::new(on_panic));
    std::process::exit(run());
}

fn run() -> i32 {
    let cli = match sdv_provision::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help, version or a usage error; one that cannot be printed is exit 1.
        Err(e) => {
            return match e.print() {
                Ok(()) => e.exit_code(),
                Err(why) => {
                    output::stderr(&format!("error: cannot write the usage text ({why})\n"));
                    1
                }
            }
        }
    };
    init_logging(cli.global.verbose);
    let code = match sdv_provision::commands::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, what is wrong and what to do. The cause chain goes to the log.
            tracing::debug!(error = ?e, "failed");
            output::stderr(&format!("error: {e}\n"));
            return e.exit_code();
        }
    };
    // A run whose output could not be written did not tell its user what it did.
    match output::failure() {
        Some(why) if code == 0 => {
            output::stderr(&format!(
                "error: {why}; the run itself finished, check it with `sdv-provision status`\n"
            ));
            1
        }
        _ => code,
    }
}

/// A panic is a bug: one `error:` line (where, not the message, which might hold
/// data), then exit 1 from the hook itself, so the release profile's `panic = "abort"`
/// never gets to raise SIGABRT (on any thread). The message goes to the debug log.
/// A transaction it interrupted is left as a crash would leave it, and the next run
/// finishes or undoes it (DESIGN §6 "Crash safety").
fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    tracing::debug!(panic = %info, "panicked");
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    output::stderr(&format!(
        "error: internal error{at}; nothing more was done (re-run to finish or undo an interrupted change, and please report this with the output of -vv)\n"
    ));
    std::process::exit(1);
}

/// `-v`: steps with timings; `-vv`: debug. Logs go to stderr, never stdout (which
/// may carry the `--json` document), without colour unless stderr is a terminal and
/// NO_COLOR is unset. A log line that cannot be written is dropped (tracing-subscriber
/// ignores the writer's errors); the lines the user needs go through `output`.
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
