//! `WatchChannel` streams: a snapshot of the members online now, then the live events of the
//! channel's pub/sub topic, through a bounded per-watcher queue.
//!
//! Each watcher registers a listener on the process-wide [`Hub`], so one engine subscription per
//! channel serves every local watcher. The listener never blocks the hub: it `try_send`s into
//! the watcher's queue, and a full queue cuts the watcher off (RESOURCE_EXHAUSTED) rather than
//! growing memory or slowing down the other watchers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use loadlab_kit::engine::{Engine, PresenceChange};
use loadlab_kit::hub::{Hub, Listener};
use loadlab_kit::metrics::Metrics;
use loadlab_kit::{Id, Shutdown};
use loadlab_proto::presence::v1::{PresenceEvent, State};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::domain;
use crate::error::PresenceError;

#[derive(Clone, Default)]
struct WatchMetrics {
    active: Gauge,
    too_slow: Counter,
}

/// Opens watch streams.
#[derive(Clone)]
pub struct Watchers {
    hub: Arc<Hub>,
    engine: Engine,
    buffer: usize,
    shutdown: Shutdown,
    metrics: WatchMetrics,
}

impl Watchers {
    /// Watchers over `hub` (a hub of `engine`'s pub/sub) with `buffer` queued events each; their
    /// streams end when `shutdown` fires.
    pub fn new(
        hub: Arc<Hub>,
        engine: Engine,
        buffer: usize,
        shutdown: Shutdown,
        registry: &Metrics,
    ) -> Self {
        let metrics = WatchMetrics::default();
        registry.register(
            "presence_active_watchers",
            "WatchChannel streams with a live registration",
            metrics.active.clone(),
        );
        registry.register(
            "presence_watchers_too_slow",
            "Watchers cut off because their queue was full",
            metrics.too_slow.clone(),
        );
        Watchers {
            hub,
            engine,
            buffer,
            shutdown,
            metrics,
        }
    }

    /// A stream of `channel`'s presence: its online members (as snapshot events), then changes.
    pub async fn watch(&self, channel: Id) -> Result<WatchStream, PresenceError> {
        let (tx, live) = mpsc::channel::<Bytes>(self.buffer);
        let lagging = Arc::new(AtomicBool::new(false));
        // Cancelled when the watcher is done with its registration: the stream was dropped (the
        // client went away or the stream ended) or the watcher fell behind.
        let done = CancellationToken::new();
        let done_on_drop = done.clone().drop_guard();
        let listener: Listener = {
            let lagging = Arc::clone(&lagging);
            let done = done.clone();
            let too_slow = self.metrics.too_slow.clone();
            Arc::new(move |payload: &Bytes| {
                if lagging.load(Ordering::Acquire) {
                    return;
                }
                match tx.try_send(payload.clone()) {
                    Ok(()) | Err(TrySendError::Closed(_)) => {}
                    Err(TrySendError::Full(_)) => {
                        if !lagging.swap(true, Ordering::AcqRel) {
                            too_slow.inc();
                            // Unregister at once: a client that stopped reading may never let
                            // the stream be polled again.
                            done.cancel();
                        }
                    }
                }
            })
        };
        // Listen first, snapshot second: a change racing the snapshot then shows up as a live
        // event after it (possibly repeating what the snapshot said), never goes missing.
        self.register(channel, listener, done).await?;
        let at_ms = domain::now_ms();
        let snapshot: Vec<PresenceEvent> = self
            .engine
            .presence
            .channel_online(channel)
            .await?
            .into_iter()
            .map(|user| domain::event(PresenceChange { channel, user }, State::Online, at_ms, true))
            .collect();
        Ok(WatchStream {
            channel,
            buffer: self.buffer,
            snapshot: snapshot.into_iter(),
            live,
            lagging,
            shutdown: Box::pin(self.shutdown.wait()),
            finished: false,
            _done_on_drop: done_on_drop,
        })
    }

    /// Registers `listener` on `channel`'s topic and keeps it until `done` (or shutdown).
    ///
    /// The registration lives in its own task so that it is always undone: if the caller's
    /// request is cancelled mid-way, the task still learns the listener id, sees `done`
    /// cancelled by the dropped guard, and unlistens.
    async fn register(
        &self,
        channel: Id,
        listener: Listener,
        done: CancellationToken,
    ) -> Result<(), PresenceError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let hub = Arc::clone(&self.hub);
        let shutdown = self.shutdown.clone();
        let active = self.metrics.active.clone();
        let topic = domain::topic(channel);
        tokio::spawn(async move {
            let id = match hub.listen(&topic, listener).await {
                Ok(id) => id,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            active.inc();
            let _ = ready_tx.send(Ok(()));
            tokio::select! {
                () = done.cancelled() => {}
                () = shutdown.wait() => {}
            }
            if let Err(e) = hub.unlisten(&topic, id).await {
                tracing::warn!(error = %e, %topic, "cannot unsubscribe a watched topic");
            }
            active.dec();
        });
        match ready_rx.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(PresenceError::WatchRegistration(channel)),
        }
    }
}

/// One watcher's events; ends with an error when the watcher fell behind or the server stops.
pub struct WatchStream {
    channel: Id,
    buffer: usize,
    snapshot: std::vec::IntoIter<PresenceEvent>,
    live: mpsc::Receiver<Bytes>,
    lagging: Arc<AtomicBool>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    finished: bool,
    _done_on_drop: DropGuard,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl WatchStream {
    fn finish(
        &mut self,
        error: PresenceError,
    ) -> Poll<Option<Result<PresenceEvent, PresenceError>>> {
        self.finished = true;
        Poll::Ready(Some(Err(error)))
    }

    fn too_slow(&self) -> PresenceError {
        PresenceError::WatcherTooSlow {
            channel: self.channel,
            buffer: self.buffer,
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<PresenceEvent, PresenceError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            return this.finish(PresenceError::ShuttingDown);
        }
        // Checked before the queue: what is still queued is stale, and the watcher has to
        // re-watch (and get a fresh snapshot) anyway.
        if this.lagging.load(Ordering::Acquire) {
            let error = this.too_slow();
            return this.finish(error);
        }
        if let Some(event) = this.snapshot.next() {
            return Poll::Ready(Some(Ok(event)));
        }
        loop {
            match ready!(this.live.poll_recv(cx)) {
                Some(payload) => match PresenceEvent::decode(payload) {
                    Ok(event) => return Poll::Ready(Some(Ok(event))),
                    Err(e) => {
                        tracing::warn!(error = %e, channel = %this.channel, "undecodable presence event skipped");
                    }
                },
                // The registration ended without a shutdown: it can only have been the lag.
                None => {
                    let error = if this.lagging.load(Ordering::Acquire) {
                        this.too_slow()
                    } else {
                        PresenceError::ShuttingDown
                    };
                    return this.finish(error);
                }
            }
        }
    }
}
