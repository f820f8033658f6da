//! Spinners for slow steps (RSA key generation in a TPM or token, connector restart):
//! shown on a terminal only, never with `--json`, `--quiet` or redirected stderr.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::output::Out;

/// A spinner on stderr that clears itself when dropped.
pub struct Spinner(Option<ProgressBar>);

/// Start a spinner named after the step. Invisible when not on a terminal.
pub fn spinner(out: &Out, step: &str) -> Spinner {
    if !out.human || !std::io::stderr().is_terminal() {
        return Spinner(None);
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        pb.set_style(style);
    }
    pb.set_message(step.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    Spinner(Some(pb))
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

/// Logs a step's name and duration (at `-v`) when dropped.
pub struct Step {
    name: &'static str,
    start: std::time::Instant,
}

/// Time a step of a command for the `-v` log.
pub fn step(name: &'static str) -> Step {
    tracing::debug!(step = name, "start");
    Step {
        name,
        start: std::time::Instant::now(),
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        tracing::info!(step = self.name, elapsed = ?self.start.elapsed(), "done");
    }
}
