//! The shared runtime of the retention platform's services (SPEC 2, 3, 5, 6).
//!
//! A service's `main` is one line ([`cli::main`]); its `run` wires its
//! handlers into a [`server::Kit`], which brings configuration, telemetry,
//! health, reflection, auth, metrics, database and Redis pools, the outbox
//! relay and event consumers. Where a request enters: [`edge`]. Where errors
//! become gRPC statuses: [`error`]. Where events leave and arrive:
//! [`outbox`] and [`consumer`].

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod consumer;
pub mod db;
pub mod edge;
pub mod error;
pub mod fields;
pub mod idempotency;
pub mod lifecycle;
pub mod metrics;
pub mod outbox;
pub mod paging;
pub mod privacy;
pub mod retention;
pub mod server;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{AccessPolicy, Caller, Role};
pub use error::{ApiError, FieldViolations, IntoGrpc};
pub use server::{Kit, KitError, ServiceSpec};
