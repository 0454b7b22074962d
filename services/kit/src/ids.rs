//! Snowflake ids: 41 bits of milliseconds since [`EPOCH_UNIX_MS`], 10 bits of node, 12 bits of
//! sequence. They sort by creation time, fit in an `i64` (the top bit stays clear) and are unique
//! per node without coordination.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// 2024-01-01T00:00:00Z, in Unix milliseconds: the zero of the id clock.
pub const EPOCH_UNIX_MS: i64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
/// Largest node id (inclusive).
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
const MAX_MS: u64 = (1 << 41) - 1;

/// A 64-bit snowflake id. JSON carries it as a decimal string, because JavaScript numbers cannot
/// represent every 64-bit integer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Id(pub u64);

impl Id {
    /// Milliseconds since [`EPOCH_UNIX_MS`] encoded in the id.
    pub fn epoch_ms(self) -> u64 {
        self.0 >> (NODE_BITS + SEQ_BITS)
    }

    /// Unix milliseconds at which the id was minted.
    pub fn unix_ms(self) -> i64 {
        EPOCH_UNIX_MS + self.epoch_ms() as i64
    }

    /// The creation time encoded in the id.
    pub fn created_at(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.unix_ms())
            .single()
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }

    /// The node that minted the id.
    pub fn node(self) -> u16 {
        ((self.0 >> SEQ_BITS) & u64::from(MAX_NODE)) as u16
    }

    /// The smallest id that any node could mint at `unix_ms`: ids below it are older.
    pub fn lower_bound_at(unix_ms: i64) -> Id {
        let ms = (unix_ms - EPOCH_UNIX_MS).clamp(0, MAX_MS as i64) as u64;
        Id(ms << (NODE_BITS + SEQ_BITS))
    }

    /// The id as the signed integer stored in SQL `BIGINT` columns.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// An id read back from a SQL `BIGINT` column.
    pub fn from_i64(v: i64) -> Id {
        Id(v as u64)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.0)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Why a string is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an id (a positive decimal integer below 2^63)")]
pub struct ParseIdError(String);

impl FromStr for Id {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let digits_only = !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit());
        match trimmed.parse::<u64>() {
            Ok(v) if digits_only && v > 0 && v <= i64::MAX as u64 => Ok(Id(v)),
            _ => Err(ParseIdError(s.chars().take(40).collect())),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both the documented decimal string and a plain JSON integer.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Str(String),
            Num(u64),
        }
        match Repr::deserialize(d)? {
            Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
            Repr::Num(n) => format!("{n}").parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A source of Unix milliseconds. Injected so tests can make the clock go backwards.
pub trait Clock: Send + Sync {
    /// Current Unix time in milliseconds.
    fn now_unix_ms(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// Mints snowflake ids for one node. Lock-free; shareable across threads.
///
/// Invariant: every id is strictly greater than the previous one from the same generator. When
/// the clock stands still the sequence advances; when it overflows, or when the wall clock goes
/// backwards (NTP step, VM migration), the generator keeps counting on its own last millisecond
/// and borrows the next one, so ids never repeat and never go backwards.
pub struct Snowflake<C: Clock = SystemClock> {
    node: u64,
    clock: C,
    /// `(last_ms << SEQ_BITS) | seq`, where `last_ms` is relative to the epoch.
    state: AtomicU64,
}

impl<C: Clock> fmt::Debug for Snowflake<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snowflake")
            .field("node", &self.node)
            .finish()
    }
}

/// The node id is outside 0..=1023.
#[derive(Debug, Clone, thiserror::Error)]
#[error("node id {0} is out of range (0..={MAX_NODE})")]
pub struct NodeOutOfRange(pub u32);

impl Snowflake<SystemClock> {
    /// A generator for `node` on the wall clock.
    pub fn new(node: u16) -> Result<Self, NodeOutOfRange> {
        Self::with_clock(node, SystemClock)
    }
}

impl<C: Clock> Snowflake<C> {
    /// A generator for `node` on a given clock.
    pub fn with_clock(node: u16, clock: C) -> Result<Self, NodeOutOfRange> {
        if node > MAX_NODE {
            return Err(NodeOutOfRange(u32::from(node)));
        }
        Ok(Snowflake {
            node: u64::from(node),
            clock,
            state: AtomicU64::new(0),
        })
    }

    /// This generator's node id.
    pub fn node(&self) -> u16 {
        self.node as u16
    }

    /// The next id.
    pub fn next_id(&self) -> Id {
        let now = (self.clock.now_unix_ms() - EPOCH_UNIX_MS).clamp(0, MAX_MS as i64) as u64;
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let last = current >> SEQ_BITS;
            let seq = current & MAX_SEQ;
            let (ms, seq) = if now > last {
                (now, 0)
            } else if seq < MAX_SEQ {
                (last, seq + 1)
            } else {
                (last + 1, 0)
            };
            let next = (ms << SEQ_BITS) | seq;
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Id((ms << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | seq),
                Err(observed) => current = observed,
            }
        }
    }
}

/// Derives a node id when none is configured: the StatefulSet/Indexed-Job ordinal at the end of
/// the host name (`feed-3` → 3) if there is one, otherwise a hash of host name and process id.
/// Replicas of one service should set `--node-id` explicitly when they are not ordinal-named.
pub fn default_node_id(hostname: &str, pid: u32) -> u16 {
    if let Some((_, suffix)) = hostname.rsplit_once('-')
        && let Ok(ordinal) = suffix.parse::<u32>()
    {
        return (ordinal % (u32::from(MAX_NODE) + 1)) as u16;
    }
    // FNV-1a: stable across builds, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in hostname.bytes().chain(pid.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % (u64::from(MAX_NODE) + 1)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::Mutex;

    /// A clock that replays a script of readings, then repeats the last one.
    struct ScriptedClock {
        readings: Mutex<(Vec<i64>, usize)>,
    }

    impl Clock for ScriptedClock {
        fn now_unix_ms(&self) -> i64 {
            let mut guard = self.readings.lock().expect("clock lock");
            let (readings, pos) = &mut *guard;
            let i = (*pos).min(readings.len() - 1);
            *pos += 1;
            readings[i]
        }
    }

    #[test]
    fn id_fields_round_trip() {
        let clock = ScriptedClock {
            readings: Mutex::new((vec![EPOCH_UNIX_MS + 1_000], 0)),
        };
        let ids_gen = Snowflake::with_clock(7, clock).expect("node");
        let id = ids_gen.next_id();
        assert_eq!(id.unix_ms(), EPOCH_UNIX_MS + 1_000);
        assert_eq!(id.node(), 7);
        assert_eq!(id.0 & MAX_SEQ, 0);
        assert!(id.as_i64() > 0);
        assert!(Id::lower_bound_at(EPOCH_UNIX_MS + 1_000) <= id);
        assert!(Id::lower_bound_at(EPOCH_UNIX_MS + 1_001) > id);
    }

    #[test]
    fn node_out_of_range_is_rejected() {
        assert!(Snowflake::new(MAX_NODE).is_ok());
        assert!(Snowflake::new(MAX_NODE + 1).is_err());
    }

    #[test]
    fn sequence_overflow_borrows_the_next_millisecond() {
        let clock = ScriptedClock {
            readings: Mutex::new((vec![EPOCH_UNIX_MS + 5], 0)),
        };
        let ids_gen = Snowflake::with_clock(1, clock).expect("node");
        let ids: Vec<Id> = (0..=MAX_SEQ + 1).map(|_| ids_gen.next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids[MAX_SEQ as usize].epoch_ms(), 5);
        assert_eq!(ids[MAX_SEQ as usize + 1].epoch_ms(), 6);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert_eq!("42".parse::<Id>(), Ok(Id(42)));
        for bad in [
            "",
            "0",
            "-1",
            "+5",
            "1e3",
            "abc",
            "18446744073709551615",
            " ",
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn json_is_a_decimal_string() {
        let json = serde_json::to_string(&Id(1234567890123456789)).expect("ser");
        assert_eq!(json, "\"1234567890123456789\"");
        let back: Id = serde_json::from_str(&json).expect("de");
        assert_eq!(back, Id(1234567890123456789));
        let from_number: Id = serde_json::from_str("17").expect("de number");
        assert_eq!(from_number, Id(17));
        assert!(serde_json::from_str::<Id>("\"x\"").is_err());
    }

    #[test]
    fn default_node_id_uses_the_ordinal() {
        assert_eq!(default_node_id("feed-3", 1), 3);
        assert_eq!(default_node_id("loadtest-worker-1029", 1), 5);
        let a = default_node_id("feed-7d9f8c-abcde", 100);
        assert_eq!(a, default_node_id("feed-7d9f8c-abcde", 100));
        assert!(a <= MAX_NODE);
    }

    proptest! {
        // Any clock behaviour — standing still, jumping forward, going backwards — yields strictly
        // increasing ids.
        #[test]
        fn monotonic_under_any_clock(steps in proptest::collection::vec(-5_000i64..5_000, 1..400)) {
            let mut t = EPOCH_UNIX_MS + 10_000_000;
            let readings: Vec<i64> = steps.iter().map(|d| { t += d; t }).collect();
            let ids_gen = Snowflake::with_clock(3, ScriptedClock { readings: Mutex::new((readings, 0)) })
                .expect("node");
            let mut prev = Id(0);
            for _ in 0..steps.len() * 3 {
                let id = ids_gen.next_id();
                prop_assert!(id > prev, "{:?} after {:?}", id, prev);
                prop_assert_eq!(id.node(), 3);
                prev = id;
            }
        }

        // Many threads share one generator: all ids are unique and each thread sees them increase.
        #[test]
        fn unique_and_monotonic_under_concurrency(threads in 2usize..8, per_thread in 100usize..2_000) {
            let ids_gen = Arc::new(Snowflake::new(9).expect("node"));
            let handles: Vec<_> = (0..threads).map(|_| {
                let ids_gen = Arc::clone(&ids_gen);
                std::thread::spawn(move || (0..per_thread).map(|_| ids_gen.next_id()).collect::<Vec<_>>())
            }).collect();
            let mut all = HashSet::new();
            for h in handles {
                let ids = h.join().expect("thread");
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]));
                for id in ids {
                    prop_assert!(all.insert(id), "duplicate {:?}", id);
                }
            }
            prop_assert_eq!(all.len(), threads * per_thread);
        }
    }
}
