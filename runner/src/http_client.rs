//! The load engine's HTTP/1.1 client: one keep-alive connection per origin and virtual user, with
//! k6's timing phases measured at the socket rather than guessed around hyper's futures.
//!
//! Each connection's stream is wrapped in `TimedIo`, which records in a per-connection cell when
//! the request's first and last bytes were written and when the response's first byte was read.
//! The engine holds one [`VuConnection`] per virtual user, and hyper's connection future is
//! polled by the VU's own task alongside the request (not spawned): a request costs no wake-up
//! of another task, nothing is shared between tasks, and a dropped connection stops at once.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, USER_AGENT};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Settings shared by every connection of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of a whole request: DNS, connect, TLS, sending, waiting and receiving.
    pub timeout: Duration,
    /// Bytes of each response body kept in [`Response::body`]; the rest is counted and dropped.
    pub keep_body_bytes: usize,
    /// Accept any TLS certificate (self-signed lab clusters); never use against real services.
    pub insecure_skip_verify: bool,
    /// `User-Agent` sent unless the request sets its own.
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            keep_body_bytes: 1024 * 1024,
            insecure_skip_verify: false,
            user_agent: default_user_agent(),
        }
    }
}

fn default_user_agent() -> String {
    concat!("loadlab/", env!("CARGO_PKG_VERSION")).to_owned()
}

/// The engine's HTTP client: configuration and TLS setup, cheap to clone into every VU.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    // Parsed once so the hot path only clones a refcounted value.
    user_agent: Option<HeaderValue>,
    tls: TlsConnector,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds the client; TLS uses rustls with the ring provider and the webpki root store.
    pub fn new(config: ClientConfig) -> Client {
        let user_agent = match HeaderValue::from_str(&config.user_agent) {
            Ok(value) => Some(value),
            Err(_) => {
                tracing::warn!(user_agent = %config.user_agent, "invalid User-Agent, using the default");
                HeaderValue::from_str(&default_user_agent()).ok()
            }
        };
        let tls = TlsConnector::from(Arc::new(tls_config(config.insecure_skip_verify)));
        Client {
            shared: Arc::new(Shared {
                config,
                user_agent,
                tls,
            }),
        }
    }

    /// A fresh connection state for one virtual user; opens nothing until the first request.
    pub fn connection(&self) -> VuConnection {
        VuConnection {
            client: self.clone(),
            conns: Vec::new(),
        }
    }
}

fn tls_config(insecure_skip_verify: bool) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        // Only fails for a provider without TLS 1.2/1.3 suites; ring's default has both.
        .expect("ring's default provider supports the default TLS versions");
    let mut config = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    } else {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// Accepts every server certificate, for labs with self-signed certificates only: it still checks
/// the handshake signatures (so the session key really belongs to the presented certificate) but
/// not who the certificate belongs to, which leaves the connection open to interception.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// One HTTP request; `uri` must be absolute (`http://` or `https://`).
#[derive(Debug, Clone)]
pub struct Request {
    /// Request method.
    pub method: Method,
    /// Absolute URI; its authority picks the connection and the `Host` header.
    pub uri: Uri,
    /// Headers sent as given; they win over the client's `Host` and `User-Agent`.
    pub headers: HeaderMap,
    /// Request body; its length is sent as `Content-Length`.
    pub body: Bytes,
}

impl Request {
    /// A request without headers or body.
    pub fn new(method: Method, uri: Uri) -> Request {
        Request {
            method,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }
}

/// A complete response: head, the kept prefix of the body, and what the exchange cost.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The first [`ClientConfig::keep_body_bytes`] bytes of the body.
    pub body: Bytes,
    /// Length of the whole body as received.
    pub body_len: u64,
    /// k6's timing phases of this request.
    pub timings: Timings,
    /// Bytes written to the connection for this request (TLS overhead excluded).
    pub bytes_sent: u64,
    /// Bytes read from the connection for this response, head and body (TLS overhead excluded).
    pub bytes_received: u64,
}

/// k6's request phases; a phase that did not happen (e.g. connecting on a reused connection) is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Time before the request could be written: DNS + connect + TLS when a connection was opened.
    pub blocked: Duration,
    /// DNS resolution.
    pub looking_up: Duration,
    /// TCP connect.
    pub connecting: Duration,
    /// TLS handshake.
    pub tls_handshaking: Duration,
    /// First to last request byte written.
    pub sending: Duration,
    /// Last request byte written to first response byte read (time to first byte).
    pub waiting: Duration,
    /// First response byte to last body byte.
    pub receiving: Duration,
    /// `sending + waiting + receiving` (k6's `http_req_duration`).
    pub duration: Duration,
}

/// Why a request failed, coarse enough to be a metric tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port.
    ConnectRefused,
    /// TCP connect did not finish before the request deadline.
    ConnectTimeout,
    /// Any other TCP connect failure (unreachable network, …).
    Connect,
    /// TLS handshake or certificate failure.
    Tls,
    /// The request deadline passed after the connection was established.
    Timeout,
    /// The connection was reset or closed before the response was complete.
    Reset,
    /// The server's response was not valid HTTP/1.1.
    Protocol,
    /// The request itself cannot be sent (relative URI, unknown scheme, …).
    InvalidRequest,
}

impl ErrorKind {
    /// The metric tag value, e.g. `connect_refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Dns => "dns",
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::InvalidRequest => "invalid_request",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request, with whatever timings and byte counts it got to before failing.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RequestError {
    /// Failure class.
    pub kind: ErrorKind,
    /// Human-readable cause, naming the host.
    pub message: String,
    /// Phases completed before the failure.
    pub timings: Timings,
    /// Bytes written for this request before the failure.
    pub bytes_sent: u64,
    /// Bytes read for this request before the failure.
    pub bytes_received: u64,
}

/// One virtual user's connection state: at most one keep-alive HTTP/1.1 connection per origin
/// (scheme, host, port), reused across requests, re-established transparently when the server
/// closed it. Not Sync; used by one task at a time.
pub struct VuConnection {
    client: Client,
    // A VU talks to a handful of origins at most, so a linear scan beats hashing a host name.
    conns: Vec<Conn>,
}

impl fmt::Debug for VuConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VuConnection")
            .field("open", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// Where a request goes, borrowed from its URI.
struct Target<'a> {
    tls: bool,
    host: &'a str,
    port: u16,
    authority: &'a Authority,
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl VuConnection {
    /// Sends one request and reads its whole response, within [`ClientConfig::timeout`].
    pub async fn send(&mut self, request: Request) -> Result<Response, RequestError> {
        let start = Instant::now();
        let timeout = self.client.shared.config.timeout;
        let deadline = tokio::time::Instant::from_std(start + timeout);
        let Request {
            method,
            uri,
            headers,
            body,
        } = request;
        let mut parts = uri.into_parts();
        let authority = parts.authority.take();
        let target = match parse_target(
            parts.scheme.as_ref().map(|s| s.as_str()),
            authority.as_ref(),
        ) {
            Ok(target) => target,
            Err(message) => {
                return Err(Progress::default().fail(ErrorKind::InvalidRequest, message));
            }
        };
        // Origin-form on the wire: absolute-form is meant for proxies and some servers reject it.
        let path = parts
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut progress = Progress::default();
        let exchange = self.exchange(
            &target,
            method,
            path,
            headers,
            body,
            deadline,
            &mut progress,
        );
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            // Dropping the exchange dropped the connection it had taken out of the pool, so a
            // connection with a half-read response is never reused.
            Err(_) => Err(progress.fail(
                ErrorKind::Timeout,
                format!("request to {target} did not complete within {timeout:?}"),
            )),
        }
    }

    /// Closes every open connection; the next request opens a new one.
    pub fn close(&mut self) {
        self.conns.clear();
    }

    #[allow(clippy::too_many_arguments)] // the request's parts, moved once into hyper's request
    async fn exchange(
        &mut self,
        target: &Target<'_>,
        method: Method,
        path: PathAndQuery,
        mut headers: HeaderMap,
        body: Bytes,
        deadline: tokio::time::Instant,
        progress: &mut Progress,
    ) -> Result<Response, RequestError> {
        let shared: &Shared = &self.client.shared;
        let mut pooled = take(&mut self.conns, target);
        if let Some(conn) = &mut pooled {
            // Closed by the server while idle: not a failure, just open a new one.
            if conn.driver.is_none()
                || conn.sender.is_closed()
                || drive(&mut conn.driver, conn.sender.ready()).await.is_err()
            {
                pooled = None;
            }
        }
        let mut reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => connect(shared, target, deadline, progress).await?,
        };

        if let Some(ua) = &shared.user_agent {
            headers.entry(USER_AGENT).or_insert_with(|| ua.clone());
        }
        if body.is_empty()
            && matches!(method, Method::POST | Method::PUT | Method::PATCH)
            && !headers.contains_key(CONTENT_LENGTH)
            && !headers.contains_key(TRANSFER_ENCODING)
        {
            // hyper only adds Content-Length for non-empty bodies; servers may answer 411 without it.
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        let close_requested = wants_close(&headers);
        let mut req = hyper::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from(path);
        *req.headers_mut() = headers;
        // Set per connection so the value is built once per origin, not once per request.
        req.headers_mut()
            .entry(HOST)
            .or_insert_with(|| conn.host_header.clone());

        progress.begin(&conn.stats);
        let sent = loop {
            match drive(&mut conn.driver, conn.sender.try_send_request(req)).await {
                Ok(response) => break response,
                Err(mut err) => match err.take_message() {
                    // The connection died before hyper took the request, so nothing was written:
                    // retrying is safe even for non-idempotent methods.
                    Some(unsent) if reused => {
                        reused = false;
                        req = unsent;
                        conn = connect(shared, target, deadline, progress).await?;
                        progress.begin(&conn.stats);
                    }
                    _ => {
                        let err = err.into_error();
                        return Err(
                            progress.fail(classify(&err), describe("request to", target, &err))
                        );
                    }
                },
            }
        };

        let (head, mut incoming) = sent.into_parts();
        let mut kept = KeptBody::new(shared.config.keep_body_bytes);
        let mut body_len = 0u64;
        while let Some(frame) = drive(&mut conn.driver, incoming.frame()).await {
            let frame = frame.map_err(|err| {
                progress.fail(
                    classify(&err),
                    describe("reading the body from", target, &err),
                )
            })?;
            // Trailers carry no body bytes and are dropped.
            if let Ok(data) = frame.into_data() {
                body_len += data.len() as u64;
                kept.push(data);
            }
        }
        let end = Instant::now();

        let (bytes_sent, bytes_received) = progress.bytes();
        let timings = progress.finish(&conn.stats, end);
        let response = Response {
            status: head.status.as_u16(),
            body: kept.finish(),
            body_len,
            timings,
            bytes_sent,
            bytes_received,
            headers: head.headers,
        };
        // Announced closes are honoured now instead of discovered by the next request.
        if !close_requested && !wants_close(&response.headers) && conn.driver.is_some() {
            self.conns.push(conn);
        }
        Ok(response)
    }
}

/// Takes the pooled connection to `target` out, so a request that fails or times out drops it.
fn take(conns: &mut Vec<Conn>, target: &Target<'_>) -> Option<Conn> {
    let index = conns.iter().position(|c| {
        c.tls == target.tls && c.port == target.port && c.host.eq_ignore_ascii_case(target.host)
    })?;
    Some(conns.swap_remove(index))
}

fn parse_target<'a>(
    scheme: Option<&str>,
    authority: Option<&'a Authority>,
) -> Result<Target<'a>, String> {
    let tls = match scheme {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            return Err(format!(
                "unsupported scheme {other:?}, expected http or https"
            ));
        }
        None => return Err("the URI must be absolute (http:// or https://)".to_owned()),
    };
    let authority = authority.ok_or_else(|| "the URI has no host".to_owned())?;
    let host = authority.host();
    if host.is_empty() {
        return Err("the URI has no host".to_owned());
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target {
        tls,
        host,
        port,
        authority,
    })
}

fn wants_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// What a request has done so far, kept outside the exchange future so a timeout can still
/// report the phases and bytes that happened before it.
#[derive(Default)]
struct Progress {
    timings: Timings,
    io: Option<(Arc<IoStats>, u64, u64)>,
}

impl Progress {
    fn begin(&mut self, stats: &Arc<IoStats>) {
        let (written, read) = stats.begin_request();
        self.io = Some((Arc::clone(stats), written, read));
    }

    fn bytes(&self) -> (u64, u64) {
        match &self.io {
            Some((stats, written, read)) => (
                stats
                    .written
                    .load(Ordering::Relaxed)
                    .saturating_sub(*written),
                stats.read.load(Ordering::Relaxed).saturating_sub(*read),
            ),
            None => (0, 0),
        }
    }

    fn finish(&mut self, stats: &IoStats, end: Instant) -> Timings {
        let first_write = stats.instant(&stats.first_write);
        let last_write = stats.instant(&stats.last_write).or(first_write);
        let first_read = stats.instant(&stats.first_read);
        let t = &mut self.timings;
        if let (Some(first), Some(last)) = (first_write, last_write) {
            t.sending = last.saturating_duration_since(first);
        }
        match (last_write, first_read) {
            (Some(last), Some(first)) => t.waiting = first.saturating_duration_since(last),
            // Failed before any response byte (e.g. a timeout): it was waiting until `end`.
            (Some(last), None) => t.waiting = end.saturating_duration_since(last),
            _ => {}
        }
        if let Some(first) = first_read {
            t.receiving = end.saturating_duration_since(first);
        }
        t.duration = t.sending + t.waiting + t.receiving;
        *t
    }

    fn fail(&self, kind: ErrorKind, message: String) -> RequestError {
        let (bytes_sent, bytes_received) = self.bytes();
        let mut timings = self.timings;
        if let Some((stats, _, _)) = &self.io {
            // Partial phases are still useful when a request times out while waiting.
            let mut partial = Progress { timings, io: None };
            timings = partial.finish(stats, Instant::now());
        }
        RequestError {
            kind,
            message,
            timings,
            bytes_sent,
            bytes_received,
        }
    }
}

/// The response body prefix kept for checks; zero-copy when the body arrives in one frame.
struct KeptBody {
    limit: usize,
    first: Bytes,
    rest: BytesMut,
}

impl KeptBody {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            first: Bytes::new(),
            rest: BytesMut::new(),
        }
    }

    fn push(&mut self, data: Bytes) {
        if self.first.is_empty() && self.rest.is_empty() {
            self.first = data.slice(..data.len().min(self.limit));
            return;
        }
        let held = self.first.len() + self.rest.len();
        let room = self.limit - held;
        if room == 0 {
            return;
        }
        if self.rest.is_empty() {
            self.rest.reserve(held + data.len().min(room));
            self.rest.extend_from_slice(&self.first);
            self.first = Bytes::new();
        }
        self.rest.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn finish(self) -> Bytes {
        if self.rest.is_empty() {
            self.first
        } else {
            self.rest.freeze()
        }
    }
}

/// An open connection in a VU's pool.
struct Conn {
    tls: bool,
    host: String,
    port: u16,
    host_header: HeaderValue,
    sender: http1::SendRequest<Full<Bytes>>,
    stats: Arc<IoStats>,
    /// hyper's connection future (it does the reading and writing); `None` once it ended, i.e.
    /// the connection is closed. Dropping it closes the socket.
    driver: Option<Driver>,
}

/// A connection's I/O future, polled by the task that uses the connection.
type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Runs `fut` (a request's step on the connection) while polling the connection's `driver`,
/// which moves its bytes; a driver that ends is dropped (the request then sees the closed
/// connection through hyper's channel).
async fn drive<F: Future>(driver: &mut Option<Driver>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(d) = driver.as_mut()
            && let Poll::Ready(ended) = d.as_mut().poll(cx)
        {
            // The request that hit this error reports it; the driver only leaves a trace.
            if let Err(err) = ended {
                tracing::debug!(error = %err, "HTTP/1.1 connection ended with an error");
            }
            *driver = None;
        }
        // The driver may just have delivered what `fut` waits for (or closed the connection):
        // look again now rather than after a wake-up.
        fut.as_mut().poll(cx)
    })
    .await
}

async fn connect(
    shared: &Shared,
    target: &Target<'_>,
    deadline: tokio::time::Instant,
    progress: &mut Progress,
) -> Result<Conn, RequestError> {
    let begin = Instant::now();
    progress.io = None;
    let t = &mut progress.timings;
    *t = Timings::default();

    let bare_host = target
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(target.host);
    let literal = bare_host.parse::<IpAddr>().ok();
    let resolved_name = literal.is_none();
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, target.port)],
        None => {
            let resolved = tokio::net::lookup_host((bare_host, target.port)).await;
            t.looking_up = begin.elapsed();
            match resolved {
                Ok(addrs) => addrs.collect(),
                Err(err) => {
                    t.blocked = begin.elapsed();
                    let message = format!("cannot resolve {}: {err}", target.host);
                    return Err(progress.fail(ErrorKind::Dns, message));
                }
            }
        }
    };
    if addrs.is_empty() {
        t.blocked = begin.elapsed();
        let message = format!("{} resolved to no address", target.host);
        return Err(progress.fail(ErrorKind::Dns, message));
    }

    let connecting = Instant::now();
    let mut failure: Option<(SocketAddr, io::Error)> = None;
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(err)) => failure = Some((addr, err)),
            Err(_) => {
                t.connecting = connecting.elapsed();
                t.blocked = begin.elapsed();
                let message = format!(
                    "connecting to {target} (tried {addr}) did not finish before the deadline"
                );
                return Err(progress.fail(ErrorKind::ConnectTimeout, message));
            }
        }
    }
    t.connecting = connecting.elapsed();
    let tcp = match (tcp, failure) {
        (Some(tcp), _) => tcp,
        (None, failure) => {
            t.blocked = begin.elapsed();
            let (kind, message) = match failure {
                Some((addr, err)) => {
                    let kind = match err.kind() {
                        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
                        io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
                        _ => ErrorKind::Connect,
                    };
                    let message = if resolved_name {
                        format!("cannot connect to {target} ({addr}): {err}")
                    } else {
                        format!("cannot connect to {target}: {err}")
                    };
                    (kind, message)
                }
                None => (ErrorKind::Connect, format!("cannot connect to {target}")),
            };
            return Err(progress.fail(kind, message));
        }
    };
    // Requests are small and latency is what we measure; Nagle would add delayed-ACK stalls.
    if let Err(err) = tcp.set_nodelay(true) {
        t.blocked = begin.elapsed();
        let message = format!("cannot set TCP_NODELAY on the connection to {target}: {err}");
        return Err(progress.fail(ErrorKind::Connect, message));
    }

    let stats = Arc::new(IoStats::new());
    let handshake = if target.tls {
        let tls_start = Instant::now();
        let server_name = match ServerName::try_from(bare_host) {
            Ok(name) => name.to_owned(),
            Err(err) => {
                t.blocked = begin.elapsed();
                let message = format!("{} is not a valid TLS server name: {err}", target.host);
                return Err(progress.fail(ErrorKind::InvalidRequest, message));
            }
        };
        let tls = shared.tls.connect(server_name, tcp).await;
        t.tls_handshaking = tls_start.elapsed();
        match tls {
            Ok(stream) => start_driver(stream, Arc::clone(&stats)).await,
            Err(err) => {
                t.blocked = begin.elapsed();
                let message = format!("TLS handshake with {target} failed: {err}");
                return Err(progress.fail(ErrorKind::Tls, message));
            }
        }
    } else {
        start_driver(tcp, Arc::clone(&stats)).await
    };
    t.blocked = begin.elapsed();
    let (sender, driver) = handshake.map_err(|err| {
        progress.fail(
            ErrorKind::Protocol,
            describe("starting HTTP/1.1 with", target, &err),
        )
    })?;

    let host_header = if target.port == if target.tls { 443 } else { 80 } {
        HeaderValue::from_str(target.host)
    } else {
        HeaderValue::from_str(
            target
                .authority
                .as_str()
                .rsplit('@')
                .next()
                .unwrap_or(target.host),
        )
    }
    .map_err(|err| {
        progress.fail(
            ErrorKind::InvalidRequest,
            format!("{target} is not a valid Host header: {err}"),
        )
    })?;
    Ok(Conn {
        tls: target.tls,
        host: target.host.to_owned(),
        port: target.port,
        host_header,
        sender,
        stats,
        driver: Some(driver),
    })
}

async fn start_driver<S>(
    stream: S,
    stats: Arc<IoStats>,
) -> Result<(http1::SendRequest<Full<Bytes>>, Driver), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(TimedIo {
        inner: stream,
        stats,
        unflushed: false,
    });
    let (sender, connection) = http1::handshake(io).await?;
    Ok((sender, Box::pin(connection)))
}

fn describe(action: &str, target: &Target<'_>, err: &hyper::Error) -> String {
    let mut message = format!("{action} {target} failed: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn classify(err: &hyper::Error) -> ErrorKind {
    if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        return ErrorKind::Protocol;
    }
    if err.is_user() {
        return ErrorKind::InvalidRequest;
    }
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io_err) = cause.downcast_ref::<io::Error>() {
            if io_err
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return ErrorKind::Tls;
            }
            return match io_err.kind() {
                io::ErrorKind::TimedOut => ErrorKind::Timeout,
                io::ErrorKind::InvalidData => ErrorKind::Protocol,
                _ => ErrorKind::Reset,
            };
        }
        source = cause.source();
    }
    if err.is_incomplete_message()
        || err.is_canceled()
        || err.is_closed()
        || err.is_body_write_aborted()
    {
        return ErrorKind::Reset;
    }
    ErrorKind::Protocol
}

/// Per-connection record of socket activity. Times are nanoseconds since `base` plus one, so zero
/// means "not yet in this request"; atomics keep the driver's hot path free of locks.
struct IoStats {
    base: Instant,
    written: AtomicU64,
    read: AtomicU64,
    first_write: AtomicU64,
    last_write: AtomicU64,
    first_read: AtomicU64,
}

impl IoStats {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            first_write: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            first_read: AtomicU64::new(0),
        }
    }

    /// Clears the markers and returns the byte counters; called while the connection is idle, so
    /// the driver cannot race it. Relaxed is enough: hyper's channel that hands over the request
    /// and response orders these accesses.
    fn begin_request(&self) -> (u64, u64) {
        self.first_write.store(0, Ordering::Relaxed);
        self.last_write.store(0, Ordering::Relaxed);
        self.first_read.store(0, Ordering::Relaxed);
        (
            self.written.load(Ordering::Relaxed),
            self.read.load(Ordering::Relaxed),
        )
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn instant(&self, marker: &AtomicU64) -> Option<Instant> {
        match marker.load(Ordering::Relaxed) {
            0 => None,
            nanos => self.base.checked_add(Duration::from_nanos(nanos - 1)),
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A stream that records [`IoStats`] as hyper reads and writes through it.
struct TimedIo<S> {
    inner: S,
    stats: Arc<IoStats>,
    // The last write is stamped when the flush after it completes: TLS buffers plaintext until
    // then, and hyper flushes after every batch of writes, so one clock read covers the batch.
    unflushed: bool,
}

impl<S> TimedIo<S> {
    fn starting_write(&self) {
        if self.stats.first_write.load(Ordering::Relaxed) == 0 {
            self.stats
                .first_write
                .store(self.stats.now(), Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            let stats = &this.stats;
            stats.read.fetch_add(n as u64, Ordering::Relaxed);
            if stats.first_read.load(Ordering::Relaxed) == 0 {
                stats.first_read.store(stats.now(), Ordering::Relaxed);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.starting_write();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.stats.wrote(n);
            this.unflushed |= n > 0;
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.starting_write();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            this.stats.wrote(n);
            this.unflushed |= n > 0;
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        if this.unflushed && matches!(result, Poll::Ready(Ok(()))) {
            this.unflushed = false;
            this.stats
                .last_write
                .store(this.stats.now(), Ordering::Relaxed);
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
