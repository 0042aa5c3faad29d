//! `[lease]` and the limits in `[listen]`.

use crate::config::problems::Problems;
use crate::config::schema::FileConfig;

pub(super) fn lease(file: &FileConfig, problems: &mut Problems) {
    // -- lease --
    if file.lease.login_window.is_zero() {
        problems.add("lease.login_window", "must be longer than 0s, e.g. \"60s\"");
    }
    if file.listen.max_connections == 0 {
        problems.add("listen.max_connections", "must be at least 1");
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
