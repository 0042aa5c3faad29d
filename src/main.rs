//! The `ephemera` command: parse the arguments, set up the process and its
//! logging, and run the command. Every command is defined and carried out in
//! `cli`; errors become `anyhow` there, in the binary, and nowhere else.

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // No core file, no ptrace by the same user, for the commands that hold
    // secrets.
    if cli.command.handles_secrets() {
        if let Err(error) = ephemera::ops::hardening::forbid_core_dumps() {
            eprintln!("ephemera: cannot disable core dumps (prctl PR_SET_DUMPABLE / RLIMIT_CORE): {error}");
            return ExitCode::FAILURE;
        }
    }
    init_logging(cli.log_format, cli.command.default_log_level());
    cli::run(cli.command)
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
    use tracing_subscriber::prelude::*;

    let wanted = tracing_subscriber::EnvFilter::try_from_env("EPHEMERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // tokio-postgres logs statement text at debug level, and the statements
    // that create roles carry SCRAM verifiers: it never logs below info,
    // whatever EPHEMERA_LOG asks for.
    let never_secrets = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tokio_postgres", LevelFilter::INFO);
    let filter = wanted.and(never_secrets);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .init(),
    }
}
