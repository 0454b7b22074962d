//! One contract, two engines: every test runs against the memory engine and against real Redis
//! (with a key prefix of its own, so tests run in parallel).

use std::time::Duration;

use bytes::Bytes;
use loadlab_kit::Id;
use loadlab_kit::engine::redis::RedisSettings;
use loadlab_kit::engine::{Engine, FanoutJob, TimelineKey};
use loadlab_kit::ids::EPOCH_UNIX_MS;
use loadlab_kit::test_support;

fn redis_engine() -> Engine {
    Engine::redis(RedisSettings {
        url: test_support::redis_url(),
        prefix: test_support::redis_prefix(),
        pool_size: 2,
    })
    .expect("redis engine")
}

macro_rules! contract {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(loadlab_kit::engine::Engine::memory()).await;
            }
            #[tokio::test]
            async fn redis() {
                super::$name(super::redis_engine()).await;
            }
        }
    };
}

/// One timeline's newest `limit` ids (`None` when missing or not filled).
async fn read(engine: &Engine, key: TimelineKey, limit: usize) -> Option<Vec<Id>> {
    let mut got = engine
        .timelines
        .range(&[key], None, limit)
        .await
        .expect("range");
    assert_eq!(got.len(), 1, "one answer per key");
    got.pop().flatten()
}

/// An id minted at `ms` after the id epoch, with a distinguishing sequence number.
fn id_at(ms: u64, seq: u64) -> Id {
    Id((ms << 22) | seq)
}

async fn timelines_skip_missing_and_keep_order(engine: Engine) {
    let user = Id(1);
    let home = TimelineKey::Home(user);
    assert_eq!(
        engine
            .timelines
            .append(&[home], id_at(10, 0), 5)
            .await
            .expect("append"),
        0
    );
    assert_eq!(read(&engine, home, 10).await, None);

    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    // Materialised but not filled: a rebuild is in progress, and a reader must not take it for
    // an empty timeline.
    assert_eq!(read(&engine, home, 10).await, None);
    // Appends during the rebuild land; the fill adds the source's posts and makes it readable.
    assert_eq!(
        engine
            .timelines
            .append(&[home], id_at(5, 0), 10)
            .await
            .expect("append"),
        1
    );
    engine
        .timelines
        .materialise(home)
        .await
        .expect("a second rebuild materialises again");
    engine
        .timelines
        .fill(home, &[id_at(4, 0)], 10)
        .await
        .expect("fill");
    assert_eq!(
        read(&engine, home, 10).await,
        Some(vec![id_at(5, 0), id_at(4, 0)])
    );
    // Materialising a filled timeline changes nothing: it stays readable.
    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    assert_eq!(
        read(&engine, home, 10).await,
        Some(vec![id_at(5, 0), id_at(4, 0)])
    );
    for (ms, seq) in [(10, 0), (30, 0), (20, 0), (20, 1)] {
        assert_eq!(
            engine
                .timelines
                .append(&[home], id_at(ms, seq), 10)
                .await
                .expect("append"),
            1
        );
    }
    // Appending again changes nothing.
    engine
        .timelines
        .append(&[home], id_at(30, 0), 10)
        .await
        .expect("append");
    let all = engine
        .timelines
        .range(&[home], None, 10)
        .await
        .expect("range");
    assert_eq!(
        all,
        vec![Some(vec![
            id_at(30, 0),
            id_at(20, 1),
            id_at(20, 0),
            id_at(10, 0),
            id_at(5, 0),
            id_at(4, 0)
        ])]
    );

    // Cursor: strictly older, including ties on the same millisecond.
    let page = engine
        .timelines
        .range(&[home], Some(id_at(20, 1)), 2)
        .await
        .expect("range");
    assert_eq!(page, vec![Some(vec![id_at(20, 0), id_at(10, 0)])]);
    let page = engine
        .timelines
        .range(&[home], Some(id_at(10, 0)), 2)
        .await
        .expect("range");
    assert_eq!(page, vec![Some(vec![id_at(5, 0), id_at(4, 0)])]);
    let page = engine
        .timelines
        .range(&[home], Some(id_at(4, 0)), 2)
        .await
        .expect("range");
    assert_eq!(page, vec![Some(vec![])]);

    engine.timelines.remove(home).await.expect("remove");
    assert_eq!(read(&engine, home, 10).await, None);
}
contract!(timelines_skip_missing_and_keep_order);

async fn timelines_are_capped_to_the_newest(engine: Engine) {
    let home = TimelineKey::Home(Id(2));
    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    // An empty rebuild still fills: the timeline becomes readable, and empty.
    engine.timelines.fill(home, &[], 5).await.expect("fill");
    assert_eq!(read(&engine, home, 100).await, Some(vec![]));
    for ms in 1..=12u64 {
        engine
            .timelines
            .append(&[home], id_at(ms, 0), 5)
            .await
            .expect("append");
    }
    let got = engine
        .timelines
        .range(&[home], None, 100)
        .await
        .expect("range");
    assert_eq!(
        got,
        vec![Some((8..=12u64).rev().map(|ms| id_at(ms, 0)).collect())]
    );

    let author = TimelineKey::Author(Id(2));
    let posts: Vec<Id> = (1..=9u64).map(|ms| id_at(ms, 7)).collect();
    // Filling a missing timeline is a no-op (it was invalidated mid-rebuild).
    engine
        .timelines
        .fill(author, &posts, 4)
        .await
        .expect("fill");
    assert_eq!(read(&engine, author, 10).await, None);
    engine
        .timelines
        .materialise(author)
        .await
        .expect("materialise");
    engine
        .timelines
        .fill(author, &posts, 4)
        .await
        .expect("fill");
    let got = engine
        .timelines
        .range(&[author, home], None, 2)
        .await
        .expect("range");
    assert_eq!(got[0], Some(vec![id_at(9, 7), id_at(8, 7)]));
    assert_eq!(got[1], Some(vec![id_at(12, 0), id_at(11, 0)]));
}
contract!(timelines_are_capped_to_the_newest);

async fn many_ids_in_one_millisecond_page_correctly(engine: Engine) {
    let home = TimelineKey::Home(Id(3));
    let posts: Vec<Id> = (0..200u64).map(|seq| id_at(500, seq)).collect();
    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    engine
        .timelines
        .fill(home, &posts, 800)
        .await
        .expect("fill");
    let mut before = None;
    let mut seen = Vec::new();
    loop {
        let page = engine
            .timelines
            .range(&[home], before, 30)
            .await
            .expect("range")[0]
            .clone()
            .expect("materialised");
        if page.is_empty() {
            break;
        }
        before = page.last().copied();
        seen.extend(page);
    }
    let expected: Vec<Id> = posts.iter().rev().copied().collect();
    assert_eq!(seen, expected);
}
contract!(many_ids_in_one_millisecond_page_correctly);

async fn real_snowflakes_round_trip(engine: Engine) {
    let ids = loadlab_kit::Snowflake::new(1021).expect("node");
    let posts: Vec<Id> = (0..50).map(|_| ids.next_id()).collect();
    assert!(posts[0].unix_ms() > EPOCH_UNIX_MS);
    let home = TimelineKey::Home(Id(4));
    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    engine
        .timelines
        .fill(home, &posts, 800)
        .await
        .expect("fill");
    let got = engine
        .timelines
        .range(&[home], None, 100)
        .await
        .expect("range")[0]
        .clone()
        .expect("materialised");
    assert_eq!(got, posts.iter().rev().copied().collect::<Vec<_>>());
}
contract!(real_snowflakes_round_trip);

async fn follow_cache_round_trip_and_expiry(engine: Engine) {
    let user = Id(7);
    let cache = &engine.follow_cache;
    assert_eq!(cache.celebrities_followed(user).await.expect("get"), None);
    cache
        .store_celebrities_followed(user, &[Id(30), Id(10), Id(20)], Duration::from_secs(60))
        .await
        .expect("store");
    assert_eq!(
        cache.celebrities_followed(user).await.expect("get"),
        Some(vec![Id(10), Id(20), Id(30)])
    );
    cache
        .forget_celebrities_followed(&[user])
        .await
        .expect("forget");
    assert_eq!(cache.celebrities_followed(user).await.expect("get"), None);

    // An empty set is a cached answer too, distinct from "not cached".
    cache
        .store_celebrities_followed(user, &[], Duration::from_secs(1))
        .await
        .expect("store");
    assert_eq!(
        cache.celebrities_followed(user).await.expect("get"),
        Some(vec![])
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(cache.celebrities_followed(user).await.expect("get"), None);
}
contract!(follow_cache_round_trip_and_expiry);

async fn post_cache_keeps_order_and_misses(engine: Engine) {
    let posts = &engine.posts;
    assert_eq!(posts.get_many(&[Id(1)]).await.expect("get"), vec![None]);
    posts
        .put_many(
            &[
                (Id(1), Bytes::from_static(b"one")),
                (Id(3), Bytes::from_static(b"three")),
            ],
            Duration::from_secs(60),
        )
        .await
        .expect("put");
    let got = posts.get_many(&[Id(3), Id(2), Id(1)]).await.expect("get");
    assert_eq!(
        got,
        vec![
            Some(Bytes::from_static(b"three")),
            None,
            Some(Bytes::from_static(b"one"))
        ]
    );
    assert_eq!(
        posts.get_many(&[]).await.expect("get"),
        Vec::<Option<Bytes>>::new()
    );
}
contract!(post_cache_keeps_order_and_misses);

async fn fanout_queue_redelivers_unacked_jobs(engine: Engine) {
    let queue = &engine.fanout;
    let mut first = queue.consumer("first").await.expect("consumer");
    // Nothing published yet: an empty answer after the wait, not an error.
    assert!(
        first
            .receive(10, Duration::from_millis(50))
            .await
            .expect("receive")
            .is_empty()
    );

    let jobs: Vec<FanoutJob> = (1..=3u64)
        .map(|i| FanoutJob {
            post: Id(100 + i),
            author: Id(i),
            trace: None,
        })
        .collect();
    for job in &jobs {
        queue.publish(*job).await.expect("publish");
    }
    let got = first
        .receive(10, Duration::from_secs(1))
        .await
        .expect("receive");
    assert_eq!(got.iter().map(|d| d.job).collect::<Vec<_>>(), jobs);
    assert_eq!(queue.backlog().await.expect("backlog"), 3);

    first
        .ack(&[got[0].id.clone(), got[2].id.clone()])
        .await
        .expect("ack");
    assert_eq!(queue.backlog().await.expect("backlog"), 1);

    // The first consumer "dies" holding job 2; another takes it over once it has been idle.
    drop(first);
    let mut second = queue.consumer("second").await.expect("consumer");
    assert!(
        second
            .reclaim(Duration::from_secs(60), 10)
            .await
            .expect("reclaim")
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let reclaimed = second
        .reclaim(Duration::from_millis(20), 10)
        .await
        .expect("reclaim");
    assert_eq!(
        reclaimed.iter().map(|d| d.job).collect::<Vec<_>>(),
        vec![jobs[1]]
    );
    assert!(
        second
            .receive(10, Duration::from_millis(50))
            .await
            .expect("receive")
            .is_empty()
    );
    second.ack(&[reclaimed[0].id.clone()]).await.expect("ack");
    assert_eq!(queue.backlog().await.expect("backlog"), 0);
}
contract!(fanout_queue_redelivers_unacked_jobs);

async fn engine_answers_ping(engine: Engine) {
    engine.ping().await.expect("ping");
}
contract!(engine_answers_ping);

/// A consumer created before Redis lost its data recreates its group and keeps working.
#[tokio::test]
async fn redis_fault_consumer_recovers_after_restart() {
    let mut server = test_support::RedisServer::start();
    let engine = Engine::redis(RedisSettings {
        url: server.url(),
        prefix: "x:".into(),
        pool_size: 1,
    })
    .expect("engine");
    let mut consumer = engine.fanout.consumer("c").await.expect("consumer");
    engine
        .fanout
        .publish(FanoutJob {
            post: Id(1),
            author: Id(2),
            trace: None,
        })
        .await
        .expect("publish");
    assert_eq!(
        consumer
            .receive(10, Duration::from_secs(1))
            .await
            .expect("receive")
            .len(),
        1
    );

    server.kill();
    assert!(
        engine
            .fanout
            .publish(FanoutJob {
                post: Id(3),
                author: Id(2),
                trace: None,
            })
            .await
            .is_err()
    );
    assert!(engine.ping().await.is_err());
    server.restart();

    // Reconnects in the background; the first calls may still fail while it does.
    let mut published = false;
    for _ in 0..100 {
        if engine
            .fanout
            .publish(FanoutJob {
                post: Id(5),
                author: Id(2),
                trace: None,
            })
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "publish never succeeded after the restart");
    let mut got = Vec::new();
    for _ in 0..50 {
        match consumer.receive(10, Duration::from_millis(200)).await {
            Ok(batch) if !batch.is_empty() => {
                got = batch;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(
        got.iter().map(|d| d.job.post).collect::<Vec<_>>(),
        vec![Id(5)]
    );
}

async fn appends_trim_in_bulk_past_the_slack(engine: Engine) {
    let home = TimelineKey::Home(Id(5));
    engine
        .timelines
        .materialise(home)
        .await
        .expect("materialise");
    engine.timelines.fill(home, &[], 32).await.expect("fill");
    let len = |v: Vec<Option<Vec<Id>>>| v[0].as_ref().map_or(0, Vec::len);
    // cap 32 → slack 2: up to 34 entries are kept, the 35th trims back to 32.
    for ms in 1..=34u64 {
        engine
            .timelines
            .append(&[home], id_at(ms, 0), 32)
            .await
            .expect("append");
    }
    assert_eq!(
        len(engine
            .timelines
            .range(&[home], None, 100)
            .await
            .expect("range")),
        34
    );
    engine
        .timelines
        .append(&[home], id_at(35, 0), 32)
        .await
        .expect("append");
    let got = engine
        .timelines
        .range(&[home], None, 100)
        .await
        .expect("range");
    assert_eq!(
        got,
        vec![Some((4..=35u64).rev().map(|ms| id_at(ms, 0)).collect())]
    );
}
contract!(appends_trim_in_bulk_past_the_slack);

async fn pubsub_delivers_to_subscribed_topics_only(engine: Engine) {
    let hub = loadlab_kit::hub::Hub::new(engine.pubsub.as_ref())
        .await
        .expect("hub");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Bytes)>();
    let listener = |name: &'static str| {
        let tx = tx.clone();
        std::sync::Arc::new(move |b: &Bytes| {
            let _ = tx.send((name.to_owned(), b.clone()));
        }) as loadlab_kit::hub::Listener
    };
    let a = hub.listen("chat:a", listener("a1")).await.expect("listen");
    let _a2 = hub.listen("chat:a", listener("a2")).await.expect("listen");
    let _b = hub.listen("chat:b", listener("b")).await.expect("listen");
    // Redis applies SUBSCRIBE asynchronously to PUBLISH from another connection: retry until heard.
    let mut heard = Vec::new();
    for _ in 0..50 {
        engine
            .pubsub
            .publish("chat:a", Bytes::from_static(b"hello"))
            .await
            .expect("publish");
        engine
            .pubsub
            .publish("chat:c", Bytes::from_static(b"nobody"))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(m) = rx.try_recv() {
            heard.push(m);
        }
        if heard.iter().any(|(n, _)| n == "a1") && heard.iter().any(|(n, _)| n == "a2") {
            break;
        }
    }
    assert!(
        heard
            .iter()
            .all(|(n, b)| (n == "a1" || n == "a2") && b.as_ref() == b"hello"),
        "{heard:?}"
    );
    assert!(heard.iter().any(|(n, _)| n == "a1") && heard.iter().any(|(n, _)| n == "a2"));
    engine
        .pubsub
        .publish("chat:b", Bytes::from_static(b"to b"))
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some((n, b)) = rx.recv().await
                && n == "b"
            {
                return b;
            }
        }
    })
    .await
    .expect("b hears its topic");
    assert_eq!(got.as_ref(), b"to b");
    // After the last listener of a topic leaves, nothing more arrives for it.
    hub.unlisten("chat:a", a).await.expect("unlisten");
    assert_eq!(hub.topics().len(), 2);
}
contract!(pubsub_delivers_to_subscribed_topics_only);

async fn presence_counts_gateways_and_expires(engine: Engine) {
    use loadlab_kit::engine::PresenceChange;
    let p = &engine.presence;
    let pc = |c: u64, u: u64| PresenceChange {
        channel: Id(c),
        user: Id(u),
    };
    let (alice0, alice7, bob7) = (pc(0, 1), pc(7, 1), pc(7, 2));
    // Alice connects on gateway A in channel 7, then on gateway B too: online once.
    let mut online = p
        .touch("A", &[alice0, alice7, bob7], 10_000)
        .await
        .expect("touch");
    online.sort();
    assert_eq!(online, vec![alice0, alice7, bob7]);
    assert_eq!(
        p.touch("B", &[alice0, alice7], 10_000)
            .await
            .expect("touch"),
        vec![]
    );
    assert_eq!(
        p.touch("A", &[alice0, alice7, bob7], 20_000)
            .await
            .expect("refresh"),
        vec![]
    );
    assert_eq!(
        p.channel_online(Id(7)).await.expect("channel"),
        vec![Id(1), Id(2)]
    );
    assert_eq!(
        p.online(&[Id(1), Id(2), Id(3)]).await.expect("online"),
        vec![true, false, false]
    );
    // Leaving gateway A: still online through B; Bob leaves entirely.
    let mut gone = p
        .remove("A", &[alice0, alice7, bob7])
        .await
        .expect("remove");
    gone.sort();
    assert_eq!(gone, vec![bob7]);
    assert_eq!(p.channel_online(Id(7)).await.expect("channel"), vec![Id(1)]);
    // Gateway B dies silently: its entries expire.
    assert_eq!(p.expire(9_999, 100).await.expect("not yet"), vec![]);
    let mut expired = p.expire(10_000, 100).await.expect("expire");
    expired.sort();
    assert_eq!(expired, vec![alice0, alice7]);
    assert_eq!(p.online(&[Id(1)]).await.expect("online"), vec![false]);
    assert_eq!(
        p.channel_online(Id(7)).await.expect("channel"),
        Vec::<Id>::new()
    );
}
contract!(presence_counts_gateways_and_expires);
