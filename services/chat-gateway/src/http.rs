//! HTTP routes: channel creation, history, and the WebSocket upgrade.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use loadlab_kit::auth::{AuthUser, TokenKeys, bearer_or_query_token};
use loadlab_kit::error::{ApiJson, ApiPath, ApiQuery};
use loadlab_kit::{ApiError, Id};
use serde::{Deserialize, Serialize};

use crate::Gateway;
use crate::store::{StoreError, StoredMessage};

/// Largest history page.
pub const MAX_PAGE: u32 = 100;
const DEFAULT_PAGE: u32 = 50;

#[derive(Clone)]
struct AppState {
    gateway: Arc<Gateway>,
}

impl FromRef<AppState> for Arc<TokenKeys> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.gateway.tokens)
    }
}

/// The routes.
pub fn routes(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/ws", get(upgrade))
        .route("/v1/channels", post(create_channel))
        .route("/v1/channels/{id}/messages", get(history))
        .with_state(AppState { gateway })
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownChannel(id) => {
                ApiError::not_found(format!("channel {id} not found"))
            }
            StoreError::UnknownUser(id) => ApiError::not_found(format!("user {id} not found")),
            StoreError::DanglingReference => ApiError::not_found("channel or user not found"),
            StoreError::Db(e) => {
                ApiError::unavailable("database_unavailable", format!("database: {e}"), 1)
            }
        }
    }
}

/// The caller of a WebSocket upgrade: bearer header, or `?token=` (browsers cannot set headers).
struct WsUser(Id);

impl FromRequestParts<AppState> for WsUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_or_query_token(parts)?;
        state
            .gateway
            .tokens
            .verify(token)
            .map(WsUser)
            .map_err(|e| ApiError::unauthorized(e.to_string()))
    }
}

/// Bytes a connection's writer gathers before a write reaches the socket (a flush always
/// writes everything).
const WRITE_BATCH_BYTES: usize = 8 * 1024;

async fn upgrade(
    State(state): State<AppState>,
    WsUser(user): WsUser,
    ws: WebSocketUpgrade,
) -> Response {
    let gateway = state.gateway;
    if gateway.shutdown.is_triggered() {
        return ApiError::unavailable("draining", "gateway shutting down", 1).into_response();
    }
    let frame = gateway.cfg.max_frame_bytes;
    // tungstenite allocates its read buffer eagerly (128 KiB by default): with tens of
    // thousands of mostly idle connections that buffer is most of the memory, and chat frames
    // are small, so it is sized by flag. The write buffer grows only on busy connections: the
    // writer feeds a burst of queued frames and flushes once.
    ws.max_frame_size(frame)
        .max_message_size(frame)
        .read_buffer_size(gateway.cfg.ws_read_buffer_bytes)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tracker = gateway.tracker.clone();
            tracker.track_future(loadlab_kit::telemetry::in_service(
                crate::SERVICE,
                crate::connection::serve(socket, user, gateway),
            ))
        })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewChannel {
    name: String,
}

#[derive(Debug, Serialize)]
struct ChannelJson {
    id: Id,
    name: String,
}

async fn create_channel(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(new): ApiJson<NewChannel>,
) -> Result<Response, ApiError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "channel name must be 1-100 characters",
        ));
    }
    let id = state.gateway.ids.next_id();
    state.gateway.store.create_channel(id, name, user).await?;
    state.gateway.known_channel(id);
    Ok((
        StatusCode::CREATED,
        Json(ChannelJson {
            id,
            name: name.to_owned(),
        }),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    limit: Option<u32>,
    before: Option<Id>,
}

#[derive(Debug, Serialize)]
struct MessageJson {
    id: Id,
    channel: Id,
    sender: Id,
    body: String,
    ts: String,
}

impl From<StoredMessage> for MessageJson {
    fn from(m: StoredMessage) -> Self {
        MessageJson {
            id: m.id,
            channel: m.channel,
            sender: m.sender,
            body: m.body,
            ts: m
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

#[derive(Debug, Serialize)]
struct MessageList {
    messages: Vec<MessageJson>,
    next: Option<String>,
}

async fn history(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiPath(channel): ApiPath<Id>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<MessageList>, ApiError> {
    let limit = match page.limit {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::unprocessable(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_PAGE} (got {n})"),
            ));
        }
    };
    let store = &state.gateway.store;
    if !store.channel_exists(channel).await? {
        return Err(ApiError::not_found(format!("channel {channel} not found")));
    }
    if !store.is_member(channel, user).await? {
        return Err(ApiError::forbidden(format!(
            "user {user} is not a member of channel {channel}"
        )));
    }
    let messages = store
        .history(channel, page.before, u64::from(limit))
        .await?;
    let next = (messages.len() == limit as usize)
        .then(|| messages.last().map(|m| m.id.to_string()))
        .flatten();
    Ok(Json(MessageList {
        messages: messages.into_iter().map(MessageJson::from).collect(),
        next,
    }))
}
