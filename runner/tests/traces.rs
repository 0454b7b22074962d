//! End to end through real OTLP/gRPC on loopback: the runner's embedded receiver collects what
//! the embedded stack (feed, timeline, chat-gateway, presence on PostgreSQL + Redis) and the
//! runner's own client spans export.
//!
//! * One home-timeline request from the runner is one trace: client span → feed HTTP span →
//!   feed's gRPC client span → timeline's gRPC server span → Redis spans, each the child of
//!   the one before, with their attributes.
//! * A post's fan-out batch links to the post's trace.
//! * A chat message delivered by another gateway replica links to the sender's trace.
//!
//! The subscriber is process-wide: both tests install the same one (nextest runs each in its
//! own process; under `cargo test` they take turns).

use std::time::Duration;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use loadlab::http_client::{Client, ClientConfig, Request};
use loadlab::metrics::EndpointId;
use loadlab::otlp::{ReceivedSpan, Receiver};
use loadlab::stack::{Stack, StackArgs};
use loadlab::tracing_client::{self, TracingSettings};
use loadlab_kit::telemetry::{self, OtelArgs};
use loadlab_kit::{Shutdown, test_support};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: StackArgs,
}

#[derive(Parser)]
struct ChatCli {
    #[command(flatten)]
    config: loadlab_chat_gateway::ChatConfig,
}

const SECRET: &str = "traces-test-secret-0123456789";

struct Setup {
    receiver: Receiver,
    stack_urls: (String, String, String),
    presence_url: String,
    db: loadlab_kit::db::DbSettings,
    prefix: String,
    shutdown: Shutdown,
    waiter: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

/// Under `cargo test` both tests share a process, hence the trace pipeline: they take turns
/// (each stack registers its services' exporters anew, pointed at its own receiver).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Receiver, subscriber and the embedded stack on PostgreSQL + Redis, exporting to it.
async fn setup() -> Setup {
    let receiver = Receiver::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("receiver");
    let endpoint = receiver.endpoint();
    telemetry::init(
        telemetry::LogFormat::Text,
        &OtelArgs::with_endpoint(&endpoint),
    );
    let db = test_support::postgres_db();
    let prefix = test_support::redis_prefix();
    let args = Cli::try_parse_from([
        "up".to_owned(),
        "--base-port".into(),
        "0".into(),
        "--engine".into(),
        "redis".into(),
        "--redis-url".into(),
        test_support::redis_url(),
        "--redis-prefix".into(),
        prefix.clone(),
        "--database-url".into(),
        db.url.clone(),
        "--database-schema".into(),
        db.schema.clone(),
        "--jwt-secret".into(),
        SECRET.into(),
        "--service-flag=--password-memory-kib=256".into(),
        "--service-flag=--password-iterations=1".into(),
        format!("--service-flag=--otlp-endpoint={endpoint}"),
    ])
    .expect("flags")
    .args;
    let shutdown = Shutdown::new();
    let stack = Stack::start(&args, shutdown.clone()).await.expect("stack");
    let urls = (
        stack.feed_url.clone(),
        stack.timeline_url.clone(),
        stack.chat_url.clone(),
    );
    let presence_url = stack.presence_url.clone();
    let waiter = tokio::spawn(async move {
        let _ = stack.wait().await;
    });
    let http = reqwest::Client::new();
    for url in [&urls.0, &urls.1, &urls.2, &presence_url] {
        ready(&http, url).await;
    }
    Setup {
        receiver,
        stack_urls: urls,
        presence_url,
        db,
        prefix,
        shutdown,
        waiter,
        http,
    }
}

async fn ready(http: &reqwest::Client, url: &str) {
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became ready");
}

async fn post_json(http: &reqwest::Client, url: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("request");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    if r.status() == reqwest::StatusCode::NO_CONTENT {
        return Value::Null;
    }
    r.json().await.expect("json")
}

/// Signs up a user; (id, token).
async fn user(http: &reqwest::Client, feed: &str, handle: &str) -> (String, String) {
    let v = post_json(
        http,
        &format!("{feed}/v1/users"),
        None,
        json!({"handle": handle, "password": "correct horse battery"}),
    )
    .await;
    (
        v["id"].as_str().expect("id").to_owned(),
        v["token"].as_str().expect("token").to_owned(),
    )
}

fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    pick: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what}, got {}: {:#?}",
        found.len(),
        spans
    );
    found[0]
}

/// Sends one request through the runner's client with its request tracing; returns the
/// trace id (the request is sampled: ratio 1).
async fn traced_request(
    tracing: &tracing_client::ClientTracing,
    client: &Client,
    method: http::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = Request::new(method.clone(), url.parse().expect("uri"));
    request.headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    if let Some(b) = body {
        request.headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        request.body = b.to_string().into();
    }
    let endpoint = if method == http::Method::GET {
        "GET /v1/users/{id}/timeline"
    } else {
        "POST /v1/posts"
    };
    let trace = tracing.start(
        || endpoint.to_owned(),
        || url.to_owned(),
        &mut request.headers,
    );
    let traceparent = request
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("traceparent sent")
        .to_owned();
    assert!(traceparent.ends_with("-01"), "sampled: {traceparent}");
    let trace_id = traceparent.split('-').nth(1).expect("trace id").to_owned();
    let mut conn = client.connection();
    let response = conn.send(request).await.expect("response");
    tracing.finish(
        trace,
        EndpointId(0),
        response.status,
        response.timings.duration,
    );
    (response.status, trace_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_timeline_read_is_one_trace_and_fan_out_links_to_the_post() {
    let _turn = TURN.lock().await;
    let s = setup().await;
    let (feed, _, _) = s.stack_urls.clone();
    let (author_id, author_token) = user(&s.http, &feed, "trace_author").await;
    let (reader_id, reader_token) = user(&s.http, &feed, "trace_reader").await;
    post_json(
        &s.http,
        &format!("{feed}/v1/users/{reader_id}/follows/{author_id}"),
        Some(&reader_token),
        Value::Null,
    )
    .await;

    let tracing = tracing_client::install(TracingSettings {
        sample_ratio: 1.0,
        otlp_endpoint: Some(s.receiver.endpoint()),
        jaeger_url: Some("http://jaeger.test:16686".into()),
    })
    .expect("client tracing");
    let client = Client::new(ClientConfig::default());

    // A post, traced: its fan-out batch must link to this trace.
    let (status, post_trace) = traced_request(
        &tracing,
        &client,
        http::Method::POST,
        &format!("{feed}/v1/posts"),
        &author_token,
        Some(json!({"body": "hello, traces"})),
    )
    .await;
    assert_eq!(status, 201);
    // Wait until the reader's timeline has it, then read it traced.
    let mut delivered = false;
    for _ in 0..200 {
        let r: Value = s
            .http
            .get(format!("{feed}/v1/users/{reader_id}/timeline"))
            .bearer_auth(&reader_token)
            .send()
            .await
            .expect("read")
            .json()
            .await
            .expect("json");
        if r["posts"].as_array().is_some_and(|p| !p.is_empty()) {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "fan-out never delivered the post");
    let (status, read_trace) = traced_request(
        &tracing,
        &client,
        http::Method::GET,
        &format!("{feed}/v1/users/{reader_id}/timeline?limit=10"),
        &reader_token,
        None,
    )
    .await;
    assert_eq!(status, 200);
    // A read the generator did not sample: no service creates a span for it.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = s
        .http
        .get(format!("{feed}/v1/users/{reader_id}/timeline?limit=10"))
        .bearer_auth(&reader_token)
        .header(
            "traceparent",
            format!("00-{unsampled_trace}-b7ad6b7169203331-00"),
        )
        .send()
        .await
        .expect("unsampled read");
    assert_eq!(r.status(), 200);
    let refs = tracing
        .clone()
        .complete(&["GET /v1/users/{id}/timeline".to_owned()])
        .await;
    assert!(
        refs.iter().any(|r| r.trace_id == read_trace
            && r.url.as_deref() == Some(&*format!("http://jaeger.test:16686/trace/{read_trace}"))),
        "{refs:?}"
    );

    // The read: client → feed HTTP → feed gRPC client → timeline gRPC server → Redis.
    let received = s.receiver.received();
    let complete = received
        .wait_for(Duration::from_secs(20), |spans| {
            let t: Vec<_> = spans.iter().filter(|s| s.trace_id == read_trace).collect();
            t.iter().any(|s| s.service == "loadlab")
                && t.iter()
                    .any(|s| s.service == "timeline" && s.name.starts_with("EVALSHA"))
        })
        .await;
    let spans = received.trace(&read_trace);
    assert!(complete, "incomplete trace: {spans:#?}");
    // Exported in the same batches as the complete trace: none of the unsampled read.
    assert_eq!(received.trace(unsampled_trace), Vec::new());
    // Reads without a traceparent were drawn at the edge (ratio 1: all sampled) and are roots,
    // with the edge's marker taken off before export.
    let all = received.spans();
    assert!(
        all.iter().any(|s| s.service == "feed"
            && s.name == "GET /v1/users/{id}/timeline"
            && s.parent_span_id.is_empty()),
        "edge-sampled roots"
    );
    assert!(
        all.iter()
            .all(|s| s.attribute("loadlab.edge_sampled").is_none()),
        "the marker leaked"
    );
    let client_span = one(&spans, "client span", |s| s.service == "loadlab");
    assert_eq!(client_span.kind, 3, "client kind");
    assert!(
        client_span.parent_span_id.is_empty(),
        "the client span is the root"
    );
    let feed_http = one(&spans, "feed HTTP span", |s| {
        s.service == "feed" && s.name == "GET /v1/users/{id}/timeline"
    });
    assert_eq!(feed_http.parent_span_id, client_span.span_id);
    assert_eq!(feed_http.kind, 2, "server kind");
    assert_eq!(
        feed_http.attribute("http.route"),
        Some("/v1/users/{id}/timeline")
    );
    assert_eq!(
        feed_http.attribute("http.response.status_code"),
        Some("200")
    );
    let grpc_client = one(&spans, "feed gRPC client span", |s| {
        s.service == "feed" && s.kind == 3 && s.name == "loadlab.timeline.v1.TimelineService/Get"
    });
    assert_eq!(grpc_client.parent_span_id, feed_http.span_id);
    assert_eq!(grpc_client.attribute("rpc.system"), Some("grpc"));
    let grpc_server = one(&spans, "timeline gRPC server span", |s| {
        s.service == "timeline" && s.kind == 2
    });
    assert_eq!(grpc_server.name, "loadlab.timeline.v1.TimelineService/Get");
    assert_eq!(grpc_server.parent_span_id, grpc_client.span_id);
    assert_eq!(grpc_server.attribute("rpc.method"), Some("Get"));
    assert_eq!(grpc_server.attribute("rpc.grpc.status_code"), Some("0"));
    let redis: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attribute("db.system.name") == Some("redis"))
        .collect();
    assert!(!redis.is_empty(), "no Redis spans: {spans:#?}");
    for r in &redis {
        assert_eq!(r.service, "timeline");
        assert_eq!(r.kind, 3);
        assert!(r.attribute("db.operation.name").is_some());
        // Every Redis span hangs off the timeline server span, directly or via an internal span.
        let mut parent = r.parent_span_id.clone();
        let mut hops = 0;
        while parent != grpc_server.span_id {
            let p = spans
                .iter()
                .find(|s| s.span_id == parent)
                .unwrap_or_else(|| panic!("Redis span {} has a foreign parent", r.name));
            parent = p.parent_span_id.clone();
            hops += 1;
            assert!(hops < 10, "parent chain too long");
        }
    }
    // Every span of the read is in this one trace and has a parent inside it (but the root).
    for span in &spans {
        if span.span_id != client_span.span_id {
            assert!(
                spans.iter().any(|p| p.span_id == span.parent_span_id),
                "{} has no parent in the trace",
                span.name
            );
        }
    }

    // The post's fan-out: its own trace, linked to the post's.
    let linked = received
        .wait_for(Duration::from_secs(20), |spans| {
            spans
                .iter()
                .any(|s| s.name == "fanout.batch" && s.links.iter().any(|(t, _)| *t == post_trace))
        })
        .await;
    assert!(linked, "no fan-out batch linked to trace {post_trace}");
    let spans = received.spans();
    let batch = spans
        .iter()
        .find(|s| s.name == "fanout.batch" && s.links.iter().any(|(t, _)| *t == post_trace))
        .expect("batch span");
    assert_eq!(batch.service, "feed");
    assert_ne!(batch.trace_id, post_trace, "a link, not a child");
    let post_span = received
        .trace(&post_trace)
        .into_iter()
        .find(|s| s.service == "feed" && s.name == "POST /v1/posts")
        .expect("the post's server span");
    assert!(
        batch
            .links
            .contains(&(post_trace.clone(), post_span.span_id.clone())),
        "the link points at the post's server span"
    );
    // The post's SQL statements (`tracing` spans of sea-orm) and its queue publish (a Redis
    // client span) descend from its server span.
    let post_spans = received.trace(&post_trace);
    let under_post = |span: &ReceivedSpan| {
        let mut parent = span.parent_span_id.clone();
        for _ in 0..10 {
            if parent == post_span.span_id {
                return true;
            }
            match post_spans.iter().find(|p| p.span_id == parent) {
                Some(p) => parent = p.parent_span_id.clone(),
                None => return false,
            }
        }
        false
    };
    let child_of_post = |pred: &dyn Fn(&ReceivedSpan) -> bool| {
        post_spans
            .iter()
            .any(|s| s.service == "feed" && pred(s) && under_post(s))
    };
    assert!(
        child_of_post(&|s| s.name.starts_with("sea_orm.") && s.attribute("db.statement").is_some()),
        "no SQL span under the post: {post_spans:#?}"
    );
    assert!(
        child_of_post(&|s| s.name == "XADD fanout publish" && s.kind == 3),
        "no queue publish span under the post: {post_spans:#?}"
    );
    // The batch's own trace carries the Append call to timeline.
    let batch_trace = received.trace(&batch.trace_id);
    assert!(
        batch_trace
            .iter()
            .any(|s| s.service == "timeline"
                && s.name == "loadlab.timeline.v1.TimelineService/Append"),
        "{batch_trace:#?}"
    );

    // Shutdown flushes every service's metrics: RED per route, fan-out lag, and the process
    // figures the report shows per service.
    s.shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.waiter).await;
    for service in ["feed", "timeline", "chat-gateway", "presence"] {
        for metric in [
            "http.server.request.duration",
            "process.cpu.time",
            "process.memory.usage",
            "process.network.io",
        ] {
            assert!(
                received.has_metric(service, metric),
                "{service} exported no {metric}"
            );
        }
    }
    assert!(received.has_metric("feed", "fanout.lag"));
    assert!(
        !received
            .points("feed", loadlab::otlp::ProcessMetric::MemoryBytes)
            .is_empty()
    );
    s.receiver.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(chat: &str, token: &str) -> Ws {
    let url = format!(
        "{}/v1/chat/ws?token={token}",
        chat.replacen("http://", "ws://", 1)
    );
    tokio_tungstenite::connect_async(url).await.expect("ws").0
}

async fn until(ws: &mut Ws, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} frame"))
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).expect("json");
            if v["type"] == kind {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_delivery_on_another_replica_links_to_the_senders_trace() {
    let _turn = TURN.lock().await;
    let s = setup().await;
    let (feed, _, chat_a) = s.stack_urls.clone();
    // A second gateway replica on the same Redis and database.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let chat_b = format!("http://{}", listener.local_addr().expect("addr"));
    let cfg = ChatCli::try_parse_from([
        "chat".to_owned(),
        "--engine".into(),
        "redis".into(),
        "--redis-url".into(),
        test_support::redis_url(),
        "--redis-prefix".into(),
        s.prefix.clone(),
        "--database-url".into(),
        s.db.url.clone(),
        "--database-schema".into(),
        s.db.schema.clone(),
        "--jwt-secret".into(),
        SECRET.into(),
        "--node-id".into(),
        "77".into(),
        "--presence-url".into(),
        s.presence_url.clone(),
        "--otlp-endpoint".into(),
        s.receiver.endpoint(),
    ])
    .expect("chat flags")
    .config;
    let engine = loadlab_kit::engine::Engine::from_args(&cfg.common).expect("engine");
    let database = loadlab_kit::db::connect(&s.db).await.expect("db");
    let replica = tokio::spawn(loadlab_chat_gateway::serve_with(
        cfg,
        engine,
        database,
        listener,
        s.shutdown.clone(),
    ));
    ready(&s.http, &chat_b).await;

    let (_, sender_token) = user(&s.http, &feed, "chat_sender").await;
    let (_, reader_token) = user(&s.http, &feed, "chat_reader").await;
    let channel = post_json(
        &s.http,
        &format!("{chat_a}/v1/channels"),
        Some(&sender_token),
        json!({"name": "traced"}),
    )
    .await["id"]
        .as_str()
        .expect("channel id")
        .to_owned();
    let mut sender = ws(&chat_a, &sender_token).await;
    let mut reader = ws(&chat_b, &reader_token).await;
    for w in [&mut sender, &mut reader] {
        w.send(Message::Text(
            json!({"type": "join", "channel": channel})
                .to_string()
                .into(),
        ))
        .await
        .expect("join");
        until(w, "joined").await;
    }
    // The sender's client span context, as a load generator sends it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    sender
        .send(Message::Text(
            json!({"type": "send", "channel": channel, "client_msg_id": "m-1",
                   "body": "over the wire", "traceparent": traceparent})
            .to_string()
            .into(),
        ))
        .await
        .expect("send");
    until(&mut sender, "ack").await;
    let message = until(&mut reader, "message").await;
    assert_eq!(
        message["body"], "over the wire",
        "the envelope is invisible to clients"
    );

    let received = s.receiver.received();
    let found = received
        .wait_for(Duration::from_secs(20), |spans| {
            let send = spans
                .iter()
                .find(|s| s.name == "chat.send" && s.trace_id == trace_id);
            send.is_some_and(|send| {
                spans.iter().any(|d| {
                    d.name == "chat.deliver"
                        && d.links
                            .contains(&(trace_id.to_owned(), send.span_id.clone()))
                        && d.attribute("chat.replica")
                            .is_some_and(|r| r.starts_with("gw-77-"))
                })
            })
        })
        .await;
    let spans = received.spans();
    assert!(
        found,
        "no delivery on replica gw-77 linked to the sender's trace: {:#?}",
        spans
            .iter()
            .filter(|s| s.name.starts_with("chat."))
            .collect::<Vec<_>>()
    );
    let send = spans
        .iter()
        .find(|s| s.name == "chat.send" && s.trace_id == trace_id)
        .expect("send span");
    assert_eq!(send.service, "chat-gateway");
    assert_eq!(
        send.parent_span_id, "00f067aa0ba902b7",
        "child of the client's span"
    );
    let delivery = spans
        .iter()
        .find(|d| {
            d.name == "chat.deliver"
                && d.attribute("chat.replica")
                    .is_some_and(|r| r.starts_with("gw-77-"))
        })
        .expect("delivery");
    assert_ne!(delivery.trace_id, trace_id, "a link, not a child");
    assert_eq!(delivery.attribute("chat.recipients"), Some("1"));
    // The group commit links to the sender too, and carries the SQL insert.
    let commit = spans
        .iter()
        .find(|c| c.name == "chat.commit" && c.links.iter().any(|(t, _)| t == trace_id))
        .expect("commit span");
    assert!(
        spans.iter().any(
            |q| q.trace_id == commit.trace_id && q.attribute("db.system") == Some("postgresql")
        ),
        "no SQL span under the commit"
    );

    s.shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(15), replica).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), s.waiter).await;
    // Flushed at shutdown: the gateways' WebSocket and delivery metrics.
    assert!(received.has_metric("chat-gateway", "chat.websocket.connections"));
    assert!(received.has_metric("chat-gateway", "chat.messages.delivered"));
    s.receiver.stop().await;
}
