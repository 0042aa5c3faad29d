//! The integration tests that can share a process and one PostgreSQL
//! cluster, a module per area, in one binary: compiled and linked once
//! instead of once per file (see the numbers in the commit that made it).
//!
//! Run one area with `cargo test --test it leases::`.
//!
//! Still their own binaries, each with its own process and cluster
//! (`tests/*.rs`): `admin_flood` (changes the process's file limit),
//! `crash`, `election`, `reaper` and `replicas` (they assert which
//! Ephemera reaps or holds the reaper election, which any other proxy on
//! the same cluster could do), `faults` (it terminates the admin
//! role's connections and rotates its password), and `session` (it checks
//! that no plaintext password is anywhere in the cluster's statement log,
//! where other tests put some on purpose).

#[path = "../common/mod.rs"]
mod common;

mod admin_errors;
mod backpressure;
mod cancel;
mod cert_login;
mod check_config;
mod cli;
mod compat;
mod compat_disconnect;
mod config;
mod connector;
mod dev;
mod engine_seam;
mod exec;
mod exec_tokens;
mod federation;
mod hardening;
mod harness_smoke;
mod intermediate_ca;
mod layout;
mod leases;
mod limits;
mod on_behalf;
mod pool;
mod proptest_protocol;
mod refusals;
mod review_attacks;
mod rotation;
mod statement_audit;
mod static_engine;
mod tokens;
mod workers;
mod workload_api;
mod workload_serve;
