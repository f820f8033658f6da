//! Driving the binary on a pseudo-terminal (rexpect).
use rexpect::session::PtySession;

/// Wait until the program has switched the terminal's echo off for hidden input.
/// The hidden prompt (console's `read_secure`) sets it with `TCSAFLUSH`, which
/// discards whatever was typed before: a line sent as soon as the question shows
/// can be thrown away, and the question comes again (seen on a loaded CI machine).
/// A person typing ahead gets the same; a test must not. On Linux the pty master
/// reports the terminal's modes.
pub fn wait_for_hidden_input(p: &PtySession) {
    use std::os::fd::AsRawFd;
    let fd = p.process().pty.as_raw_fd();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: fd is the open pty master; tcgetattr fills `t` on success.
        let rc = unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) };
        assert_eq!(
            rc,
            0,
            "tcgetattr on the pty: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: tcgetattr returned 0, so `t` is initialised.
        if unsafe { t.assume_init() }.c_lflag & libc::ECHO == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "echo never went off");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
