//! Optional system-wide `perf record` around a scenario
//! (`EPHEMERA_BENCH_PERF=1`): where the 2 cores go, per process and, for
//! Ephemera and PostgreSQL, per symbol. Reports land in the output directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Options;

/// Syscalls counted on the relaying process while recording.
const SYSCALLS: [&str; 12] = [
    "recvfrom",
    "sendto",
    "read",
    "write",
    "readv",
    "writev",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_ctl",
    "futex",
    "sched_yield",
];

pub struct Perf {
    child: Child,
    stat: Option<(Child, PathBuf)>,
    pid: Option<u32>,
    data: PathBuf,
    report: PathBuf,
    keep_data: bool,
}

impl Perf {
    /// Record the whole machine; `pid` (Ephemera or PgBouncer) also gets
    /// its syscalls counted and its own symbol table in the report.
    pub fn start(options: &Options, label: &str, pid: Option<u32>) -> Option<Perf> {
        if !options.perf {
            return None;
        }
        let data = options.out_dir.join(format!("perf-{label}.data"));
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "499", "-o"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("load: perf record did not start: {e}"))
            .ok()?;
        let stat = pid.and_then(|pid| {
            let out = options.out_dir.join(format!("perf-{label}.syscalls"));
            let events: Vec<String> = SYSCALLS
                .iter()
                .map(|s| format!("syscalls:sys_enter_{s}"))
                .collect();
            Command::new("perf")
                .args(["stat", "-x", ",", "-e", &events.join(","), "-p"])
                .arg(pid.to_string())
                .arg("-o")
                .arg(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
                .map(|c| (c, out))
        });
        std::thread::sleep(Duration::from_millis(300));
        Some(Perf {
            child,
            stat,
            pid,
            data,
            report: options.out_dir.join(format!("perf-{label}.txt")),
            keep_data: options.keep,
        })
    }

    /// Stop recording and write the report: CPU share per command, then the
    /// hottest symbols of `ephemera` (by pid) and of `postgres`.
    /// Returns the syscall counts of the process, by name.
    pub fn finish(mut self) -> Vec<(String, u64)> {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut syscalls = Vec::new();
        if let Some((mut stat, out)) = self.stat.take() {
            unsafe { libc::kill(stat.id() as i32, libc::SIGINT) };
            let _ = stat.wait();
            for line in std::fs::read_to_string(&out).unwrap_or_default().lines() {
                let fields: Vec<&str> = line.split(',').collect();
                if fields.len() > 2 {
                    if let (Ok(n), Some(name)) = (
                        fields[0].parse::<u64>(),
                        fields[2].strip_prefix("syscalls:sys_enter_"),
                    ) {
                        if n > 0 {
                            syscalls.push((name.to_owned(), n));
                        }
                    }
                }
            }
        }
        let ephemera_pid = self.pid;
        let mut text = String::new();
        let mut report = |title: &str, extra: &[String], lines: usize| {
            let output = Command::new("perf")
                .args(["report", "--stdio", "--no-children", "-g", "none", "-i"])
                .arg(&self.data)
                .args(extra)
                .stderr(Stdio::null())
                .output();
            text.push_str(&format!("===== {title}\n"));
            if let Ok(output) = output {
                let out = String::from_utf8_lossy(&output.stdout);
                for line in out
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .take(lines)
                {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        };
        report("CPU by command", &["--sort".into(), "comm".into()], 15);
        if let Some(pid) = ephemera_pid {
            report(
                "the relay's process by thread",
                &[
                    "--pid".into(),
                    pid.to_string(),
                    "--sort".into(),
                    "comm".into(),
                ],
                5,
            );
            report(
                "the relay's process by shared object",
                &[
                    "--pid".into(),
                    pid.to_string(),
                    "--sort".into(),
                    "dso".into(),
                ],
                15,
            );
            report(
                "the relay's process by symbol",
                &[
                    "--pid".into(),
                    pid.to_string(),
                    "--sort".into(),
                    "sym".into(),
                ],
                45,
            );
        }
        report(
            "postgres by symbol",
            &[
                "--comm".into(),
                "postgres".into(),
                "--sort".into(),
                "sym".into(),
            ],
            30,
        );
        text.push_str(&format!(
            "===== syscalls of the relay's process\n{syscalls:?}\n"
        ));
        let _ = std::fs::write(&self.report, text);
        if !self.keep_data {
            let _ = std::fs::remove_file(&self.data);
        }
        eprintln!("load: perf report in {}", self.report.display());
        syscalls
    }
}
