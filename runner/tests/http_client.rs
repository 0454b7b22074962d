//! The load engine's HTTP/1.1 client against real servers on loopback: keep-alive reuse, k6 timing
//! phases, reconnects, timeouts, connect/DNS/TLS failures, huge bodies and request bodies.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::HeaderMap as AxumHeaders;
use axum::routing::{get, post};
use axum::serve::{Listener, ListenerExt};
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method};
use loadlab::http_client::{Client, ClientConfig, ErrorKind, Request, VuConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

// The engine binary allocates with mimalloc; the throughput check below must measure the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long `/slow` takes before answering.
const SLOW: Duration = Duration::from_millis(200);

/// A server on 127.0.0.1 that counts the TCP connections it accepted.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(app: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    Server { addr, accepted }
}

fn app() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello, loadlab" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(SLOW).await;
                "slow body"
            }),
        )
        .route(
            "/sleep2s",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }),
        )
        .route("/close", get(|| async { ([(CONNECTION, "close")], "bye") }))
        .route(
            "/echo-len",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/echo-headers",
            get(|headers: AxumHeaders| async move {
                let host = headers
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let ua = headers
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                format!("{host}|{ua}")
            }),
        )
        .route(
            "/huge",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let chunks = (0..1024).map(move |_| Ok::<_, Infallible>(chunk.clone()));
                Body::from_stream(futures::stream::iter(chunks))
            }),
        )
}

fn vu(config: ClientConfig) -> VuConnection {
    Client::new(config).connection()
}

fn get_request(url: &str) -> Request {
    Request::new(Method::GET, url.parse().expect("uri"))
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_for_sequential_requests() {
    let server = serve(app()).await;
    let url = server.url("/hello");
    // Spawned like the engine's VU tasks, which also proves `send`'s future is Send.
    let responses = tokio::spawn(async move {
        let mut vu = vu(ClientConfig::default());
        let mut responses = Vec::new();
        for _ in 0..20 {
            responses.push(vu.send(get_request(&url)).await.expect("request"));
        }
        responses
    })
    .await
    .expect("VU task");
    assert_eq!(server.accepted(), 1);
    for (i, response) in responses.iter().enumerate() {
        assert_eq!(response.status, 200);
        assert_eq!(response.body, Bytes::from_static(b"hello, loadlab"));
        let t = response.timings;
        if i == 0 {
            assert!(
                t.blocked > Duration::ZERO,
                "first request opens the connection: {t:?}"
            );
            assert!(t.connecting > Duration::ZERO, "{t:?}");
            assert!(t.blocked >= t.connecting, "{t:?}");
        } else {
            assert_eq!(
                t.blocked,
                Duration::ZERO,
                "request {i} reuses the connection: {t:?}"
            );
            assert_eq!(t.connecting, Duration::ZERO, "request {i}: {t:?}");
            assert_eq!(t.looking_up, Duration::ZERO, "request {i}: {t:?}");
            assert_eq!(t.tls_handshaking, Duration::ZERO, "request {i}: {t:?}");
        }
        // An IP literal needs no DNS.
        assert_eq!(t.looking_up, Duration::ZERO);
    }
}

#[tokio::test]
async fn timings_split_sending_waiting_and_receiving() {
    let server = serve(app()).await;
    let mut vu = vu(ClientConfig::default());
    let response = vu
        .send(get_request(&server.url("/slow")))
        .await
        .expect("request");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, Bytes::from_static(b"slow body"));
    assert_eq!(response.body_len, 9);
    let t = response.timings;
    assert!(
        t.waiting >= SLOW,
        "waiting includes the handler's sleep: {t:?}"
    );
    assert!(t.waiting < Duration::from_secs(1), "{t:?}");
    assert!(t.duration >= t.waiting, "{t:?}");
    assert_eq!(t.duration, t.sending + t.waiting + t.receiving);
    assert!(
        response.bytes_received >= response.body_len,
        "{}",
        response.bytes_received
    );
    assert!(response.bytes_sent > 0);
}

#[tokio::test]
async fn announced_connection_close_reconnects_every_request() {
    let server = serve(app()).await;
    let mut vu = vu(ClientConfig::default());
    for i in 0..5 {
        let response = vu
            .send(get_request(&server.url("/close")))
            .await
            .expect("request");
        assert_eq!(response.status, 200, "request {i}");
        assert_eq!(response.body, Bytes::from_static(b"bye"));
        assert!(
            response.timings.connecting > Duration::ZERO,
            "request {i} opens a connection"
        );
    }
    assert_eq!(server.accepted(), 5);
}

/// A hand-written HTTP server: reads each connection's first request head, writes `reply`, then
/// hangs up without announcing it (what a server-side idle timeout looks like to the client).
async fn serve_raw(reply: &'static [u8]) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Server { addr, accepted }
}

#[tokio::test]
async fn unannounced_close_between_requests_is_not_an_error() {
    let server = serve_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let mut vu = vu(ClientConfig::default());
    for i in 0..3 {
        let response = vu
            .send(get_request(&server.url("/")))
            .await
            .expect("request");
        assert_eq!(response.status, 200, "request {i}");
        assert_eq!(response.body, Bytes::from_static(b"ok"));
        // Between iterations, like a VU's think time; the server's FIN arrives meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.accepted(), 3);
}

#[tokio::test]
async fn connection_closed_mid_body_is_a_reset() {
    let server = serve_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..").await;
    let mut vu = vu(ClientConfig::default());
    let err = vu
        .send(get_request(&server.url("/")))
        .await
        .expect_err("truncated body");
    assert_eq!(err.kind, ErrorKind::Reset, "{err}");
    assert!(err.bytes_received > 0, "the head arrived: {err:?}");
}

#[tokio::test]
async fn garbage_instead_of_http_is_a_protocol_error() {
    let server = serve_raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
    let mut vu = vu(ClientConfig::default());
    let err = vu
        .send(get_request(&server.url("/")))
        .await
        .expect_err("not HTTP");
    assert_eq!(err.kind, ErrorKind::Protocol, "{err}");
}

#[tokio::test]
async fn timeout_discards_the_connection_and_the_next_request_works() {
    let server = serve(app()).await;
    let mut vu = vu(ClientConfig {
        timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    });
    let started = Instant::now();
    let err = vu
        .send(get_request(&server.url("/sleep2s")))
        .await
        .expect_err("must time out");
    let elapsed = started.elapsed();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(
        err.message.contains(&server.addr.ip().to_string()),
        "names the host: {err}"
    );
    assert!(
        err.bytes_sent > 0,
        "the request was written before the deadline"
    );

    let response = vu
        .send(get_request(&server.url("/hello")))
        .await
        .expect("next request");
    assert_eq!(response.status, 200);
    assert_eq!(
        server.accepted(),
        2,
        "the timed-out connection is not reused"
    );
}

#[tokio::test]
async fn nothing_listening_is_connect_refused() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local addr").port()
    };
    let mut vu = vu(ClientConfig::default());
    let err = vu
        .send(get_request(&format!("http://127.0.0.1:{port}/")))
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind, ErrorKind::ConnectRefused, "{err}");
    assert_eq!(err.kind.as_str(), "connect_refused");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(err.bytes_sent, 0);
}

#[tokio::test]
async fn unknown_host_is_a_dns_error() {
    let mut vu = vu(ClientConfig::default());
    let err = vu
        .send(get_request("http://does-not-exist.invalid/"))
        .await
        .expect_err("must not resolve");
    assert_eq!(err.kind, ErrorKind::Dns, "{err}");
    assert_eq!(err.kind.as_str(), "dns");
    assert!(err.message.contains("does-not-exist.invalid"), "{err}");
}

#[tokio::test]
async fn relative_or_non_http_uris_are_invalid_requests() {
    let mut vu = vu(ClientConfig::default());
    for uri in ["/relative", "ftp://127.0.0.1/file"] {
        let err = vu.send(get_request(uri)).await.expect_err("invalid");
        assert_eq!(err.kind, ErrorKind::InvalidRequest, "{uri}: {err}");
    }
}

/// Accepts TLS connections; a client that rejects the certificate only fails its own handshake.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn serve_tls(app: Router) -> SocketAddr {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server cert");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("local addr");
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    };
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}

#[tokio::test]
async fn self_signed_certificate_fails_unless_verification_is_skipped() {
    let addr = serve_tls(app()).await;
    let url = format!("https://localhost:{}/hello", addr.port());

    let mut verifying = vu(ClientConfig::default());
    let err = verifying
        .send(get_request(&url))
        .await
        .expect_err("self-signed must be rejected");
    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(err.message.contains("localhost"), "{err}");

    let mut insecure = vu(ClientConfig {
        insecure_skip_verify: true,
        ..ClientConfig::default()
    });
    let first = insecure
        .send(get_request(&url))
        .await
        .expect("insecure request");
    assert_eq!(first.status, 200);
    assert_eq!(first.body, Bytes::from_static(b"hello, loadlab"));
    assert!(
        first.timings.tls_handshaking > Duration::ZERO,
        "{:?}",
        first.timings
    );
    assert!(
        first.timings.blocked >= first.timings.tls_handshaking,
        "{:?}",
        first.timings
    );

    let second = insecure
        .send(get_request(&url))
        .await
        .expect("reused TLS connection");
    assert_eq!(second.status, 200);
    assert_eq!(
        second.timings.tls_handshaking,
        Duration::ZERO,
        "{:?}",
        second.timings
    );
}

/// Peak resident set size of this process, from the kernel's own accounting.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test]
async fn huge_body_is_counted_in_full_but_kept_only_up_to_the_limit() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let server = serve(app()).await;
    let config = ClientConfig {
        timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let keep = config.keep_body_bytes;
    let mut vu = vu(config);
    let before = peak_rss_bytes();
    let response = vu
        .send(get_request(&server.url("/huge")))
        .await
        .expect("request");
    let after = peak_rss_bytes();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_len, TOTAL);
    assert_eq!(response.body.len(), keep);
    assert_eq!(keep, 1024 * 1024);
    assert!(response.body.iter().all(|b| *b == b'x'));
    assert!(
        response.bytes_received > TOTAL,
        "head and chunk framing come on top"
    );
    if let (Some(before), Some(after)) = (before, after) {
        let growth = after.saturating_sub(before);
        assert!(growth < 32 * 1024 * 1024, "peak RSS grew by {growth} bytes");
    }
}

#[tokio::test]
async fn post_sends_the_json_body_with_its_length() {
    let server = serve(app()).await;
    let mut vu = vu(ClientConfig::default());
    let payload = format!(r#"{{"text":"{}"}}"#, "a".repeat(10_000));
    let mut request = Request::new(Method::POST, server.url("/echo-len").parse().expect("uri"));
    request
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    request.body = Bytes::from(payload.clone());
    let response = vu.send(request).await.expect("request");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, Bytes::from(payload.len().to_string()));
    assert!(
        response.bytes_sent >= payload.len() as u64,
        "{}",
        response.bytes_sent
    );

    let empty = Request::new(Method::POST, server.url("/echo-len").parse().expect("uri"));
    let response = vu.send(empty).await.expect("empty POST");
    assert_eq!(response.body, Bytes::from_static(b"0"));
}

#[tokio::test]
async fn host_and_user_agent_are_set_but_user_headers_win() {
    let server = serve(app()).await;
    let mut vu = vu(ClientConfig::default());
    let response = vu
        .send(get_request(&server.url("/echo-headers")))
        .await
        .expect("request");
    let expected = format!("{}|loadlab/{}", server.addr, env!("CARGO_PKG_VERSION"));
    assert_eq!(response.body, Bytes::from(expected));

    let mut request = get_request(&server.url("/echo-headers"));
    request
        .headers
        .insert(USER_AGENT, HeaderValue::from_static("custom/1"));
    request
        .headers
        .insert("host", HeaderValue::from_static("example.test"));
    let response = vu.send(request).await.expect("request");
    assert_eq!(response.body, Bytes::from_static(b"example.test|custom/1"));
}

/// CPU time this thread has run, in nanoseconds (the scheduler's own accounting).
fn thread_cpu() -> Duration {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let nanos = schedstat
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok());
    Duration::from_nanos(nanos.expect("schedstat's first field"))
}

/// CPU time of this process's waited-for children (`cutime + cstime` of `/proc/self/stat`).
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    // Fields after the command name, which may contain spaces, start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .expect("stat format");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[13].parse::<u64>().expect("cutime") + fields[14].parse::<u64>().expect("cstime");
    let output = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    let hz: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK");
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// Runs `VUS` virtual users against `uri` for `run` on this thread; returns requests and CPU.
fn loadlab_round(
    runtime: &tokio::runtime::Runtime,
    uri: &http::Uri,
    run: Duration,
) -> (f64, Duration) {
    let cpu_before = thread_cpu();
    let requests: usize = runtime.block_on(async {
        let client = Client::new(ClientConfig::default());
        let end = Instant::now() + run;
        let vus: Vec<_> = (0..VUS)
            .map(|_| {
                let mut vu = client.connection();
                let uri = uri.clone();
                tokio::spawn(async move {
                    let mut done = 0usize;
                    while Instant::now() < end {
                        let response = vu.send(Request::new(Method::GET, uri.clone())).await;
                        assert_eq!(response.expect("request").status, 200);
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        let mut total = 0;
        for vu in vus {
            total += vu.await.expect("VU");
        }
        total
    });
    (requests as f64, thread_cpu() - cpu_before)
}

/// Runs wrk with one thread and `VUS` connections for `run`; returns requests and CPU.
fn wrk_round(url: &str, run: Duration) -> (f64, Duration) {
    let cpu_before = children_cpu();
    let output = std::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{VUS}"),
            &format!("-d{}s", run.as_secs()),
            url,
        ])
        .output()
        .expect("run wrk");
    let cpu = children_cpu() - cpu_before;
    let report = String::from_utf8_lossy(&output.stdout);
    let requests = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("wrk's request count");
    (requests, cpu)
}

/// Connections of both load generators in the throughput check.
const VUS: usize = 64;

/// Requests per CPU-second of this client against wrk's, on the same server in the same run; the
/// engine's target is at least 0.7x wrk. Rounds alternate so drifting machine load hits both.
/// Run with `cargo nextest run --release -p loadlab --test http_client --run-ignored only throughput`.
#[test]
#[ignore = "benchmark: needs wrk on PATH and a release build"]
fn throughput_per_cpu_second_against_wrk() {
    const ROUNDS: u32 = 4;
    const RUN: Duration = Duration::from_secs(2);
    // The server gets its own thread so only the client's CPU is measured.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let server = serve(app()).await;
            addr_tx.send(server.addr).expect("send addr");
            std::future::pending::<()>().await;
        });
    });
    let addr = addr_rx.recv().expect("server address");
    let url = format!("http://{addr}/hello");
    let uri: http::Uri = url.parse().expect("uri");

    // One engine thread: a current-thread runtime runs the VUs and their connection drivers here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let (mut ours, mut our_cpu, mut wrk, mut wrk_cpu) = (0.0, Duration::ZERO, 0.0, Duration::ZERO);
    for _ in 0..ROUNDS {
        let (requests, cpu) = loadlab_round(&runtime, &uri, RUN);
        ours += requests;
        our_cpu += cpu;
        let (requests, cpu) = wrk_round(&url, RUN);
        wrk += requests;
        wrk_cpu += cpu;
    }

    let our_rate = ours / our_cpu.as_secs_f64();
    let wrk_rate = wrk / wrk_cpu.as_secs_f64();
    let ratio = our_rate / wrk_rate;
    println!(
        "loadlab: {ours} requests in {our_cpu:.2?} CPU = {our_rate:.0}/CPU-s; \
         wrk: {wrk} requests in {wrk_cpu:.2?} CPU = {wrk_rate:.0}/CPU-s; ratio {ratio:.2}"
    );
    assert!(
        ratio >= 0.7,
        "loadlab reaches {ratio:.2}x wrk's requests per CPU-second"
    );
}
