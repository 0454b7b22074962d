//! Local delivery: which connections of this gateway are in which channel. A channel with local
//! members is subscribed (through the kit's pub/sub hub) on topic `chat:<channel>`; every
//! message published there is pushed to each local member's bounded outbound queue.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use loadlab_kit::Id;
use loadlab_kit::engine::EngineError;
use loadlab_kit::hub::{Hub, ListenerId};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::committer::open_envelope;
use crate::protocol::close;
use loadlab_kit::telemetry;

/// A connection's id within this gateway.
pub type ConnId = u64;

/// What a connection's writer sends.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A JSON text frame.
    Text(Utf8Bytes),
}

/// A connection's outbound queue plus the means to close it.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Frame>,
    kill: CancellationToken,
    code: Arc<AtomicU16>,
}

impl Outbox {
    /// A queue of `capacity` frames; the receiver goes to the connection's writer.
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(capacity);
        let outbox = Outbox {
            tx,
            kill: CancellationToken::new(),
            code: Arc::new(AtomicU16::new(close::NORMAL)),
        };
        (outbox, rx)
    }

    /// Queues a frame without waiting. A full queue means the client does not read fast
    /// enough: the connection is closed as a slow consumer rather than buffering without bound.
    pub fn push(&self, frame: Frame) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.close(close::SLOW_CONSUMER);
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a JSON frame.
    pub fn push_json(&self, json: String) -> bool {
        self.push(Frame::Text(Utf8Bytes::from(json)))
    }

    /// Asks the connection to close with `code` (the first code asked for wins).
    pub fn close(&self, code: u16) {
        if !self.kill.is_cancelled() {
            self.code.store(code, Ordering::Relaxed);
            self.kill.cancel();
        }
    }

    /// Fires when the connection must close.
    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    /// The close code asked for.
    pub fn close_code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }
}

struct Room {
    members: HashMap<ConnId, (Id, Outbox)>,
    listener: ListenerId,
    /// Members online (from presence), for joiners' initial presence frames.
    online: HashSet<Id>,
}

type RoomMap = HashMap<Id, Room>;

/// The channels with local members.
pub struct Rooms {
    hub: Arc<Hub>,
    delivered: opentelemetry::metrics::Counter<u64>,
    /// This gateway's id, on delivery spans (which replica delivered).
    replica: Arc<str>,
    rooms: Arc<Mutex<RoomMap>>,
    changes: tokio::sync::Mutex<()>,
}

fn lock(m: &Mutex<RoomMap>) -> std::sync::MutexGuard<'_, RoomMap> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The pub/sub topic of a channel.
pub fn topic(channel: Id) -> String {
    format!("chat:{channel}")
}

impl Rooms {
    /// Rooms delivering through `hub`.
    pub fn new(hub: Arc<Hub>, meter: &opentelemetry::metrics::Meter, replica: &str) -> Rooms {
        Rooms {
            hub,
            replica: Arc::from(replica),
            delivered: meter
                .u64_counter("chat.messages.delivered")
                .with_description("Chat messages queued to local members' connections")
                .build(),
            rooms: Arc::default(),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds a connection to a channel. Returns true when the channel got its first local
    /// member (the caller starts relaying its presence).
    pub async fn join(
        &self,
        channel: Id,
        conn: ConnId,
        user: Id,
        outbox: Outbox,
    ) -> Result<bool, EngineError> {
        let _guard = self.changes.lock().await;
        if let Some(room) = lock(&self.rooms).get_mut(&channel) {
            room.members.insert(conn, (user, outbox));
            return Ok(false);
        }
        let rooms = Arc::downgrade(&self.rooms);
        let delivered_counter = self.delivered.clone();
        let replica = self.replica.clone();
        let listener = self
            .hub
            .listen(
                &topic(channel),
                Arc::new(move |payload: &Bytes| {
                    let Some(rooms) = rooms.upgrade() else { return };
                    let (trace, json) = open_envelope(payload);
                    // The delivery on this replica is its own span, linked to the sender's
                    // trace (the send was handled on whichever replica the sender is on).
                    let span = match trace {
                        Some(tp) => {
                            let span = tracing::info_span!(
                                "chat.deliver",
                                otel.kind = "consumer",
                                chat.channel = channel.0,
                                chat.replica = &*replica,
                                chat.recipients = tracing::field::Empty,
                            );
                            tp.link(&span);
                            span
                        }
                        None => tracing::Span::none(),
                    };
                    telemetry::sync_in_service(crate::SERVICE, || {
                        let _entered = span.enter();
                        // Validated once per message here, then shared by every member's frame.
                        let Ok(text) = Utf8Bytes::try_from(json) else {
                            tracing::warn!(%channel, "dropping a non-UTF-8 chat payload");
                            return;
                        };
                        if let Some(room) = lock(&rooms).get(&channel) {
                            let mut delivered = 0u64;
                            for (_, outbox) in room.members.values() {
                                delivered += u64::from(outbox.push(Frame::Text(text.clone())));
                            }
                            span.record("chat.recipients", delivered);
                            delivered_counter.add(delivered, &[]);
                        }
                    });
                }),
            )
            .await?;
        let mut members = HashMap::new();
        members.insert(conn, (user, outbox));
        lock(&self.rooms).insert(
            channel,
            Room {
                members,
                listener,
                online: HashSet::new(),
            },
        );
        Ok(true)
    }

    /// Removes a connection from a channel. Returns true when it was the last local member
    /// (the channel is unsubscribed).
    pub async fn leave(&self, channel: Id, conn: ConnId) -> Result<bool, EngineError> {
        let _guard = self.changes.lock().await;
        let emptied = {
            let mut rooms = lock(&self.rooms);
            match rooms.get_mut(&channel) {
                Some(room) => {
                    room.members.remove(&conn);
                    if room.members.is_empty() {
                        rooms.remove(&channel).map(|r| r.listener)
                    } else {
                        None
                    }
                }
                None => None,
            }
        };
        match emptied {
            Some(listener) => {
                self.hub.unlisten(&topic(channel), listener).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Sends `json` to every local member of `channel`.
    pub fn broadcast(&self, channel: Id, json: &str) {
        let text = Utf8Bytes::from(json.to_owned());
        if let Some(room) = lock(&self.rooms).get(&channel) {
            for (_, outbox) in room.members.values() {
                outbox.push(Frame::Text(text.clone()));
            }
        }
    }

    /// Records a presence change of a member (for later joiners).
    pub fn set_online(&self, channel: Id, user: Id, online: bool) {
        if let Some(room) = lock(&self.rooms).get_mut(&channel) {
            if online {
                room.online.insert(user);
            } else {
                room.online.remove(&user);
            }
        }
    }

    /// Members of `channel` known to be online.
    pub fn online(&self, channel: Id) -> Vec<Id> {
        lock(&self.rooms)
            .get(&channel)
            .map(|r| {
                let mut v: Vec<Id> = r.online.iter().copied().collect();
                v.sort_unstable();
                v
            })
            .unwrap_or_default()
    }

    /// Whether the channel still has local members.
    pub fn has(&self, channel: Id) -> bool {
        lock(&self.rooms).contains_key(&channel)
    }

    /// Number of channels with local members.
    pub fn len(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Whether no channel has local members.
    pub fn is_empty(&self) -> bool {
        lock(&self.rooms).is_empty()
    }
}
