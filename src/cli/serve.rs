//! `ephemera serve`, `ephemera dev` and `ephemera check-config`: the commands
//! that run a proxy or check its configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use ephemera::{Server, Settings};

/// `ephemera check-config`: every problem on its own line, exit 1 if any.
pub fn check_config(path: &Path, connect: bool) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(settings) => settings,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // Loaded once already, so this parses.
    if let Ok(file) = ephemera::config::read_file_config(path) {
        let base = path.parent().unwrap_or(Path::new("."));
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
        for note in &check.notes {
            println!("{note}");
        }
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

/// `ephemera serve`: serve until Ctrl-C/SIGTERM.
pub fn serve(config: PathBuf) -> anyhow::Result<()> {
    let settings = Settings::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = control_runtime()?;
    runtime.block_on(async {
        let server = Server::bind(settings).await?;
        server.serve(shutdown_signal()).await;
        Ok(())
    })
}

/// `ephemera dev`: prepare, serve until Ctrl-C/SIGTERM, revoke every lease,
/// stop the cluster.
pub fn dev(options: ephemera::dev::DevOptions) -> anyhow::Result<()> {
    let runtime = control_runtime()?;
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

/// The runtime for the accept loop, the handshakes (TLS, SVID checks,
/// minting, upstream logins), the admin API, the lease clock and the
/// reaper: multi-threaded, so that handshakes use every core. Established
/// sessions are relayed on threads of their own (`listen.workers`).
fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ephemera-handshake")
        .build()
        .context("cannot start the async runtime")
}

/// Ctrl-C or SIGTERM.
pub(super) async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
