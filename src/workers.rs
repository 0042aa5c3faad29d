//! The session threads: one single-threaded tokio runtime per worker
//! (`listen.workers`, one per core by default). Once a session is
//! established (TLS, SVID, mint, upstream login: on the multi-threaded
//! runtime, so that handshakes never stall relays), it is handed to the
//! next worker in turn and relayed there until it ends
//! (`session/handoff.rs`).
//!
//! Why not tokio's work-stealing runtime: a relayed transaction is two
//! small reads and two small writes, and on the multi-threaded runtime
//! most of its CPU went to waking and migrating tasks between threads
//! (22–26 % of the relay's CPU, BENCHMARKS.md, issue 14). On a
//! single-threaded runtime a session's wake-ups stay on one core.
//!
//! What sessions share (leases, cancel keys, limits) lives in `Arc`s with
//! locks or atomics and works from any thread; no session state is
//! thread-local.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// How many connections each worker was handed, shared with [`Services`]
/// so that operators (and tests) can see the spread.
///
/// [`Services`]: crate::session::services::Services
#[derive(Debug, Clone)]
pub struct WorkerLoad {
    accepted: Arc<[AtomicU64]>,
}

impl WorkerLoad {
    pub fn new(workers: usize) -> Self {
        WorkerLoad {
            accepted: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn workers(&self) -> usize {
        self.accepted.len()
    }

    /// Connections handed to each worker so far, by worker index.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// The running session threads.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next: AtomicUsize,
    load: WorkerLoad,
    stop: CancellationToken,
}

impl Workers {
    /// Start one thread per worker counted in `load`.
    pub fn start(load: WorkerLoad) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(load.workers());
        let mut threads = Vec::with_capacity(load.workers());
        for index in 0..load.workers() {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ephemera-worker-{index}"))
                .spawn(move || {
                    // Drive the sessions handed to this runtime until told
                    // to stop; dropping it cancels whatever is left.
                    runtime.block_on(stopped.cancelled());
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            threads: Mutex::new(threads),
            next: AtomicUsize::new(0),
            load,
            stop,
        })
    }

    /// Connections handed to each worker so far.
    pub fn load(&self) -> &WorkerLoad {
        &self.load
    }

    /// Run `session` on the next worker in turn; its result can be awaited
    /// from any runtime. The future is created on that worker's thread, so
    /// that the sockets it registers there belong to that worker's reactor.
    pub fn spawn<F, Fut, T>(&self, session: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce(usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.load.accepted[index].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::ops::telemetry::WORKER_CONNECTIONS, "worker" => index.to_string())
            .increment(1);
        self.handles[index].spawn(async move { session(index).await })
    }

    /// Stop every worker (their remaining sessions are dropped) and wait
    /// for the threads to end.
    pub async fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a session thread panicked while stopping");
                }
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // A server dropped without an orderly stop must not leave threads.
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_handed_out_in_turn_each_to_its_own_thread() {
        let load = WorkerLoad::new(2);
        let workers = Workers::start(load.clone()).unwrap();
        let mut names = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            drop(workers.spawn(move |index| async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send((index, name));
            }));
            names.push(rx.await.unwrap());
        }
        assert_eq!(load.accepted(), vec![2, 2]);
        let expect = |i: usize| (i, Some(format!("ephemera-worker-{i}")));
        assert_eq!(names, vec![expect(0), expect(1), expect(0), expect(1)]);
        workers.stop().await;
    }
}
