//! `loadlab-timeline` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use loadlab_kit::config::{CommonArgs, ConfigError, parse_duration};

/// Flags of the timeline service.
#[derive(Debug, Clone, Args)]
pub struct TimelineConfig {
    /// Address to listen on (gRPC over h2c, plus probes and metrics).
    #[arg(long, env = "LOADLAB_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,

    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// The feed service (gRPC), for hydration misses and rebuilds.
    #[arg(
        long,
        env = "LOADLAB_FEED_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub feed_url: String,

    /// Entries kept per timeline; older ones are trimmed on append.
    #[arg(long, env = "LOADLAB_TIMELINE_CAP", default_value_t = 800)]
    pub timeline_cap: usize,

    /// How long "which celebrities does this user follow" is cached. Follows and unfollows
    /// invalidate it at once; the TTL bounds staleness in the rare cases they cannot.
    #[arg(long, env = "LOADLAB_CELEBRITY_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub celebrity_cache_ttl: Duration,

    /// Lifetime of cached posts.
    #[arg(long, env = "LOADLAB_POST_CACHE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub post_cache_ttl: Duration,
}

impl TimelineConfig {
    /// Checks the configuration; the message names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        if !(1..=100_000).contains(&self.timeline_cap) {
            return Err(ConfigError("--timeline-cap must be in 1..=100000".into()));
        }
        if self.celebrity_cache_ttl < Duration::from_secs(1)
            || self.post_cache_ttl < Duration::from_secs(1)
        {
            return Err(ConfigError(
                "--celebrity-cache-ttl and --post-cache-ttl must be at least 1s".into(),
            ));
        }
        if !(self.feed_url.starts_with("http://") || self.feed_url.starts_with("https://")) {
            return Err(ConfigError(format!(
                "--feed-url must be an http:// URL (got {:?})",
                self.feed_url
            )));
        }
        Ok(())
    }
}
