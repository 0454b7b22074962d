//! `loadlab.feed.v1.FeedService`: the feed's internal API for the timeline service and tools.

use loadlab_kit::Id;
use loadlab_proto::feed::v1::feed_service_server::FeedService;
use loadlab_proto::feed::v1::{
    CreatePostRequest, CreatePostResponse, FollowRequest, FollowResponse, GetPostsRequest,
    GetPostsResponse, ListFollowersRequest, ListFollowersResponse, ListFollowingRequest,
    ListFollowingResponse, ListPostsByAuthorsRequest, ListPostsByAuthorsResponse, UnfollowRequest,
    UnfollowResponse,
};
use tonic::{Request, Response, Status};

use crate::domain::PostBody;
use crate::store::{FeedStore, StoreError};

/// Largest batch of ids in one `GetPosts`.
pub const MAX_GET_POSTS: usize = 1_000;
/// Largest page of followers/following.
pub const MAX_PAGE: u32 = 10_000;
const DEFAULT_PAGE: u32 = 1_000;
/// Largest page of `ListPostsByAuthors`.
pub const MAX_POSTS_PAGE: u32 = 5_000;
/// Most authors in one `ListPostsByAuthors`.
pub const MAX_AUTHORS: usize = 1_000;

/// The gRPC service.
#[derive(Clone)]
pub struct FeedGrpc {
    store: FeedStore,
    max_post_chars: usize,
}

impl FeedGrpc {
    /// A service over `store`.
    pub fn new(store: FeedStore, max_post_chars: usize) -> Self {
        FeedGrpc {
            store,
            max_post_chars,
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        if let Some(reason) = e.unavailable() {
            return Status::unavailable(format!("database unavailable: {reason}"));
        }
        match e {
            StoreError::UserNotFound(id) => Status::not_found(format!("user {id} not found")),
            StoreError::HandleTaken(h) => Status::already_exists(format!("handle {h:?} is taken")),
            StoreError::SelfFollow => Status::invalid_argument("a user cannot follow themselves"),
            StoreError::Db(e) => {
                tracing::error!(error = %e, "database error");
                Status::internal("database error")
            }
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

fn page_limit(limit: u32, max: u32) -> Result<u64, Status> {
    match limit {
        0 => Ok(u64::from(DEFAULT_PAGE.min(max))),
        n if n <= max => Ok(u64::from(n)),
        n => Err(Status::invalid_argument(format!("limit {n} exceeds {max}"))),
    }
}

#[tonic::async_trait]
impl FeedService for FeedGrpc {
    async fn create_post(
        &self,
        request: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostResponse>, Status> {
        let r = request.into_inner();
        let author = id(r.author_id, "author_id")?;
        let body = PostBody::parse(&r.body, self.max_post_chars)
            .map_err(|e| Status::invalid_argument(e.message))?;
        let post = self.store.create_post(author, body).await?;
        Ok(Response::new(CreatePostResponse { post: Some(post) }))
    }

    async fn get_posts(
        &self,
        request: Request<GetPostsRequest>,
    ) -> Result<Response<GetPostsResponse>, Status> {
        let r = request.into_inner();
        if r.ids.len() > MAX_GET_POSTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_GET_POSTS} ids per call"
            )));
        }
        let ids: Vec<Id> = r.ids.into_iter().map(Id).collect();
        let posts = self.store.posts(&ids).await?;
        Ok(Response::new(GetPostsResponse { posts }))
    }

    async fn follow(
        &self,
        request: Request<FollowRequest>,
    ) -> Result<Response<FollowResponse>, Status> {
        let r = request.into_inner();
        let change = self
            .store
            .follow(
                id(r.follower_id, "follower_id")?,
                id(r.followee_id, "followee_id")?,
            )
            .await?;
        Ok(Response::new(FollowResponse {
            created: change.changed,
        }))
    }

    async fn unfollow(
        &self,
        request: Request<UnfollowRequest>,
    ) -> Result<Response<UnfollowResponse>, Status> {
        let r = request.into_inner();
        let change = self
            .store
            .unfollow(
                id(r.follower_id, "follower_id")?,
                id(r.followee_id, "followee_id")?,
            )
            .await?;
        Ok(Response::new(UnfollowResponse {
            removed: change.changed,
        }))
    }

    async fn list_followers(
        &self,
        request: Request<ListFollowersRequest>,
    ) -> Result<Response<ListFollowersResponse>, Status> {
        let r = request.into_inner();
        let user = id(r.user_id, "user_id")?;
        let limit = page_limit(r.limit, MAX_PAGE)?;
        let (ids, next) = self.store.followers_page(user, Id(r.after), limit).await?;
        Ok(Response::new(ListFollowersResponse {
            follower_ids: ids.into_iter().map(|i| i.0).collect(),
            next_after: next.map_or(0, |n| n.0),
        }))
    }

    async fn list_following(
        &self,
        request: Request<ListFollowingRequest>,
    ) -> Result<Response<ListFollowingResponse>, Status> {
        let r = request.into_inner();
        let user = id(r.user_id, "user_id")?;
        let limit = page_limit(r.limit, MAX_PAGE)?;
        if r.after == 0 {
            // First page: an unknown user is an error rather than an empty graph.
            self.store.user(user).await?;
        }
        let (ids, next) = self
            .store
            .following_page(user, Id(r.after), limit, r.celebrities_only)
            .await?;
        Ok(Response::new(ListFollowingResponse {
            followee_ids: ids.into_iter().map(|i| i.0).collect(),
            next_after: next.map_or(0, |n| n.0),
        }))
    }

    async fn list_posts_by_authors(
        &self,
        request: Request<ListPostsByAuthorsRequest>,
    ) -> Result<Response<ListPostsByAuthorsResponse>, Status> {
        let r = request.into_inner();
        if r.author_ids.len() > MAX_AUTHORS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AUTHORS} authors per call"
            )));
        }
        let limit = page_limit(r.limit, MAX_POSTS_PAGE)?;
        let authors: Vec<Id> = r.author_ids.into_iter().map(Id).collect();
        let before = (r.before != 0).then_some(Id(r.before));
        let posts = self.store.posts_by_authors(&authors, before, limit).await?;
        Ok(Response::new(ListPostsByAuthorsResponse { posts }))
    }
}
