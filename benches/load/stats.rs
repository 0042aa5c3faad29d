//! Latency summaries, CPU accounting per process group and RSS readings,
//! all from `/proc` and `getrusage`.

use std::path::Path;
use std::time::{Duration, Instant};

/// Median, p99 and friends of a set of latencies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        Summary {
            count: sorted.len(),
            p50: percentile(&sorted, 50.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// (ppid, own CPU seconds, reaped children's CPU seconds) of a process.
fn stat(pid: u32) -> Option<(u32, f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14 … cstime 17.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let ticks = clock_ticks();
    let ppid = field(4)? as u32;
    let own = (field(14)? + field(15)?) / ticks;
    let children = (field(16)? + field(17)?) / ticks;
    Some((ppid, own, children))
}

/// The live children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(stat(pid), Some((ppid, _, _)) if ppid == parent))
        .collect()
}

/// CPU seconds used by a process and every descendant it has reaped, plus
/// its live children (a postmaster and its backends, exited or not).
pub fn tree_cpu(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Some((_, own, reaped)) = stat(pid) else {
        return 0.0;
    };
    let live: f64 = children_of(pid)
        .into_iter()
        .filter_map(stat)
        .map(|(_, own, reaped)| own + reaped)
        .sum();
    own + reaped + live
}

/// CPU seconds of this process plus its waited-for children (pgbench, psql).
pub fn client_cpu() -> f64 {
    let usage = |who| {
        // SAFETY: getrusage fills the struct we pass.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}

/// Whole-machine busy CPU seconds (all processes, including other users').
fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal
    (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / clock_ticks()
}

/// Who was using the CPU during a scenario.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    postgres: f64,
    ephemera: f64,
    pgbouncer: f64,
    client: f64,
    machine: f64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    pub wall: f64,
    /// Cores used on average by each party over the wall time.
    pub postgres: f64,
    pub ephemera: f64,
    pub pgbouncer: f64,
    pub client: f64,
    /// Busy cores on the whole machine; what the parties above do not
    /// explain is other users' work (the machine is shared) or the kernel's
    /// softirq time not charged to a process.
    pub machine: f64,
}

impl CpuSplit {
    /// Add another measurement of the same thing (a later slice): the
    /// averages are weighted by wall time.
    pub fn add(&mut self, other: &CpuSplit) {
        let wall = self.wall + other.wall;
        if wall <= 0.0 {
            return;
        }
        let mix = |a: f64, b: f64| (a * self.wall + b * other.wall) / wall;
        *self = CpuSplit {
            wall,
            postgres: mix(self.postgres, other.postgres),
            ephemera: mix(self.ephemera, other.ephemera),
            pgbouncer: mix(self.pgbouncer, other.pgbouncer),
            client: mix(self.client, other.client),
            machine: mix(self.machine, other.machine),
        };
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub postmaster: Option<u32>,
    pub ephemera: Option<u32>,
    /// The second Ephemera (Unix-socket upstream); its CPU counts as Ephemera's.
    pub ephemera_unix: Option<u32>,
    pub pgbouncer: Option<u32>,
    pub floor: Option<u32>,
}

impl CpuSnapshot {
    pub fn take(pids: &Pids) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            postgres: tree_cpu(pids.postmaster),
            ephemera: [pids.ephemera, pids.ephemera_unix]
                .into_iter()
                .flatten()
                .filter_map(stat)
                .map(|s| s.1)
                .sum(),
            pgbouncer: pids.pgbouncer.and_then(stat).map_or(0.0, |s| s.1),
            client: client_cpu(),
            machine: machine_busy(),
        }
    }

    /// The snapshot at the end of a measurement that ended at `end`, read
    /// a little later: a backend that has just exited is a zombie whose CPU
    /// shows nowhere until the postmaster reaps it into its children's time.
    pub fn settled(pids: &Pids, end: Instant) -> CpuSnapshot {
        std::thread::sleep(std::time::Duration::from_millis(300));
        CpuSnapshot {
            at: end,
            ..CpuSnapshot::take(pids)
        }
    }

    pub fn since(&self, earlier: &CpuSnapshot) -> CpuSplit {
        let wall = (self.at - earlier.at).as_secs_f64().max(1e-9);
        CpuSplit {
            wall,
            postgres: (self.postgres - earlier.postgres).max(0.0) / wall,
            ephemera: (self.ephemera - earlier.ephemera).max(0.0) / wall,
            pgbouncer: (self.pgbouncer - earlier.pgbouncer).max(0.0) / wall,
            client: (self.client - earlier.client).max(0.0) / wall,
            machine: (self.machine - earlier.machine).max(0.0) / wall,
        }
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
/// One process's own CPU seconds (all its threads), if it is running.
pub fn process_cpu(pid: Option<u32>) -> f64 {
    pid.and_then(stat).map_or(0.0, |s| s.1)
}

/// Context switches (voluntary and not) of every thread of `pid`.
pub fn context_switches(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Proportional set size (KiB) of a process (`smaps_rollup`).
pub fn pss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(Path::new(&path)).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
