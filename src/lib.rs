//! Ephemera: dynamic PostgreSQL credentials for SPIFFE workloads.
//!
//! A workload connects over the PostgreSQL protocol with its X.509-SVID as
//! TLS client certificate; Ephemera mints a role for that one session,
//! logs in upstream as it, relays the session and drops the role at the end.
//!
//! The folders follow a session and the parts of the system; ARCHITECTURE.md
//! (at the repository's root) is the map:
//!
//! | part | module |
//! | --- | --- |
//! | one session, step by step: front door, protocol, upstream login, relay, cancel, refusals | [`session`] |
//! | who is it (SPIFFE IDs, X.509-SVIDs) | [`identity`] |
//! | may it | [`policy`] |
//! | every credential's life: issue, renew, expire, revoke, reap | [`leases`] |
//! | the engines Ephemera mints credentials with (registered in one place) | [`engines`] |
//! | the admin API: server, JSON types, client | [`admin`] |
//! | the file DBAs write, validated | [`config`] |
//! | TLS material: ours towards clients (reloadable), the upstream's | [`tls`] |
//! | audit log, metrics, limits, process hardening | [`ops`] |
//! | `ephemera connect`: the local connector for applications without credentials | [`connector`] |
//! | `ephemera dev`: a throwaway cluster, a dev CA, a running proxy | [`dev`] |
//!
//! [`server`] builds the shared state and runs the listeners; [`workers`]
//! are the session threads it hands connections to.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod connector;
pub mod dev;
pub mod engines;
pub mod identity;
pub mod leases;
pub mod ops;
pub mod policy;
pub mod server;
pub mod session;
pub mod tls;
pub mod workers;

pub use config::Settings;
pub use server::Server;
