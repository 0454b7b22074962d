//! gRPC client plumbing shared by services that call each other.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A bad peer URL.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer URL {url:?}: {reason}")]
pub struct PeerUrlError {
    /// The URL.
    pub url: String,
    /// Why it was refused.
    pub reason: String,
}

/// A lazily-connecting channel to a peer service: it connects on first use and reconnects after
/// the peer restarts, so services can start in any order.
pub fn lazy_channel(url: &str, request_timeout: Duration) -> Result<Channel, PeerUrlError> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| PeerUrlError {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}
