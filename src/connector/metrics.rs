//! The connector's metrics, on a Prometheus recorder of its own (never the
//! process-wide one, which `ephemera serve` owns when both run in one
//! process, as in the tests).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `ephemera_connector_connections_total` | counter | (every accepted application connection, cancels included) |
//! | `ephemera_connector_sessions_active` | gauge | |
//! | `ephemera_connector_errors_total` | counter | cause |
//! | `ephemera_connector_svid_expiry_seconds` | gauge | (seconds until the current SVID expires; negative once expired) |

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub const CONNECTIONS: &str = "ephemera_connector_connections_total";
pub const SESSIONS_ACTIVE: &str = "ephemera_connector_sessions_active";
pub const ERRORS: &str = "ephemera_connector_errors_total";
pub const SVID_EXPIRY_SECONDS: &str = "ephemera_connector_svid_expiry_seconds";

const METADATA: Metadata<'static> = Metadata::new(
    "ephemera::connector",
    metrics::Level::INFO,
    Some(module_path!()),
);

/// The recorder and the handles the connector updates.
pub struct ConnectorMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub connections: Counter,
    pub sessions_active: Gauge,
    pub svid_expiry: Gauge,
}

impl std::fmt::Debug for ConnectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectorMetrics")
    }
}

impl Default for ConnectorMetrics {
    fn default() -> Self {
        ConnectorMetrics::new()
    }
}

impl ConnectorMetrics {
    pub fn new() -> ConnectorMetrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        describe(&recorder);
        let connections = recorder.register_counter(&Key::from_name(CONNECTIONS), &METADATA);
        let sessions_active = recorder.register_gauge(&Key::from_name(SESSIONS_ACTIVE), &METADATA);
        let svid_expiry = recorder.register_gauge(&Key::from_name(SVID_EXPIRY_SECONDS), &METADATA);
        ConnectorMetrics {
            recorder,
            handle,
            connections,
            sessions_active,
            svid_expiry,
        }
    }

    /// Count one error of `cause` (a fixed label, never client text).
    pub fn error(&self, cause: &'static str) {
        let key = Key::from_parts(ERRORS, vec![Label::new("cause", cause)]);
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn describe(recorder: &PrometheusRecorder) {
    for (name, text) in [
        (CONNECTIONS, "Application connections accepted"),
        (ERRORS, "Connections that failed, by cause"),
    ] {
        recorder.describe_counter(KeyName::from(name), None, SharedString::from(text));
    }
    for (name, text) in [
        (SESSIONS_ACTIVE, "Sessions relayed to Ephemera now"),
        (
            SVID_EXPIRY_SECONDS,
            "Seconds until the current X.509-SVID expires (negative: expired)",
        ),
    ] {
        recorder.describe_gauge(KeyName::from(name), None, SharedString::from(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_cause() {
        let metrics = ConnectorMetrics::new();
        metrics.connections.increment(2);
        metrics.error("ephemera_unreachable");
        let text = metrics.render();
        assert!(
            text.contains("ephemera_connector_connections_total 2"),
            "{text}"
        );
        assert!(
            text.contains("ephemera_connector_errors_total{cause=\"ephemera_unreachable\"} 1"),
            "{text}"
        );
    }
}
