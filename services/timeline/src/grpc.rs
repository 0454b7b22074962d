//! `loadlab.timeline.v1.TimelineService`.

use loadlab_kit::Id;
use loadlab_proto::timeline::v1::timeline_service_server::TimelineService;
use loadlab_proto::timeline::v1::{
    AppendRequest, AppendResponse, GetRequest, GetResponse, RebuildRequest, RebuildResponse,
};
use tonic::{Request, Response, Status};

use crate::timelines::{TimelineError, Timelines};

/// Largest page of `Get`.
pub const MAX_PAGE: u32 = 100;
/// Page size when `limit` is 0.
pub const DEFAULT_PAGE: u32 = 20;
/// Most users in one `Append`.
pub const MAX_APPEND_USERS: usize = 10_000;

/// The gRPC service.
#[derive(Clone)]
pub struct TimelineGrpc {
    timelines: Timelines,
}

impl TimelineGrpc {
    /// A service over `timelines`.
    pub fn new(timelines: Timelines) -> Self {
        TimelineGrpc { timelines }
    }
}

impl From<TimelineError> for Status {
    fn from(e: TimelineError) -> Self {
        match e {
            TimelineError::Engine(e) => Status::unavailable(format!("engine: {e}")),
            // Keep the feed's code (NotFound for unknown users, Unavailable when it is down).
            TimelineError::Feed(s) => Status::new(s.code(), format!("feed: {}", s.message())),
        }
    }
}

fn id(v: u64, field: &str) -> Result<Id, Status> {
    if v == 0 || v > i64::MAX as u64 {
        Err(Status::invalid_argument(format!(
            "{field} must be a positive id"
        )))
    } else {
        Ok(Id(v))
    }
}

#[tonic::async_trait]
impl TimelineService for TimelineGrpc {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let r = request.into_inner();
        let post = id(r.post_id, "post_id")?;
        let author = id(r.author_id, "author_id")?;
        if r.user_ids.len() > MAX_APPEND_USERS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_APPEND_USERS} user_ids per call"
            )));
        }
        let users = r
            .user_ids
            .into_iter()
            .map(|u| id(u, "user_ids"))
            .collect::<Result<Vec<_>, _>>()?;
        let appended = self
            .timelines
            .append(post, author, &users, r.include_author)
            .await?;
        Ok(Response::new(AppendResponse { appended }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = request.into_inner();
        let user = id(r.user_id, "user_id")?;
        let limit = match r.limit {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} exceeds {MAX_PAGE}"
                )));
            }
        };
        let before = (r.before != 0).then_some(Id(r.before));
        let page = self.timelines.get(user, limit as usize, before).await?;
        Ok(Response::new(GetResponse {
            posts: page.posts,
            next_before: page.next_before.map_or(0, |b| b.0),
        }))
    }

    async fn rebuild(
        &self,
        request: Request<RebuildRequest>,
    ) -> Result<Response<RebuildResponse>, Status> {
        let user = id(request.into_inner().user_id, "user_id")?;
        let ids = self.timelines.rebuild(user).await?;
        Ok(Response::new(RebuildResponse {
            entries: ids.len() as u32,
        }))
    }
}
