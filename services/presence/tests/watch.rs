//! `WatchChannel` streams: snapshot, live events, slow watchers, and unregistering when the
//! client goes away — on the memory engine and Redis.

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use loadlab_proto::presence::v1::State;
use support::{
    Backend, EVENT_WAIT, Engines, Replica, assert_quiet, heartbeat, next_event, summary, user,
    watch,
};
use tonic::Code;

const ACTIVE: &str = "loadlab_presence_active_watchers";

async fn a_watch_starts_with_the_members_online_now(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &[]).await;
    let mut client = replica.client().await;
    heartbeat(
        &mut client,
        "gw-a",
        vec![user(1, &[7]), user(2, &[7, 8]), user(3, &[8])],
        vec![],
    )
    .await;

    let mut channel = watch(&mut client, 7).await;
    let mut snapshot = vec![
        summary(&next_event(&mut channel).await),
        summary(&next_event(&mut channel).await),
    ];
    snapshot.sort_by_key(|s| s.1);
    assert_eq!(
        snapshot,
        vec![(7, 1, State::Online, true), (7, 2, State::Online, true)]
    );
    // Then live changes.
    heartbeat(&mut client, "gw-a", vec![user(4, &[7])], vec![]).await;
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 4, State::Online, false)
    );
    heartbeat(&mut client, "gw-a", vec![], vec![user(2, &[7])]).await;
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 2, State::Offline, false)
    );

    // An empty channel has an empty snapshot: the first event is live.
    let mut empty = watch(&mut client, 9).await;
    heartbeat(&mut client, "gw-a", vec![user(5, &[9])], vec![]).await;
    assert_eq!(
        summary(&next_event(&mut empty).await),
        (9, 5, State::Online, false)
    );
    replica.stop().await;
}
on_both_engines!(a_watch_starts_with_the_members_online_now);

async fn a_watcher_that_does_not_read_is_cut_off_alone(backend: Backend) {
    const USERS: u64 = 2_000;
    // Bursts of 16 events fit the buffer of a watcher that reads; one that does not read
    // overflows it once its connection's flow-control window is full.
    let replica = Replica::start(Engines::new(backend).engine(), &["--watch-buffer", "64"]).await;
    let mut slow_client = replica.client_with_window(1024).await;
    let mut slow = watch(&mut slow_client, 9).await;
    let mut fast_client = replica.client().await;
    let mut fast = watch(&mut fast_client, 9).await;
    replica.wait_for_metric(ACTIVE, 2.0).await;

    // The reading watcher takes each batch before the next is sent, so it never falls more
    // than one burst behind however the test machine schedules it.
    let mut gateway = replica.client().await;
    let users: Vec<u64> = (1..=USERS).collect();
    let mut seen = Vec::new();
    for batch in users.chunks(16) {
        let online = batch.iter().map(|&u| user(u, &[9])).collect();
        heartbeat(&mut gateway, "gw", online, vec![]).await;
        for _ in batch {
            seen.push(next_event(&mut fast).await.user_id);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, users, "the reading watcher got every event");

    // The slow watcher is unregistered although its client never read a byte...
    replica
        .wait_for_metric("loadlab_presence_watchers_too_slow_total", 1.0)
        .await;
    replica.wait_for_metric(ACTIVE, 1.0).await;
    // ...and, reading now, finds what was in flight, then RESOURCE_EXHAUSTED.
    let mut delivered = 0;
    let status = loop {
        match tokio::time::timeout(EVENT_WAIT, slow.message())
            .await
            .expect("the slow stream ends in time")
        {
            Ok(Some(_)) => delivered += 1,
            Ok(None) => panic!("the slow stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("watcher too slow"), "{status:?}");
    assert!(
        delivered < USERS,
        "{delivered} events reached the slow watcher"
    );

    // The other watcher is unaffected.
    heartbeat(&mut gateway, "gw", vec![user(USERS + 1, &[9])], vec![]).await;
    assert_eq!(
        summary(&next_event(&mut fast).await),
        (9, USERS + 1, State::Online, false)
    );
    replica.stop().await;
}
on_both_engines!(a_watcher_that_does_not_read_is_cut_off_alone);

async fn a_watcher_that_goes_away_is_unregistered(backend: Backend) {
    let engines = Engines::new(backend);
    let engine = engines.engine();
    let replica = Replica::start(engines.engine(), &[]).await;
    let mut client = replica.client().await;
    let mut channel = watch(&mut client, 11).await;
    replica.wait_for_metric(ACTIVE, 1.0).await;

    // Something that is not a presence event on the topic is skipped, not fatal.
    let receivers = engine
        .pubsub
        .publish("presence:11", Bytes::from_static(&[0xff, 0xff]))
        .await
        .expect("publish");
    if backend == Backend::Redis {
        assert_eq!(receivers, 1, "the replica subscribed the watched topic");
    }
    heartbeat(&mut client, "gw", vec![user(1, &[11])], vec![]).await;
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (11, 1, State::Online, false)
    );

    drop(channel);
    replica.wait_for_metric(ACTIVE, 0.0).await;
    if backend == Backend::Redis {
        // The topic is unsubscribed from Redis once its last watcher is gone.
        let deadline = tokio::time::Instant::now() + EVENT_WAIT;
        while engine
            .pubsub
            .publish("presence:11", Bytes::from_static(&[0xff]))
            .await
            .expect("publish")
            > 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still subscribed to presence:11"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A new watcher on the same channel works as before.
    let mut again = watch(&mut client, 11).await;
    assert_eq!(
        summary(&next_event(&mut again).await),
        (11, 1, State::Online, true)
    );
    assert_quiet(&mut again, Duration::from_millis(200)).await;
    replica.stop().await;
}
on_both_engines!(a_watcher_that_goes_away_is_unregistered);
