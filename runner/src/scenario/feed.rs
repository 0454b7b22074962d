//! Feed scenarios against the `feed` service: `feed-read` (home timelines), `feed-write`
//! (posts), `feed-mixed` (60% home timeline, 30% user timeline, 10% post).
//!
//! Set-up (once per run, through the public API): `users` accounts; a follow graph where each
//! user follows every one of the `celebrities` top accounts with probability ½ and
//! `followsPerUser` others drawn from a Zipf (power-law) distribution; `postsPerUser` posts each.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::executor::Iteration;
use crate::http_client::{Client, Request, VuConnection};
use crate::metrics::{EndpointId, Recorder, Registry};
use crate::scenario::send_recorded;
use crate::spec::{ScenarioName, ScenarioParams};

/// A user created by set-up.
#[derive(Debug, Clone)]
pub struct FeedUser {
    /// User id (decimal, as the API returns it).
    pub id: String,
    /// `Bearer …` header value.
    pub auth: HeaderValue,
}

/// What set-up created.
#[derive(Debug, Clone)]
pub struct FeedData {
    /// Every user.
    pub users: Vec<FeedUser>,
    /// Follow edges created.
    pub follows: usize,
    /// Posts created.
    pub posts: usize,
}

/// Set-up failed.
#[derive(Debug, thiserror::Error)]
#[error("set-up: {0}")]
pub struct SetupError(String);

impl SetupError {
    /// A set-up error with a message.
    pub fn new(message: String) -> Self {
        SetupError(message)
    }
}

/// Requests in flight during set-up.
const SETUP_CONCURRENCY: usize = 32;

/// Creates users, the follow graph and initial posts. `progress` is told each phase.
pub async fn setup(
    base: &str,
    params: &ScenarioParams,
    client: &Client,
    run_tag: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<FeedData, SetupError> {
    let base = base.trim_end_matches('/');
    let n = params.users as usize;
    progress(&format!("creating {n} users"));
    let users: Vec<FeedUser> = run_all(client, (0..n).collect(), async |conn, i: usize| {
        let body = serde_json::json!({"handle": format!("ll{run_tag}_{i}"), "password": "loadlab-password"}).to_string();
        let r = call(conn, Method::POST, &format!("{base}/v1/users"), None, Some(body)).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&r).map_err(|e| SetupError(format!("sign-up response: {e}")))?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| SetupError(format!("sign-up response without id: {v}")))?;
        let token = v["token"]
            .as_str()
            .ok_or_else(|| SetupError("sign-up response without token".into()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| SetupError(e.to_string()))?;
        Ok(FeedUser { id: id.to_owned(), auth })
    })
    .await?;

    let edges = follow_graph(
        n,
        params.celebrities as usize,
        params.follows_per_user as usize,
        0x010a_d1ab,
    );
    progress(&format!("following: {} edges", edges.len()));
    let follows = edges.len();
    run_all(client, edges, async |conn, (a, b): (usize, usize)| {
        let (who, whom) = (&users[a], &users[b]);
        let url = format!("{base}/v1/users/{}/follows/{}", who.id, whom.id);
        call(conn, Method::POST, &url, Some(&who.auth), None)
            .await
            .map(|_| ())
    })
    .await?;

    let posts = n * params.posts_per_user as usize;
    progress(&format!("posting: {posts} posts"));
    run_all(client, (0..posts).collect(), async |conn, k: usize| {
        let who = &users[k % n];
        let body =
            serde_json::json!({"body": format!("set-up post {k} by {}", who.id)}).to_string();
        call(
            conn,
            Method::POST,
            &format!("{base}/v1/posts"),
            Some(&who.auth),
            Some(body),
        )
        .await
        .map(|_| ())
    })
    .await?;
    Ok(FeedData {
        users,
        follows,
        posts,
    })
}

/// Runs `job` for every item, [`SETUP_CONCURRENCY`] at a time, each worker on its own
/// connection; results in item order; stops at the first error.
async fn run_all<T, R>(
    client: &Client,
    items: Vec<T>,
    job: impl AsyncFn(&mut VuConnection, T) -> Result<R, SetupError>,
) -> Result<Vec<R>, SetupError> {
    let len = items.len();
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..len).map(|_| None).collect::<Vec<Option<R>>>());
    let next = || {
        queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next()
    };
    let workers = (0..SETUP_CONCURRENCY.min(len.max(1))).map(|_| async {
        let mut conn = client.connection();
        while let Some((i, item)) = next() {
            let r = job(&mut conn, item).await?;
            results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(r);
        }
        Ok::<(), SetupError>(())
    });
    futures::future::try_join_all(workers).await?;
    Ok(results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .into_iter()
        .flatten()
        .collect())
}

async fn call(
    conn: &mut VuConnection,
    method: Method,
    url: &str,
    auth: Option<&HeaderValue>,
    body: Option<String>,
) -> Result<Bytes, SetupError> {
    let uri: Uri = url.parse().map_err(|e| SetupError(format!("{url}: {e}")))?;
    let mut headers = HeaderMap::new();
    if let Some(a) = auth {
        headers.insert(AUTHORIZATION, a.clone());
    }
    if body.is_some() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let request = Request {
        method: method.clone(),
        uri,
        headers,
        body: body.map_or_else(Bytes::new, Bytes::from),
    };
    // Set-up retries overload answers: it must finish even against a small stack.
    for attempt in 0..6u32 {
        match conn.send(request.clone()).await {
            Ok(r) if (200..300).contains(&r.status) => return Ok(r.body),
            Ok(r) if r.status == 503 || r.status == 429 => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Ok(r) => {
                return Err(SetupError(format!(
                    "{method} {url}: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                )));
            }
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %e, "set-up request failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => return Err(SetupError(format!("{method} {url}: {e}"))),
        }
    }
    Err(SetupError(format!(
        "{method} {url}: still overloaded after retries"
    )))
}

/// The follow graph: `(follower, followee)` index pairs, no self-follows, no duplicates.
pub fn follow_graph(
    users: usize,
    celebrities: usize,
    follows_per_user: usize,
    seed: u64,
) -> Vec<(usize, usize)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let celebrities = celebrities.min(users);
    // Zipf over the non-celebrities: weight of rank r ∝ 1/(r+1).
    let others = users - celebrities;
    let cumulative: Vec<f64> = (0..others)
        .scan(0.0, |acc, r| {
            *acc += 1.0 / (r as f64 + 1.0);
            Some(*acc)
        })
        .collect();
    let total = cumulative.last().copied().unwrap_or(0.0);
    let mut edges = Vec::with_capacity(users * (follows_per_user + celebrities / 2 + 1));
    let mut chosen = std::collections::HashSet::new();
    for u in 0..users {
        chosen.clear();
        for c in 0..celebrities {
            if c != u && rng.random_bool(0.5) {
                chosen.insert(c);
            }
        }
        let want = follows_per_user.min(others.saturating_sub(usize::from(u >= celebrities)));
        let mut picked = 0;
        let mut attempts = 0;
        while picked < want && attempts < want * 20 && total > 0.0 {
            attempts += 1;
            let x = rng.random_range(0.0..total);
            let rank = cumulative.partition_point(|c| *c < x).min(others - 1);
            let target = celebrities + rank;
            if target != u && chosen.insert(target) {
                picked += 1;
            }
        }
        edges.extend(chosen.iter().map(|t| (u, *t)));
    }
    edges
}

/// The action of one `feed-*` iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Home,
    UserPosts,
    Post,
}

/// A feed scenario.
pub struct FeedWorkload {
    client: Client,
    base: String,
    data: Arc<FeedData>,
    /// The users this workload acts as (reads their timelines, posts as them): all of them in a
    /// single-process run, a disjoint slice per worker in a distributed one.
    actors: std::ops::Range<usize>,
    mix: [(Action, u32); 3],
    page_size: u32,
    home: EndpointId,
    user_posts: EndpointId,
    post: EndpointId,
}

/// Per-VU state.
pub struct FeedVu {
    conn: VuConnection,
    recorder: Recorder,
    rng: SmallRng,
    seq: u64,
}

impl FeedWorkload {
    /// A workload for `name` over the users of `data`, acting as the users in `actors` (clamped
    /// to the users there are; an empty range means all of them).
    pub fn new(
        name: ScenarioName,
        base: &str,
        params: &ScenarioParams,
        data: Arc<FeedData>,
        actors: std::ops::Range<usize>,
        client: Client,
        registry: &Registry,
    ) -> Arc<FeedWorkload> {
        let mix = match name {
            ScenarioName::FeedRead => [
                (Action::Home, 100),
                (Action::UserPosts, 0),
                (Action::Post, 0),
            ],
            ScenarioName::FeedWrite => [
                (Action::Home, 0),
                (Action::UserPosts, 0),
                (Action::Post, 100),
            ],
            _ => [
                (Action::Home, 60),
                (Action::UserPosts, 30),
                (Action::Post, 10),
            ],
        };
        let n = data.users.len();
        let actors = if actors.start < actors.end.min(n) {
            actors.start..actors.end.min(n)
        } else {
            0..n
        };
        Arc::new(FeedWorkload {
            client,
            base: base.trim_end_matches('/').to_owned(),
            data,
            actors,
            mix,
            page_size: params.page_size,
            home: registry.endpoint("GET /v1/users/{id}/timeline"),
            user_posts: registry.endpoint("GET /v1/users/{id}/posts"),
            post: registry.endpoint("POST /v1/posts"),
        })
    }
}

#[async_trait]
impl Iteration for FeedWorkload {
    type Vu = FeedVu;

    fn new_vu(&self, id: u64, recorder: Recorder) -> FeedVu {
        FeedVu {
            conn: self.client.connection(),
            recorder,
            rng: SmallRng::seed_from_u64(id ^ 0xfeed_0000_0000),
            seq: 0,
        }
    }

    async fn run(&self, vu: &mut FeedVu, queued: Duration) {
        let users = &self.data.users;
        if users.is_empty() {
            return;
        }
        let mut pick = vu.rng.random_range(0..100u32);
        let action = self
            .mix
            .iter()
            .find(|(_, weight)| {
                if pick < *weight {
                    true
                } else {
                    pick -= weight;
                    false
                }
            })
            .map_or(Action::Home, |(a, _)| *a);
        let me = &users[vu.rng.random_range(self.actors.clone())];
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(AUTHORIZATION, me.auth.clone());
        let (endpoint, method, url, body) = match action {
            Action::Home => (
                self.home,
                Method::GET,
                format!(
                    "{}/v1/users/{}/timeline?limit={}",
                    self.base, me.id, self.page_size
                ),
                Bytes::new(),
            ),
            Action::UserPosts => {
                let author = &users[vu.rng.random_range(0..users.len())];
                (
                    self.user_posts,
                    Method::GET,
                    format!(
                        "{}/v1/users/{}/posts?limit={}",
                        self.base, author.id, self.page_size
                    ),
                    Bytes::new(),
                )
            }
            Action::Post => {
                vu.seq += 1;
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (
                    self.post,
                    Method::POST,
                    format!("{}/v1/posts", self.base),
                    Bytes::from(format!(
                        "{{\"body\":\"load post {} from a loadlab VU\"}}",
                        vu.seq
                    )),
                )
            }
        };
        let Ok(uri) = url.parse::<Uri>() else {
            vu.recorder.check(false);
            return;
        };
        let request = Request {
            method,
            uri,
            headers,
            body,
        };
        let result = send_recorded(&mut vu.conn, &vu.recorder, endpoint, request, queued).await;
        let expected = if action == Action::Post { 201 } else { 200 };
        vu.recorder
            .check(matches!(&result, Ok(r) if r.status == expected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_graph_is_a_power_law_without_self_or_duplicate_edges() {
        let edges = follow_graph(1_000, 10, 20, 7);
        let set: std::collections::HashSet<_> = edges.iter().copied().collect();
        assert_eq!(set.len(), edges.len(), "no duplicates");
        assert!(edges.iter().all(|(a, b)| a != b), "no self-follows");
        let mut followers = vec![0usize; 1_000];
        for (_, b) in &edges {
            followers[*b] += 1;
        }
        // Celebrities: about half of everyone.
        for (c, n) in followers.iter().enumerate().take(10) {
            assert!((400..=600).contains(n), "celebrity {c} has {n} followers");
        }
        // The head of the tail is far more followed than its end.
        let head: usize = followers[10..20].iter().sum();
        let tail: usize = followers[990..1_000].iter().sum();
        assert!(head > 20 * tail.max(1), "head {head} vs tail {tail}");
        // Everyone follows roughly followsPerUser non-celebrities.
        let per_user = edges.iter().filter(|(_, b)| *b >= 10).count() as f64 / 1_000.0;
        assert!((19.0..=20.0).contains(&per_user), "{per_user}");
    }
}
