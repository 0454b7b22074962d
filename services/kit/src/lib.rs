//! Shared foundation of loadlab's services.
//!
//! Every service binary is a thin `main` over a library whose `serve` function takes a typed config
//! and a [`shutdown::Shutdown`]; this crate holds what they share: configuration, snowflake ids, auth
//! tokens and password hashing, the JSON error contract, the engines (memory | redis), the database
//! (sea-orm entities + migrations), the one-port HTTP+gRPC server, metrics and shutdown.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod db;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use error::ApiError;
pub use ids::{Id, Snowflake};
pub use shutdown::Shutdown;

/// Locks `m`, recovering from poisoning: every lock of this crate guards state that a panic
/// elsewhere cannot leave half-updated in a way that matters (single inserts, removes, swaps),
/// so one panicking task must not cascade into every other user of the lock.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
