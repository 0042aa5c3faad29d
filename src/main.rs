//! The `ephemera` command. Errors become `anyhow` here and nowhere else.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
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
        Command::CheckConfig { path } => match Settings::load(&path) {
            Ok(_) => {
                println!("{}: OK", path.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::FAILURE
            }
        },
    }
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

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EPHEMERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // tokio-postgres logs statement text at debug level, and the
        // statements that create roles carry SCRAM verifiers: never below info.
        .add_directive(
            "tokio_postgres=info"
                .parse()
                .expect("a constant, valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
