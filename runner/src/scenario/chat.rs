//! The `chat` scenario: each iteration is one WebSocket session on the chat gateway — connect,
//! join a channel, send a message every `messageIntervalMs` for `sessionDuration` while reading
//! everything the channel delivers, then leave. Each message carries its send time, so every
//! receiving client measures the end-to-end delivery latency (`ws_delivery_latency`) of other
//! clients' messages (all clients share this machine's clock).
//!
//! Set-up (once per run): `users` accounts through the feed's API (the gateway has no sign-up)
//! and `channels` channels through the gateway; VU `i` is user `i mod users` in channel
//! `i mod channels`, connected to gateway replica `(i / channels) mod replicas` when
//! `target.chat` lists several (so each channel's members alternate between replicas and
//! delivery crosses Redis).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::executor::Iteration;
use crate::http_client::{Client, Request, VuConnection};
use crate::metrics::Recorder;
use crate::scenario::feed::{self, FeedUser, SetupError};
use crate::spec::ScenarioParams;

/// What set-up created.
#[derive(Debug, Clone)]
pub struct ChatData {
    /// Users (id, token).
    pub users: Vec<(String, String)>,
    /// Channel ids.
    pub channels: Vec<String>,
}

/// Creates users (through feed) and channels (through the gateway).
pub async fn setup(
    feed_base: &str,
    chat_base: &str,
    params: &ScenarioParams,
    client: &Client,
    run_tag: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<ChatData, SetupError> {
    let mut user_params = params.clone();
    user_params.follows_per_user = 0;
    user_params.celebrities = 0;
    user_params.posts_per_user = 0;
    let users = feed::setup(feed_base, &user_params, client, run_tag, progress).await?;
    let owner = users
        .users
        .first()
        .ok_or_else(|| SetupError::new("no users were created".into()))?
        .clone();
    progress(&format!("creating {} channels", params.channels));
    let mut conn = client.connection();
    let mut channels = Vec::with_capacity(params.channels as usize);
    let base = chat_base.trim_end_matches('/');
    for i in 0..params.channels {
        let id = create_channel(&mut conn, base, &owner, &format!("{run_tag}-{i}")).await?;
        channels.push(id);
    }
    let users = users
        .users
        .into_iter()
        .map(|u| {
            let token = u
                .auth
                .to_str()
                .unwrap_or_default()
                .trim_start_matches("Bearer ")
                .to_owned();
            (u.id, token)
        })
        .collect();
    Ok(ChatData { users, channels })
}

async fn create_channel(
    conn: &mut VuConnection,
    base: &str,
    owner: &FeedUser,
    name: &str,
) -> Result<String, SetupError> {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, owner.auth.clone());
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let uri = format!("{base}/v1/channels")
        .parse()
        .map_err(|e| SetupError::new(format!("{base}: {e}")))?;
    let body = serde_json::json!({"name": name}).to_string();
    let r = conn
        .send(Request {
            method: Method::POST,
            uri,
            headers,
            body: body.into(),
        })
        .await
        .map_err(|e| SetupError::new(format!("creating a channel: {e}")))?;
    if r.status != 201 {
        return Err(SetupError::new(format!(
            "creating a channel: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| SetupError::new(e.to_string()))?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| SetupError::new(format!("channel response without id: {v}")))
}

/// The chat workload.
pub struct ChatWorkload {
    /// `ws://` bases of the gateway replicas.
    ws_bases: Vec<String>,
    data: Arc<ChatData>,
    interval: Duration,
    session: Duration,
    /// Sessions end at the latest when the run's schedule does.
    run_end: Instant,
}

/// Per-VU state.
pub struct ChatVu {
    id: u64,
    recorder: Recorder,
    seq: u64,
}

impl ChatWorkload {
    /// A workload against the gateway replicas at `gateways` (`http(s)://` base URLs).
    pub fn new(
        gateways: &[String],
        params: &ScenarioParams,
        data: Arc<ChatData>,
        run_end: Instant,
    ) -> Arc<ChatWorkload> {
        let ws_bases = gateways
            .iter()
            .map(|base| {
                base.trim_end_matches('/')
                    .replacen("https://", "wss://", 1)
                    .replacen("http://", "ws://", 1)
            })
            .collect();
        Arc::new(ChatWorkload {
            ws_bases,
            data,
            interval: Duration::from_millis(u64::from(params.message_interval_ms.max(1))),
            session: params.session_duration,
            run_end,
        })
    }
}

/// Client WebSocket settings: tungstenite allocates its read buffer up front (128 KiB by
/// default), which would make 10 000 sessions cost over a gigabyte of generator memory; chat
/// frames are small. Nagle is off (the caller passes `disable_nagle`) so that delivery latency
/// is the system's, not the client's socket's.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The send time a message body carries (`t=<unix ns> …`).
fn sent_at(body: &str) -> Option<u128> {
    body.strip_prefix("t=")?.split(' ').next()?.parse().ok()
}

#[async_trait]
impl Iteration for ChatWorkload {
    type Vu = ChatVu;

    fn new_vu(&self, id: u64, recorder: Recorder) -> ChatVu {
        ChatVu {
            id,
            recorder,
            seq: 0,
        }
    }

    async fn run(&self, vu: &mut ChatVu, _queued: Duration) {
        let (users, channels) = (&self.data.users, &self.data.channels);
        if users.is_empty() || channels.is_empty() || self.ws_bases.is_empty() {
            return;
        }
        let (me, token) = &users[(vu.id as usize) % users.len()];
        let channel = &channels[(vu.id as usize) % channels.len()];
        let end = (Instant::now() + self.session).min(self.run_end);
        let started = Instant::now();
        // Consecutive VUs fill consecutive channels, so the replica advances once per round of
        // channels: each channel's members alternate between replicas.
        let replica = (vu.id as usize / channels.len()) % self.ws_bases.len();
        let ws_base = &self.ws_bases[replica];
        let url = format!("{ws_base}/v1/chat/ws?token={token}");
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
        )
        .await
        else {
            vu.recorder.ws_session(None);
            vu.recorder.check(false);
            return;
        };
        vu.recorder.ws_session(Some(started.elapsed()));
        let join = serde_json::json!({"type": "join", "channel": channel}).to_string();
        if ws.send(Message::Text(join.into())).await.is_err() {
            vu.recorder.ws_failure();
            return;
        }
        // The first send comes at a random point of the first interval: sessions that start
        // together (constant-vus) would otherwise send in lockstep bursts, which measures the
        // burst rather than the system at the offered rate.
        let phase = self.interval.mul_f64(rand::random::<f64>());
        let mut ticker = tokio::time::interval_at(Instant::now() + phase, self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut ok = true;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(end) => break,
                _ = ticker.tick() => {
                    vu.seq += 1;
                    let mut frame = serde_json::json!({
                        "type": "send",
                        "channel": channel,
                        "client_msg_id": format!("{}-{}-{}", vu.id, started.elapsed().as_micros(), vu.seq),
                        "body": format!("t={} vu={}", unix_nanos(), vu.id),
                    });
                    // With request tracing on, a sampled send starts a trace that the gateway's
                    // handling and every replica's delivery join.
                    if let Some(tp) = crate::tracing_client::active().map(|t| t.message_traceparent("chat send")) {
                        frame["traceparent"] = serde_json::Value::String(tp);
                    }
                    if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                        ok = false;
                        break;
                    }
                    vu.recorder.ws_sent();
                }
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
                        match v["type"].as_str() {
                            Some("message") => {
                                let from_me = v["sender"].as_str() == Some(me.as_str());
                                let latency = (!from_me)
                                    .then(|| v["body"].as_str().and_then(sent_at))
                                    .flatten()
                                    .map(|t| Duration::from_nanos(unix_nanos().saturating_sub(t) as u64));
                                vu.recorder.ws_received(latency);
                            }
                            Some("error") => {
                                vu.recorder.check(false);
                                tracing::debug!(frame = %v, "chat error frame");
                            }
                            Some("ack") => vu.recorder.check(true),
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        ok = false;
                        break;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
        if !ok {
            vu.recorder.ws_failure();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_send_time() {
        assert_eq!(sent_at("t=123 vu=4"), Some(123));
        assert_eq!(sent_at("hello"), None);
        assert_eq!(sent_at("t=abc"), None);
    }
}
