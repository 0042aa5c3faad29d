//! Shared test harness for Ephemera's integration tests. Use it from a test file with
//! `mod common;` (from a module of `tests/it/`: `use crate::common;`).
//!
//! * [`pg`]: one real PostgreSQL 15 cluster per test binary ([`cluster()`]), with
//!   SCRAM authentication, TLS and statement logging.
//! * [`pki`]: certificate authorities, SPIFFE X.509-SVIDs (valid and deliberately
//!   invalid), server certificates and rustls client configs ([`TestCa`]).
//!
//! Every test binary compiles this module separately and uses a different subset of
//! it, hence the blanket `dead_code` allowance.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::too_many_lines)]

pub mod os;
pub mod pg;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod workload_api;

pub use pg::{cluster, exec_sql, TestCluster, HOST, SUPERUSER};
pub use pki::{make_tls_connect, svid_params, tls_client_config, TestCa, TestCert};
