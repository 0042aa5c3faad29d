//! Process hardening for the commands that hold secrets (`serve`, `dev`,
//! `check-config`): the admin role's password and the SCRAM keys of every
//! minted role are in memory, so the process must not leave a core file
//! behind, and other processes of the same user must not attach to it or
//! read its memory.

use std::io;

/// Make the process not dumpable (`prctl(PR_SET_DUMPABLE, 0)`: no core
/// file, no ptrace or `/proc/<pid>/mem` access for other processes of the
/// same user, `/proc/<pid>` owned by root) and set the core file size limit
/// (`RLIMIT_CORE`, soft and hard) to 0. Call it first thing, before any
/// secret is read. Children started later get their own dumpable flag back
/// at `execve`, but inherit the core limit.
pub fn forbid_core_dumps() -> io::Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; lowering a limit needs no
    // privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_DUMPABLE takes one integer argument; the rest are unused.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child (the effect is process-wide and irreversible):
    /// afterwards PR_GET_DUMPABLE is 0 and RLIMIT_CORE is 0/0. The child
    /// only makes system calls between fork and _exit.
    #[test]
    fn the_process_is_not_dumpable_and_writes_no_core_file() {
        // SAFETY: the child calls only async-signal-safe functions
        // (setrlimit, prctl, getrlimit, _exit) and allocates nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = unsafe {
                if forbid_core_dumps().is_err() {
                    1
                } else if libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 {
                    2
                } else {
                    let mut limit = libc::rlimit {
                        rlim_cur: 1,
                        rlim_max: 1,
                    };
                    if libc::getrlimit(libc::RLIMIT_CORE, &mut limit) != 0
                        || limit.rlim_cur != 0
                        || limit.rlim_max != 0
                    {
                        3
                    } else {
                        0
                    }
                }
            };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "the child exited: {status}");
        let code = libc::WEXITSTATUS(status);
        assert_eq!(
            code, 0,
            "1: forbid_core_dumps failed, 2: still dumpable, 3: RLIMIT_CORE not 0"
        );
    }
}
