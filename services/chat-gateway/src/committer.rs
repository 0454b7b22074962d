//! Group commit: sends wait in one queue; a single writer takes whatever is waiting (up to
//! `--commit-batch`) and makes it durable in one statement — one message at a time when idle,
//! many per round trip under load. Only then are senders acked and messages published for
//! delivery, so an ack always means "in the history".

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use loadlab_kit::engine::PubSub;
use loadlab_kit::telemetry::{self, propagation::TraceParent};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use crate::protocol::{ServerFrame, code};
use crate::rooms::{Outbox, topic};
use crate::store::{ChatStore, NewMessage, StoreError};

/// A send waiting to be made durable.
#[derive(Debug)]
pub struct Pending {
    /// The message.
    pub message: NewMessage,
    /// Where the ack (or error) goes.
    pub reply: Outbox,
    /// The sender's span (the `send` frame's handling), carried to every replica's delivery.
    pub trace: Option<TraceParent>,
}

/// Group-commit metrics.
#[derive(Clone)]
pub struct CommitMetrics {
    batch: Histogram,
    latency: Histogram,
    committed: Counter,
    duplicates: Counter,
    failed: Counter,
}

impl CommitMetrics {
    /// Registers the metrics.
    pub fn register(metrics: &loadlab_kit::metrics::Metrics) -> Self {
        let m = CommitMetrics {
            batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            latency: Histogram::new(loadlab_kit::metrics::latency_buckets()),
            committed: Counter::default(),
            duplicates: Counter::default(),
            failed: Counter::default(),
        };
        metrics.register(
            "chat_commit_batch_size",
            "Messages per database write",
            m.batch.clone(),
        );
        metrics.register(
            "chat_commit_seconds",
            "Time to make a batch durable",
            m.latency.clone(),
        );
        metrics.register(
            "chat_messages_committed",
            "Messages made durable",
            m.committed.clone(),
        );
        metrics.register(
            "chat_messages_duplicate",
            "Retried sends answered with the original id",
            m.duplicates.clone(),
        );
        metrics.register(
            "chat_messages_failed",
            "Sends that could not be made durable",
            m.failed.clone(),
        );
        m
    }
}

/// Handle for submitting sends.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts the writer. `drained` turns true once every submitted send has been answered and
    /// all handles are gone (shutdown).
    pub fn spawn(
        store: ChatStore,
        pubsub: Arc<dyn PubSub>,
        batch: usize,
        queue: usize,
        metrics: CommitMetrics,
    ) -> (Committer, watch::Receiver<bool>) {
        let (tx, rx) = mpsc::channel(queue);
        let (drained_tx, drained_rx) = watch::channel(false);
        tokio::spawn(telemetry::in_service(crate::SERVICE, async move {
            run(rx, store, pubsub, batch.max(1), metrics).await;
            let _ = drained_tx.send(true);
        }));
        (Committer { tx }, drained_rx)
    }

    /// Queues a send; gives it back when the queue is full (the caller answers `overloaded`).
    pub fn submit(&self, pending: Pending) -> Result<(), Box<Pending>> {
        // Boxed: refusals are rare, and a large `Err` would cost every successful call.
        self.tx
            .try_send(pending)
            .map_err(|e| Box::new(e.into_inner()))
    }
}

async fn run(
    mut rx: mpsc::Receiver<Pending>,
    store: ChatStore,
    pubsub: Arc<dyn PubSub>,
    max: usize,
    metrics: CommitMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // One trace per group commit (it serves many senders), linked to each sender's.
        let span = tracing::info_span!("chat.commit", messaging.batch.message_count = batch.len());
        for p in &batch {
            if let Some(tp) = p.trace {
                tp.link(&span);
            }
        }
        commit(&store, pubsub.as_ref(), batch, &metrics)
            .instrument(span)
            .await;
    }
}

/// Prefix of a published chat payload that carries the sender's trace context:
/// `tp:<traceparent>\n<frame JSON>`. Receivers strip it and hand the JSON on unchanged.
pub const TRACE_PREFIX: &[u8] = b"tp:";

/// The published payload: the frame, behind the sender's trace context when there is one.
fn envelope(trace: Option<TraceParent>, frame: String) -> Bytes {
    match trace {
        Some(tp) => {
            let tp = tp.to_string();
            let mut out = Vec::with_capacity(TRACE_PREFIX.len() + tp.len() + 1 + frame.len());
            out.extend_from_slice(TRACE_PREFIX);
            out.extend_from_slice(tp.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(frame.as_bytes());
            Bytes::from(out)
        }
        None => Bytes::from(frame),
    }
}

/// Splits a published payload into the sender's trace context (if any) and the frame JSON.
pub fn open_envelope(payload: &Bytes) -> (Option<TraceParent>, Bytes) {
    if let Some(rest) = payload.strip_prefix(TRACE_PREFIX)
        && let Some(nl) = rest.iter().position(|b| *b == b'\n')
    {
        let tp = std::str::from_utf8(&rest[..nl])
            .ok()
            .and_then(|s| s.parse().ok());
        let start = TRACE_PREFIX.len() + nl + 1;
        return (tp, payload.slice(start..));
    }
    (None, payload.clone())
}

async fn commit(
    store: &ChatStore,
    pubsub: &dyn PubSub,
    batch: Vec<Pending>,
    metrics: &CommitMetrics,
) {
    let started = Instant::now();
    let messages: Vec<NewMessage> = batch.iter().map(|p| p.message.clone()).collect();
    match store.insert_batch(&messages).await {
        Ok(stored) => {
            metrics.batch.observe(batch.len() as f64);
            metrics.latency.observe(started.elapsed().as_secs_f64());
            let mut publish = Vec::with_capacity(batch.len());
            for (p, (id, at)) in batch.iter().zip(stored) {
                let m = &p.message;
                p.reply.push_json(
                    ServerFrame::Ack {
                        client_msg_id: &m.client_msg_id,
                        id,
                    }
                    .to_json(),
                );
                if id == m.id {
                    metrics.committed.inc();
                    let ts = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    let frame = ServerFrame::Message {
                        channel: m.channel,
                        id,
                        sender: m.sender,
                        body: &m.body,
                        ts: &ts,
                    };
                    publish.push((topic(m.channel), envelope(p.trace, frame.to_json())));
                } else {
                    metrics.duplicates.inc();
                }
            }
            if let Err(e) = pubsub.publish_many(&publish).await {
                // Durable and acked, but live delivery missed: readers find it in the history.
                tracing::warn!(error = %e, messages = publish.len(), "publishing chat messages failed");
            }
        }
        Err(StoreError::DanglingReference) if batch.len() > 1 => {
            // Isolate the message that refers to a missing channel or user.
            for p in batch {
                Box::pin(commit(store, pubsub, vec![p], metrics)).await;
            }
        }
        Err(e) => {
            let (code, reason) = match &e {
                StoreError::DanglingReference => (
                    code::UNKNOWN_CHANNEL,
                    "the channel or the sender does not exist",
                ),
                _ => (
                    code::UNAVAILABLE,
                    "the message could not be made durable and was not sent; retry with the same client_msg_id",
                ),
            };
            tracing::warn!(error = %e, messages = batch.len(), "chat commit failed");
            metrics.failed.inc_by(batch.len() as u64);
            for p in batch {
                p.reply.push_json(
                    ServerFrame::Error {
                        code,
                        message: reason,
                        reference: Some(&p.message.client_msg_id),
                    }
                    .to_json(),
                );
            }
        }
    }
}
