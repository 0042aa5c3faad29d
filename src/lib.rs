//! Ephemera: dynamic PostgreSQL credentials for SPIFFE workloads.
//!
//! A workload connects over the PostgreSQL protocol with its X.509-SVID as
//! TLS client certificate; Ephemera mints a role for that one session,
//! logs in upstream as it, relays the session and drops the role at the end.
//!
//! The modules follow a session's steps:
//!
//! | step | module |
//! | --- | --- |
//! | accept, TLS, startup packet | [`front_door`], [`protocol`] |
//! | who is it | [`identity`] |
//! | may it | [`policy`] |
//! | mint the role | [`leases`] over the engine (`engines/`) |
//! | log in upstream | [`upstream`] |
//! | pass bytes | [`relay`] |
//! | cancel requests | [`cancel`] |
//! | turning clients away | [`refusal`] |
//! | certificates and trust bundle (reloadable) | [`tls`] |
//!
//! [`server`] ties them together; [`config`] is the file DBAs write.

pub mod admin;
pub mod admin_client;
pub mod audit;
pub mod cancel;
pub mod check;
pub mod config;
pub mod dev;
pub mod front_door;
pub mod hardening;
pub mod identity;
pub mod leases;
pub mod limits;
pub mod policy;
pub mod protocol;
pub mod refusal;
pub mod relay;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::Settings;
pub use server::Server;
