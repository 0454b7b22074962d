//! `loadlab-feed` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use loadlab_kit::auth::HashCost;
use loadlab_kit::config::{CommonArgs, ConfigError, parse_duration};

/// What this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// HTTP edge and gRPC API only.
    Api,
    /// Fan-out workers and the outbox sweep only (plus probes and metrics).
    Fanout,
    /// Both.
    All,
}

impl Role {
    /// Whether the API routes are served.
    pub fn serves_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }

    /// Whether fan-out workers run.
    pub fn runs_fanout(self) -> bool {
        matches!(self, Role::Fanout | Role::All)
    }
}

/// Flags of the feed service.
#[derive(Debug, Clone, Args)]
pub struct FeedConfig {
    /// Address to listen on (HTTP/1.1 and gRPC over h2c).
    #[arg(long, env = "LOADLAB_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Run the API, the fan-out workers, or both.
    #[arg(long, env = "LOADLAB_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,

    /// The timeline service (gRPC).
    #[arg(
        long,
        env = "LOADLAB_TIMELINE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub timeline_url: String,

    /// Authors with at least this many followers are not fanned out; their posts are merged
    /// into readers' timelines at read time.
    #[arg(long, env = "LOADLAB_CELEBRITY_THRESHOLD", default_value_t = 10_000)]
    pub celebrity_threshold: u64,

    /// Longest accepted post, in characters (Unicode scalar values).
    #[arg(long, env = "LOADLAB_MAX_POST_CHARS", default_value_t = 2_000)]
    pub max_post_chars: usize,

    /// Lifetime of issued tokens.
    #[arg(long, env = "LOADLAB_TOKEN_TTL", default_value = "24h", value_parser = parse_duration)]
    pub token_ttl: Duration,

    /// argon2id memory cost in KiB (19456 = OWASP's recommendation; lower only for load labs).
    #[arg(long, env = "LOADLAB_PASSWORD_MEMORY_KIB", default_value_t = 19_456)]
    pub password_memory_kib: u32,

    /// argon2id passes.
    #[arg(long, env = "LOADLAB_PASSWORD_ITERATIONS", default_value_t = 2)]
    pub password_iterations: u32,

    /// Followers per `timeline.Append` call.
    #[arg(long, env = "LOADLAB_FANOUT_BATCH", default_value_t = 500)]
    pub fanout_batch: usize,

    /// Posts fanned out concurrently by each consumer.
    #[arg(long, env = "LOADLAB_FANOUT_CONCURRENCY", default_value_t = 16)]
    pub fanout_concurrency: usize,

    /// Queue consumers per process; each keeps a batch of posts in flight.
    #[arg(long, env = "LOADLAB_FANOUT_CONSUMERS", default_value_t = 4)]
    pub fanout_consumers: usize,

    /// Pause between batches of one post's fan-out, to throttle the write load on timelines.
    #[arg(long, env = "LOADLAB_FANOUT_BATCH_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub fanout_batch_delay: Duration,

    /// How often the outbox sweep looks for posts whose fan-out did not complete.
    #[arg(long, env = "LOADLAB_FANOUT_SWEEP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub fanout_sweep_interval: Duration,

    /// Age after which an unfinished fan-out is re-published by the sweep.
    #[arg(long, env = "LOADLAB_FANOUT_SWEEP_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub fanout_sweep_after: Duration,

    /// Idle time after which a job held by a dead worker is claimed by another.
    #[arg(long, env = "LOADLAB_FANOUT_CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub fanout_claim_idle: Duration,

    /// Lifetime of cached posts.
    #[arg(long, env = "LOADLAB_POST_CACHE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub post_cache_ttl: Duration,
}

impl FeedConfig {
    /// Checks the configuration; the message names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        if self.celebrity_threshold == 0 {
            return Err(ConfigError("--celebrity-threshold must be positive".into()));
        }
        if self.max_post_chars == 0 {
            return Err(ConfigError("--max-post-chars must be positive".into()));
        }
        if self.fanout_batch == 0 || self.fanout_batch > 10_000 {
            return Err(ConfigError("--fanout-batch must be in 1..=10000".into()));
        }
        if self.fanout_concurrency == 0 || self.fanout_consumers == 0 {
            return Err(ConfigError(
                "--fanout-concurrency and --fanout-consumers must be positive".into(),
            ));
        }
        if self.fanout_sweep_interval.is_zero() || self.fanout_claim_idle.is_zero() {
            return Err(ConfigError(
                "--fanout-sweep-interval and --fanout-claim-idle must be positive".into(),
            ));
        }
        if !(self.timeline_url.starts_with("http://") || self.timeline_url.starts_with("https://"))
        {
            return Err(ConfigError(format!(
                "--timeline-url must be an http:// URL (got {:?})",
                self.timeline_url
            )));
        }
        Ok(())
    }

    /// argon2 cost.
    pub fn hash_cost(&self) -> HashCost {
        HashCost {
            memory_kib: self.password_memory_kib,
            iterations: self.password_iterations,
        }
    }
}
