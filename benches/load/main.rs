//! The load harness of issue 8: Ephemera against direct PostgreSQL and
//! PgBouncer, on loopback, every ratio from the same run.
//!
//! ```sh
//! cargo bench --bench load                          # everything, ~12 min
//! EPHEMERA_BENCH_QUICK=1 cargo bench --bench load   # smoke run, ~2 min
//! cargo bench --bench load -- connect storm         # some scenarios
//! ```
//!
//! It starts its own PostgreSQL (the machine's binaries, a cluster in
//! /var/tmp, scram-sha-256, TLS on), `ephemera serve` (the release binary, a
//! separate process) and PgBouncer in session mode (apt-get installs it
//! when missing and root), runs the scenarios and prints a table. See
//! BENCHMARKS.md for the variables and the last full run.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]
// a benchmark: a panic is its failure message
// The harness calls libc for process control and resource usage; each
// block says why it is sound.
#![allow(unsafe_code)]

mod env;
mod floor;
mod perf;
mod pooled;
mod relay;
mod scenarios;
mod stats;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use stats::CpuSplit;

pub const ALL_SCENARIOS: [&str; 9] = [
    "memory", "connect", "pgbench", "relay", "copy", "storm", "pooled", "revoke", "reaper",
];

#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub scenarios: Vec<String>,
    /// Sessions per mode for connect-to-first-row.
    pub sessions: usize,
    pub pgbench_secs: u64,
    /// pgbench runs are cut into this many slices, the modes taking turns,
    /// so that drift in the background load hits every mode alike.
    pub pgbench_rounds: u64,
    pub storm_secs: u64,
    pub storm_concurrency: usize,
    pub copy_bytes: u64,
    pub copy_rounds: usize,
    pub revoke_sessions: usize,
    pub reap_roles: usize,
    pub idle_sessions: usize,
    pub perf: bool,
    pub keep: bool,
    pub out_dir: PathBuf,
}

fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("load: ignoring {name}={v} (not a number)");
            default
        }),
        _ => default,
    }
}

fn flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("1" | "true" | "yes"))
}

impl Options {
    fn from_env() -> Options {
        let quick = flag("EPHEMERA_BENCH_QUICK");
        let q = |full: u64, quick_value: u64| if quick { quick_value } else { full };
        // `cargo bench --bench load -- connect storm`: cargo passes `--bench`
        // too; anything that is not a flag names a scenario.
        let mut scenarios: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        if scenarios.is_empty() {
            if let Ok(list) = std::env::var("EPHEMERA_BENCH_SCENARIOS") {
                scenarios = list
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
        }
        if scenarios.is_empty() {
            scenarios = ALL_SCENARIOS.iter().map(|s| s.to_string()).collect();
        }
        // --profile: CPU per transaction of each process, context switches
        // and a perf profile per relay (the relay scenario, with perf on).
        let profile = std::env::args().any(|a| a == "--profile");
        if profile && !scenarios.iter().any(|s| s == "relay") {
            scenarios.push("relay".into());
        }
        for s in &scenarios {
            if !ALL_SCENARIOS.contains(&s.as_str()) {
                eprintln!(
                    "load: unknown scenario {s:?}; the scenarios are {}",
                    ALL_SCENARIOS.join(", ")
                );
                std::process::exit(2);
            }
        }
        // Run them in the canonical order (memory first: a fresh process).
        scenarios.sort_by_key(|s| ALL_SCENARIOS.iter().position(|a| a == s));
        scenarios.dedup();
        let secs = var("EPHEMERA_BENCH_SECS", q(30, 5));
        let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench-load");
        Options {
            quick,
            scenarios,
            sessions: var("EPHEMERA_BENCH_SESSIONS", q(1000, 100) as usize),
            pgbench_secs: secs,
            pgbench_rounds: var("EPHEMERA_BENCH_PGBENCH_ROUNDS", q(3, 1)).max(1),
            storm_secs: secs,
            storm_concurrency: var("EPHEMERA_BENCH_STORM_CONCURRENCY", 32),
            copy_bytes: var("EPHEMERA_BENCH_COPY_MIB", q(1100, 128)) << 20,
            copy_rounds: var("EPHEMERA_BENCH_COPY_ROUNDS", q(2, 1) as usize),
            revoke_sessions: var("EPHEMERA_BENCH_REVOKE", q(100, 20) as usize),
            reap_roles: var("EPHEMERA_BENCH_REAP", q(10_000, 1_000) as usize),
            idle_sessions: var("EPHEMERA_BENCH_IDLE", q(1000, 100) as usize),
            perf: profile || flag("EPHEMERA_BENCH_PERF"),
            keep: flag("EPHEMERA_BENCH_KEEP"),
            out_dir,
        }
    }
}

/// One line of the results table.
pub struct Row {
    pub scenario: String,
    pub direct: String,
    pub ephemera: String,
    pub ratio: String,
    pub other: String,
    pub target: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub cpu: Vec<(String, CpuSplit)>,
    /// Whole tables a scenario writes itself (markdown).
    pub tables: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(&mut self, row: Row) {
        eprintln!(
            "load: {}: direct {} | Ephemera {} | {} | {}",
            row.scenario, row.direct, row.ephemera, row.ratio, row.other
        );
        self.rows.push(row);
    }
    pub fn cpu(&mut self, what: &str, split: CpuSplit) {
        self.cpu.push((what.to_owned(), split));
    }
    pub fn note(&mut self, note: String) {
        eprintln!("load: {note}");
        self.notes.push(note);
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| scenario | direct | Ephemera | Ephemera / direct | others | target | met |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {met} |",
                r.scenario, r.direct, r.ephemera, r.ratio, r.other, r.target
            );
        }
        let _ = writeln!(
            out,
            "\nCPU in use during each measurement (cores of 2; `machine` is every process on the box, other users' included):\n"
        );
        let _ = writeln!(
            out,
            "| measurement | wall s | postgres | ephemera | pgbouncer | client | machine |"
        );
        let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
        for (what, s) in &self.cpu {
            let _ = writeln!(
                out,
                "| {what} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                s.wall, s.postgres, s.ephemera, s.pgbouncer, s.client, s.machine
            );
        }
        for table in &self.tables {
            let _ = writeln!(out, "\n{table}");
        }
        let _ = writeln!(out, "\nNotes:\n");
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }
}

fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let mem = shell("free", &["-g"])
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
        .unwrap_or_default();
    format!(
        "{model}, nproc {}, {mem} GiB RAM (free -g), kernel {}, Debian {}",
        shell("nproc", &[]),
        shell("uname", &["-r"]),
        std::fs::read_to_string("/etc/debian_version")
            .unwrap_or_default()
            .trim()
    )
}

/// "full" or "QUICK", plus any experiment knobs that were set.
fn mode_line(options: &Options) -> String {
    let mut line = if options.quick {
        "QUICK (smoke run)"
    } else {
        "full"
    }
    .to_owned();
    for knob in [
        "EPHEMERA_BENCH_BIN",
        "EPHEMERA_BENCH_POOL_SIZE",
        "EPHEMERA_BENCH_TOKIO_WORKERS",
        "EPHEMERA_BENCH_WORKERS",
        "EPHEMERA_BENCH_UPSTREAM_SSLMODE",
        "EPHEMERA_BENCH_SECS",
    ] {
        if let Ok(value) = std::env::var(knob) {
            line.push_str(&format!(", {knob}={value}"));
        }
    }
    line
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// An error's text; a database error says what the server said.
fn explain(e: &env::Error) -> String {
    match e.downcast_ref::<tokio_postgres::Error>() {
        Some(pg) => scenarios::describe(pg),
        None => e.to_string(),
    }
}

fn main() {
    // Started by the harness as the floor relay: be that, nothing else.
    floor::run_if_asked();
    let options = Options::from_env();
    let _ = std::fs::create_dir_all(&options.out_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let load_before = loadavg();
    let started = Instant::now();
    let mut env = match env::prepare(&runtime, options.keep) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("load: setting up failed: {}", explain(&e));
            std::process::exit(1);
        }
    };
    let mut report = Report::default();
    let mut failed = false;
    for name in options.scenarios.clone() {
        if name == "memory" && env.ephemera.is_none() {
            let _ = env.start_ephemera();
        }
        let env_ref = &env;
        let opts = &options;
        let rep = &mut report;
        let result = runtime.block_on(async move {
            let scenario = async {
                match name.as_str() {
                    "memory" => scenarios::memory(env_ref, opts, rep).await,
                    "connect" => scenarios::connect(env_ref, opts, rep).await,
                    "pgbench" => scenarios::pgbench(env_ref, opts, rep).await,
                    "relay" => relay::relay(env_ref, opts, rep).await,
                    "copy" => scenarios::copy(env_ref, opts, rep).await,
                    "storm" => scenarios::storm(env_ref, opts, rep).await,
                    "pooled" => pooled::pooled(env_ref, opts, rep).await,
                    "revoke" => scenarios::revoke(env_ref, opts, rep).await,
                    "reaper" => scenarios::reaper(env_ref, opts, rep).await,
                    _ => unreachable!("checked in Options::from_env"),
                }
            };
            tokio::select! {
                r = scenario => r.map_err(|e| (name.clone(), explain(&e))),
                _ = tokio::signal::ctrl_c() => Err((name.clone(), "interrupted".to_owned())),
            }
        });
        if let Err((name, e)) = result {
            failed = true;
            report.note(format!("scenario {name} failed: {e}"));
            if e == "interrupted" {
                break;
            }
        }
    }
    let elapsed = started.elapsed();

    let mut out = String::new();
    let _ = writeln!(out, "## Results\n");
    let _ = writeln!(
        out,
        "- machine: {}\n- versions: {}; {}; {}\n- mode: {}; scenarios: {}; took {:.1} min; load average before {} / after {}\n",
        machine(),
        env.pg_version,
        env.pgbouncer_version
            .clone()
            .unwrap_or_else(|| format!("no PgBouncer ({})", env.pgbouncer_missing.clone().unwrap_or_default())),
        shell("rustc", &["--version"]),
        mode_line(&options),
        options.scenarios.join(", "),
        elapsed.as_secs_f64() / 60.0,
        load_before,
        loadavg(),
    );
    out.push_str(&report.markdown());
    println!("\n{out}");
    let path = options.out_dir.join(if options.quick {
        "results-quick.md"
    } else {
        "results.md"
    });
    if std::fs::write(&path, &out).is_ok() {
        eprintln!("load: results written to {}", path.display());
    }
    drop(env);
    if failed {
        std::process::exit(1);
    }
}
