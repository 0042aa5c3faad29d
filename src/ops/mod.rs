//! Running Ephemera in production: the audit log, metrics, limits that keep
//! one client from costing others, and process hardening.

pub mod audit;
pub mod audit_query;
pub mod hardening;
pub mod limits;
pub mod statement_log;
pub mod telemetry;
