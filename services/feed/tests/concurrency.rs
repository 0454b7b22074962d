//! Many clients posting and following at once: no duplicates, no lost posts, exact counters.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use loadlab_kit::Id;
use reqwest::{Method, StatusCode};
use support::{Backend, Options, Stack};

async fn concurrent_posts_and_follows(backend: Backend) {
    let stack = std::sync::Arc::new(Stack::start(Options::new(backend)).await);
    let n = 12usize;
    let mut users = Vec::new();
    for i in 0..n {
        users.push(stack.register(&format!("user_{i}")).await);
    }
    // Deterministic "random" graph: user i follows the 4 users after it; every follow is sent
    // twice, concurrently, to exercise idempotency under contention.
    let mut follows: HashMap<Id, BTreeSet<Id>> = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        for k in 1..=4 {
            let j = (i * 7 + k * 3) % n;
            if j == i {
                continue;
            }
            follows.entry(users[i].id).or_default().insert(users[j].id);
            for _ in 0..2 {
                let stack = stack.clone();
                let (a, b) = (users[i].clone(), users[j].clone());
                tasks.push(tokio::spawn(async move { stack.follow(&a, &b).await }));
            }
        }
    }
    // Meanwhile everybody posts 6 times.
    let mut post_tasks = Vec::new();
    for u in &users {
        for p in 0..6 {
            let stack = stack.clone();
            let u = u.clone();
            post_tasks.push(tokio::spawn(async move {
                (u.id, stack.post(&u, &format!("{} #{p}", u.handle)).await)
            }));
        }
    }
    for t in tasks {
        t.await.expect("follow task");
    }
    let mut posts_by: HashMap<Id, Vec<Id>> = HashMap::new();
    let mut all = BTreeSet::new();
    for t in post_tasks {
        let (author, post) = t.await.expect("post task");
        assert!(all.insert(post), "duplicate post id {post}");
        posts_by.entry(author).or_default().push(post);
    }
    assert_eq!(all.len(), n * 6);
    stack.wait_fanned_out(Duration::from_secs(30)).await;

    for u in &users {
        let followees = follows.get(&u.id).cloned().unwrap_or_default();
        let mut expected: Vec<Id> = followees
            .iter()
            .chain(std::iter::once(&u.id))
            .flat_map(|a| posts_by.get(a).cloned().unwrap_or_default())
            .collect();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        let got = stack.home_all(u).await;
        assert_eq!(got, expected, "home timeline of {}", u.handle);

        let followers = follows.values().filter(|s| s.contains(&u.id)).count();
        let (status, view) = stack
            .call(
                Method::GET,
                &format!("/v1/users/{}", u.id),
                Some(&u.token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(view["follower_count"], followers as i64, "{}", u.handle);
        assert_eq!(
            view["following_count"],
            followees.len() as i64,
            "{}",
            u.handle
        );
    }
    match std::sync::Arc::try_unwrap(stack) {
        Ok(stack) => stack.stop().await,
        Err(_) => panic!("stack still shared"),
    }
}
both_backends!(concurrent_posts_and_follows);

/// Users following each other in both directions at the same moment (the load runner's set-up
/// does this by the thousand): every follow and unfollow succeeds — no deadlock between the two
/// transactions' counter updates — and the counters end exact.
async fn mutual_follows_at_once_do_not_deadlock(backend: Backend) {
    let stack = std::sync::Arc::new(Stack::start(Options::new(backend)).await);
    let n = 8usize;
    let mut users = Vec::new();
    for i in 0..n {
        users.push(stack.register(&format!("mutual_{i}")).await);
    }
    let both_ways = |method: Method| {
        let mut tasks = Vec::new();
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                let (stack, method) = (stack.clone(), method.clone());
                let (a, b) = (users[i].clone(), users[j].clone());
                tasks.push(tokio::spawn(async move {
                    let path = format!("/v1/users/{}/follows/{}", a.id, b.id);
                    let (status, body) = stack.call(method, &path, Some(&a.token), None).await;
                    (status, body)
                }));
            }
        }
        tasks
    };
    for (method, expected) in [(Method::POST, n as i64 - 1), (Method::DELETE, 0)] {
        for t in both_ways(method.clone()) {
            let (status, body) = t.await.expect("task");
            assert_eq!(status, StatusCode::NO_CONTENT, "{method}: {body}");
        }
        for u in &users {
            let path = format!("/v1/users/{}", u.id);
            let (status, view) = stack.call(Method::GET, &path, Some(&u.token), None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(view["follower_count"], expected, "{method} {}", u.handle);
            assert_eq!(view["following_count"], expected, "{method} {}", u.handle);
        }
    }
    match std::sync::Arc::try_unwrap(stack) {
        Ok(stack) => stack.stop().await,
        Err(_) => panic!("stack still shared"),
    }
}
both_backends!(mutual_follows_at_once_do_not_deadlock);
