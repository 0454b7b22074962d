//! One engine subscription shared by many local listeners: the hub subscribes a topic while it
//! has listeners and calls each listener for every message. Listeners must not block (they
//! typically `try_send` into a bounded queue and treat a full queue as a slow consumer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;

use crate::engine::{EngineError, PubSub, SubscriptionControl};
use crate::lock;

/// Called with each payload published on the listener's topic.
pub type Listener = Arc<dyn Fn(&Bytes) + Send + Sync>;

/// Identifies a registration, to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

type Listeners = HashMap<String, Vec<(ListenerId, Listener)>>;

/// The dispatcher.
pub struct Hub {
    control: Arc<dyn SubscriptionControl>,
    listeners: Arc<Mutex<Listeners>>,
    next: AtomicU64,
    /// Serialises subscribe/unsubscribe decisions so a topic is never left subscribed with no
    /// listener, or unsubscribed with one.
    changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub over a new subscriber of `pubsub`; its dispatch task runs until the hub is dropped.
    pub async fn new(pubsub: &dyn PubSub) -> Result<Arc<Hub>, EngineError> {
        let subscription = pubsub.subscriber().await?;
        let listeners: Arc<Mutex<Listeners>> = Arc::default();
        let hub = Arc::new(Hub {
            control: subscription.control,
            listeners: Arc::clone(&listeners),
            next: AtomicU64::new(1),
            changes: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&listeners);
        let mut messages = subscription.messages;
        tokio::spawn(async move {
            loop {
                let message = match messages.recv().await {
                    Ok(m) => m,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "pub/sub hub fell behind; messages were lost");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let Some(listeners) = weak.upgrade() else {
                    return;
                };
                // Clone the callbacks out so none runs under the lock.
                let targets: Vec<Listener> = lock(&listeners)
                    .get(&message.topic)
                    .map(|v| v.iter().map(|(_, l)| Arc::clone(l)).collect())
                    .unwrap_or_default();
                for listener in targets {
                    listener(&message.payload);
                }
            }
        });
        Ok(hub)
    }

    /// Calls `listener` for every message on `topic` until [`Hub::unlisten`].
    pub async fn listen(&self, topic: &str, listener: Listener) -> Result<ListenerId, EngineError> {
        let _guard = self.changes.lock().await;
        let id = ListenerId(self.next.fetch_add(1, Ordering::Relaxed));
        let first = {
            let mut map = lock(&self.listeners);
            let entry = map.entry(topic.to_owned()).or_default();
            entry.push((id, listener));
            entry.len() == 1
        };
        if first && let Err(e) = self.control.subscribe(topic).await {
            lock(&self.listeners).remove(topic);
            return Err(e);
        }
        Ok(id)
    }

    /// Removes a listener; the topic is unsubscribed when its last listener goes.
    pub async fn unlisten(&self, topic: &str, id: ListenerId) -> Result<(), EngineError> {
        let _guard = self.changes.lock().await;
        let last = {
            let mut map = lock(&self.listeners);
            match map.get_mut(topic) {
                Some(v) => {
                    v.retain(|(i, _)| *i != id);
                    if v.is_empty() {
                        map.remove(topic);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if last {
            self.control.unsubscribe(topic).await?;
        }
        Ok(())
    }

    /// Topics with at least one listener.
    pub fn topics(&self) -> Vec<String> {
        lock(&self.listeners).keys().cloned().collect()
    }
}
