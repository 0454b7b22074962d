//! The feed's source of truth: users, the follow graph and posts in the database, plus the
//! hand-off of new posts to the fan-out queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use loadlab_kit::db::entity::{follow, post, user};
use loadlab_kit::engine::{Engine, EngineError, FanoutJob, TimelineKey};
use loadlab_kit::{Id, Snowflake};
use loadlab_proto::feed::v1::Post;
use prost::Message;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseConnection, DbErr, EntityTrait, JoinType,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, RelationDef, Set, SqlErr,
    TransactionTrait,
};

use crate::domain::{Handle, PostBody};

/// Longest a post's acknowledgement waits for the queue and cache hand-off.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(1);

/// What can go wrong in the store. Mapped to HTTP in `http.rs` and to gRPC in `grpc.rs`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A referenced user does not exist.
    #[error("user {0} not found")]
    UserNotFound(Id),
    /// The handle is taken.
    #[error("handle {0:?} is taken")]
    HandleTaken(String),
    /// A user tried to follow themselves.
    #[error("a user cannot follow themselves")]
    SelfFollow,
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

impl StoreError {
    /// The reason, when the failure is the database being unreachable (answered 503, not 500).
    pub fn unavailable(&self) -> Option<String> {
        use sea_orm::RuntimeErr;
        use sea_orm::sqlx::Error as Sqlx;
        match self {
            StoreError::Db(DbErr::Conn(e)) => Some(e.to_string()),
            StoreError::Db(DbErr::ConnectionAcquire(e)) => Some(e.to_string()),
            // A pooled connection that died with its server fails its next statement with an
            // I/O error rather than a connection error.
            StoreError::Db(
                DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)),
            ) if matches!(
                e.as_ref(),
                Sqlx::Io(_)
                    | Sqlx::PoolTimedOut
                    | Sqlx::PoolClosed
                    | Sqlx::WorkerCrashed
                    | Sqlx::Protocol(_)
            ) =>
            {
                Some(e.to_string())
            }
            _ => None,
        }
    }
}

/// A user as the API shows it.
#[derive(Debug, Clone)]
pub struct UserView {
    /// Id.
    pub id: Id,
    /// Handle.
    pub handle: String,
    /// Followers.
    pub follower_count: i64,
    /// Following.
    pub following_count: i64,
}

impl From<user::Model> for UserView {
    fn from(m: user::Model) -> Self {
        UserView {
            id: Id::from_i64(m.id),
            handle: m.handle,
            follower_count: m.follower_count,
            following_count: m.following_count,
        }
    }
}

/// A post's fan-out bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct FanoutPlan {
    /// The author.
    pub author: Id,
    /// Whether fan-out already completed.
    pub done: bool,
    /// The author's follower count (celebrities are merged on read, not pushed).
    pub author_followers: i64,
}

/// Outcome of a follow or unfollow.
#[derive(Debug, Clone, Copy)]
pub struct FollowChange {
    /// Whether an edge was added (follow) or removed (unfollow).
    pub changed: bool,
    /// The followee's follower count after the change.
    pub followee_followers: i64,
}

/// Handles to the database, id generator and engine.
#[derive(Clone)]
pub struct FeedStore {
    db: DatabaseConnection,
    ids: Arc<Snowflake>,
    engine: Engine,
    celebrity_threshold: u64,
    post_cache_ttl: Duration,
}

/// Encodes a post for the post cache (the same bytes the timeline service decodes).
pub fn encode_post(p: &Post) -> Bytes {
    Bytes::from(p.encode_to_vec())
}

fn to_proto(m: &post::Model) -> Post {
    Post {
        id: m.id as u64,
        author_id: m.author_id as u64,
        body: m.body.clone(),
        created_at_ms: m.created_at.timestamp_millis(),
    }
}

/// A post's author, for the fan-out join.
fn author_relation() -> RelationDef {
    post::Entity::belongs_to(user::Entity)
        .from(post::Column::AuthorId)
        .to(user::Column::Id)
        .into()
}

/// Followee side of a follow edge, for the celebrity join.
fn followee_relation() -> RelationDef {
    follow::Entity::belongs_to(user::Entity)
        .from(follow::Column::FolloweeId)
        .to(user::Column::Id)
        .into()
}

impl FeedStore {
    /// A store over `db`.
    pub fn new(
        db: DatabaseConnection,
        ids: Arc<Snowflake>,
        engine: Engine,
        celebrity_threshold: u64,
        post_cache_ttl: Duration,
    ) -> Self {
        FeedStore {
            db,
            ids,
            engine,
            celebrity_threshold,
            post_cache_ttl,
        }
    }

    /// The database handle.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The celebrity threshold.
    pub fn celebrity_threshold(&self) -> u64 {
        self.celebrity_threshold
    }

    /// Creates a user with an already-hashed password.
    pub async fn create_user(
        &self,
        handle: &Handle,
        password_hash: String,
    ) -> Result<UserView, StoreError> {
        let id = self.ids.next_id();
        let model = user::ActiveModel {
            id: Set(id.as_i64()),
            handle: Set(handle.as_str().to_owned()),
            password_hash: Set(password_hash),
            follower_count: Set(0),
            following_count: Set(0),
            created_at: Set(Utc::now()),
        };
        match model.insert(&self.db).await {
            Ok(m) => Ok(m.into()),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(StoreError::HandleTaken(handle.as_str().to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The user with `handle` and their password hash.
    pub async fn credentials(
        &self,
        handle: &str,
    ) -> Result<Option<(UserView, String)>, StoreError> {
        let found = user::Entity::find()
            .filter(user::Column::Handle.eq(handle.to_ascii_lowercase()))
            .one(&self.db)
            .await?;
        Ok(found.map(|m| {
            let hash = m.password_hash.clone();
            (m.into(), hash)
        }))
    }

    /// A user by id.
    pub async fn user(&self, id: Id) -> Result<UserView, StoreError> {
        user::Entity::find_by_id(id.as_i64())
            .one(&self.db)
            .await?
            .map(UserView::from)
            .ok_or(StoreError::UserNotFound(id))
    }

    /// `follower` follows `followee`. Idempotent; counters move in the same transaction.
    ///
    /// Every write transaction starts with its write: on SQLite a transaction that reads first
    /// and writes later cannot upgrade its lock while another writer is active (SQLITE_BUSY
    /// regardless of the busy timeout), while one that writes first simply waits its turn.
    pub async fn follow(&self, follower: Id, followee: Id) -> Result<FollowChange, StoreError> {
        if follower == followee {
            return Err(StoreError::SelfFollow);
        }
        let txn = self.db.begin().await?;
        let inserted = follow::Entity::insert(follow::ActiveModel {
            follower_id: Set(follower.as_i64()),
            followee_id: Set(followee.as_i64()),
            created_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::columns([follow::Column::FollowerId, follow::Column::FolloweeId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await;
        let changed = match inserted {
            Ok(n) => n > 0,
            Err(DbErr::RecordNotInserted) => false,
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                txn.rollback().await?;
                return Err(self.missing_user(&[follower, followee]).await);
            }
            Err(e) => return Err(e.into()),
        };
        if changed {
            self.bump_counts(&txn, follower, followee, 1).await?;
        }
        let followers = self.follower_count_in(&txn, followee).await?;
        txn.commit().await?;
        self.after_follow_change(follower, followee, changed, followers, 1)
            .await;
        Ok(FollowChange {
            changed,
            followee_followers: followers,
        })
    }

    /// `follower` stops following `followee`. Idempotent.
    pub async fn unfollow(&self, follower: Id, followee: Id) -> Result<FollowChange, StoreError> {
        if follower == followee {
            return Err(StoreError::SelfFollow);
        }
        let txn = self.db.begin().await?;
        let removed = follow::Entity::delete_many()
            .filter(follow::Column::FollowerId.eq(follower.as_i64()))
            .filter(follow::Column::FolloweeId.eq(followee.as_i64()))
            .exec(&txn)
            .await?
            .rows_affected
            > 0;
        if removed {
            self.bump_counts(&txn, follower, followee, -1).await?;
        }
        let existing = user::Entity::find()
            .filter(user::Column::Id.is_in([follower.as_i64(), followee.as_i64()]))
            .count(&txn)
            .await?;
        if existing < 2 {
            txn.rollback().await?;
            return Err(self.missing_user(&[follower, followee]).await);
        }
        let followers = self.follower_count_in(&txn, followee).await?;
        txn.commit().await?;
        self.after_follow_change(follower, followee, removed, followers, -1)
            .await;
        Ok(FollowChange {
            changed: removed,
            followee_followers: followers,
        })
    }

    /// The error naming the first of `ids` that does not exist.
    async fn missing_user(&self, ids: &[Id]) -> StoreError {
        for id in ids {
            match user::Entity::find_by_id(id.as_i64()).count(&self.db).await {
                Ok(0) => return StoreError::UserNotFound(*id),
                Ok(_) => {}
                Err(e) => return e.into(),
            }
        }
        StoreError::Db(DbErr::Custom(
            "referenced user vanished concurrently".into(),
        ))
    }

    async fn bump_counts<C: sea_orm::ConnectionTrait>(
        &self,
        db: &C,
        follower: Id,
        followee: Id,
        delta: i64,
    ) -> Result<(), DbErr> {
        // Row locks are taken in id order: A following B while B follows A would otherwise
        // lock the two rows in opposite orders and deadlock (PostgreSQL aborts one of them).
        let followee_update = (followee, user::Column::FollowerCount);
        let follower_update = (follower, user::Column::FollowingCount);
        let ordered = if followee < follower {
            [followee_update, follower_update]
        } else {
            [follower_update, followee_update]
        };
        for (id, column) in ordered {
            user::Entity::update_many()
                .col_expr(column, Expr::col(column).add(delta))
                .filter(user::Column::Id.eq(id.as_i64()))
                .exec(db)
                .await?;
        }
        Ok(())
    }

    async fn follower_count_in<C: sea_orm::ConnectionTrait>(
        &self,
        db: &C,
        user_id: Id,
    ) -> Result<i64, DbErr> {
        let count: Option<i64> = user::Entity::find_by_id(user_id.as_i64())
            .select_only()
            .column(user::Column::FollowerCount)
            .into_tuple()
            .one(db)
            .await?;
        Ok(count.unwrap_or(0))
    }

    /// Keeps the engine's derived state in step with the graph. The follower's home timeline is
    /// dropped (the next read rebuilds it from the graph, so old posts of a new followee appear
    /// and an unfollowed author's disappear), and so is their celebrity cache. When the followee
    /// crosses the celebrity threshold, every follower's celebrity cache is dropped too.
    async fn after_follow_change(
        &self,
        follower: Id,
        followee: Id,
        changed: bool,
        followers: i64,
        delta: i64,
    ) {
        if !changed {
            return;
        }
        if let Err(e) = self.forget_derived(follower).await {
            tracing::warn!(%follower, error = %e, "could not invalidate derived timeline state; it expires with its TTL");
        }
        let threshold = self.celebrity_threshold as i64;
        let crossed =
            (delta > 0 && followers == threshold) || (delta < 0 && followers == threshold - 1);
        if crossed {
            let store = self.clone();
            tokio::spawn(async move {
                if let Err(e) = store.forget_followers_celebrity_caches(followee).await {
                    tracing::warn!(%followee, error = %e, "could not invalidate followers' celebrity caches");
                }
            });
        }
    }

    async fn forget_derived(&self, user: Id) -> Result<(), EngineError> {
        self.engine
            .timelines
            .remove(TimelineKey::Home(user))
            .await?;
        self.engine
            .follow_cache
            .forget_celebrities_followed(&[user])
            .await
    }

    async fn forget_followers_celebrity_caches(
        &self,
        user: Id,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut after = Id(0);
        loop {
            let (page, next) = self.followers_page(user, after, 5_000).await?;
            self.engine
                .follow_cache
                .forget_celebrities_followed(&page)
                .await?;
            match next {
                Some(n) => after = n,
                None => return Ok(()),
            }
        }
    }

    /// Commits a post, then hands it to fan-out. The post is acknowledged once committed: if the
    /// queue is unreachable the outbox sweep publishes it later, so it is never lost.
    pub async fn create_post(&self, author: Id, body: PostBody) -> Result<Post, StoreError> {
        let id = self.ids.next_id();
        let model = post::ActiveModel {
            id: Set(id.as_i64()),
            author_id: Set(author.as_i64()),
            body: Set(body.into_inner()),
            created_at: Set(id.created_at()),
            fanned_out_at: Set(None),
        };
        let inserted = match model.insert(&self.db).await {
            Ok(m) => m,
            Err(e) if matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_))) => {
                return Err(StoreError::UserNotFound(author));
            }
            Err(e) => return Err(e.into()),
        };
        let post = to_proto(&inserted);
        let job = FanoutJob {
            post: id,
            author,
            trace: loadlab_kit::telemetry::propagation::TraceParent::current(),
        };
        // Neither step may hold the acknowledgement hostage to a Redis outage: the post is
        // committed, and the sweep publishes it if this attempt fails or times out.
        let cache_entry = [(id, encode_post(&post))];
        let (published, cached) = tokio::join!(
            tokio::time::timeout(HANDOFF_TIMEOUT, self.engine.fanout.publish(job)),
            tokio::time::timeout(
                HANDOFF_TIMEOUT,
                self.engine
                    .posts
                    .put_many(&cache_entry, self.post_cache_ttl)
            )
        );
        match published {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(post = %id, error = %e, "fan-out queue unavailable; the outbox sweep will publish this post")
            }
            Err(_) => {
                tracing::warn!(post = %id, "fan-out queue timed out; the outbox sweep will publish this post")
            }
        }
        if !matches!(cached, Ok(Ok(()))) {
            tracing::debug!(post = %id, "post cache write failed");
        }
        Ok(post)
    }

    /// The posts among `ids` that exist, in the order asked.
    pub async fn posts(&self, ids: &[Id]) -> Result<Vec<Post>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found = post::Entity::find()
            .filter(post::Column::Id.is_in(ids.iter().map(|i| i.as_i64())))
            .all(&self.db)
            .await?;
        let mut by_id: std::collections::HashMap<i64, post::Model> =
            found.into_iter().map(|m| (m.id, m)).collect();
        Ok(ids
            .iter()
            .filter_map(|id| by_id.remove(&id.as_i64()))
            .map(|m| to_proto(&m))
            .collect())
    }

    /// What fan-out needs to know about each of `ids` that still exists, in one query.
    pub async fn fanout_plans(&self, ids: &[Id]) -> Result<HashMap<Id, FanoutPlan>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(i64, i64, Option<chrono::DateTime<Utc>>, i64)> = post::Entity::find()
            .select_only()
            .column(post::Column::Id)
            .column(post::Column::AuthorId)
            .column(post::Column::FannedOutAt)
            .join(JoinType::InnerJoin, author_relation())
            .column(user::Column::FollowerCount)
            .filter(post::Column::Id.is_in(ids.iter().map(|i| i.as_i64())))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, author, done, followers)| {
                (
                    Id::from_i64(id),
                    FanoutPlan {
                        author: Id::from_i64(author),
                        done: done.is_some(),
                        author_followers: followers,
                    },
                )
            })
            .collect())
    }

    /// Records that every follower's timeline holds these posts.
    pub async fn mark_fanned_out(&self, ids: &[Id]) -> Result<(), StoreError> {
        post::Entity::update_many()
            .col_expr(post::Column::FannedOutAt, Expr::value(Utc::now()))
            .filter(post::Column::Id.is_in(ids.iter().map(|i| i.as_i64())))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Posts whose fan-out has not completed, with ids in `(after, older_than)`, oldest first.
    pub async fn pending_fanouts(
        &self,
        after: Id,
        older_than: Id,
        limit: u64,
    ) -> Result<Vec<FanoutJob>, StoreError> {
        let rows: Vec<(i64, i64)> = post::Entity::find()
            .select_only()
            .column(post::Column::Id)
            .column(post::Column::AuthorId)
            .filter(post::Column::FannedOutAt.is_null())
            .filter(post::Column::Id.gt(after.as_i64()))
            .filter(post::Column::Id.lt(older_than.as_i64()))
            .order_by_asc(post::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(p, a)| FanoutJob {
                post: Id::from_i64(p),
                author: Id::from_i64(a),
                trace: None,
            })
            .collect())
    }

    /// Posts by any of `authors`, newest first, older than `before` when given.
    pub async fn posts_by_authors(
        &self,
        authors: &[Id],
        before: Option<Id>,
        limit: u64,
    ) -> Result<Vec<Post>, StoreError> {
        if authors.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let mut query = post::Entity::find()
            .filter(post::Column::AuthorId.is_in(authors.iter().map(|a| a.as_i64())));
        if let Some(b) = before {
            query = query.filter(post::Column::Id.lt(b.as_i64()));
        }
        let rows = query
            .order_by_desc(post::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        Ok(rows.iter().map(to_proto).collect())
    }

    /// One page of `user`'s followers in id order after `after`; the cursor for the next page.
    pub async fn followers_page(
        &self,
        user_id: Id,
        after: Id,
        limit: u64,
    ) -> Result<(Vec<Id>, Option<Id>), StoreError> {
        let rows: Vec<i64> = follow::Entity::find()
            .select_only()
            .column(follow::Column::FollowerId)
            .filter(follow::Column::FolloweeId.eq(user_id.as_i64()))
            .filter(follow::Column::FollowerId.gt(after.as_i64()))
            .order_by_asc(follow::Column::FollowerId)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(page(rows, limit))
    }

    /// One page of whom `user` follows (optionally only celebrities), in id order after `after`.
    pub async fn following_page(
        &self,
        user_id: Id,
        after: Id,
        limit: u64,
        celebrities_only: bool,
    ) -> Result<(Vec<Id>, Option<Id>), StoreError> {
        let mut query = follow::Entity::find()
            .select_only()
            .column(follow::Column::FolloweeId)
            .filter(follow::Column::FollowerId.eq(user_id.as_i64()))
            .filter(follow::Column::FolloweeId.gt(after.as_i64()));
        if celebrities_only {
            query = query
                .join(JoinType::InnerJoin, followee_relation())
                .filter(user::Column::FollowerCount.gte(self.celebrity_threshold as i64));
        }
        let rows: Vec<i64> = query
            .order_by_asc(follow::Column::FolloweeId)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(page(rows, limit))
    }
}

fn page(rows: Vec<i64>, limit: u64) -> (Vec<Id>, Option<Id>) {
    let ids: Vec<Id> = rows.into_iter().map(Id::from_i64).collect();
    let next = if ids.len() as u64 == limit {
        ids.last().copied()
    } else {
        None
    };
    (ids, next)
}
