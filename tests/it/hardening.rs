//! The `ephemera serve` process holds the admin password and every
//! session's SCRAM keys: it writes no core file. (That it is also not
//! dumpable is checked by the unit test of `ephemera::ops::hardening`, in a
//! child process: from outside, as root, a non-dumpable process looks the
//! same.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use common::proxy::{free_port, signal, spawn_binary, ProxyFiles, ProxyOptions};

/// The soft and hard values of `/proc/<pid>/limits`' "Max core file size".
fn core_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("reading limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core file size in {limits}"));
    let mut fields = line["Max core file size".len()..].split_whitespace();
    (
        fields.next().expect("soft limit").to_owned(),
        fields.next().expect("hard limit").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_with_a_core_file_size_limit_of_zero() {
    let listen = format!("127.0.0.1:{}", free_port());
    let files = ProxyFiles::write(&ProxyOptions::templates(&["h_core"]), &listen).await;
    let mut child = spawn_binary(&files.config_path, &listen, None, &[]).await;
    let pid = child.id().expect("the proxy is running");
    assert_eq!(
        core_limit(pid),
        ("0".to_owned(), "0".to_owned()),
        "RLIMIT_CORE of the serving process (soft, hard)"
    );
    signal(&child, libc::SIGTERM);
    let status = child.wait().await.expect("wait for the proxy");
    assert!(status.success(), "the proxy shuts down cleanly: {status}");
}
