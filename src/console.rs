//! Every byte the tool prints: human lines on stdout, `warning:` lines on stderr,
//! the `--json` document. A leaf: the keystores warn through it without depending
//! on what [`crate::output`] renders (identities, reports).

use std::io::Write;

/// Prints human lines (stdout) and warnings (stderr), honouring `--json`/`--quiet`.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// Human lines on stdout? (not with `--json` or `--quiet`)
    pub human: bool,
    /// Warnings on stderr? (not with `--quiet`)
    pub warnings: bool,
}

impl Out {
    pub fn say(&self, line: impl AsRef<str>) {
        if self.human {
            stdout(&format!("{}\n", line.as_ref()));
        }
    }

    pub fn warn(&self, line: impl AsRef<str>) {
        if self.warnings {
            warning(line.as_ref());
        }
    }
}

/// Which stream failed first, and why (for the one `error:` line at the end).
static FAILED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Write `text` to stdout. Every byte the tool prints goes through [`stdout`],
/// [`stderr`] or [`write_to`]: a failed write (a full disk, a closed pipe) never
/// panics. It is recorded and the run carries on, so a transaction in flight still
/// finishes; `main` then exits 1 ([`failure`]). Returns whether the write worked.
pub fn stdout(text: &str) -> bool {
    write_to("stdout", |w| w.write_all(text.as_bytes()))
}

/// Write `text` to stderr (see [`stdout`]).
pub fn stderr(text: &str) -> bool {
    let mut e = std::io::stderr().lock();
    record(
        "stderr",
        e.write_all(text.as_bytes()).and_then(|()| e.flush()),
    )
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--quiet`: [`warning`] prints nothing (set once, when the run's context is made).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// One `warning: …` line on stderr unless `--quiet`, for code without an [`Out`]
/// (see [`stdout`]).
pub fn warning(line: &str) -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed) || stderr(&format!("warning: {line}\n"))
}

/// Run `f` on a locked, flushed stdout (a `--json` document): see [`stdout`].
pub fn write_to(name: &'static str, f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> bool {
    let mut o = std::io::stdout().lock();
    record(name, f(&mut o).and_then(|()| o.flush()))
}

fn record(name: &str, r: std::io::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            let _ = FAILED.set(format!("cannot write to {name} ({e})"));
            false
        }
    }
}

/// The first failed write of this run, if any: the run's exit code is then 1.
pub fn failure() -> Option<&'static str> {
    FAILED.get().map(String::as_str)
}
