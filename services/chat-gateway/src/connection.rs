//! One WebSocket connection: a reader that parses and acts on client frames, and a writer that
//! drains the connection's bounded outbound queue, pings, and closes with the right code.

use loadlab_kit::telemetry::propagation::TraceParent;
use opentelemetry::trace::TraceContextExt as _;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt};
use loadlab_kit::Id;
use tokio::sync::mpsc;

use crate::Gateway;
use crate::committer::Pending;
use crate::protocol::{ClientFrame, ServerFrame, close, code, parse_error};
use crate::rooms::{ConnId, Frame, Outbox};
use crate::store::{NewMessage, StoreError};

/// A token bucket: `rate` tokens per second up to `burst`.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            rate,
            burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn error_frame(code: &str, message: &str, reference: Option<&str>) -> String {
    ServerFrame::Error {
        code,
        message,
        reference,
    }
    .to_json()
}

/// Serves one upgraded connection of `user` until it closes.
pub async fn serve(socket: WebSocket, user: Id, gateway: Arc<Gateway>) {
    let Some(committer) = gateway.committer() else {
        // Draining: refuse politely.
        let (mut sink, _) = socket.split();
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: close::GOING_AWAY,
                reason: Utf8Bytes::from_static("shutting down"),
            })))
            .await;
        return;
    };
    let conn: ConnId = gateway.next_conn_id();
    let (outbox, queue) = Outbox::new(gateway.cfg.outbound_queue);
    let (sink, stream) = socket.split();
    gateway.metrics.connected();
    gateway.presence.connected(user);
    let writer = tokio::spawn(write_loop(sink, queue, outbox.clone(), gateway.clone()));

    let mut joined: HashSet<Id> = HashSet::new();
    read_loop(
        stream,
        user,
        conn,
        &outbox,
        &gateway,
        &committer,
        &mut joined,
    )
    .await;
    // The reader is done: stop submitting, leave everything, tell presence.
    drop(committer);
    for channel in &joined {
        gateway.leave_room(*channel, conn, user).await;
    }
    gateway.presence.disconnected(user);
    // When the gateway drains, the writer owns the goodbye: it flushes the pending acks and
    // closes with 1001; a normal close here would race it.
    if !outbox.killed().is_cancelled() && !gateway.shutdown.is_triggered() {
        outbox.close(close::NORMAL);
    }
    let _ = writer.await;
    gateway.metrics.disconnected();
}

async fn read_loop(
    mut stream: futures::stream::SplitStream<WebSocket>,
    user: Id,
    conn: ConnId,
    outbox: &Outbox,
    gateway: &Arc<Gateway>,
    committer: &crate::committer::Committer,
    joined: &mut HashSet<Id>,
) {
    let cfg = &gateway.cfg;
    let mut bucket = Bucket::new(cfg.send_rate, cfg.send_burst);
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(cfg.idle_timeout, stream.next()) => n,
            () = outbox.killed().cancelled() => return,
            () = gateway.shutdown.wait() => return,
        };
        let message = match next {
            Err(_) => {
                outbox.close(close::IDLE_TIMEOUT);
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                outbox.close(close_code_for(e));
                return;
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match message {
            Message::Text(t) => t,
            Message::Binary(_) => {
                outbox.push_json(error_frame(
                    code::BINARY,
                    "binary frames are not accepted: send JSON text frames",
                    None,
                ));
                continue;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return,
        };
        gateway.metrics.frames_in.inc();
        let frame = match serde_json::from_str::<ClientFrame>(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                let (code, message) = parse_error(text.as_str(), &e);
                outbox.push_json(error_frame(code, &message, None));
                continue;
            }
        };
        match frame {
            ClientFrame::Ping => {
                outbox.push_json(ServerFrame::Pong.to_json());
            }
            ClientFrame::Join { channel } => {
                if joined.contains(&channel) {
                    outbox.push_json(ServerFrame::Joined { channel }.to_json());
                    continue;
                }
                if joined.len() >= cfg.max_channels_per_connection {
                    outbox.push_json(error_frame(
                        code::TOO_MANY_CHANNELS,
                        &format!(
                            "at most {} channels per connection",
                            cfg.max_channels_per_connection
                        ),
                        None,
                    ));
                    continue;
                }
                match gateway.join_room(channel, conn, user, outbox.clone()).await {
                    Ok(()) => {
                        joined.insert(channel);
                        outbox.push_json(ServerFrame::Joined { channel }.to_json());
                        for member in gateway.rooms.online(channel) {
                            outbox.push_json(
                                ServerFrame::Presence {
                                    channel,
                                    user: member,
                                    state: "online",
                                }
                                .to_json(),
                            );
                        }
                    }
                    Err(JoinError::UnknownChannel) => {
                        outbox.push_json(error_frame(
                            code::UNKNOWN_CHANNEL,
                            &format!("channel {channel} does not exist"),
                            None,
                        ));
                    }
                    Err(JoinError::Unavailable(reason)) => {
                        outbox.push_json(error_frame(
                            code::UNAVAILABLE,
                            &format!("cannot join now: {reason}"),
                            None,
                        ));
                    }
                }
            }
            ClientFrame::Leave { channel } => {
                if joined.remove(&channel) {
                    gateway.leave_room(channel, conn, user).await;
                }
                outbox.push_json(ServerFrame::Left { channel }.to_json());
            }
            ClientFrame::Send {
                channel,
                client_msg_id,
                body,
                traceparent,
            } => {
                // The handling of a send is one span, entered only for this synchronous
                // branch (it never awaits): its context travels with the message to the
                // committer and to every replica's delivery.
                let span = tracing::info_span!(
                    "chat.send",
                    otel.kind = "server",
                    chat.channel = channel.0,
                    chat.sender = user.0,
                    chat.message_id = tracing::field::Empty,
                );
                if let Some(tp) = traceparent
                    .as_deref()
                    .and_then(|t| t.parse::<TraceParent>().ok())
                {
                    let parent =
                        opentelemetry::Context::new().with_remote_span_context(tp.span_context());
                    let _ = span.set_parent(parent);
                }
                let _entered = span.enter();
                let reference = Some(client_msg_id.as_str());
                if client_msg_id.is_empty() || client_msg_id.chars().count() > 64 {
                    outbox.push_json(error_frame(
                        code::INVALID_MESSAGE,
                        "client_msg_id must be 1-64 characters",
                        None,
                    ));
                    continue;
                }
                if !joined.contains(&channel) {
                    outbox.push_json(error_frame(
                        code::NOT_JOINED,
                        &format!("join channel {channel} before sending to it"),
                        reference,
                    ));
                    continue;
                }
                if body.len() > cfg.max_message_bytes {
                    outbox.push_json(error_frame(
                        code::TOO_LARGE,
                        &format!(
                            "message body is {} bytes; the limit is {}",
                            body.len(),
                            cfg.max_message_bytes
                        ),
                        reference,
                    ));
                    continue;
                }
                if body.trim().is_empty() {
                    outbox.push_json(error_frame(
                        code::INVALID_MESSAGE,
                        "message body must not be empty",
                        reference,
                    ));
                    continue;
                }
                if !bucket.take() {
                    gateway.metrics.rate_limited.inc();
                    outbox.push_json(error_frame(
                        code::RATE_LIMITED,
                        &format!(
                            "over {} messages per second; this one was not sent",
                            cfg.send_rate
                        ),
                        reference,
                    ));
                    continue;
                }
                let id = gateway.ids.next_id();
                span.record("chat.message_id", id.0);
                let pending = Pending {
                    trace: TraceParent::of(&span),
                    message: NewMessage {
                        id,
                        channel,
                        sender: user,
                        client_msg_id,
                        body,
                    },
                    reply: outbox.clone(),
                };
                if let Err(refused) = committer.submit(pending) {
                    outbox.push_json(error_frame(
                        code::OVERLOADED,
                        "the gateway is saturated; retry with the same client_msg_id",
                        Some(&refused.message.client_msg_id),
                    ));
                }
            }
        }
    }
}

/// Why a join failed.
pub enum JoinError {
    /// No such channel.
    UnknownChannel,
    /// Database or engine trouble.
    Unavailable(String),
}

impl From<StoreError> for JoinError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownChannel(_) => JoinError::UnknownChannel,
            other => JoinError::Unavailable(other.to_string()),
        }
    }
}

/// Most frames one burst writes before it flushes (bounds the time a writer holds a burst).
const BURST_FRAMES: usize = 64;

/// Writes `first` and whatever else is already queued (up to [`BURST_FRAMES`]), then flushes
/// once: under fan-out load that is one system call for many frames instead of one each.
async fn write_burst(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    queue: &mut mpsc::Receiver<Frame>,
    first: Utf8Bytes,
    gateway: &Gateway,
) -> Result<(), axum::Error> {
    sink.feed(Message::Text(first)).await?;
    let mut n = 1;
    while n < BURST_FRAMES {
        let Ok(Frame::Text(text)) = queue.try_recv() else {
            break;
        };
        sink.feed(Message::Text(text)).await?;
        n += 1;
    }
    gateway.metrics.frames_out.inc_by(n as u64);
    sink.flush().await
}

/// Maps a protocol error from the WebSocket library to the close code that explains it.
fn close_code_for(e: axum::Error) -> u16 {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.into_inner().downcast::<WsError>() {
        Ok(ws) => match *ws {
            WsError::Capacity(_) => close::TOO_BIG,
            WsError::Utf8(_) => close::INVALID_PAYLOAD,
            WsError::Protocol(_) => close::PROTOCOL,
            _ => close::NORMAL,
        },
        Err(_) => close::NORMAL,
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Frame>,
    outbox: Outbox,
    gateway: Arc<Gateway>,
) {
    let mut ping = tokio::time::interval(gateway.cfg.ping_interval);
    ping.tick().await;
    let send_timeout = Duration::from_secs(10);
    let code = loop {
        tokio::select! {
            biased;
            frame = queue.recv() => match frame {
                Some(Frame::Text(text)) => {
                    match tokio::time::timeout(send_timeout, write_burst(&mut sink, &mut queue, text, &gateway)).await {
                        Ok(Ok(())) => {}
                        // A client that does not read blocks its socket: treat it as slow.
                        Err(_) => break close::SLOW_CONSUMER,
                        Ok(Err(_)) => return,
                    }
                }
                None => break outbox.close_code(),
            },
            () = outbox.killed().cancelled() => break outbox.close_code(),
            () = gateway.shutdown.wait() => {
                // Drain: wait until every queued send is durable and answered, flush the
                // answers, then say goodbye with 1001.
                let mut drained = gateway.drained.clone();
                let _ = tokio::time::timeout(gateway.cfg.common.shutdown_grace, drained.wait_for(|d| *d)).await;
                while let Ok(Frame::Text(text)) = queue.try_recv() {
                    if tokio::time::timeout(Duration::from_secs(2), sink.send(Message::Text(text))).await.is_err() {
                        break;
                    }
                }
                break close::GOING_AWAY;
            }
            _ = ping.tick() => {
                if tokio::time::timeout(send_timeout, sink.send(Message::Ping(bytes::Bytes::from_static(b"ll")))).await.is_err() {
                    break close::SLOW_CONSUMER;
                }
            }
        }
    };
    if code == close::SLOW_CONSUMER {
        gateway.metrics.slow_consumers.inc();
    }
    let reason = match code {
        close::SLOW_CONSUMER => "slow consumer: the outbound queue filled up",
        close::IDLE_TIMEOUT => "idle timeout",
        close::TOO_BIG => "frame too large",
        close::INVALID_PAYLOAD => "text frame is not valid UTF-8",
        close::GOING_AWAY => "gateway shutting down",
        close::PROTOCOL => "protocol error",
        _ => "",
    };
    outbox.close(code);
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
}
