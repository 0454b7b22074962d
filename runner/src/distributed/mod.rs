//! Distributed runs (ARCHITECTURE.md §4 "Distributed runs"): one coordinator and N load workers
//! speaking `loadlab.runner.v1.Coordinator` over gRPC (the protocol is described in
//! `proto/loadlab/runner/v1/runner.proto`).
//!
//! * [`shard`]: each worker's share of the executor, its VU ids and its slice of the users.
//! * [`codec`]: interval buffers as HdrHistogram V2+DEFLATE blobs, set-up data, both ways.
//! * [`hdr`]: histogram blobs decoded sparsely (exact, and cheap for the coordinator).
//! * [`merge`]: the coordinator's exact merge of the reports into totals and intervals.
//! * [`coordinator`]: registration, set-up once, the barrier and scheduled start, merging,
//!   worker loss, stop, and the summary.
//! * [`worker`]: a load worker (`loadlab worker`, one pod of an Indexed Job).
//! * [`local`]: `loadlab run --workers N`, N worker processes of this binary on this machine.

use std::time::Duration;

pub mod cli;
pub mod codec;
pub mod coordinator;
pub mod hdr;
pub mod local;
pub mod merge;
mod service;
pub mod shard;
pub mod worker;

/// The version workers must share with their coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Both sides send something at least this often.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A peer silent for this long is lost (three missed heartbeats: one late packet is not a loss,
/// and a dead peer is still noticed within a few seconds).
pub const LOSS_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest gRPC message either side accepts: set-up data of large runs (every user's token) is
/// tens of MB; reports are a few kB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Exit code of a run that could not complete as planned: a worker was lost under
/// `onWorkerLoss: fail`, or did not register in time. (99 stays "thresholds failed".)
pub const EXIT_RUN_INCOMPLETE: i32 = 98;
