//! Overload: the concurrency limit sheds with fast 503s + Retry-After, the request deadline
//! answers 503 instead of hanging, and neither loses or half-applies anything.

mod support;

use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{Backend, Options, Stack};

/// Expensive password hashing makes sign-up a slow request on purpose.
fn slow_signups(limit: &str, timeout: &str) -> Vec<String> {
    [
        "--password-memory-kib",
        "65536",
        "--password-iterations",
        "4",
        "--concurrency-limit",
        limit,
        "--request-timeout",
        timeout,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_requests_are_shed() {
    let mut options = Options::new(Backend::SqliteMemory);
    options.feed_flags = slow_signups("2", "30s");
    let stack = Stack::start(options).await;
    let attempts = join_all((0..12).map(|i| {
        let stack = &stack;
        async move {
            let resp = stack
                .http
                .post(format!("{}/v1/users", stack.feed_url))
                .json(&json!({"handle": format!("burst_{i}"), "password": "password1"}))
                .send()
                .await
                .expect("send");
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let body: serde_json::Value = resp.json().await.expect("json");
            (i, status, retry_after, body)
        }
    }))
    .await;
    let created: Vec<usize> = attempts
        .iter()
        .filter(|a| a.1 == StatusCode::CREATED)
        .map(|a| a.0)
        .collect();
    let shed: Vec<_> = attempts
        .iter()
        .filter(|a| a.1 == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert!(
        !created.is_empty(),
        "some sign-ups get through: {attempts:?}"
    );
    assert!(!shed.is_empty(), "some sign-ups are shed: {attempts:?}");
    assert_eq!(created.len() + shed.len(), 12, "{attempts:?}");
    for (_, _, retry_after, body) in &shed {
        assert_eq!(body["error"]["code"], "overloaded");
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    // Shed sign-ups left nothing behind: their handles are still free.
    for (i, ..) in shed {
        let (status, body) = stack
            .call(
                Method::POST,
                "/v1/sessions",
                None,
                Some(json!({"handle": format!("burst_{i}"), "password": "password1"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_deadline_get_503_timeout() {
    let mut options = Options::new(Backend::SqliteMemory);
    options.feed_flags = slow_signups("64", "50ms");
    let stack = Stack::start(options).await;
    let (status, body) = stack
        .call(
            Method::POST,
            "/v1/users",
            None,
            Some(json!({"handle": "too_slow", "password": "password1"})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "timeout");
    stack.stop().await;
}
