//! Presence requests parsed once at the edge — so the core never sees an invalid id or an
//! oversized batch — and the events presence publishes.

use loadlab_kit::Id;
use loadlab_kit::engine::PresenceChange;
use loadlab_proto::presence::v1::{HeartbeatRequest, PresenceEvent, State, UserChannels};
use prost::Message;

/// The pseudo-channel meaning "connected at all"; `Get` answers from it.
pub const CONNECTED: Id = Id(0);
/// Longest gateway id, in characters.
pub const MAX_GATEWAY_ID_CHARS: usize = 128;
/// Most entries in one heartbeat: every `(user, channel)` pair named in `online` and `offline`,
/// plus the implicit "connected" entry of each `online` user.
pub const MAX_HEARTBEAT_ENTRIES: usize = 10_000;
/// Most users in one `Get`.
pub const MAX_GET_USERS: usize = 10_000;

/// A request that breaks the contract; the message says which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// The id a gateway reports under: non-empty, at most [`MAX_GATEWAY_ID_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayId(String);

impl GatewayId {
    /// Checks a gateway id.
    pub fn parse(id: String) -> Result<GatewayId, InvalidInput> {
        if id.is_empty() {
            return Err(InvalidInput("gateway_id must not be empty".into()));
        }
        if id.chars().count() > MAX_GATEWAY_ID_CHARS {
            return Err(InvalidInput(format!(
                "gateway_id must be at most {MAX_GATEWAY_ID_CHARS} characters"
            )));
        }
        Ok(GatewayId(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A valid heartbeat: which entries a gateway refreshes and which it drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The reporting gateway.
    pub gateway: GatewayId,
    /// Entries to create or refresh, sorted, without duplicates.
    pub online: Vec<PresenceChange>,
    /// Entries to drop, sorted, without duplicates.
    pub offline: Vec<PresenceChange>,
}

impl Heartbeat {
    /// Parses a request.
    ///
    /// Every `online` user is also connected (channel 0) — a gateway only lists users it holds a
    /// connection for, so it never has to spell that out. `offline` drops exactly the channels
    /// listed: a user who leaves a channel stays connected, so a gateway reports a disconnect by
    /// listing channel 0 (with the channels the user was in). A pair listed in both is treated as
    /// offline: applying the online half first would only flash an ONLINE/OFFLINE pair to
    /// watchers.
    pub fn parse(request: HeartbeatRequest) -> Result<Heartbeat, InvalidInput> {
        let gateway = GatewayId::parse(request.gateway_id)?;
        // Count before expanding anything, so an oversized request costs no allocation.
        let entries = request
            .online
            .iter()
            .map(|u| 1 + u.channel_ids.len())
            .chain(request.offline.iter().map(|u| u.channel_ids.len()))
            .fold(0usize, usize::saturating_add);
        if entries > MAX_HEARTBEAT_ENTRIES {
            return Err(InvalidInput(format!(
                "a heartbeat may hold at most {MAX_HEARTBEAT_ENTRIES} entries (user/channel pairs, plus one per online user); got {entries}"
            )));
        }
        let mut online = expand(&request.online, "online", true)?;
        let mut offline = expand(&request.offline, "offline", false)?;
        online.sort_unstable();
        online.dedup();
        offline.sort_unstable();
        offline.dedup();
        online.retain(|pair| offline.binary_search(pair).is_err());
        Ok(Heartbeat {
            gateway,
            online,
            offline,
        })
    }
}

/// The `(channel, user)` pairs of `users`, with the "connected" pair of each user when asked.
fn expand(
    users: &[UserChannels],
    field: &str,
    connected: bool,
) -> Result<Vec<PresenceChange>, InvalidInput> {
    let mut pairs = Vec::new();
    for (i, entry) in users.iter().enumerate() {
        let user = user_id(entry.user_id, &format!("{field}[{i}].user_id"))?;
        if connected {
            pairs.push(PresenceChange {
                channel: CONNECTED,
                user,
            });
        }
        for &channel in &entry.channel_ids {
            pairs.push(PresenceChange {
                channel: channel_id(channel, &format!("{field}[{i}].channel_ids"))?,
                user,
            });
        }
    }
    Ok(pairs)
}

/// A user id: positive and within the 63 bits of a snowflake.
pub fn user_id(value: u64, field: &str) -> Result<Id, InvalidInput> {
    if value == 0 || value > i64::MAX as u64 {
        Err(InvalidInput(format!("{field} must be a positive id")))
    } else {
        Ok(Id(value))
    }
}

/// A channel id: like a user id, or 0 for "connected at all".
pub fn channel_id(value: u64, field: &str) -> Result<Id, InvalidInput> {
    if value > i64::MAX as u64 {
        Err(InvalidInput(format!(
            "{field} must be a channel id (0 for connected)"
        )))
    } else {
        Ok(Id(value))
    }
}

/// Checks the user ids of a `Get`.
pub fn get_users(ids: &[u64]) -> Result<Vec<Id>, InvalidInput> {
    if ids.len() > MAX_GET_USERS {
        return Err(InvalidInput(format!(
            "at most {MAX_GET_USERS} user_ids per call; got {}",
            ids.len()
        )));
    }
    ids.iter()
        .enumerate()
        .map(|(i, &id)| user_id(id, &format!("user_ids[{i}]")))
        .collect()
}

/// The pub/sub topic carrying `channel`'s events (each an encoded [`PresenceEvent`]).
pub fn topic(channel: Id) -> String {
    format!("presence:{}", channel.0)
}

/// The event reporting `change` as `state`.
pub fn event(change: PresenceChange, state: State, at_ms: i64, snapshot: bool) -> PresenceEvent {
    PresenceEvent {
        channel_id: change.channel.0,
        user_id: change.user.0,
        state: state as i32,
        at_ms,
        snapshot,
    }
}

/// `event` encoded for pub/sub.
pub fn encode(event: &PresenceEvent) -> bytes::Bytes {
    bytes::Bytes::from(event.encode_to_vec())
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc(channel: u64, user: u64) -> PresenceChange {
        PresenceChange {
            channel: Id(channel),
            user: Id(user),
        }
    }

    fn uc(user_id: u64, channel_ids: &[u64]) -> UserChannels {
        UserChannels {
            user_id,
            channel_ids: channel_ids.to_vec(),
        }
    }

    fn request(online: Vec<UserChannels>, offline: Vec<UserChannels>) -> HeartbeatRequest {
        HeartbeatRequest {
            gateway_id: "gw-1".into(),
            online,
            offline,
        }
    }

    #[test]
    fn online_users_are_connected_and_pairs_are_deduplicated() {
        let hb = Heartbeat::parse(request(
            vec![uc(2, &[7, 7, 0]), uc(1, &[7]), uc(2, &[8])],
            vec![],
        ))
        .expect("valid");
        assert_eq!(hb.gateway.as_str(), "gw-1");
        assert_eq!(
            hb.online,
            vec![pc(0, 1), pc(0, 2), pc(7, 1), pc(7, 2), pc(8, 2)]
        );
        assert!(hb.offline.is_empty());
    }

    #[test]
    fn offline_drops_exactly_the_listed_channels_and_wins_over_online() {
        let hb = Heartbeat::parse(request(
            vec![uc(1, &[7, 8]), uc(2, &[7])],
            vec![uc(1, &[8]), uc(3, &[0, 7]), uc(4, &[])],
        ))
        .expect("valid");
        assert_eq!(hb.online, vec![pc(0, 1), pc(0, 2), pc(7, 1), pc(7, 2)]);
        assert_eq!(hb.offline, vec![pc(0, 3), pc(7, 3), pc(8, 1)]);
    }

    #[test]
    fn bad_ids_and_gateways_are_refused_with_the_field() {
        let err = |r: HeartbeatRequest| Heartbeat::parse(r).expect_err("invalid").0;
        assert!(err(request(vec![uc(0, &[1])], vec![])).contains("online[0].user_id"));
        assert!(err(request(vec![], vec![uc(1, &[1]), uc(0, &[])])).contains("offline[1].user_id"));
        assert!(err(request(vec![uc(1, &[u64::MAX])], vec![])).contains("online[0].channel_ids"));
        let mut r = request(vec![], vec![]);
        r.gateway_id = String::new();
        assert!(err(r.clone()).contains("gateway_id"));
        r.gateway_id = "é".repeat(MAX_GATEWAY_ID_CHARS);
        Heartbeat::parse(r.clone()).expect("128 characters (more bytes) is fine");
        r.gateway_id.push('x');
        assert!(err(r).contains("gateway_id"));
    }

    #[test]
    fn entry_limit_counts_pairs_and_implicit_connections() {
        let users = |n: u64, channels: &[u64]| (1..=n).map(|u| uc(u, channels)).collect();
        let at_limit = MAX_HEARTBEAT_ENTRIES as u64;
        Heartbeat::parse(request(users(at_limit, &[]), vec![])).expect("at the limit");
        Heartbeat::parse(request(users(at_limit / 2, &[5]), vec![])).expect("at the limit");
        let err = Heartbeat::parse(request(users(at_limit / 2, &[5]), users(1, &[5])))
            .expect_err("over the limit");
        assert!(err.0.contains("at most 10000 entries"), "{err}");
        Heartbeat::parse(request(users(at_limit + 1, &[]), vec![])).expect_err("over the limit");
    }

    #[test]
    fn get_users_checks_count_and_ids() {
        assert_eq!(get_users(&[3, 1]).expect("valid"), vec![Id(3), Id(1)]);
        assert!(
            get_users(&[1, 0])
                .expect_err("zero")
                .0
                .contains("user_ids[1]")
        );
        assert!(get_users(&vec![1; MAX_GET_USERS + 1]).is_err());
    }

    #[test]
    fn events_round_trip_through_their_encoding() {
        let e = event(pc(7, 1), State::Offline, 1_700_000_000_000, false);
        let decoded = PresenceEvent::decode(encode(&e)).expect("decode");
        assert_eq!(decoded, e);
        assert_eq!(decoded.state(), State::Offline);
        assert_eq!(topic(Id(0)), "presence:0");
        assert_eq!(topic(Id(42)), "presence:42");
    }
}
