//! The floor (issue 14): the plainest relay tokio can be, built and run by
//! the harness as a process of its own, so that Ephemera's relay CPU per
//! transaction has a same-machine, same-run reference. No TLS, no
//! protocol, one single-threaded runtime, `copy_bidirectional` from
//! loopback TCP to PostgreSQL's Unix socket. Whatever Ephemera spends
//! above it is TLS towards the client and Ephemera's own work.

use tokio::net::{TcpListener, UnixStream};

/// `127.0.0.1:<port>|<PostgreSQL's socket path>`: set, this process is the
/// floor relay instead of the harness.
pub const FLOOR_RELAY_ENV: &str = "EPHEMERA_BENCH_FLOOR_RELAY";

/// If this process was started as the floor relay, relay until killed.
pub fn run_if_asked() {
    let Ok(spec) = std::env::var(FLOOR_RELAY_ENV) else {
        return;
    };
    let (listen, socket) = spec
        .split_once('|')
        .expect("EPHEMERA_BENCH_FLOOR_RELAY is address|socket");
    let (listen, socket) = (listen.to_owned(), socket.to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&listen).await.expect("the floor's port");
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
}
