//! The built-in scenarios distributed against the real embedded stack: set-up runs once on the
//! coordinator and its users (and channels) reach every worker.

use std::time::Duration;

use clap::Parser;
use loadlab::distributed::local;
use loadlab::spec::LoadTestSpec;
use loadlab::stack::{Stack, StackArgs};
use loadlab_kit::Shutdown;

use crate::support::{self, value};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: StackArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_and_chat_scenarios_run_on_workers_with_the_coordinators_set_up() {
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
    let workers = local::LocalWorkers {
        count: 2,
        exe: support::loadlab(),
    };

    // feed-mixed: every worker acts as its own half of the users, with their tokens.
    let yaml = format!(
        "target: {{feed: '{feed}'}}\nscenario:\n  name: feed-mixed\n  params: {{users: 20, followsPerUser: 3, celebrities: 2, postsPerUser: 1}}\nexecutor: {{type: constant-arrival-rate, rate: 20, duration: 2s, preAllocatedVUs: 10}}\n"
    );
    let spec = LoadTestSpec::from_yaml(&yaml).expect("spec");
    let opts = support::run_options("feed");
    let outcome = local::run(&spec, &opts, &workers, shutdown.child())
        .await
        .expect("feed run");
    let s = &outcome.summary;
    assert_eq!(value(s, "http_reqs", "count"), 40.0);
    assert_eq!(
        value(s, "http_req_failed", "passes"),
        0.0,
        "{:?}",
        s.endpoints
    );
    assert_eq!(value(s, "checks", "fails"), 0.0);
    let d = s.run.distributed.as_ref().expect("distributed");
    assert!(
        d.workers.iter().all(|w| w.requests == 20),
        "{:?}",
        d.workers
    );
    let _ = std::fs::remove_dir_all(&opts.out_dir);

    // chat: the workers' clients share channels, so messages cross worker processes.
    let yaml = format!(
        "target: {{feed: '{feed}', chat: '{chat}'}}\nscenario:\n  name: chat\n  params: {{users: 10, channels: 1, messageIntervalMs: 100, sessionDuration: 2s}}\nexecutor: {{type: constant-vus, vus: 4, duration: 2s}}\n"
    );
    let spec = LoadTestSpec::from_yaml(&yaml).expect("spec");
    let opts = support::run_options("chat");
    let outcome = local::run(&spec, &opts, &workers, shutdown.child())
        .await
        .expect("chat run");
    let s = &outcome.summary;
    assert_eq!(value(s, "ws_session_failures", "count"), 0.0);
    let sent = value(s, "ws_msgs_sent", "count");
    let received = value(s, "ws_msgs_received", "count");
    // 4 VUs (2 per worker, distinct users) in one channel: each message reaches all 4.
    assert!(sent >= 40.0, "sent {sent}");
    assert!(received >= sent * 3.0, "received {received} for {sent}");
    assert!(value(s, "ws_delivery_latency", "count") > 0.0);
    let _ = std::fs::remove_dir_all(&opts.out_dir);

    shutdown.trigger();
    waiter.await.expect("join").expect("clean stop");
}
