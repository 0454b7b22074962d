//! Heartbeats, expiry and `Get` against real presence replicas, on the memory engine and Redis.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use loadlab_proto::presence::v1::{GetRequest, HeartbeatRequest, State, WatchChannelRequest};
use support::{
    Backend, Engines, Replica, assert_quiet, heartbeat, next_event, online, summary, user, watch,
};
use tonic::Code;

const FAST_EXPIRY: [&str; 4] = ["--presence-ttl", "1s", "--presence-sweep-interval", "100ms"];

async fn online_once_per_pair_and_offline_after_the_last_gateway(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &[]).await;
    let mut client = replica.client().await;
    let mut channel = watch(&mut client, 7).await;
    let mut connected = watch(&mut client, 0).await;

    let sent_at = chrono::Utc::now().timestamp_millis();
    // Online users are connected too (channel 0) without listing it.
    assert_eq!(
        heartbeat(&mut client, "gw-a", vec![user(1, &[7])], vec![]).await,
        2
    );
    let event = next_event(&mut channel).await;
    assert_eq!(summary(&event), (7, 1, State::Online, false));
    assert!(
        (sent_at - 1_000..sent_at + 10_000).contains(&event.at_ms),
        "at_ms {} is not about now ({sent_at})",
        event.at_ms
    );
    assert_eq!(
        summary(&next_event(&mut connected).await),
        (0, 1, State::Online, false)
    );
    assert_eq!(online(&mut client, &[1, 2]).await, vec![true, false]);

    // A second gateway, and a refresh of the first, change nothing.
    assert_eq!(
        heartbeat(&mut client, "gw-b", vec![user(1, &[7])], vec![]).await,
        0
    );
    assert_eq!(
        heartbeat(&mut client, "gw-a", vec![user(1, &[7])], vec![]).await,
        0
    );
    // Gone from gateway A entirely: still online through B.
    assert_eq!(
        heartbeat(&mut client, "gw-a", vec![], vec![user(1, &[0, 7])]).await,
        0
    );
    assert_quiet(&mut channel, Duration::from_millis(300)).await;
    assert_eq!(online(&mut client, &[1]).await, vec![true]);

    // Leaving the channel on the last gateway: offline there, still connected.
    assert_eq!(
        heartbeat(&mut client, "gw-b", vec![], vec![user(1, &[7])]).await,
        1
    );
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 1, State::Offline, false)
    );
    assert_eq!(online(&mut client, &[1]).await, vec![true]);
    assert_quiet(&mut connected, Duration::from_millis(200)).await;

    // Disconnecting from the last gateway.
    assert_eq!(
        heartbeat(&mut client, "gw-b", vec![], vec![user(1, &[0])]).await,
        1
    );
    assert_eq!(
        summary(&next_event(&mut connected).await),
        (0, 1, State::Offline, false)
    );
    assert_eq!(online(&mut client, &[1]).await, vec![false]);

    assert_eq!(
        replica.metric("loadlab_presence_heartbeats_total").await,
        6.0
    );
    for state in ["online", "offline"] {
        let name = format!("loadlab_presence_changes_total{{state=\"{state}\"}}");
        assert_eq!(replica.metric(&name).await, 2.0, "{name}");
    }
    replica.stop().await;
}
on_both_engines!(online_once_per_pair_and_offline_after_the_last_gateway);

async fn a_silent_gateway_takes_its_users_offline_after_the_ttl(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &FAST_EXPIRY).await;
    let mut client = replica.client().await;
    let mut channel = watch(&mut client, 7).await;

    // Gateway B keeps heartbeating user 2; gateway A reports user 1 once and goes silent.
    let keeper = {
        let mut client = replica.client().await;
        tokio::spawn(async move {
            loop {
                heartbeat(&mut client, "gw-b", vec![user(2, &[7])], vec![]).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 2, State::Online, false)
    );
    let started = Instant::now();
    heartbeat(&mut client, "gw-a", vec![user(1, &[7])], vec![]).await;
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 1, State::Online, false)
    );
    assert_eq!(online(&mut client, &[1, 2]).await, vec![true, true]);

    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 1, State::Offline, false)
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(950) && elapsed < Duration::from_secs(2),
        "offline after {elapsed:?} with a 1s TTL swept every 100ms"
    );
    assert_eq!(online(&mut client, &[1, 2]).await, vec![false, true]);
    // Refreshed entries do not expire.
    assert_quiet(&mut channel, Duration::from_millis(1_200)).await;
    assert_eq!(online(&mut client, &[2]).await, vec![true]);
    keeper.abort();
    replica.stop().await;
}
on_both_engines!(a_silent_gateway_takes_its_users_offline_after_the_ttl);

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let replica = Replica::start(Engines::new(backend).engine(), &[]).await;
    let mut client = replica.client().await;
    let mut channel = watch(&mut client, 7).await;

    // Every bad request also carries a valid entry: nothing of it may be applied.
    let valid = || user(1, &[7]);
    let request = |gateway: &str, online| HeartbeatRequest {
        gateway_id: gateway.to_owned(),
        online,
        offline: vec![],
    };
    let many: Vec<_> = (1..=10_001).map(|u| user(u, &[])).collect();
    let cases = [
        (request("", vec![valid()]), "gateway_id"),
        (request(&"g".repeat(129), vec![valid()]), "gateway_id"),
        (
            request("gw", vec![valid(), user(0, &[7])]),
            "online[1].user_id",
        ),
        (
            request("gw", vec![valid(), user(2, &[u64::MAX])]),
            "online[1].channel_ids",
        ),
        (
            HeartbeatRequest {
                gateway_id: "gw".into(),
                online: vec![valid()],
                offline: vec![user(0, &[7])],
            },
            "offline[0].user_id",
        ),
        (request("gw", many), "at most 10000 entries"),
    ];
    for (bad, field) in cases {
        let status = client.heartbeat(bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    for ids in [vec![1, 0], vec![1; 10_001]] {
        let status = client
            .get(GetRequest { user_ids: ids })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let status = client
        .watch_channel(WatchChannelRequest {
            channel_id: u64::MAX,
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    assert_eq!(online(&mut client, &[1]).await, vec![false]);
    assert_quiet(&mut channel, Duration::from_millis(300)).await;
    assert_eq!(
        replica.metric("loadlab_presence_heartbeats_total").await,
        0.0
    );
    // The same entry, valid on its own, goes through.
    assert_eq!(heartbeat(&mut client, "gw", vec![valid()], vec![]).await, 2);
    assert_eq!(
        summary(&next_event(&mut channel).await),
        (7, 1, State::Online, false)
    );
    replica.stop().await;
}
on_both_engines!(bad_input_is_refused_and_changes_nothing);

async fn replicas_share_presence_and_announce_each_expiry_once(backend: Backend) {
    let engines = Engines::new(backend);
    let a = Replica::start(engines.engine(), &FAST_EXPIRY).await;
    let b = Replica::start(engines.engine(), &FAST_EXPIRY).await;
    let mut on_a = watch(&mut a.client().await, 7).await;
    let mut on_b = watch(&mut b.client().await, 7).await;

    let mut gateway = a.client().await;
    assert_eq!(
        heartbeat(&mut gateway, "gw-1", vec![user(1, &[7])], vec![]).await,
        2
    );
    for watcher in [&mut on_a, &mut on_b] {
        assert_eq!(
            summary(&next_event(watcher).await),
            (7, 1, State::Online, false)
        );
    }
    assert_eq!(online(&mut b.client().await, &[1]).await, vec![true]);

    // Both replicas sweep; the expiry is announced by exactly one of them.
    for watcher in [&mut on_a, &mut on_b] {
        assert_eq!(
            summary(&next_event(watcher).await),
            (7, 1, State::Offline, false)
        );
    }
    tokio::join!(
        assert_quiet(&mut on_a, Duration::from_millis(500)),
        assert_quiet(&mut on_b, Duration::from_millis(500)),
    );
    let offline = "loadlab_presence_changes_total{state=\"offline\"}";
    assert_eq!(
        a.metric(offline).await + b.metric(offline).await,
        2.0,
        "(0, 1) and (7, 1) went offline once each"
    );
    assert_eq!(online(&mut a.client().await, &[1]).await, vec![false]);
    a.stop().await;
    b.stop().await;
}
on_both_engines!(replicas_share_presence_and_announce_each_expiry_once);
