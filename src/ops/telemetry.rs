//! Metrics (Prometheus text at the admin API's `/metrics`).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `ephemera_sessions_active` | gauge | |
//! | `ephemera_leases_active` | gauge | |
//! | `ephemera_leases_issued_total` | counter | template, kind |
//! | `ephemera_leases_revoked_total` | counter | template, reason |
//! | `ephemera_leases_expired_total` | counter | template, reason |
//! | `ephemera_denials_total` | counter | reason |
//! | `ephemera_handshake_seconds` | histogram | |
//! | `ephemera_role_creation_seconds` | histogram | |
//! | `ephemera_reaper_lag_seconds` | gauge | (how far past expiry the oldest expired role was at the last scan) |
//! | `ephemera_revocations_pending` | gauge | |
//! | `ephemera_revoke_failures_total` | counter | template |
//! | `ephemera_audit_write_failures_total` | counter | |
//! | `ephemera_audit_events_dropped_total` | counter | |

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SESSIONS_ACTIVE: &str = "ephemera_sessions_active";
pub const LEASES_ACTIVE: &str = "ephemera_leases_active";
pub const LEASES_ISSUED: &str = "ephemera_leases_issued_total";
pub const LEASES_REVOKED: &str = "ephemera_leases_revoked_total";
pub const LEASES_EXPIRED: &str = "ephemera_leases_expired_total";
pub const DENIALS: &str = "ephemera_denials_total";
pub const HANDSHAKE_SECONDS: &str = "ephemera_handshake_seconds";
pub const ROLE_CREATION_SECONDS: &str = "ephemera_role_creation_seconds";
pub const REAPER_LAG_SECONDS: &str = "ephemera_reaper_lag_seconds";
pub const REVOCATIONS_PENDING: &str = "ephemera_revocations_pending";
pub const REVOKE_FAILURES: &str = "ephemera_revoke_failures_total";
pub const REAPER_ELECTION_SQUATTED: &str = "ephemera_reaper_election_squatted_total";
pub const REVOKE_CLEANUPS: &str = "ephemera_revoke_cleanups_total";
pub const BACKGROUND_TASK_FAILURES: &str = "ephemera_background_task_failures_total";
pub const REFUSAL_EVENTS_SUPPRESSED: &str = "ephemera_refusal_events_suppressed_total";
pub const AUDIT_WRITE_FAILURES: &str = "ephemera_audit_write_failures_total";
pub const AUDIT_EVENTS_DROPPED: &str = "ephemera_audit_events_dropped_total";
pub const AUDIT_STATEMENTS: &str = "ephemera_audit_statements_total";
pub const AUDIT_STATEMENTS_DROPPED: &str = "ephemera_audit_statements_dropped_total";
pub const WORKER_CONNECTIONS: &str = "ephemera_worker_connections_total";
pub const POOL_HITS: &str = "ephemera_pool_hits_total";
pub const POOL_MISSES: &str = "ephemera_pool_misses_total";
pub const POOL_WAITS: &str = "ephemera_pool_waits_total";
pub const POOL_WAIT_TIMEOUTS: &str = "ephemera_pool_wait_timeouts_total";
pub const POOL_BACKENDS_IDLE: &str = "ephemera_pool_backends_idle";
pub const POOL_BACKENDS_ACTIVE: &str = "ephemera_pool_backends_active";
pub const POOL_RESETS_FAILED: &str = "ephemera_pool_resets_failed_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder (once) and return its handle.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding
            // program's); then ours only renders what it saw, which is
            // nothing. Said once: this runs once per process.
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(
                    %error,
                    "cannot install Ephemera's metrics recorder; /metrics will show no metrics (they go to the recorder already installed)"
                );
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        POOL_HITS,
        "Pooled clients given an idle backend (no mint, no login), by template"
    );
    metrics::describe_counter!(
        POOL_MISSES,
        "Pooled clients that needed a new backend, by template"
    );
    metrics::describe_counter!(
        POOL_WAITS,
        "Pooled clients that waited for a busy pool, by template"
    );
    metrics::describe_counter!(
        POOL_WAIT_TIMEOUTS,
        "Pooled clients refused with 53300 after pool_wait, by template"
    );
    metrics::describe_gauge!(POOL_BACKENDS_IDLE, "Pooled backends idle now, by template");
    metrics::describe_gauge!(
        POOL_BACKENDS_ACTIVE,
        "Pooled backends serving a client now, by template"
    );
    metrics::describe_counter!(
        POOL_RESETS_FAILED,
        "Pooled backends closed because their reset failed, by template"
    );
    metrics::describe_gauge!(SESSIONS_ACTIVE, "Relayed sessions open now");
    metrics::describe_gauge!(LEASES_ACTIVE, "Leases this process holds now");
    metrics::describe_counter!(LEASES_ISSUED, "Leases issued");
    metrics::describe_counter!(
        LEASES_REVOKED,
        "Leases revoked (session end, admin, shutdown, policy)"
    );
    metrics::describe_counter!(
        LEASES_EXPIRED,
        "Leases that reached their TTL, max TTL or SVID expiry"
    );
    metrics::describe_counter!(DENIALS, "Connections refused");
    metrics::describe_counter!(
        WORKER_CONNECTIONS,
        "Connections handed to each session thread (listen.workers)"
    );
    metrics::describe_histogram!(
        HANDSHAKE_SECONDS,
        "Accept to admitted identity (TLS and startup)"
    );
    metrics::describe_histogram!(ROLE_CREATION_SECONDS, "Time to mint a role");
    metrics::describe_gauge!(
        REAPER_LAG_SECONDS,
        "How long past expiry the oldest expired role was at the last reaper scan"
    );
    metrics::describe_gauge!(
        REVOCATIONS_PENDING,
        "Revocations started and not yet finished (retrying)"
    );
    metrics::describe_counter!(
        REVOKE_FAILURES,
        "Failed revocation attempts (each is retried)"
    );
    metrics::describe_counter!(
        REAPER_ELECTION_SQUATTED,
        "Reaper elections held by a role other than the admin role (cause=held) or impossible (cause=unavailable); reaped anyway"
    );
    metrics::describe_counter!(
        REVOKE_CLEANUPS,
        "Objects and prepared transactions a session left behind, undone at revocation"
    );
    metrics::describe_counter!(
        BACKGROUND_TASK_FAILURES,
        "Background tasks (lease clock, reaper, admin API) that failed and were restarted"
    );
    metrics::describe_counter!(
        REFUSAL_EVENTS_SUPPRESSED,
        "Refusal audit events not written because the peer exceeded its event rate"
    );
    metrics::describe_counter!(
        AUDIT_WRITE_FAILURES,
        "Audit events that did not reach the audit file (write failed, queue full or writer stopped); each is logged at ERROR instead"
    );
    metrics::describe_counter!(
        AUDIT_EVENTS_DROPPED,
        "Audit events never handed to the audit file's writer (queue full or writer stopped); each is logged at ERROR instead"
    );
}
