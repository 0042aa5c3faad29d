//! The harness's only `unsafe`: what std and nix offer no safe call for.
//! Each block says why it is sound.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Run `hook` when the test process exits (stopping the shared cluster).
pub fn at_exit(hook: extern "C" fn()) {
    // SAFETY: registers a plain `extern "C"` function with no arguments.
    unsafe { libc::atexit(hook) };
}

/// Have the kernel send SIGQUIT to the child `command` makes when this
/// process dies (PR_SET_PDEATHSIG), even by SIGKILL.
pub fn die_with_parent(command: &mut Command) {
    let parent_pid = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (no allocation, no locks). std
    // changes uid/gid before running it, and that change would otherwise
    // reset the death signal.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If we died between fork and prctl, nobody will signal the child.
            if libc::getppid() as u32 != parent_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}
