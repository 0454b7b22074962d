//! Flags of the pod entrypoints `loadlab coordinator` and `loadlab worker`, each with a
//! `LOADLAB_*` environment fallback so a pod spec can set them either way.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::spec::parse_duration;

/// Flags of `loadlab coordinator`.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// The load test: a LoadTest manifest or its spec (YAML or JSON), e.g. a ConfigMap mount.
    #[arg(short = 'f', long = "file", env = "LOADLAB_SPEC")]
    pub file: PathBuf,
    /// Run name; workers that name another run are refused (default: generated).
    #[arg(long, env = "LOADLAB_RUN")]
    pub run: Option<String>,
    /// Address to serve the coordinator protocol on.
    #[arg(long, env = "LOADLAB_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: String,
    /// Workers of the run (default: the spec's `workers`).
    #[arg(long, env = "LOADLAB_WORKERS")]
    pub workers: Option<u32>,
    /// Report directory.
    #[arg(long, env = "LOADLAB_OUT", default_value = "loadlab-report")]
    pub out: PathBuf,
    /// Accept any TLS certificate (during set-up).
    #[arg(long)]
    pub insecure: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `loadlab worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The coordinator's URL, e.g. http://coordinator:7000.
    #[arg(long, env = "LOADLAB_COORDINATOR")]
    pub coordinator: String,
    /// This worker's shard, 0..total (an Indexed Job sets JOB_COMPLETION_INDEX).
    #[arg(long, env = "JOB_COMPLETION_INDEX")]
    pub index: u32,
    /// Workers of the run; must match the coordinator's.
    #[arg(long, env = "LOADLAB_WORKERS")]
    pub total: u32,
    /// The run this worker is for (default: whatever the coordinator runs).
    #[arg(long, env = "LOADLAB_RUN", default_value = "")]
    pub run: String,
    /// How long to keep trying to reach the coordinator at first.
    #[arg(long, env = "LOADLAB_CONNECT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Accept any TLS certificate from the target.
    #[arg(long)]
    pub insecure: bool,
}
