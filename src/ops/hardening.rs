//! Process hardening for the commands that hold secrets (`serve`, `dev`,
//! `check-config`): the admin role's password and the SCRAM keys of every
//! minted role are in memory, so the process must not leave a core file
//! behind, and other processes of the same user must not attach to it or
//! read its memory.

use std::io;

use nix::sys::prctl;
use nix::sys::resource::{setrlimit, Resource};

/// Make the process not dumpable (`prctl(PR_SET_DUMPABLE, 0)`: no core
/// file, no ptrace or `/proc/<pid>/mem` access for other processes of the
/// same user, `/proc/<pid>` owned by root) and set the core file size limit
/// (`RLIMIT_CORE`, soft and hard) to 0. Call it first thing, before any
/// secret is read. Children started later get their own dumpable flag back
/// at `execve`, but inherit the core limit.
pub fn forbid_core_dumps() -> io::Result<()> {
    // Lowering a limit needs no privilege.
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    prctl::set_dumpable(false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process the test runs its checks in.
    const CHILD: &str = "EPHEMERA_HARDENING_TEST_CHILD";
    /// What the child prints once every check passed, so that a filter
    /// matching no test (the child running nothing) cannot pass.
    const CHECKED: &str = "hardening checks passed in the child";

    /// In a child process (the effect is process-wide and irreversible):
    /// this test binary again, running only this test with CHILD set.
    /// Afterwards PR_GET_DUMPABLE is 0 and RLIMIT_CORE is 0/0.
    #[test]
    fn the_process_is_not_dumpable_and_writes_no_core_file() {
        if std::env::var_os(CHILD).is_some() {
            forbid_core_dumps().expect("forbid_core_dumps");
            assert!(
                !prctl::get_dumpable().expect("PR_GET_DUMPABLE"),
                "still dumpable"
            );
            assert_eq!(
                nix::sys::resource::getrlimit(Resource::RLIMIT_CORE).expect("getrlimit"),
                (0, 0),
                "RLIMIT_CORE (soft, hard)"
            );
            println!("{CHECKED}");
            return;
        }
        // libtest names tests by their path without the crate's name.
        let module = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, rest)| rest);
        let name = format!("{module}::the_process_is_not_dumpable_and_writes_no_core_file");
        let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("running the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains(CHECKED),
            "the child's checks failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
    }
}
