//! What can go wrong in the presence service; mapped to gRPC statuses in `grpc.rs` only.

use loadlab_kit::Id;
use loadlab_kit::engine::EngineError;

use crate::domain::InvalidInput;

/// Why a presence operation failed or a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The request breaks the contract.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The engine (Redis) failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The task registering a watcher stopped before answering (it panicked).
    #[error("watch registration for channel {0} stopped unexpectedly")]
    WatchRegistration(Id),
    /// A watcher fell more than its buffer behind and was cut off.
    #[error(
        "watcher too slow: fell more than {buffer} events behind on channel {channel}; watch again"
    )]
    WatcherTooSlow {
        /// The watched channel.
        channel: Id,
        /// The configured `--watch-buffer`.
        buffer: usize,
    },
    /// The server is shutting down; the watcher should reconnect (to another replica).
    #[error("presence is shutting down; watch again")]
    ShuttingDown,
}
