//! `loadlab-presence` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use loadlab_kit::config::{CommonArgs, ConfigError, parse_duration};

/// Shortest accepted `--presence-ttl`: gateways heartbeat every few seconds, so anything shorter
/// would flap users offline between two heartbeats.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Shortest accepted `--presence-sweep-interval`: below it the sweeper is a busy loop on Redis.
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);
/// Largest accepted `--watch-buffer`.
pub const MAX_WATCH_BUFFER: usize = 1_000_000;

/// Flags of the presence service.
#[derive(Debug, Clone, Args)]
pub struct PresenceConfig {
    /// Address to listen on (gRPC over h2c, plus probes and metrics).
    #[arg(long, env = "LOADLAB_LISTEN", default_value = "0.0.0.0:8083")]
    pub listen: SocketAddr,

    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// A user goes offline this long after the last heartbeat that listed them. Gateways should
    /// heartbeat several times per TTL so one lost heartbeat does not flap users offline.
    #[arg(long, env = "LOADLAB_PRESENCE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub presence_ttl: Duration,

    /// How often expired presence entries are swept (and their users reported offline).
    #[arg(
        long,
        env = "LOADLAB_PRESENCE_SWEEP_INTERVAL",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub presence_sweep_interval: Duration,

    /// Events buffered per WatchChannel stream; a watcher that falls this far behind is
    /// disconnected with RESOURCE_EXHAUSTED instead of growing memory.
    #[arg(long, env = "LOADLAB_WATCH_BUFFER", default_value_t = 1024)]
    pub watch_buffer: usize,
}

impl PresenceConfig {
    /// Checks the configuration; the message names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        if self.presence_ttl < MIN_TTL {
            return Err(ConfigError(format!(
                "--presence-ttl must be at least {MIN_TTL:?} (got {:?})",
                self.presence_ttl
            )));
        }
        // A sweep slower than the TTL would report users offline up to twice the TTL late.
        if self.presence_sweep_interval < MIN_SWEEP_INTERVAL
            || self.presence_sweep_interval > self.presence_ttl
        {
            return Err(ConfigError(format!(
                "--presence-sweep-interval must be between {MIN_SWEEP_INTERVAL:?} and --presence-ttl (got {:?})",
                self.presence_sweep_interval
            )));
        }
        if !(1..=MAX_WATCH_BUFFER).contains(&self.watch_buffer) {
            return Err(ConfigError(format!(
                "--watch-buffer must be in 1..={MAX_WATCH_BUFFER} (got {})",
                self.watch_buffer
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: PresenceConfig,
    }

    fn parse(extra: &[&str]) -> PresenceConfig {
        let mut args = vec!["x", "--jwt-secret", "0123456789abcdef"];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).expect("parse").config
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = parse(&[]);
        assert_eq!(cfg.listen.port(), 8083);
        assert_eq!(cfg.presence_ttl, Duration::from_secs(30));
        assert_eq!(cfg.presence_sweep_interval, Duration::from_secs(1));
        assert_eq!(cfg.watch_buffer, 1024);
        cfg.validate().expect("valid");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: [(&[&str], &str); 4] = [
            (&["--presence-ttl", "500ms"], "--presence-ttl"),
            (
                &["--presence-ttl", "2s", "--presence-sweep-interval", "3s"],
                "--presence-sweep-interval",
            ),
            (
                &["--presence-sweep-interval", "1ms"],
                "--presence-sweep-interval",
            ),
            (&["--watch-buffer", "0"], "--watch-buffer"),
        ];
        for (args, flag) in cases {
            let err = parse(args).validate().expect_err("invalid");
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        let cfg = parse(&[
            "--presence-ttl",
            "1s",
            "--presence-sweep-interval",
            "100ms",
            "--watch-buffer",
            "4",
        ]);
        assert_eq!(cfg.presence_ttl, MIN_TTL);
        assert_eq!(cfg.presence_sweep_interval, Duration::from_millis(100));
        cfg.validate().expect("valid");
    }
}
