//! The chat scenario against the real embedded stack (feed for sign-ups, chat-gateway,
//! presence) on the memory engine and SQLite.

use std::time::Duration;

use clap::Parser;
use loadlab::run::{self, RunOptions};
use loadlab::spec::LoadTestSpec;
use loadlab::stack::{Stack, StackArgs};
use loadlab_kit::Shutdown;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: StackArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sessions_measure_delivery_between_clients() {
    let args = Cli::try_parse_from([
        "up",
        "--base-port",
        "0",
        "--engine",
        "memory",
        "--database-url",
        &loadlab_kit::test_support::sqlite_db().url,
        "--service-flag=--password-memory-kib=256",
        "--service-flag=--password-iterations=1",
    ])
    .expect("flags")
    .args;
    let shutdown = Shutdown::new();
    let stack = Stack::start(&args, shutdown.clone()).await.expect("stack");
    let (feed, chat) = (stack.feed_url.clone(), stack.chat_url.clone());
    let waiter = tokio::spawn(stack.wait());
    let http = reqwest::Client::new();
    for url in [&feed, &chat] {
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let yaml = format!(
        "target: {{feed: '{feed}', chat: '{chat}'}}\nscenario:\n  name: chat\n  params: {{users: 20, channels: 2, messageIntervalMs: 100, sessionDuration: 3s}}\nexecutor: {{type: constant-vus, vus: 10, duration: 3s}}\nthresholds:\n  ws_delivery_latency: ['p(95)<1000']\n"
    );
    let spec = LoadTestSpec::from_yaml(&yaml).expect("spec");
    let out = std::env::temp_dir().join(format!(
        "loadlab-chat-{}",
        loadlab_kit::test_support::unique_suffix()
    ));
    let opts = RunOptions {
        out_dir: out.clone(),
        progress: false,
        server_processes: Vec::new(),
        run_id: "chattest".into(),
        insecure_skip_verify: false,
    };
    let s = run::run(&spec, &opts, shutdown.child())
        .await
        .expect("run")
        .summary;
    let v = |m: &str, k: &str| {
        s.metrics
            .get(m)
            .and_then(|m| m.values.get(k))
            .copied()
            .unwrap_or_else(|| panic!("{m}.{k}"))
    };
    assert!(v("ws_sessions", "count") >= 10.0);
    assert_eq!(v("ws_session_failures", "count"), 0.0);
    let sent = v("ws_msgs_sent", "count");
    let received = v("ws_msgs_received", "count");
    // 10 VUs in 2 channels: each message reaches the 5 members of its channel.
    assert!(sent >= 150.0, "sent {sent}");
    assert!(
        received >= sent * 3.0,
        "received {received} for {sent} sent"
    );
    assert!(v("ws_delivery_latency", "count") > 0.0);
    assert!(v("ws_delivery_latency", "p(99)") < 1_000.0);
    assert!(s.thresholds.iter().all(|t| t.ok), "{:?}", s.thresholds);
    shutdown.trigger();
    waiter.await.expect("join").expect("clean stop");
    let _ = std::fs::remove_dir_all(out);
}
