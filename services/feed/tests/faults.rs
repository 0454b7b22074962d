//! Faults: Redis restarted or its queue lost between post and fan-out, a fan-out worker killed
//! mid-batch. After recovery every follower's timeline holds every acknowledged post exactly once.

mod support;

use std::sync::Arc;
use std::time::Duration;

use loadlab_feed::fanout::{Fanout, FanoutMetrics, FanoutSettings};
use loadlab_feed::store::FeedStore;
use loadlab_kit::metrics::Metrics;
use loadlab_kit::{Id, Shutdown, Snowflake, grpc, test_support};
use loadlab_proto::timeline::v1::timeline_service_client::TimelineServiceClient;
use reqwest::StatusCode;
use support::{Backend, Options, Stack, User};

/// A fan-out worker outside the feed process, as with `--role fanout`.
fn worker(stack: &Stack, settings: FanoutSettings) -> Fanout {
    let store = FeedStore::new(
        stack.db.clone(),
        Arc::new(Snowflake::new(9).expect("node")),
        stack.engine.clone(),
        settings.celebrity_threshold,
        Duration::from_secs(3_600),
    );
    let timeline = TimelineServiceClient::new(
        grpc::lazy_channel(&stack.timeline_url, Duration::from_secs(5)).expect("channel"),
    );
    Fanout::new(
        store,
        stack.engine.clone(),
        timeline,
        settings,
        FanoutMetrics::register(&Metrics::new()),
    )
}

fn settings(
    batch: usize,
    delay: Duration,
    sweep_after: Duration,
    claim_idle: Duration,
) -> FanoutSettings {
    FanoutSettings {
        batch,
        concurrency: 4,
        consumers: 2,
        batch_delay: delay,
        sweep_interval: Duration::from_millis(200),
        sweep_after,
        claim_idle,
        celebrity_threshold: 10_000,
    }
}

async fn author_with_followers(stack: &Stack, n: usize) -> (User, Vec<User>) {
    let author = stack.register("author").await;
    let mut followers = Vec::new();
    for i in 0..n {
        let f = stack.register(&format!("follower_{i}")).await;
        stack.follow(&f, &author).await;
        // Materialise, so posts reach it by fan-out only.
        assert!(stack.home_all(&f).await.is_empty());
        followers.push(f);
    }
    (author, followers)
}

async fn count_holding(stack: &Stack, followers: &[User], post: Id) -> usize {
    let mut n = 0;
    for f in followers {
        if stack
            .stored_home(f.id)
            .await
            .unwrap_or_default()
            .contains(&post)
        {
            n += 1;
        }
    }
    n
}

/// Every follower's stored timeline (no rebuild) holds exactly `posts`, newest first.
async fn assert_delivered_exactly_once(stack: &Stack, followers: &[User], posts: &[Id]) {
    let mut expected = posts.to_vec();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    for f in followers {
        assert_eq!(
            stack.stored_home(f.id).await.expect("materialised"),
            expected,
            "{}",
            f.handle
        );
        assert_eq!(stack.home_all(f).await, expected, "{}", f.handle);
    }
}

async fn fault_worker_killed_mid_batch(backend: Backend) {
    let mut options = Options::new(backend);
    options.fanout_in_feed = false;
    let stack = Stack::start(options).await;
    let (author, followers) = author_with_followers(&stack, 10).await;

    // Worker A pauses between batches of 2, so it can be killed with the post half-delivered.
    let slow = worker(
        &stack,
        settings(
            2,
            Duration::from_millis(400),
            Duration::from_secs(3_600),
            Duration::from_secs(1),
        ),
    );
    let a = tokio::spawn(slow.run("worker-a".into(), Shutdown::new()));
    let post = stack.post(&author, "half delivered").await;
    Stack::eventually(
        "a first batch delivered",
        Duration::from_secs(15),
        || async { count_holding(&stack, &followers, post).await >= 2 },
    )
    .await;
    a.abort();
    let _ = a.await;
    let partial = count_holding(&stack, &followers, post).await;
    assert!(
        partial < followers.len(),
        "worker A finished before it was killed ({partial})"
    );

    // Worker B reclaims the job once it has been idle for a second and finishes it.
    let b_shutdown = Shutdown::new();
    let b = tokio::spawn(
        worker(
            &stack,
            settings(
                3,
                Duration::ZERO,
                Duration::from_secs(3_600),
                Duration::from_secs(1),
            ),
        )
        .run("worker-b".into(), b_shutdown.clone()),
    );
    stack.wait_fanned_out(Duration::from_secs(20)).await;
    assert_delivered_exactly_once(&stack, &followers, &[post]).await;

    // A second post goes straight through worker B.
    let second = stack.post(&author, "after recovery").await;
    stack.wait_fanned_out(Duration::from_secs(20)).await;
    assert_delivered_exactly_once(&stack, &followers, &[post, second]).await;
    b_shutdown.trigger();
    b.await.expect("worker B stops");
    stack.stop().await;
}
both_backends!(fault_worker_killed_mid_batch);

/// The queue is lost (its Redis key deleted) after posts were acknowledged but before any
/// worker ran: the outbox sweep re-publishes them and fan-out completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_queue_lost_before_fanout() {
    let mut options = Options::new(Backend::PostgresRedis);
    options.fanout_in_feed = false;
    let stack = Stack::start(options).await;
    let (author, followers) = author_with_followers(&stack, 5).await;
    let mut posts = Vec::new();
    for i in 0..4 {
        posts.push(stack.post(&author, &format!("queued {i}")).await);
    }
    let redis = redis_cli(&test_support::redis_url());
    let stream = format!("{}fanout", stack.redis_prefix);
    assert_eq!(redis_cmd(&redis, &["XLEN", &stream]), "4");
    assert_eq!(redis_cmd(&redis, &["DEL", &stream]), "1");

    let shutdown = Shutdown::new();
    let w = tokio::spawn(
        worker(
            &stack,
            settings(
                100,
                Duration::ZERO,
                Duration::from_millis(300),
                Duration::from_secs(30),
            ),
        )
        .run("sweeper".into(), shutdown.clone()),
    );
    stack.wait_fanned_out(Duration::from_secs(20)).await;
    assert_delivered_exactly_once(&stack, &followers, &posts).await;
    shutdown.trigger();
    w.await.expect("worker stops");
    stack.stop().await;
}

/// Redis dies between post and fan-out and comes back empty: posts are still acknowledged (the
/// database commit is the acknowledgement), reads fail fast with 503 meanwhile, and afterwards
/// every follower sees every post exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_restart_between_post_and_fanout() {
    let mut redis = test_support::RedisServer::start();
    let mut options = Options::new(Backend::PostgresRedis);
    options.redis_url = Some(redis.url());
    options.sweep_after = Duration::from_secs(1);
    options.sweep_interval = Duration::from_millis(200);
    options.claim_idle = Duration::from_secs(1);
    let stack = Stack::start(options).await;
    let (author, followers) = author_with_followers(&stack, 5).await;
    let before = stack.post(&author, "before the outage").await;
    stack.wait_fanned_out(Duration::from_secs(20)).await;

    redis.kill();
    let mut during = Vec::new();
    for i in 0..3 {
        during.push(stack.post(&author, &format!("during the outage {i}")).await);
    }
    let (status, body) = stack.home(&followers[0], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "timeline_unavailable");

    redis.restart();
    stack.wait_fanned_out(Duration::from_secs(30)).await;
    let mut all = vec![before];
    all.extend(&during);
    all.sort_unstable_by(|a, b| b.cmp(a));
    // Redis came back empty: timelines are rebuilt from the database on read.
    for f in &followers {
        Stack::eventually("reads work again", Duration::from_secs(15), || async {
            stack.home(f, "").await.0 == StatusCode::OK
        })
        .await;
        assert_eq!(stack.home_all(f).await, all, "{}", f.handle);
    }
    // And posts after the recovery are fanned out into the rebuilt timelines.
    let after = stack.post(&author, "after the outage").await;
    stack.wait_fanned_out(Duration::from_secs(20)).await;
    all.insert(0, after);
    assert_delivered_exactly_once(&stack, &followers, &all).await;
    stack.stop().await;
}

fn redis_cli(url: &str) -> String {
    url.to_owned()
}

fn redis_cmd(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// PostgreSQL dies and comes back: writes fail fast with 503 meanwhile (reads of materialised
/// timelines keep working from Redis), the pool reconnects afterwards, nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_postgres_restart_mid_run() {
    let mut pg = test_support::PostgresServer::start();
    let mut options = Options::new(Backend::PostgresRedis);
    options.postgres_url = Some(pg.url());
    let stack = Stack::start(options).await;
    let (author, followers) = author_with_followers(&stack, 3).await;
    let first = stack.post(&author, "before the database restart").await;
    stack.wait_fanned_out(Duration::from_secs(20)).await;

    pg.kill();
    let (status, body) = stack
        .call(
            reqwest::Method::POST,
            "/v1/posts",
            Some(&author.token),
            Some(serde_json::json!({"body": "lost?"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    // Materialised timelines are served from Redis while the database is down.
    let (status, body) = stack.home(&followers[0], "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(Stack::ids(&body), vec![first]);

    pg.restart();
    // The pool reconnects on its own; the first attempts may still fail while it does.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        let (status, body) = stack
            .call(
                reqwest::Method::POST,
                "/v1/posts",
                Some(&author.token),
                Some(serde_json::json!({"body": "after the restart"})),
            )
            .await;
        if status == StatusCode::CREATED {
            break body["id"].as_str().and_then(|s| s.parse::<Id>().ok());
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "posting never recovered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let second = second.expect("second post id");
    stack.wait_fanned_out(Duration::from_secs(20)).await;
    assert_delivered_exactly_once(&stack, &followers, &[first, second]).await;
    stack.stop().await;
}
