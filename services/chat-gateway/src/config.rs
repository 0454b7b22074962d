//! `loadlab-chat-gateway` configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use loadlab_kit::config::{CommonArgs, ConfigError, parse_duration};

/// Flags of the chat gateway.
#[derive(Debug, Clone, Args)]
pub struct ChatConfig {
    /// Address to listen on (WebSocket + HTTP, gRPC health on the same port).
    #[arg(long, env = "LOADLAB_LISTEN", default_value = "0.0.0.0:8082")]
    pub listen: SocketAddr,

    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// The presence service (gRPC).
    #[arg(
        long,
        env = "LOADLAB_PRESENCE_URL",
        default_value = "http://127.0.0.1:8083"
    )]
    pub presence_url: String,

    /// Largest message body, in bytes.
    #[arg(long, env = "LOADLAB_MAX_MESSAGE_BYTES", default_value_t = 4096)]
    pub max_message_bytes: usize,

    /// Largest WebSocket frame (and message), in bytes; larger ones close the connection (1009).
    #[arg(long, env = "LOADLAB_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,

    /// Read buffer of each WebSocket connection, in bytes (allocated up front per connection;
    /// larger frames still arrive, the buffer grows for them).
    #[arg(long, env = "LOADLAB_WS_READ_BUFFER_BYTES", default_value_t = 4096)]
    pub ws_read_buffer_bytes: usize,

    /// Frames queued for one connection before it counts as a slow consumer and is closed (4008).
    /// It must absorb a burst (a commit batch's acks plus its messages); slots are allocated
    /// only when used.
    #[arg(long, env = "LOADLAB_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Sends per second one connection may make (token bucket refill rate).
    #[arg(long, env = "LOADLAB_SEND_RATE", default_value_t = 50.0)]
    pub send_rate: f64,

    /// Sends one connection may burst above the rate.
    #[arg(long, env = "LOADLAB_SEND_BURST", default_value_t = 100.0)]
    pub send_burst: f64,

    /// Channels one connection may join.
    #[arg(
        long,
        env = "LOADLAB_MAX_CHANNELS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_channels_per_connection: usize,

    /// A connection that sends nothing (not even a pong) for this long is closed (4002).
    #[arg(long, env = "LOADLAB_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// How often the gateway pings each connection.
    #[arg(long, env = "LOADLAB_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// How often connected users are reported to presence.
    #[arg(long, env = "LOADLAB_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Messages written per database round trip under load (1 = one transaction per message).
    #[arg(long, env = "LOADLAB_COMMIT_BATCH", default_value_t = 256)]
    pub commit_batch: usize,

    /// Messages waiting for the database before sends are refused with `overloaded`.
    #[arg(long, env = "LOADLAB_COMMIT_QUEUE", default_value_t = 10_000)]
    pub commit_queue: usize,
}

impl ChatConfig {
    /// Checks the configuration; the message names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        if self.max_message_bytes == 0 || self.max_frame_bytes < self.max_message_bytes + 256 {
            return Err(ConfigError(
                "--max-frame-bytes must exceed --max-message-bytes by at least 256 (the frame's JSON around the body)".into(),
            ));
        }
        if self.ws_read_buffer_bytes < 256 {
            return Err(ConfigError(
                "--ws-read-buffer-bytes must be at least 256".into(),
            ));
        }
        if self.outbound_queue == 0 || self.commit_batch == 0 || self.commit_queue == 0 {
            return Err(ConfigError(
                "--outbound-queue, --commit-batch and --commit-queue must be positive".into(),
            ));
        }
        if !(self.send_rate > 0.0 && self.send_burst >= 1.0) {
            return Err(ConfigError(
                "--send-rate must be positive and --send-burst at least 1".into(),
            ));
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError(
                "--idle-timeout must be longer than --ping-interval".into(),
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError("--heartbeat-interval must be positive".into()));
        }
        if !(self.presence_url.starts_with("http://") || self.presence_url.starts_with("https://"))
        {
            return Err(ConfigError(format!(
                "--presence-url must be an http:// URL (got {:?})",
                self.presence_url
            )));
        }
        Ok(())
    }
}
