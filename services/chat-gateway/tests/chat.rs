//! Chat end to end: real gateways (two replicas), a real presence service, real WebSocket
//! clients, on PostgreSQL + Redis and on SQLite + the memory engine.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::SinkExt;
use serde_json::{Value, json};
use support::{Backend, Client, Ended, Options, Stack};

const WAIT: Duration = Duration::from_secs(15);

fn id_of(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
        .to_owned()
}

/// Collects `n` message frames (acks and others are skipped).
async fn messages(client: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = client.next(WAIT).await;
        if v["type"] == "message" {
            got.push(v);
        }
    }
    got
}

async fn every_member_on_every_replica_gets_every_message_once(backend: Backend) {
    let stack = Stack::start(Options::new(backend, 2)).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let (c, tc) = stack.user().await;
    let channel = stack.channel(0, &ta, "general").await;
    let (g0, g1) = (stack.gateways[0].url.clone(), stack.gateways[1].url.clone());
    // a on both replicas, b on replica 1, c on replica 0.
    let mut clients = vec![
        Client::connect(&g0, a, &ta).await,
        Client::connect(&g1, a, &ta).await,
        Client::connect(&g1, b, &tb).await,
        Client::connect(&g0, c, &tc).await,
    ];
    for client in &mut clients {
        client.join(channel).await;
    }
    // Presence and joins settle before the burst.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_sender = 15;
    let senders = [0usize, 2, 3];
    for round in 0..per_sender {
        for s in senders {
            let who = clients[s].user;
            clients[s]
                .send(json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("{who}-{round}"), "body": format!("{who} says {round}")}))
                .await;
        }
    }
    let total = per_sender * senders.len();
    let mut all_ids: Option<HashSet<String>> = None;
    for client in &mut clients {
        let got = messages(client, total).await;
        let ids: HashSet<String> = got.iter().map(|m| id_of(m, "id")).collect();
        assert_eq!(ids.len(), total, "exactly once, by id");
        // Per-sender order is the send order.
        let mut last: HashMap<String, usize> = HashMap::new();
        for m in &got {
            let sender = id_of(m, "sender");
            let round: usize = m["body"]
                .as_str()
                .and_then(|b| b.rsplit(' ').next())
                .and_then(|r| r.parse().ok())
                .expect("round");
            if let Some(prev) = last.insert(sender.clone(), round) {
                assert!(round > prev, "sender {sender}: {round} after {prev}");
            }
            assert_eq!(m["channel"], channel.to_string());
            assert!(chrono::DateTime::parse_from_rfc3339(m["ts"].as_str().expect("ts")).is_ok());
        }
        match &all_ids {
            None => all_ids = Some(ids),
            Some(first) => assert_eq!(first, &ids, "every client saw the same messages"),
        }
        // Nothing more arrives (no duplicates after the fact).
        if let Some(extra) = client.try_next(Duration::from_millis(300)).await {
            assert_ne!(extra["type"], "message", "unexpected extra {extra}");
        }
    }
    // History holds them all, exactly once.
    let history = stack.history(1, &tb, channel).await;
    let ids: HashSet<String> = history.iter().map(|m| id_of(m, "id")).collect();
    assert_eq!(ids, all_ids.expect("ids"));
    assert_eq!(history.len(), total);
    stack.stop().await;
}
both_backends!(every_member_on_every_replica_gets_every_message_once);

async fn retried_sends_are_not_duplicated(backend: Backend) {
    let stack = Stack::start(Options::new(backend, 2)).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "retries").await;
    let mut sender = Client::connect(&stack.gateways[0].url, a, &ta).await;
    let mut receiver = Client::connect(&stack.gateways[1].url, b, &tb).await;
    sender.join(channel).await;
    receiver.join(channel).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let send = json!({"type": "send", "channel": channel.to_string(), "client_msg_id": "once", "body": "only once"});
    sender.send(send.clone()).await;
    let (ack1, _) = sender.until("ack", WAIT).await;
    // The client did not see the ack in time and retries — on another connection, even.
    let mut again = Client::connect(&stack.gateways[1].url, a, &ta).await;
    again.join(channel).await;
    again.send(send.clone()).await;
    let (ack2, _) = again.until("ack", WAIT).await;
    assert_eq!(ack1["client_msg_id"], "once");
    assert_eq!(
        ack1["id"], ack2["id"],
        "the retry is acked with the original id"
    );
    let got = messages(&mut receiver, 1).await;
    assert_eq!(got[0]["id"], ack1["id"]);
    assert!(
        receiver
            .try_next(Duration::from_millis(500))
            .await
            .is_none_or(|v| v["type"] != "message")
    );
    assert_eq!(stack.history(0, &ta, channel).await.len(), 1);
    stack.stop().await;
}
both_backends!(retried_sends_are_not_duplicated);

/// Reads until a presence frame for `user` in `state` arrives (or gives up).
async fn saw_presence(
    watcher: &mut Client,
    user: loadlab_kit::Id,
    state: &str,
    tries: usize,
) -> bool {
    for _ in 0..tries {
        if let Some(v) = watcher.try_next(Duration::from_millis(200)).await
            && v["type"] == "presence"
            && v["state"] == state
            && v["user"] == user.to_string()
        {
            return true;
        }
    }
    false
}

async fn presence_follows_joins_and_disconnects(backend: Backend) {
    let stack = Stack::start(Options::new(backend, 2)).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "presence").await;
    let mut watcher = Client::connect(&stack.gateways[0].url, a, &ta).await;
    watcher.join(channel).await;
    // b joins on the other replica: the watcher sees b online.
    let mut other = Client::connect(&stack.gateways[1].url, b, &tb).await;
    other.join(channel).await;
    assert!(
        saw_presence(&mut watcher, b, "online", 50).await,
        "b online seen on the other replica"
    );
    // A later joiner is told who is online already.
    let (c, tc) = stack.user().await;
    let mut late = Client::connect(&stack.gateways[0].url, c, &tc).await;
    late.join(channel).await;
    assert!(
        saw_presence(&mut late, b, "online", 20).await,
        "the late joiner learns b is online"
    );
    // b disconnects cleanly: offline at once, well before the TTL.
    let started = std::time::Instant::now();
    drop(other);
    assert!(
        saw_presence(&mut watcher, b, "offline", 50).await,
        "b offline after disconnecting"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1_900),
        "offline came from the disconnect, not the TTL"
    );
    stack.stop().await;
}
both_backends!(presence_follows_joins_and_disconnects);

/// A gateway process killed without a goodbye: its users go offline when their TTL (2 s in
/// tests) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_killed_gateway_expires() {
    let stack = Stack::start(Options::new(Backend::PostgresRedis, 1)).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "presence-ttl").await;
    let mut watcher = Client::connect(&stack.gateways[0].url, a, &ta).await;
    watcher.join(channel).await;
    let mut gateway = stack.spawn_gateway_process().await;
    let mut b_client = Client::connect(&gateway.url, b, &tb).await;
    b_client.join(channel).await;
    assert!(
        saw_presence(&mut watcher, b, "online", 50).await,
        "b online through the child gateway"
    );
    gateway.kill();
    let started = std::time::Instant::now();
    assert!(
        saw_presence(&mut watcher, b, "offline", 100).await,
        "b offline after the TTL"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "offline came from the TTL, not a goodbye"
    );
    drop(b_client);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_membership() {
    let stack = Stack::start(Options::new(Backend::PostgresRedis, 1)).await;
    let (a, ta) = stack.user().await;
    let (_, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "history").await;
    let mut c = Client::connect(&stack.gateways[0].url, a, &ta).await;
    c.join(channel).await;
    for i in 0..130 {
        c.send(json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("h{i}"), "body": format!("m{i}")})).await;
        if i % 40 == 39 {
            // Stay under the per-connection rate limit.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut acks = 0;
    while acks < 130 {
        if c.next(WAIT).await["type"] == "ack" {
            acks += 1;
        }
    }
    let history = stack.history(0, &ta, channel).await;
    assert_eq!(history.len(), 130);
    let bodies: Vec<&str> = history
        .iter()
        .map(|m| m["body"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(bodies[0], "m0");
    assert_eq!(bodies[129], "m129");
    let url = |q: &str| {
        format!(
            "{}/v1/channels/{channel}/messages{q}",
            stack.gateways[0].url
        )
    };
    // Non-members are refused; unknown channels are 404; bad limits 422.
    let r = stack
        .http
        .get(url(""))
        .bearer_auth(&tb)
        .send()
        .await
        .expect("history");
    assert_eq!(r.status(), reqwest::StatusCode::FORBIDDEN);
    let r = stack
        .http
        .get(format!(
            "{}/v1/channels/123/messages",
            stack.gateways[0].url
        ))
        .bearer_auth(&ta)
        .send()
        .await
        .expect("history");
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    let r = stack
        .http
        .get(url("?limit=1000"))
        .bearer_auth(&ta)
        .send()
        .await
        .expect("history");
    assert_eq!(r.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    let r = stack.http.get(url("")).send().await.expect("history");
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let r = stack
        .http
        .post(format!("{}/v1/channels", stack.gateways[0].url))
        .bearer_auth(&ta)
        .json(&json!({"name": "  "}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_others_are_not_affected() {
    let mut options = Options::new(Backend::PostgresRedis, 1);
    options.gateway_flags = [
        "--send-rate",
        "5",
        "--send-burst",
        "5",
        "--max-frame-bytes",
        "8192",
    ]
    .map(str::to_owned)
    .to_vec();
    let stack = Stack::start(options).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "bad-input").await;
    let other_channel = stack.channel(0, &ta, "elsewhere").await;
    let url = stack.gateways[0].url.clone();
    let mut bystander = Client::connect(&url, b, &tb).await;
    bystander.join(channel).await;
    let mut c = Client::connect(&url, a, &ta).await;
    c.join(channel).await;

    let expect_error =
        async |c: &mut Client, frame: tokio_tungstenite::tungstenite::Message, code: &str| {
            c.ws.send(frame).await.expect("send");
            let (e, _) = c.until("error", WAIT).await;
            assert_eq!(e["code"], code, "{e}");
            e
        };
    use tokio_tungstenite::tungstenite::Message as M;
    expect_error(&mut c, M::Text("not json".into()), "malformed_frame").await;
    expect_error(
        &mut c,
        M::Text(r#"{"type":"shout"}"#.into()),
        "unknown_type",
    )
    .await;
    expect_error(
        &mut c,
        M::Text(r#"{"type":"join","channel":"nope"}"#.into()),
        "invalid_frame",
    )
    .await;
    expect_error(
        &mut c,
        M::Binary(vec![1u8, 2, 3].into()),
        "binary_not_supported",
    )
    .await;
    let big = "x".repeat(4_097);
    let e = expect_error(
        &mut c,
        M::Text(json!({"type": "send", "channel": channel.to_string(), "client_msg_id": "big", "body": big}).to_string().into()),
        "message_too_large",
    )
    .await;
    assert_eq!(e["ref"], "big");
    expect_error(
        &mut c,
        M::Text(json!({"type": "send", "channel": other_channel.to_string(), "client_msg_id": "x", "body": "hi"}).to_string().into()),
        "not_joined",
    )
    .await;
    expect_error(
        &mut c,
        M::Text(
            json!({"type": "join", "channel": "999999"})
                .to_string()
                .into(),
        ),
        "unknown_channel",
    )
    .await;
    // Flood: beyond the burst, sends are refused with rate_limited (not sent).
    for i in 0..12 {
        c.send(json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("f{i}"), "body": "flood"})).await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 12 {
        let v = c.next(WAIT).await;
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") if v["code"] == "rate_limited" => limited += 1,
            _ => {}
        }
    }
    assert!(acks >= 5 && limited >= 1, "acks {acks}, limited {limited}");
    // The bystander got exactly the accepted messages and nothing else broke for it.
    let got = messages(&mut bystander, acks).await;
    assert_eq!(got.len(), acks);
    assert_eq!(stack.history(0, &tb, channel).await.len(), acks);
    // A frame over --max-frame-bytes closes the connection with 1009.
    c.ws.send(M::Text("y".repeat(9_000).into()))
        .await
        .expect("send");
    assert_eq!(c.ended(WAIT).await, Ended::Closed(1009));
    // Invalid UTF-8 in a text frame closes with 1007.
    let mut d = Client::connect(&url, a, &ta).await;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let raw = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    d.ws.send(M::Frame(raw)).await.expect("send raw");
    assert_eq!(d.ended(WAIT).await, Ended::Closed(1007));
    // The bystander still works.
    bystander.send(json!({"type": "ping"})).await;
    let (pong, _) = bystander.until("pong", WAIT).await;
    assert_eq!(pong["type"], "pong");
    // Missing or forged tokens are refused before the upgrade.
    let ws_url = format!("{}/v1/chat/ws", url.replacen("http://", "ws://", 1));
    assert!(
        tokio_tungstenite::connect_async(ws_url.clone())
            .await
            .is_err()
    );
    assert!(
        tokio_tungstenite::connect_async(format!("{ws_url}?token=forged.token.here"))
            .await
            .is_err()
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_as_a_slow_consumer() {
    let mut options = Options::new(Backend::PostgresRedis, 1);
    options.gateway_flags = [
        "--outbound-queue",
        "256",
        "--send-rate",
        "10000",
        "--send-burst",
        "10000",
    ]
    .map(str::to_owned)
    .to_vec();
    let stack = Stack::start(options).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let (c, tc) = stack.user().await;
    let channel = stack.channel(0, &ta, "slow").await;
    let url = stack.gateways[0].url.clone();
    let mut slow = Client::connect(&url, b, &tb).await;
    slow.join(channel).await;
    let mut healthy = Client::connect(&url, c, &tc).await;
    healthy.join(channel).await;
    let mut sender = Client::connect(&url, a, &ta).await;
    sender.join(channel).await;
    let n = 2_000;
    // The healthy client reads as fast as it can, concurrently.
    let healthy = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match healthy.try_next(WAIT).await {
                Some(v) if v["type"] == "message" => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        got
    });
    // 8 MB of messages: far more than the slow client's socket buffers plus its queue of 256.
    // The sender reads its own acks and echoes as it goes (it must not be slow itself).
    let body = "z".repeat(4_000);
    let (mut sink, mut stream) = futures::StreamExt::split(sender.ws);
    let drain = tokio::spawn(async move {
        while let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {}
    });
    for i in 0..n {
        let frame = json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("s{i}"), "body": body});
        sink.send(tokio_tungstenite::tungstenite::Message::Text(
            frame.to_string().into(),
        ))
        .await
        .expect("send");
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The healthy client got everything; the slow one (finally reading) was closed with 4008.
    assert_eq!(healthy.await.expect("reader"), n);
    assert_eq!(
        slow.ended(Duration::from_secs(30)).await,
        Ended::Closed(4008)
    );
    drain.abort();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_with_1001_and_loses_no_acked_message() {
    let mut stack = Stack::start(Options::new(Backend::PostgresRedis, 1)).await;
    let (a, ta) = stack.user().await;
    let channel = stack.channel(0, &ta, "drain").await;
    let mut c = Client::connect(&stack.gateways[0].url, a, &ta).await;
    c.join(channel).await;
    for i in 0..20 {
        c.send(json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("d{i}"), "body": "before shutdown"})).await;
    }
    // Shut down while the sends are in flight.
    let url = stack.gateways[0].url.clone();
    let shutdown = stack.gateways[0].shutdown.clone();
    shutdown.trigger();
    let mut acked = HashSet::new();
    let closed = loop {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut c.ws))
            .await
            .expect("not hung")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["type"] == "ack" {
                    acked.insert(id_of(&v, "id"));
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                break f.map(|f| u16::from(f.code));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(closed, Some(1001));
    stack.stop_gateway(0).await;
    // Every acked message is in the history (read through a fresh gateway).
    stack.add_gateway(7).await;
    let history: HashSet<String> = stack
        .history(1, &ta, channel)
        .await
        .iter()
        .map(|m| id_of(m, "id"))
        .collect();
    assert!(
        acked.is_subset(&history),
        "acked {} vs history {}",
        acked.len(),
        history.len()
    );
    let _ = url;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_redis_restart_mid_conversation() {
    let mut redis = loadlab_kit::test_support::RedisServer::start();
    let mut options = Options::new(Backend::PostgresRedis, 2);
    options.redis_url = Some(redis.url());
    let stack = Stack::start(options).await;
    let (a, ta) = stack.user().await;
    let (b, tb) = stack.user().await;
    let channel = stack.channel(0, &ta, "restart").await;
    let mut sender = Client::connect(&stack.gateways[0].url, a, &ta).await;
    let mut receiver = Client::connect(&stack.gateways[1].url, b, &tb).await;
    sender.join(channel).await;
    receiver.join(channel).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let send = |i: usize| json!({"type": "send", "channel": channel.to_string(), "client_msg_id": format!("r{i}"), "body": format!("r{i}")});
    sender.send(send(0)).await;
    assert_eq!(messages(&mut receiver, 1).await[0]["body"], "r0");

    redis.kill();
    // While Redis is down, sends are still made durable (PostgreSQL) and acked; live delivery
    // to the other replica is what is lost.
    sender.send(send(1)).await;
    loop {
        let v = sender.next(WAIT).await;
        assert_ne!(
            v["type"], "error",
            "a durable send must be acked, not refused: {v}"
        );
        if v["type"] == "ack" && v["client_msg_id"] == "r1" {
            break;
        }
    }
    redis.restart();
    // The gateways reconnect and resubscribe: live delivery resumes.
    let mut delivered = false;
    for i in 2..40 {
        sender.send(send(i)).await;
        if let Some(v) = receiver.try_next(Duration::from_millis(500)).await
            && v["type"] == "message"
        {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "delivery resumed after the restart");
    // Every acked message is in the history.
    let history: Vec<String> = stack
        .history(0, &ta, channel)
        .await
        .iter()
        .map(|m| m["body"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        history.contains(&"r0".to_owned()) && history.contains(&"r1".to_owned()),
        "{history:?}"
    );
    stack.stop().await;
}
