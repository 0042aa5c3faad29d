//! The `ephemera` command. Errors become `anyhow` here and nowhere else.

#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ephemera::{Server, Settings};

#[derive(Parser)]
#[command(
    name = "ephemera",
    version,
    about = "Dynamic PostgreSQL credentials for SPIFFE workloads"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EPHEMERA_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Try Ephemera on this machine: a throwaway PostgreSQL cluster, a
    /// development CA and demo SVIDs, and the proxy, with commands to paste.
    Dev {
        /// Where the cluster, certificates, secrets and config live (reused).
        #[arg(long, default_value = ".ephemera-dev")]
        dir: PathBuf,
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
        /// Where the admin API listens.
        #[arg(long, default_value = "127.0.0.1:6443")]
        admin_listen: std::net::SocketAddr,
        /// Use this PostgreSQL instead of a throwaway cluster:
        /// postgres://ADMIN:PASSWORD@HOST:PORT/postgres?sslmode=require
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Run the proxy.
    Serve {
        /// The configuration file (TOML); EPHEMERA_* variables override it.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate a configuration without serving; lists every problem.
    CheckConfig {
        /// The configuration file to check.
        path: PathBuf,
        /// Also log in to the upstream as the admin role and check what the
        /// templates need there (CREATEROLE, databases, groups, owners).
        #[arg(long)]
        connect: bool,
    },
    /// List, show, renew or revoke leases (admin API).
    Leases {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(subcommand)]
        command: cli::LeasesCommand,
    },
    /// Revoke every lease of an identity, identity prefix or template, and
    /// end their sessions (admin API).
    Revoke {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        select: cli::RevokeArgs,
    },
    /// Get standalone credentials (a password) for TEMPLATE as your own
    /// identity, for clients that cannot come through the proxy.
    Creds {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        creds: cli::CredsArgs,
    },
    /// Run COMMAND with standalone credentials for TEMPLATE, revoked when it exits.
    ///
    /// COMMAND gets PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE and
    /// PGSSLMODE; the lease is renewed while it runs. Exits with COMMAND's exit
    /// code (128+N if signal N ended it).
    Exec {
        #[command(flatten)]
        admin: cli::AdminArgs,
        /// The role template to get credentials for.
        #[arg(long)]
        template: String,
        /// libpq sslmode for COMMAND's connections to the database (PGSSLMODE).
        #[arg(
            long,
            env = "EPHEMERA_PGSSLMODE",
            default_value = "require",
            value_parser = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
        )]
        sslmode: String,
        /// The database server's CA certificate(s), PEM (PGSSLROOTCERT).
        #[arg(long, value_name = "PATH", env = "EPHEMERA_PGSSLROOTCERT")]
        sslrootcert: Option<PathBuf>,
        /// The command to run, and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The commands that read the admin password (and, serving, hold every
    // session's SCRAM keys): no core file, no ptrace by the same user.
    if matches!(
        cli.command,
        Command::Serve { .. } | Command::Dev { .. } | Command::CheckConfig { .. }
    ) {
        if let Err(error) = ephemera::ops::hardening::forbid_core_dumps() {
            eprintln!("ephemera: cannot disable core dumps (prctl PR_SET_DUMPABLE / RLIMIT_CORE): {error}");
            return ExitCode::FAILURE;
        }
    }
    // `dev` prints its own progress and instructions; keep its log quiet.
    let default_level = if matches!(cli.command, Command::Dev { .. }) {
        "warn,deadpool=error"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Dev {
            dir,
            listen,
            admin_listen,
            upstream,
        } => match dev(ephemera::dev::DevOptions {
            dir,
            listen,
            admin_listen,
            upstream,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ephemera dev: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ephemera: {error:#}");
                ExitCode::FAILURE
            }
        },
        Command::Leases { admin, command } => run_client(cli::leases(admin, command)),
        Command::Revoke { admin, select } => run_client(cli::revoke(admin, select)),
        Command::Creds { admin, creds } => run_client(cli::creds(admin, creds)),
        Command::Exec {
            admin,
            template,
            sslmode,
            sslrootcert,
            command,
        } => cli::exec::main(admin, template, sslmode, sslrootcert, command),
        Command::CheckConfig { path, connect } => check_config(&path, connect),
    }
}

/// `ephemera check-config`: every problem on its own line, exit 1 if any.
fn check_config(path: &std::path::Path, connect: bool) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(settings) => settings,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // Loaded once already, so this parses.
    if let Ok(file) = ephemera::config::read_file_config(path) {
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        for warning in ephemera::config::secret_file_warnings(&file, base) {
            eprintln!("warning: {warning}");
        }
    }
    if connect {
        let check = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(ephemera::config::check::check_upstream(&settings)),
            Err(error) => {
                eprintln!("ephemera: cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        for warning in &check.warnings {
            eprintln!(
                "{}: warning: {}: {}",
                path.display(),
                warning.key,
                warning.message
            );
        }
        let problems = check.problems;
        if !problems.is_empty() {
            eprint!(
                "{}",
                ephemera::config::ConfigErrors {
                    path: path.to_owned(),
                    problems
                }
            );
            return ExitCode::FAILURE;
        }
    }
    println!(
        "{}: OK{}",
        path.display(),
        if connect { " (upstream checked)" } else { "" }
    );
    ExitCode::SUCCESS
}

/// Run an admin API client command on a small runtime.
fn run_client(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ephemera: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: PathBuf) -> anyhow::Result<()> {
    let settings = Settings::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(settings).await?;
        server.serve(shutdown_signal()).await;
        Ok(())
    })
}

/// `ephemera dev`: prepare, serve until Ctrl-C/SIGTERM, revoke every lease,
/// stop the cluster.
fn dev(options: ephemera::dev::DevOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let progress = |step: &str| eprintln!("==> {step}");
    runtime.block_on(async {
        let environment = ephemera::dev::prepare(&options, &progress).await?;
        let settings =
            Settings::load(&environment.config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let server = Server::bind(settings)
            .await?
            .revoke_standalone_on_shutdown();
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ephemera"));
        println!("{}", environment.instructions(&exe));
        server.serve(shutdown_signal()).await;
        eprintln!("==> stopping PostgreSQL");
        environment.stop();
        eprintln!("==> stopped");
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
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
