//! Process hardening, done first thing in `main` (DESIGN §6 "The process").
//!
//! The process holds PINs, a SharedAccessKey and (file keystore) private keys in
//! memory. A core dump would write all of them to disk, readable by whoever reads
//! `/var/crash` or the systemd journal, and a non-dumpable process also cannot be
//! attached with ptrace or read through `/proc/<pid>/mem` by another process of the
//! same user. So before any secret is read: `RLIMIT_CORE` 0 (no core file, even if
//! `core_pattern` pipes to a handler that ignores the limit, the dumpable flag
//! below stops it) and `PR_SET_DUMPABLE` 0. Neither can fail for an unprivileged
//! process lowering its own limits; if one does, the run stops rather than go on
//! without the protection.

use std::io;

/// Turn core dumps off and make the process non-dumpable.
pub fn harden() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; prctl(PR_SET_DUMPABLE) takes plain
    // integers. Neither touches memory of ours beyond that.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The flags hold after [`super::harden`] (this makes the test process itself
    /// non-dumpable, which is harmless).
    #[test]
    fn harden_turns_core_dumps_off() {
        super::harden().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: plain syscalls with a struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, lim.rlim_max), (0, 0));
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
