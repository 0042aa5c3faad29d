//! `[lease]` and the limits in `[listen]`.

use crate::config::problems::Problems;
use crate::config::schema::FileConfig;

/// More session threads than this would only add scheduling work.
const MAX_WORKERS: usize = 256;

/// `listen.workers`, or one per core the process may run on.
pub(super) fn workers(file: &FileConfig) -> usize {
    file.listen.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
}

pub(super) fn lease(file: &FileConfig, problems: &mut Problems) {
    // -- lease --
    if file.lease.login_window.is_zero() {
        problems.add("lease.login_window", "must be longer than 0s, e.g. \"60s\"");
    }
    if file.listen.max_connections == 0 {
        problems.add("listen.max_connections", "must be at least 1");
    }
    if let Some(workers) = file.listen.workers {
        if !(1..=MAX_WORKERS).contains(&workers) {
            problems.add(
                "listen.workers",
                format!("must be between 1 and {MAX_WORKERS} (leave it out for one per core)"),
            );
        }
    }
    if !(file.lease.issue_rate_per_identity > 0.0 && file.lease.issue_rate_per_identity.is_finite())
    {
        problems.add(
            "lease.issue_rate_per_identity",
            "must be a positive number of new leases per second, e.g. 10",
        );
    }
    if file.lease.issue_burst_per_identity == 0 {
        problems.add("lease.issue_burst_per_identity", "must be at least 1");
    }
    if file.lease.reap_interval.is_zero() {
        problems.add(
            "lease.reap_interval",
            "must be longer than 0s, e.g. \"10s\"",
        );
    }
}
