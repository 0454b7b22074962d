//! The gateway's side of presence: it reports its connected users (and the channels each has
//! joined) to the presence service — a full heartbeat every `--heartbeat-interval`, and the
//! changes at once — and relays each joined channel's presence events to its local members.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument as _;

use loadlab_kit::grpc::TracedChannel;
use loadlab_kit::{Id, Shutdown};
use loadlab_proto::presence::v1::presence_service_client::PresenceServiceClient;
use loadlab_proto::presence::v1::{HeartbeatRequest, State, UserChannels, WatchChannelRequest};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::protocol::ServerFrame;
use crate::rooms::Rooms;

/// Channel 0 stands for "connected at all".
const CONNECTED: Id = Id(0);

#[derive(Default)]
struct State_ {
    /// user → channel → local connections (channel 0: connections of the user).
    refs: HashMap<Id, HashMap<Id, u32>>,
    /// Changes not yet reported: (user, channel) → online?
    changes: BTreeMap<(Id, Id), bool>,
    /// Presence relays per channel.
    relays: HashMap<Id, JoinHandle<()>>,
}

/// Presence bookkeeping and the link to the presence service.
pub struct PresenceLink {
    client: PresenceServiceClient<TracedChannel>,
    gateway_id: String,
    state: Mutex<State_>,
    changed: Notify,
}

fn lock(m: &Mutex<State_>) -> std::sync::MutexGuard<'_, State_> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PresenceLink {
    /// A link reporting as `gateway_id`.
    pub fn new(
        client: PresenceServiceClient<TracedChannel>,
        gateway_id: String,
    ) -> Arc<PresenceLink> {
        Arc::new(PresenceLink {
            client,
            gateway_id,
            state: Mutex::default(),
            changed: Notify::new(),
        })
    }

    fn adjust(&self, user: Id, channel: Id, delta: i32) {
        let mut s = lock(&self.state);
        let per_user = s.refs.entry(user).or_default();
        let n = per_user.entry(channel).or_default();
        let before = *n;
        *n = if delta > 0 {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        let after = *n;
        if after == 0 {
            per_user.remove(&channel);
            if per_user.is_empty() {
                s.refs.remove(&user);
            }
        }
        if (before == 0) != (after == 0) {
            s.changes.insert((user, channel), after > 0);
            drop(s);
            self.changed.notify_one();
        }
    }

    /// A connection of `user` opened.
    pub fn connected(&self, user: Id) {
        self.adjust(user, CONNECTED, 1);
    }

    /// A connection of `user` closed.
    pub fn disconnected(&self, user: Id) {
        self.adjust(user, CONNECTED, -1);
    }

    /// A connection of `user` joined `channel`.
    pub fn joined(&self, user: Id, channel: Id) {
        self.adjust(user, channel, 1);
    }

    /// A connection of `user` left `channel`.
    pub fn left(&self, user: Id, channel: Id) {
        self.adjust(user, channel, -1);
    }

    fn full_report(&self) -> Vec<UserChannels> {
        lock(&self.state)
            .refs
            .iter()
            .map(|(user, channels)| UserChannels {
                user_id: user.0,
                channel_ids: channels.keys().map(|c| c.0).collect(),
            })
            .collect()
    }

    fn take_changes(&self) -> (Vec<UserChannels>, Vec<UserChannels>) {
        let changes = std::mem::take(&mut lock(&self.state).changes);
        let (mut online, mut offline): (BTreeMap<Id, Vec<u64>>, BTreeMap<Id, Vec<u64>>) =
            Default::default();
        for ((user, channel), is_online) in changes {
            let side = if is_online { &mut online } else { &mut offline };
            side.entry(user).or_default().push(channel.0);
        }
        let collect = |m: BTreeMap<Id, Vec<u64>>| {
            m.into_iter()
                .map(|(u, c)| UserChannels {
                    user_id: u.0,
                    channel_ids: c,
                })
                .collect()
        };
        (collect(online), collect(offline))
    }

    async fn send(
        &self,
        online: Vec<UserChannels>,
        offline: Vec<UserChannels>,
    ) -> Result<(), tonic::Status> {
        if online.is_empty() && offline.is_empty() {
            return Ok(());
        }
        // Each report is a trace of its own: gateway span → gRPC client → presence server.
        let span = tracing::info_span!(
            "presence.heartbeat",
            presence.gateway_id = %self.gateway_id,
            presence.online = online.len(),
            presence.offline = offline.len(),
        );
        let mut client = self.client.clone();
        client
            .heartbeat(HeartbeatRequest {
                gateway_id: self.gateway_id.clone(),
                online,
                offline,
            })
            .instrument(span)
            .await
            .map(|_| ())
    }

    /// Reports changes as they happen (coalesced over a few milliseconds) and everything every
    /// `interval`, until `shutdown`; then reports every local user offline.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (online, offline) = self.take_changes();
                    let mut all = self.full_report();
                    all.extend(online);
                    if let Err(e) = self.send(all, offline).await {
                        tracing::warn!(error = %e, "presence heartbeat failed; retrying next interval");
                    }
                }
                () = self.changed.notified() => {
                    // Coalesce a burst of joins/leaves into one call.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let (online, offline) = self.take_changes();
                    if let Err(e) = self.send(online.clone(), offline.clone()).await {
                        tracing::debug!(error = %e, "presence update failed; the next heartbeat repeats it");
                        // Offline changes must not be lost: requeue them (online ones are in
                        // the next full heartbeat anyway).
                        let mut s = lock(&self.state);
                        for uc in offline {
                            for c in uc.channel_ids {
                                s.changes.entry((Id(uc.user_id), Id(c))).or_insert(false);
                            }
                        }
                    }
                }
                () = shutdown.wait() => break,
            }
        }
        // Goodbye: everyone this gateway reported goes offline now, not after the TTL.
        let everyone = self.full_report();
        let (_, offline) = self.take_changes();
        let mut gone = everyone;
        gone.extend(offline);
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), self.send(Vec::new(), gone))
            .await
            .unwrap_or(Ok(()))
        {
            tracing::warn!(error = %e, "presence goodbye failed; users go offline when their TTL runs out");
        }
        for (_, relay) in lock(&self.state).relays.drain() {
            relay.abort();
        }
    }

    /// Starts relaying `channel`'s presence events to its local members.
    pub fn watch(self: &Arc<Self>, channel: Id, rooms: Arc<Rooms>) {
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while rooms.has(channel) {
                let mut c = client.clone();
                match c
                    .watch_channel(WatchChannelRequest {
                        channel_id: channel.0,
                    })
                    .await
                {
                    Ok(stream) => {
                        backoff = Duration::from_millis(100);
                        let mut stream = stream.into_inner();
                        while let Ok(Some(event)) = stream.message().await {
                            let online = event.state == State::Online as i32;
                            let user = Id(event.user_id);
                            rooms.set_online(channel, user, online);
                            let state = if online { "online" } else { "offline" };
                            rooms.broadcast(
                                channel,
                                &ServerFrame::Presence {
                                    channel,
                                    user,
                                    state,
                                }
                                .to_json(),
                            );
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%channel, error = %e, "presence watch failed; retrying")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        if let Some(old) = lock(&self.state).relays.insert(channel, task) {
            old.abort();
        }
    }

    /// Stops relaying `channel`.
    pub fn unwatch(&self, channel: Id) {
        if let Some(task) = lock(&self.state).relays.remove(&channel) {
            task.abort();
        }
    }
}
