//! `loadlab.presence.v1.PresenceService`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use loadlab_proto::presence::v1::presence_service_server::PresenceService;
use loadlab_proto::presence::v1::{
    GetRequest, GetResponse, HeartbeatRequest, HeartbeatResponse, PresenceEvent, UserState,
    WatchChannelRequest,
};
use tonic::{Request, Response, Status};

use crate::domain::{self, Heartbeat};
use crate::error::PresenceError;
use crate::tracker::Tracker;
use crate::watch::Watchers;

/// The gRPC service.
#[derive(Clone)]
pub struct PresenceGrpc {
    tracker: Tracker,
    watchers: Watchers,
}

impl PresenceGrpc {
    /// A service over `tracker` (heartbeats, queries) and `watchers` (streams).
    pub fn new(tracker: Tracker, watchers: Watchers) -> Self {
        PresenceGrpc { tracker, watchers }
    }
}

impl From<PresenceError> for Status {
    fn from(e: PresenceError) -> Self {
        match e {
            PresenceError::Invalid(e) => Status::invalid_argument(e.0),
            PresenceError::Engine(e) => Status::unavailable(format!("engine: {e}")),
            e @ PresenceError::WatchRegistration(_) => Status::internal(e.to_string()),
            e @ PresenceError::WatcherTooSlow { .. } => Status::resource_exhausted(e.to_string()),
            // UNAVAILABLE tells clients to retry, which is what a watcher should do elsewhere.
            e @ PresenceError::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

fn invalid(e: domain::InvalidInput) -> Status {
    PresenceError::from(e).into()
}

fn failed(e: impl Into<PresenceError>) -> Status {
    e.into().into()
}

#[tonic::async_trait]
impl PresenceService for PresenceGrpc {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let heartbeat = Heartbeat::parse(request.into_inner()).map_err(invalid)?;
        let changes = self.tracker.heartbeat(&heartbeat).await.map_err(failed)?;
        Ok(Response::new(HeartbeatResponse { changes }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let users = domain::get_users(&request.into_inner().user_ids).map_err(invalid)?;
        let online = self.tracker.online(&users).await.map_err(failed)?;
        Ok(Response::new(GetResponse {
            users: users
                .iter()
                .zip(online)
                .map(|(user, online)| UserState {
                    user_id: user.0,
                    online,
                })
                .collect(),
        }))
    }

    type WatchChannelStream =
        Pin<Box<dyn Stream<Item = Result<PresenceEvent, Status>> + Send + 'static>>;

    async fn watch_channel(
        &self,
        request: Request<WatchChannelRequest>,
    ) -> Result<Response<Self::WatchChannelStream>, Status> {
        let channel =
            domain::channel_id(request.into_inner().channel_id, "channel_id").map_err(invalid)?;
        let stream = self.watchers.watch(channel).await.map_err(failed)?;
        Ok(Response::new(Box::pin(
            stream.map(|r| r.map_err(Status::from)),
        )))
    }
}
