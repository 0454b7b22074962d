//! `loadlab up`: the embedded stack serves the feed system from one process on one memory engine.

use std::time::Duration;

use clap::Parser;
use loadlab::stack::{Stack, StackArgs};
use loadlab_kit::Shutdown;
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: StackArgs,
}

fn args(extra: &[&str]) -> StackArgs {
    let mut argv = vec![
        "up".to_owned(),
        "--base-port".into(),
        "0".into(),
        "--engine".into(),
        "memory".into(),
        "--database-url".into(),
        loadlab_kit::test_support::sqlite_db().url,
        "--service-flag=--password-memory-kib=256".into(),
        "--service-flag=--password-iterations=1".into(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    Cli::try_parse_from(argv).expect("flags").args
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_feed_on_one_memory_engine() {
    let shutdown = Shutdown::new();
    let stack = Stack::start(
        &args(&["--service-flag=--timeline-cap=50"]),
        shutdown.clone(),
    )
    .await
    .expect("start");
    let feed = stack.feed_url.clone();
    let waiter = tokio::spawn(stack.wait());
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{feed}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut users = Vec::new();
    for handle in ["writer", "reader"] {
        let (status, body) = call(
            &http,
            reqwest::Method::POST,
            format!("{feed}/v1/users"),
            None,
            Some(json!({"handle": handle, "password": "password1"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        users.push((
            body["id"].as_str().expect("id").to_owned(),
            body["token"].as_str().expect("token").to_owned(),
        ));
    }
    let (writer, reader) = (&users[0], &users[1]);
    let (status, _) = call(
        &http,
        reqwest::Method::POST,
        format!("{feed}/v1/users/{}/follows/{}", reader.0, writer.0),
        Some(&reader.1),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, empty) = call(
        &http,
        reqwest::Method::GET,
        format!("{feed}/v1/users/{}/timeline", reader.0),
        Some(&reader.1),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(empty["posts"], json!([]));
    let (status, post) = call(
        &http,
        reqwest::Method::POST,
        format!("{feed}/v1/posts"),
        Some(&writer.1),
        Some(json!({"body": "from one process"})),
    )
    .await;
    assert_eq!(status, 201);
    // Fan-out through the shared memory queue into the materialised timeline.
    let mut got = Value::Null;
    for _ in 0..100 {
        let (_, body) = call(
            &http,
            reqwest::Method::GET,
            format!("{feed}/v1/users/{}/timeline", reader.0),
            Some(&reader.1),
            None,
        )
        .await;
        if body["posts"].as_array().is_some_and(|p| !p.is_empty()) {
            got = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got["posts"][0]["id"], post["id"]);
    shutdown.trigger();
    waiter.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn unknown_service_flags_are_named() {
    let err = Stack::start(&args(&["--service-flag=--no-such-flag=1"]), Shutdown::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("--no-such-flag"), "{err}");
    let err = Stack::start(&args(&["--service-flag=--timeline-cap=0"]), Shutdown::new())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("--timeline-cap"), "{err}");
}
