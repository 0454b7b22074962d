//! The feed's HTTP edge: `/v1/users`, `/v1/sessions`, follows, posts, user and home timelines.

use std::sync::Arc;

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use loadlab_kit::auth::{AuthUser, Passwords, TokenKeys};
use loadlab_kit::error::{ApiJson, ApiPath, ApiQuery};
use loadlab_kit::grpc::TracedChannel;
use loadlab_kit::{ApiError, Id};
use loadlab_proto::feed::v1::Post;
use loadlab_proto::timeline::v1::GetRequest;
use loadlab_proto::timeline::v1::timeline_service_client::TimelineServiceClient;
use serde::{Deserialize, Serialize};

use crate::domain::{Handle, Password, PostBody};
use crate::store::{FeedStore, StoreError, UserView};

/// Largest page of a list endpoint.
pub const MAX_PAGE: u32 = 100;
/// Page size when `limit` is absent.
pub const DEFAULT_PAGE: u32 = 20;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Source of truth.
    pub store: FeedStore,
    /// Token signing/verification.
    pub tokens: Arc<TokenKeys>,
    /// Password hashing.
    pub passwords: Passwords,
    /// The timeline service.
    pub timeline: TimelineServiceClient<TracedChannel>,
    /// Post length limit.
    pub max_post_chars: usize,
}

impl FromRef<AppState> for Arc<TokenKeys> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.tokens)
    }
}

/// The routes.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/users", post(register))
        .route("/v1/sessions", post(login))
        .route("/v1/users/{id}", get(get_user))
        .route(
            "/v1/users/{id}/follows/{target}",
            post(follow).delete(unfollow),
        )
        .route("/v1/posts", post(create_post))
        .route("/v1/posts/{id}", get(get_post))
        .route("/v1/users/{id}/posts", get(user_posts))
        .route("/v1/users/{id}/timeline", get(home_timeline))
        .with_state(state)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let Some(reason) = e.unavailable() {
            return ApiError::unavailable(
                "database_unavailable",
                format!("database unavailable: {reason}"),
                1,
            );
        }
        match e {
            StoreError::UserNotFound(id) => ApiError::not_found(format!("user {id} not found")),
            StoreError::HandleTaken(h) => {
                ApiError::conflict("handle_taken", format!("handle {h:?} is taken"))
            }
            StoreError::SelfFollow => {
                ApiError::unprocessable("cannot_follow_self", "a user cannot follow themselves")
            }
            StoreError::Db(e) => ApiError::internal(e),
        }
    }
}

fn timeline_error(status: tonic::Status) -> ApiError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled => {
            ApiError::unavailable(
                "timeline_unavailable",
                format!("timeline service unavailable: {}", status.message()),
                1,
            )
        }
        Code::NotFound => ApiError::not_found(status.message().to_owned()),
        Code::InvalidArgument => {
            ApiError::unprocessable("invalid_request", status.message().to_owned())
        }
        _ => ApiError::internal(format!("timeline: {status}")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    handle: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct Session {
    id: Id,
    handle: String,
    token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPost {
    body: String,
}

/// A post as JSON: ids as decimal strings, time as RFC 3339 UTC.
#[derive(Debug, Serialize)]
pub struct PostJson {
    id: Id,
    author_id: Id,
    body: String,
    created_at: String,
}

impl From<Post> for PostJson {
    fn from(p: Post) -> Self {
        let created_at = chrono::DateTime::from_timestamp_millis(p.created_at_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        PostJson {
            id: Id(p.id),
            author_id: Id(p.author_id),
            body: p.body,
            created_at,
        }
    }
}

#[derive(Debug, Serialize)]
struct PostList {
    posts: Vec<PostJson>,
    next: Option<String>,
}

impl PostList {
    fn new(posts: Vec<Post>, limit: u32) -> Self {
        let next = if posts.len() == limit as usize {
            posts.last().map(|p| p.id.to_string())
        } else {
            None
        };
        PostList {
            posts: posts.into_iter().map(PostJson::from).collect(),
            next,
        }
    }
}

#[derive(Debug, Serialize)]
struct UserJson {
    id: Id,
    handle: String,
    follower_count: i64,
    following_count: i64,
}

impl From<UserView> for UserJson {
    fn from(u: UserView) -> Self {
        UserJson {
            id: u.id,
            handle: u.handle,
            follower_count: u.follower_count,
            following_count: u.following_count,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<u32>,
    before: Option<Id>,
}

impl PageQuery {
    fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_PAGE),
            Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::unprocessable(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_PAGE} (got {n})"),
            )),
        }
    }
}

fn require_self(caller: Id, path_user: Id) -> Result<(), ApiError> {
    if caller == path_user {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "the token is for user {caller}, not {path_user}"
        )))
    }
}

async fn register(
    State(state): State<AppState>,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<Response, ApiError> {
    let handle = Handle::parse(&creds.handle)?;
    let password = Password::parse(&creds.password)?;
    let hash = state
        .passwords
        .hash(password.as_str())
        .await
        .map_err(ApiError::internal)?;
    let user = state.store.create_user(&handle, hash).await?;
    let token = state.tokens.issue(user.id);
    Ok((
        StatusCode::CREATED,
        Json(Session {
            id: user.id,
            handle: user.handle,
            token,
        }),
    )
        .into_response())
}

async fn login(
    State(state): State<AppState>,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<Json<Session>, ApiError> {
    let found = state.store.credentials(&creds.handle).await?;
    let ok = state
        .passwords
        .verify(&creds.password, found.as_ref().map(|(_, h)| h.as_str()))
        .await;
    match found {
        Some((user, _)) if ok => Ok(Json(Session {
            id: user.id,
            token: state.tokens.issue(user.id),
            handle: user.handle,
        })),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "unknown handle or wrong password",
        )),
    }
}

async fn get_user(
    State(state): State<AppState>,
    _caller: AuthUser,
    ApiPath(id): ApiPath<Id>,
) -> Result<Json<UserJson>, ApiError> {
    Ok(Json(state.store.user(id).await?.into()))
}

async fn follow(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, target)): ApiPath<(Id, Id)>,
) -> Result<StatusCode, ApiError> {
    require_self(caller, id)?;
    state.store.follow(id, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unfollow(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, target)): ApiPath<(Id, Id)>,
) -> Result<StatusCode, ApiError> {
    require_self(caller, id)?;
    state.store.unfollow(id, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_post(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiJson(new): ApiJson<NewPost>,
) -> Result<Response, ApiError> {
    let body = PostBody::parse(&new.body, state.max_post_chars)?;
    let post = state.store.create_post(caller, body).await?;
    Ok((StatusCode::CREATED, Json(PostJson::from(post))).into_response())
}

async fn get_post(
    State(state): State<AppState>,
    _caller: AuthUser,
    ApiPath(id): ApiPath<Id>,
) -> Result<Json<PostJson>, ApiError> {
    let mut found = state.store.posts(&[id]).await?;
    found
        .pop()
        .map(|p| Json(p.into()))
        .ok_or_else(|| ApiError::not_found(format!("post {id} not found")))
}

async fn user_posts(
    State(state): State<AppState>,
    _caller: AuthUser,
    ApiPath(id): ApiPath<Id>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<PostList>, ApiError> {
    let limit = page.limit()?;
    let posts = state
        .store
        .posts_by_authors(&[id], page.before, u64::from(limit))
        .await?;
    if posts.is_empty() {
        // An unknown user is a 404, not an empty list; only an empty page pays for the check.
        state.store.user(id).await?;
    }
    Ok(Json(PostList::new(posts, limit)))
}

async fn home_timeline(
    State(mut state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<Id>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<PostList>, ApiError> {
    require_self(caller, id)?;
    let limit = page.limit()?;
    let response = state
        .timeline
        .get(GetRequest {
            user_id: id.0,
            limit,
            before: page.before.map_or(0, |b| b.0),
        })
        .await
        .map_err(timeline_error)?
        .into_inner();
    let next = (response.next_before != 0).then(|| response.next_before.to_string());
    Ok(Json(PostList {
        posts: response.posts.into_iter().map(PostJson::from).collect(),
        next,
    }))
}
