//! Black-box API tests against real feed + timeline services, on PostgreSQL + Redis and on
//! SQLite + the memory engine.

mod support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, Options, Stack};

const FANOUT_WAIT: Duration = Duration::from_secs(20);

async fn register_login_follow_post_and_read(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let bob = stack.register("Bob").await;
    let carol = stack.register("carol").await;
    assert_eq!(bob.handle, "bob", "handles are stored lower-case");

    // Login: right password, wrong password, unknown handle.
    let (status, body) = stack
        .call(
            Method::POST,
            "/v1/sessions",
            None,
            Some(json!({"handle": "ALICE", "password": "correct horse"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], alice.id.to_string());
    let fresh_token = body["token"].as_str().expect("token").to_owned();
    for (handle, password) in [("alice", "wrong horse"), ("nobody", "correct horse")] {
        let (status, body) = stack
            .call(
                Method::POST,
                "/v1/sessions",
                None,
                Some(json!({"handle": handle, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], "invalid_credentials");
    }

    stack.follow(&bob, &alice).await;
    stack.follow(&carol, &alice).await;
    stack.follow(&carol, &bob).await;
    // Materialise every home timeline first, so the posts below arrive by fan-out, not rebuild.
    for u in [&alice, &bob, &carol] {
        assert_eq!(stack.home_all(u).await, vec![]);
    }

    let a1 = stack.post(&alice, "first from alice").await;
    let b1 = stack.post(&bob, "bob says hi ✓").await;
    let a2 = stack.post(&alice, "second from alice").await;
    stack.wait_fanned_out(FANOUT_WAIT).await;

    assert_eq!(stack.home_all(&carol).await, vec![a2, b1, a1]);
    assert_eq!(stack.home_all(&bob).await, vec![a2, b1, a1]);
    assert_eq!(stack.home_all(&alice).await, vec![a2, a1]);
    for u in [&alice, &bob, &carol] {
        assert!(
            stack.stored_home(u.id).await.is_some(),
            "timeline stayed materialised"
        );
    }

    // Full post objects, the same through the home timeline, the user timeline and by id.
    let (status, home) = stack.home(&carol, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(home["next"], serde_json::Value::Null);
    let first = &home["posts"][1];
    assert_eq!(first["id"], b1.to_string());
    assert_eq!(first["author_id"], bob.id.to_string());
    assert_eq!(first["body"], "bob says hi ✓");
    let created = first["created_at"].as_str().expect("created_at");
    let parsed = chrono::DateTime::parse_from_rfc3339(created).expect("RFC 3339");
    assert_eq!(parsed.timestamp_millis(), b1.unix_ms());
    assert!(created.ends_with('Z'), "UTC: {created}");

    let (status, posts) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}/posts", alice.id),
            Some(&fresh_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(Stack::ids(&posts), vec![a2, a1]);
    let (status, post) = stack
        .call(
            Method::GET,
            &format!("/v1/posts/{b1}"),
            Some(&alice.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&post, first);

    let (status, user) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}", alice.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(user["handle"], "alice");
    assert_eq!(user["follower_count"], 2);
    assert_eq!(user["following_count"], 0);

    // Unfollow: bob's posts leave carol's timeline; a late follow brings old posts in.
    let (status, _) = stack
        .call(
            Method::DELETE,
            &format!("/v1/users/{}/follows/{}", carol.id, bob.id),
            Some(&carol.token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stack.home_all(&carol).await, vec![a2, a1]);
    stack.follow(&alice, &bob).await;
    assert_eq!(stack.home_all(&alice).await, vec![a2, b1, a1]);

    stack.stop().await;
}
both_backends!(register_login_follow_post_and_read);

async fn pagination_with_before(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let bob = stack.register("bob").await;
    stack.follow(&bob, &alice).await;
    assert!(stack.home_all(&bob).await.is_empty());
    let mut posts = Vec::new();
    for i in 0..25 {
        posts.push(stack.post(&alice, &format!("post {i}")).await);
    }
    posts.reverse();
    stack.wait_fanned_out(FANOUT_WAIT).await;

    for path in [
        format!("/v1/users/{}/timeline", bob.id),
        format!("/v1/users/{}/posts", alice.id),
    ] {
        let mut seen = Vec::new();
        let mut query = "?limit=10".to_owned();
        let mut pages = 0;
        loop {
            let (status, body) = stack
                .call(
                    Method::GET,
                    &format!("{path}{query}"),
                    Some(&bob.token),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let ids = Stack::ids(&body);
            pages += 1;
            match body["next"].as_str() {
                Some(next) => {
                    assert_eq!(ids.len(), 10);
                    assert_eq!(
                        next,
                        ids[9].to_string(),
                        "the cursor is the last id of the page"
                    );
                    query = format!("?limit=10&before={next}");
                    seen.extend(ids);
                }
                None => {
                    seen.extend(ids);
                    break;
                }
            }
        }
        assert_eq!(pages, 3, "{path}");
        assert_eq!(seen, posts, "{path}");
    }
    // Default page size is 20.
    let (_, body) = stack.home(&bob, "").await;
    assert_eq!(Stack::ids(&body), posts[..20].to_vec());
    stack.stop().await;
}
both_backends!(pagination_with_before);

async fn celebrity_posts_are_merged_on_read(backend: Backend) {
    let mut options = Options::new(backend);
    options.celebrity_threshold = 2;
    let stack = Stack::start(options).await;
    let celebrity = stack.register("celebrity").await;
    let regular = stack.register("regular").await;
    let f1 = stack.register("fan_one").await;
    let f2 = stack.register("fan_two").await;
    stack.follow(&f1, &celebrity).await;
    stack.follow(&f2, &celebrity).await;
    stack.follow(&f1, &regular).await;
    for u in [&f1, &f2] {
        assert!(stack.home_all(u).await.is_empty());
    }

    let c1 = stack.post(&celebrity, "c1").await;
    let r1 = stack.post(&regular, "r1").await;
    let c2 = stack.post(&celebrity, "c2").await;
    stack.wait_fanned_out(FANOUT_WAIT).await;

    assert_eq!(stack.home_all(&f1).await, vec![c2, r1, c1]);
    assert_eq!(stack.home_all(&f2).await, vec![c2, c1]);
    // The celebrity's posts were not pushed; they came from the merge.
    let stored = stack.stored_home(f1.id).await.expect("materialised");
    assert_eq!(stored, vec![r1]);
    assert_eq!(
        stack.stored_home(f2.id).await.expect("materialised"),
        vec![]
    );

    // Pages cut across pushed and merged posts.
    let (_, page1) = stack.home(&f1, "?limit=2").await;
    assert_eq!(Stack::ids(&page1), vec![c2, r1]);
    let next = page1["next"].as_str().expect("next");
    let (_, page2) = stack.home(&f1, &format!("?limit=2&before={next}")).await;
    assert_eq!(Stack::ids(&page2), vec![c1]);
    assert_eq!(page2["next"], serde_json::Value::Null);

    // The celebrity's author timeline survives its key being lost (rebuilt on read).
    stack
        .engine
        .timelines
        .remove(loadlab_kit::engine::TimelineKey::Author(celebrity.id))
        .await
        .expect("remove");
    assert_eq!(stack.home_all(&f1).await, vec![c2, r1, c1]);
    stack.stop().await;
}
both_backends!(celebrity_posts_are_merged_on_read);

async fn timeline_is_capped(backend: Backend) {
    let mut options = Options::new(backend);
    options.timeline_cap = 5;
    let stack = Stack::start(options).await;
    let alice = stack.register("alice").await;
    let bob = stack.register("bob").await;
    stack.follow(&bob, &alice).await;
    assert!(stack.home_all(&bob).await.is_empty());
    let mut posts = Vec::new();
    for i in 0..8 {
        posts.push(stack.post(&alice, &format!("p{i}")).await);
    }
    posts.reverse();
    stack.wait_fanned_out(FANOUT_WAIT).await;
    assert_eq!(
        stack.stored_home(bob.id).await.expect("materialised"),
        posts[..5].to_vec()
    );
    assert_eq!(stack.home_all(&bob).await, posts[..5].to_vec());
    // The user timeline comes from the database and is not capped.
    let (_, all) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}/posts?limit=100", alice.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(Stack::ids(&all), posts);
    stack.stop().await;
}
both_backends!(timeline_is_capped);

async fn missing_timeline_is_rebuilt(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let bob = stack.register("bob").await;
    let carol = stack.register("carol").await;
    stack.follow(&bob, &alice).await;
    stack.follow(&bob, &carol).await;
    let mut posts = Vec::new();
    for (who, text) in [(&alice, "a"), (&carol, "c"), (&bob, "b"), (&alice, "a2")] {
        posts.push(stack.post(who, text).await);
    }
    posts.reverse();
    stack.wait_fanned_out(FANOUT_WAIT).await;
    // Never read: not materialised, so fan-out skipped it.
    assert_eq!(stack.stored_home(bob.id).await, None);
    assert_eq!(stack.home_all(&bob).await, posts);
    assert_eq!(stack.stored_home(bob.id).await, Some(posts.clone()));

    // Lose the key (Redis eviction, flush): the next read rebuilds it identically.
    stack
        .engine
        .timelines
        .remove(loadlab_kit::engine::TimelineKey::Home(bob.id))
        .await
        .expect("remove");
    assert_eq!(stack.stored_home(bob.id).await, None);
    assert_eq!(stack.home_all(&bob).await, posts);
    assert_eq!(stack.stored_home(bob.id).await, Some(posts.clone()));

    // Many first reads at once: each either rebuilds or reads a filled timeline; none may see
    // another's rebuild half-done (an empty page).
    let home = loadlab_kit::engine::TimelineKey::Home(bob.id);
    for round in 0..5 {
        stack.engine.timelines.remove(home).await.expect("remove");
        let pages = futures::future::join_all((0..16).map(|_| stack.home(&bob, "?limit=20"))).await;
        for (status, body) in pages {
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(Stack::ids(&body), posts, "round {round}: {body}");
        }
    }
    assert_eq!(stack.stored_home(bob.id).await, Some(posts));
    stack.stop().await;
}
both_backends!(missing_timeline_is_rebuilt);

async fn probes_metrics_and_grpc_health(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    for base in [&stack.feed_url, &stack.timeline_url] {
        let r = stack
            .http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(r.status(), StatusCode::OK);
        let ready: serde_json::Value = stack
            .http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz")
            .json()
            .await
            .expect("json");
        assert_eq!(ready["status"], "ready");
        assert_eq!(ready["checks"]["engine"], "ok");
    }
    let alice = stack.register("alice").await;
    stack.post(&alice, "hello").await;
    stack.wait_fanned_out(FANOUT_WAIT).await;
    let text = stack
        .http
        .get(format!("{}/metrics", stack.feed_url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("loadlab_fanout_lag_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("route=\"/v1/posts\""), "{text}");

    // gRPC health over h2c on the same port.
    let channel = tonic::transport::Endpoint::from_shared(stack.timeline_url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "loadlab.timeline.v1.TimelineService".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    stack.stop().await;
}
both_backends!(probes_metrics_and_grpc_health);
