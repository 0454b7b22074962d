//! Bad input gets the documented error and changes nothing.

mod support;

use std::time::Duration;

use loadlab_kit::Id;
use loadlab_kit::auth::TokenKeys;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Backend, Options, SECRET, Stack};

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

async fn assert_error(
    stack: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    status: StatusCode,
    expected: &str,
) {
    let (got, response) = stack.call(method.clone(), path, token, body).await;
    assert_eq!(got, status, "{method} {path}: {response}");
    assert_eq!(code(&response), expected, "{method} {path}: {response}");
    assert!(
        !response["error"]["message"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "message in {response}"
    );
}

async fn bad_bodies_are_refused(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let t = Some(alice.token.as_str());
    let json_ct = Some("application/json");

    let cases: Vec<(&[u8], Option<&str>, StatusCode, &str)> = vec![
        (
            b"{\"body\":",
            json_ct,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (b"", json_ct, StatusCode::BAD_REQUEST, "malformed_json"),
        (
            b"{\"body\": \"\xff\xfe\"}",
            json_ct,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            b"{\"body\": 5}",
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            b"{}",
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            b"{\"body\":\"x\",\"author_id\":\"1\"}",
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            b"[1,2]",
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            b"{\"body\":\"x\"}",
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            b"{\"body\":\"   \"}",
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_post",
        ),
    ];
    for (body, ct, status, expected) in cases {
        let (got, response) = stack
            .raw(Method::POST, "/v1/posts", t, ct, body.to_vec())
            .await;
        assert_eq!(
            got,
            status,
            "{:?}: {response}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            code(&response),
            expected,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }

    // Oversized body: 413 before any parsing.
    let huge = json!({"body": "x".repeat(100 * 1024)})
        .to_string()
        .into_bytes();
    let (got, response) = stack.raw(Method::POST, "/v1/posts", t, json_ct, huge).await;
    assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE, "{response}");
    assert_eq!(code(&response), "payload_too_large");

    // Post length counts characters: 2 000 multi-byte characters pass, 2 001 do not.
    assert_error(
        &stack,
        Method::POST,
        "/v1/posts",
        t,
        Some(json!({"body": "é".repeat(2_001)})),
        StatusCode::UNPROCESSABLE_ENTITY,
        "post_too_long",
    )
    .await;
    let ok = stack.post(&alice, &"é".repeat(2_000)).await;

    // Registration.
    assert_error(
        &stack,
        Method::POST,
        "/v1/users",
        None,
        Some(json!({"handle": "alice", "password": "another one"})),
        StatusCode::CONFLICT,
        "handle_taken",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        "/v1/users",
        None,
        Some(json!({"handle": "ALICE", "password": "another one"})),
        StatusCode::CONFLICT,
        "handle_taken",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        "/v1/users",
        None,
        Some(json!({"handle": "a b", "password": "password1"})),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_handle",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        "/v1/users",
        None,
        Some(json!({"handle": "shortpw", "password": "1234"})),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_password",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        "/v1/users",
        None,
        Some(json!({"handle": 12, "password": "password1"})),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;

    // Nothing changed: one post, one user named alice, no user "shortpw".
    let (_, posts) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}/posts", alice.id),
            t,
            None,
        )
        .await;
    assert_eq!(Stack::ids(&posts), vec![ok]);
    let (status, _) = stack
        .call(
            Method::POST,
            "/v1/sessions",
            None,
            Some(json!({"handle": "shortpw", "password": "1234"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    stack.stop().await;
}
both_backends!(bad_bodies_are_refused);

async fn bad_tokens_and_foreign_users_are_refused(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let bob = stack.register("bob").await;
    let home = format!("/v1/users/{}/timeline", alice.id);

    let (status, body) = stack.call(Method::GET, &home, None, None).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let forged = TokenKeys::new(b"some-other-secret-0123456789", Duration::from_secs(60))
        .expect("keys")
        .issue(alice.id);
    let keys = TokenKeys::new(SECRET.as_bytes(), Duration::from_secs(60)).expect("keys");
    let now = chrono::Utc::now().timestamp();
    let expired = keys.issue_with(alice.id, now - 3_600, now - 60);
    for token in [forged.as_str(), expired.as_str(), "garbage", "a.b.c"] {
        let (status, body) = stack.call(Method::GET, &home, Some(token), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token}: {body}");
    }
    let (status, body) = stack.call(Method::GET, &home, Some(&expired), None).await;
    assert_eq!(body["error"]["message"], "token expired", "{status}");
    let (status, _) = stack.raw(Method::GET, &home, None, None, Vec::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Tokens in the query string are for WebSocket upgrades only, never plain HTTP routes.
    let (status, _) = stack
        .raw(
            Method::GET,
            &format!("{home}?token={}", alice.token),
            None,
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Acting for another user.
    assert_error(
        &stack,
        Method::GET,
        &home,
        Some(&bob.token),
        None,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        &format!("/v1/users/{}/follows/{}", alice.id, bob.id),
        Some(&bob.token),
        None,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert_error(
        &stack,
        Method::DELETE,
        &format!("/v1/users/{}/follows/{}", alice.id, bob.id),
        Some(&bob.token),
        None,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;

    // Unknown users: a follow target, a path user, a valid token for a user that does not exist.
    let ghost = Id(alice.id.0 + 999_999);
    assert_error(
        &stack,
        Method::POST,
        &format!("/v1/users/{}/follows/{}", alice.id, ghost),
        Some(&alice.token),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        &format!("/v1/users/{ghost}/posts"),
        Some(&alice.token),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        &format!("/v1/users/{ghost}"),
        Some(&alice.token),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let ghost_token = keys.issue(ghost);
    assert_error(
        &stack,
        Method::GET,
        &format!("/v1/users/{ghost}/timeline"),
        Some(&ghost_token),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        &stack,
        Method::POST,
        "/v1/posts",
        Some(&ghost_token),
        Some(json!({"body": "boo"})),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        &format!("/v1/posts/{ghost}"),
        Some(&alice.token),
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // Following yourself; duplicate follows are idempotent.
    assert_error(
        &stack,
        Method::POST,
        &format!("/v1/users/{}/follows/{}", alice.id, alice.id),
        Some(&alice.token),
        None,
        StatusCode::UNPROCESSABLE_ENTITY,
        "cannot_follow_self",
    )
    .await;
    for _ in 0..3 {
        stack.follow(&bob, &alice).await;
    }
    let (_, user) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}", alice.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(user["follower_count"], 1);
    for _ in 0..2 {
        let (status, _) = stack
            .call(
                Method::DELETE,
                &format!("/v1/users/{}/follows/{}", bob.id, alice.id),
                Some(&bob.token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, user) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}", alice.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(user["follower_count"], 0);
    let (_, user) = stack
        .call(
            Method::GET,
            &format!("/v1/users/{}", bob.id),
            Some(&bob.token),
            None,
        )
        .await;
    assert_eq!(user["following_count"], 0);
    stack.stop().await;
}
both_backends!(bad_tokens_and_foreign_users_are_refused);

async fn bad_queries_paths_and_routes_are_refused(backend: Backend) {
    let stack = Stack::start(Options::new(backend)).await;
    let alice = stack.register("alice").await;
    let t = Some(alice.token.as_str());
    let home = format!("/v1/users/{}/timeline", alice.id);
    for (query, status, expected) in [
        (
            "?limit=101",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_limit",
        ),
        (
            "?limit=0",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_limit",
        ),
        (
            "?limit=4294967295",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_limit",
        ),
        (
            "?limit=99999999999999999999",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        ("?limit=-1", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?limit=ten", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?before=abc", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?before=0", StatusCode::BAD_REQUEST, "invalid_query"),
        ("?colour=blue", StatusCode::BAD_REQUEST, "invalid_query"),
    ] {
        for path in [&home, &format!("/v1/users/{}/posts", alice.id)] {
            assert_error(
                &stack,
                Method::GET,
                &format!("{path}{query}"),
                t,
                None,
                status,
                expected,
            )
            .await;
        }
    }
    assert_error(
        &stack,
        Method::GET,
        "/v1/posts/abc",
        t,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        "/v1/posts/-5",
        t,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        "/v1/users/x/timeline",
        t,
        None,
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    assert_error(
        &stack,
        Method::GET,
        "/v1/nothing-here",
        t,
        None,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        &stack,
        Method::PUT,
        "/v1/posts",
        t,
        None,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    stack.stop().await;
}
both_backends!(bad_queries_paths_and_routes_are_refused);
