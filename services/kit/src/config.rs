//! Configuration shared by every service binary: CLI flags with `LOADLAB_*` environment fallbacks.
//! Each binary flattens [`CommonArgs`] into its own typed config and validates it at start.

use std::time::Duration;

use clap::Args;

use crate::engine::EngineKind;
use crate::telemetry::{LogFormat, OtelArgs};

/// Flags every service understands.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Where short-lived state lives: `memory` (single process only) or `redis`.
    #[arg(long, env = "LOADLAB_ENGINE", value_enum, default_value_t = EngineKind::Redis)]
    pub engine: EngineKind,

    /// Redis URL for `--engine redis`.
    #[arg(
        long,
        env = "LOADLAB_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Prefix for every Redis key, so several deployments (or tests) can share one Redis.
    #[arg(long, env = "LOADLAB_REDIS_PREFIX", default_value = "loadlab:")]
    pub redis_prefix: String,

    /// Redis connections in the pool.
    #[arg(long, env = "LOADLAB_REDIS_POOL", default_value_t = 4)]
    pub redis_pool: usize,

    /// Database connection.
    #[command(flatten)]
    pub db: DbArgs,

    /// Run database migrations at start.
    #[arg(long, env = "LOADLAB_MIGRATE", default_value_t = false)]
    pub migrate: bool,

    /// Snowflake node id (0..=1023). Default: the ordinal at the end of the host name, else a
    /// hash of host name and pid. Set it explicitly for replicas that are not ordinal-named.
    #[arg(long, env = "LOADLAB_NODE_ID")]
    pub node_id: Option<u16>,

    /// HS256 secret shared by every service (at least 16 bytes). Required.
    #[arg(long, env = "LOADLAB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Largest accepted request body.
    #[arg(long, env = "LOADLAB_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Requests handled at once; beyond it requests are shed with 503 + Retry-After.
    #[arg(long, env = "LOADLAB_CONCURRENCY_LIMIT", default_value_t = 1024)]
    pub concurrency_limit: usize,

    /// Per-request deadline; a request that takes longer is answered 503.
    #[arg(long, env = "LOADLAB_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// How long shutdown waits for in-flight work before giving up.
    #[arg(long, env = "LOADLAB_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format.
    #[arg(long, env = "LOADLAB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OpenTelemetry export.
    #[command(flatten)]
    pub otel: OtelArgs,
}

/// Database flags (also used alone by the `migrate` subcommands).
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Database URL: `sqlite://path?mode=rwc` or `postgres://user@host/db`.
    #[arg(
        long,
        env = "LOADLAB_DATABASE_URL",
        default_value = "sqlite://loadlab.db?mode=rwc"
    )]
    pub database_url: String,

    /// PostgreSQL schema to use (created if missing); empty for the server default.
    #[arg(long, env = "LOADLAB_DATABASE_SCHEMA", default_value = "")]
    pub database_schema: String,

    /// Maximum database connections in the pool.
    #[arg(long, env = "LOADLAB_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: u32,
}

impl DbArgs {
    /// Checks the URL scheme.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError(format!(
                "--database-url must start with sqlite:, postgres:// or postgresql:// (got {:?})",
                self.database_url
            )));
        }
        if self.database_pool == 0 {
            return Err(ConfigError("--database-pool must be positive".into()));
        }
        Ok(())
    }

    /// Connection settings.
    pub fn settings(&self) -> crate::db::DbSettings {
        crate::db::DbSettings {
            url: self.database_url.clone(),
            schema: self.database_schema.clone(),
            max_connections: self.database_pool,
        }
    }
}

/// A configuration error found at start.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl CommonArgs {
    /// Checks cross-field rules clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.jwt_secret {
            None => {
                return Err(ConfigError(
                    "--jwt-secret / LOADLAB_JWT_SECRET is required (the HS256 key shared by every service)".into(),
                ));
            }
            Some(s) if s.len() < crate::auth::MIN_SECRET_LEN => {
                return Err(ConfigError(format!(
                    "--jwt-secret / LOADLAB_JWT_SECRET must be at least {} bytes",
                    crate::auth::MIN_SECRET_LEN
                )));
            }
            Some(_) => {}
        }
        if let Some(node) = self.node_id
            && node > crate::ids::MAX_NODE
        {
            return Err(ConfigError(format!(
                "--node-id {node} is out of range (0..={})",
                crate::ids::MAX_NODE
            )));
        }
        self.db.validate()?;
        self.otel.validate()?;
        if self.max_body_bytes < 1024 {
            return Err(ConfigError("--max-body-bytes must be at least 1024".into()));
        }
        if self.concurrency_limit == 0 || self.redis_pool == 0 {
            return Err(ConfigError(
                "--concurrency-limit and --redis-pool must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The JWT secret (validated to be present by [`CommonArgs::validate`]).
    pub fn jwt_secret_bytes(&self) -> &[u8] {
        self.jwt_secret.as_deref().unwrap_or_default().as_bytes()
    }

    /// The configured node id, or one derived from the host name.
    pub fn resolved_node_id(&self) -> u16 {
        self.node_id.unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()))
                .unwrap_or_default();
            crate::ids::default_node_id(&host, std::process::id())
        })
    }
}

/// Parses `250ms`, `10s`, `1m30s`, …
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); try 10s or 250ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn flags_parse_and_validate() {
        let cli = Cli::try_parse_from([
            "x",
            "--jwt-secret",
            "0123456789abcdef",
            "--request-timeout",
            "250ms",
            "--engine",
            "memory",
        ])
        .expect("parse");
        assert_eq!(cli.common.request_timeout, Duration::from_millis(250));
        assert_eq!(cli.common.engine, EngineKind::Memory);
        cli.common.validate().expect("valid");
    }

    #[test]
    fn bad_values_are_named() {
        let cli = Cli::try_parse_from(["x", "--jwt-secret", "short"]).expect("parse");
        let err = cli.common.validate().expect_err("weak secret");
        assert!(err.to_string().contains("LOADLAB_JWT_SECRET"));
        let err = Cli::try_parse_from([
            "x",
            "--jwt-secret",
            "0123456789abcdef",
            "--request-timeout",
            "soon",
        ])
        .err()
        .expect("bad duration");
        assert!(err.to_string().contains("request-timeout"));
        let cli = Cli::try_parse_from([
            "x",
            "--jwt-secret",
            "0123456789abcdef",
            "--database-url",
            "mysql://x",
        ])
        .expect("parse");
        assert!(cli.common.validate().is_err());
    }
}
