//! The coordinator's gRPC face: `Clock`, `Register` (the guard against bad peers) and
//! `Session` (each worker's stream, forwarded to the run loop as [`Event`]s).
//!
//! Registration rules, each with its own status so a misconfigured worker says exactly what is
//! wrong: a version other than the coordinator's is FAILED_PRECONDITION naming both (reports
//! are merged field by field, so mixed versions could silently mis-add); a run name other than
//! the coordinator's is FAILED_PRECONDITION; a worker count other than the run's, or an index
//! outside it, is INVALID_ARGUMENT; an index someone else holds is ALREADY_EXISTS. Before the
//! start a worker whose session ended gives its index back (so a restarted pod can take it);
//! after the start an index is never given out again.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use loadlab_proto::runner::v1 as pb;
use pb::coordinator_server::Coordinator as CoordinatorRpc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// What the sessions tell the run loop.
pub(crate) enum Event {
    /// Worker `index`'s session is open; `tx` reaches it.
    Connected {
        index: u32,
        tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    },
    /// A message from worker `index`.
    Message {
        index: u32,
        // Boxed: reports are far larger than the other events.
        kind: Box<pb::worker_message::Kind>,
    },
    /// Worker `index`'s stream ended (closed or broken).
    Ended { index: u32, reason: String },
    /// Worker `index`'s process exited (local runs watch their children).
    Exited { index: u32, reason: String },
}

/// When each worker was last heard from, stamped as its messages arrive — not when the run loop
/// gets to them, so a coordinator busy merging a backlog does not mistake its queue for a
/// silent worker.
#[derive(Debug)]
pub(crate) struct Liveness {
    base: Instant,
    heard_ms: Vec<AtomicU64>,
}

impl Liveness {
    fn new(total: u32) -> Liveness {
        Liveness {
            base: Instant::now(),
            heard_ms: (0..total).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn touch(&self, index: u32) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(h) = self.heard_ms.get(index as usize) {
            h.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// How long worker `index` has been silent (since the coordinator started, if never heard).
    pub(crate) fn silent_for(&self, index: u32) -> Duration {
        let heard = self
            .heard_ms
            .get(index as usize)
            .map_or(0, |h| h.load(Ordering::Relaxed));
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(heard))
    }
}

/// A registration that did not open its session within this long gives its index back.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Seat {
    Free,
    Registered {
        session: u64,
        host: String,
        at: Instant,
    },
    Connected {
        host: String,
    },
}

/// Who holds which index.
#[derive(Debug)]
pub(crate) struct Roster {
    seats: Vec<Seat>,
    /// The start is scheduled: indexes are no longer given back.
    sealed: bool,
}

impl Roster {
    fn new(total: u32) -> Roster {
        Roster {
            seats: vec![Seat::Free; total as usize],
            sealed: false,
        }
    }

    /// Gives `index` back after its session ended before the start; false once sealed.
    pub(crate) fn release(&mut self, index: u32) -> bool {
        if self.sealed {
            return false;
        }
        if let Some(seat) = self.seats.get_mut(index as usize) {
            *seat = Seat::Free;
        }
        true
    }

    /// From now on indexes stay taken.
    pub(crate) fn seal(&mut self) {
        self.sealed = true;
    }

    /// The host a worker registered from.
    pub(crate) fn host(&self, index: u32) -> String {
        match self.seats.get(index as usize) {
            Some(Seat::Registered { host, .. } | Seat::Connected { host }) => host.clone(),
            _ => String::new(),
        }
    }
}

/// The coordinator service.
pub(crate) struct Service {
    pub(crate) run: String,
    pub(crate) total: u32,
    pub(crate) version: String,
    /// Per index: the spec JSON with that worker's executor share, and its shard.
    pub(crate) plans: Arc<Vec<(String, pb::Shard)>>,
    pub(crate) roster: Arc<Mutex<Roster>>,
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) events: mpsc::Sender<Event>,
}

impl Service {
    /// A service for `total` workers of `run`.
    pub(crate) fn new(
        run: String,
        total: u32,
        plans: Vec<(String, pb::Shard)>,
        events: mpsc::Sender<Event>,
    ) -> Service {
        Service {
            run,
            total,
            version: super::VERSION.to_owned(),
            plans: Arc::new(plans),
            roster: Arc::new(Mutex::new(Roster::new(total))),
            liveness: Arc::new(Liveness::new(total)),
            events,
        }
    }

    fn check(&self, r: &pb::RegisterRequest) -> Result<(), Status> {
        if r.version != self.version {
            return Err(Status::failed_precondition(format!(
                "worker version {:?} does not match coordinator version {:?}: run the same loadlab build everywhere",
                r.version, self.version
            )));
        }
        if !r.run.is_empty() && r.run != self.run {
            return Err(Status::failed_precondition(format!(
                "worker is for run {:?}, this coordinator runs {:?}",
                r.run, self.run
            )));
        }
        if r.total != self.total {
            return Err(Status::invalid_argument(format!(
                "worker was told the run has {} workers, it has {}",
                r.total, self.total
            )));
        }
        if r.index >= self.total {
            return Err(Status::invalid_argument(format!(
                "worker index {} is out of range: the run has workers 0..{}",
                r.index,
                self.total - 1
            )));
        }
        Ok(())
    }
}

fn lock(m: &Mutex<Roster>) -> std::sync::MutexGuard<'_, Roster> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unix nanoseconds now.
pub(crate) fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

type SessionStream =
    Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn clock(
        &self,
        _request: Request<pb::ClockRequest>,
    ) -> Result<Response<pb::ClockResponse>, Status> {
        Ok(Response::new(pb::ClockResponse {
            now_unix_nanos: unix_nanos(SystemTime::now()),
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let r = request.into_inner();
        if let Err(status) = self.check(&r) {
            tracing::warn!(index = r.index, %peer, reason = status.message(), "registration refused");
            return Err(status);
        }
        let host = if r.host.is_empty() {
            peer
        } else {
            format!("{} ({peer})", r.host)
        };
        let session = rand::random::<u64>() | 1;
        {
            let mut roster = lock(&self.roster);
            let Some(seat) = roster.seats.get_mut(r.index as usize) else {
                return Err(Status::invalid_argument("worker index out of range"));
            };
            match seat {
                Seat::Free => {}
                // A registration that never opened its session (its process died in between)
                // does not keep the index from a replacement.
                Seat::Registered { at, .. } if at.elapsed() > HELLO_TIMEOUT => {}
                Seat::Registered { host: holder, .. } | Seat::Connected { host: holder } => {
                    let holder = holder.clone();
                    tracing::warn!(index = r.index, %host, %holder, "duplicate worker index refused");
                    return Err(Status::already_exists(format!(
                        "worker index {} is already registered (by {holder})",
                        r.index
                    )));
                }
            }
            *seat = Seat::Registered {
                session,
                host: host.clone(),
                at: Instant::now(),
            };
        }
        let (spec_json, shard) = self
            .plans
            .get(r.index as usize)
            .cloned()
            .ok_or_else(|| Status::invalid_argument("worker index out of range"))?;
        tracing::debug!(index = r.index, %host, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            run: self.run.clone(),
            session,
            shard: Some(shard),
            spec_json,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let Some(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "a session starts with Hello {index, session}",
            ));
        };
        let index = hello.index;
        {
            let mut roster = lock(&self.roster);
            let Some(seat) = roster.seats.get_mut(index as usize) else {
                return Err(Status::invalid_argument(format!(
                    "worker index {index} is out of range"
                )));
            };
            match seat.clone() {
                Seat::Registered { session, host, .. } if session == hello.session => {
                    *seat = Seat::Connected { host };
                }
                Seat::Registered { .. } => {
                    return Err(Status::permission_denied(format!(
                        "worker {index}: session does not match its registration"
                    )));
                }
                Seat::Connected { .. } => {
                    return Err(Status::already_exists(format!(
                        "worker {index} already has a session"
                    )));
                }
                Seat::Free => {
                    return Err(Status::failed_precondition(format!(
                        "worker {index} is not registered: call Register first"
                    )));
                }
            }
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        if self
            .events
            .send(Event::Connected { index, tx })
            .await
            .is_err()
        {
            return Err(Status::unavailable("the run is over"));
        }
        let events = self.events.clone();
        let liveness = self.liveness.clone();
        liveness.touch(index);
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(pb::WorkerMessage { kind: Some(kind) })) => {
                        liveness.touch(index);
                        if events
                            .send(Event::Message {
                                index,
                                kind: Box::new(kind),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(_)) => break "sent an empty message".to_owned(),
                    Ok(None) => break "closed its stream".to_owned(),
                    Err(status) => break format!("stream broke: {}", status.message()),
                }
            };
            let _ = events.send(Event::Ended { index, reason }).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Messages queued towards one worker before it counts as not reading (heartbeats, a stop).
pub(crate) const OUTBOUND_CAPACITY: usize = 32;
