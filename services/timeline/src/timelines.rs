//! Home timelines: append (fan-out writes), read (merge celebrities, hydrate) and rebuild.

use std::time::Duration;

use bytes::Bytes;
use loadlab_kit::Id;
use loadlab_kit::engine::{Engine, EngineError, TimelineKey};
use loadlab_kit::grpc::TracedChannel;
use loadlab_kit::metrics::Metrics;
use loadlab_proto::feed::v1::feed_service_client::FeedServiceClient;
use loadlab_proto::feed::v1::{
    GetPostsRequest, ListFollowingRequest, ListPostsByAuthorsRequest, Post,
};
use prometheus_client::metrics::counter::Counter;
use prost::Message;

/// Why a timeline operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The engine (Redis) failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The feed service answered an error.
    #[error("feed: {0}")]
    Feed(#[from] tonic::Status),
}

/// Largest batch of authors per `ListPostsByAuthors` call.
const AUTHORS_PER_CALL: usize = 1_000;
/// Largest batch of ids per `GetPosts` call.
const POSTS_PER_CALL: usize = 1_000;

/// Timeline metrics.
#[derive(Clone, Default)]
struct TimelineMetrics {
    rebuilds: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    celebrity_merges: Counter,
}

/// The timeline logic over an engine and the feed service.
#[derive(Clone)]
pub struct Timelines {
    engine: Engine,
    feed: FeedServiceClient<TracedChannel>,
    cap: usize,
    celebrity_ttl: Duration,
    post_ttl: Duration,
    metrics: TimelineMetrics,
}

/// A page of a home timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Posts, newest first.
    pub posts: Vec<Post>,
    /// Cursor for the next page.
    pub next_before: Option<Id>,
}

impl Timelines {
    /// Timelines capped at `cap`.
    pub fn new(
        engine: Engine,
        feed: FeedServiceClient<TracedChannel>,
        cap: usize,
        celebrity_ttl: Duration,
        post_ttl: Duration,
        registry: &Metrics,
    ) -> Self {
        let metrics = TimelineMetrics::default();
        registry.register(
            "timeline_rebuilds",
            "Timelines rebuilt from the follow graph",
            metrics.rebuilds.clone(),
        );
        registry.register(
            "timeline_post_cache_hits",
            "Posts hydrated from the cache",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "timeline_post_cache_misses",
            "Posts hydrated from the feed service",
            metrics.cache_misses.clone(),
        );
        registry.register(
            "timeline_celebrity_merges",
            "Reads that merged celebrity posts",
            metrics.celebrity_merges.clone(),
        );
        Timelines {
            engine,
            feed,
            cap,
            celebrity_ttl,
            post_ttl,
            metrics,
        }
    }

    /// Adds `post` to the home timelines of `users` (and its author's timeline when asked).
    /// Returns how many home timelines received it.
    pub async fn append(
        &self,
        post: Id,
        author: Id,
        users: &[Id],
        include_author: bool,
    ) -> Result<u32, TimelineError> {
        if include_author {
            self.engine
                .timelines
                .append(&[TimelineKey::Author(author)], post, self.cap)
                .await?;
        }
        let keys: Vec<TimelineKey> = users.iter().map(|u| TimelineKey::Home(*u)).collect();
        Ok(self.engine.timelines.append(&keys, post, self.cap).await?)
    }

    /// A page of `user`'s home timeline: pushed posts merged with the posts of celebrities they
    /// follow, newest first, hydrated.
    pub async fn get(
        &self,
        user: Id,
        limit: usize,
        before: Option<Id>,
    ) -> Result<Page, TimelineError> {
        let home_key = [TimelineKey::Home(user)];
        let (home, celebrities) = tokio::join!(
            self.engine.timelines.range(&home_key, before, limit),
            self.celebrities_followed(user)
        );
        let home = match home?.pop().flatten() {
            Some(ids) => ids,
            None => page_of(&self.rebuild(user).await?, before, limit),
        };
        let celebrities = celebrities?;
        let mut ids = home;
        if !celebrities.is_empty() {
            self.metrics.celebrity_merges.inc();
            let keys: Vec<TimelineKey> = celebrities
                .iter()
                .map(|c| TimelineKey::Author(*c))
                .collect();
            let ranges = self.engine.timelines.range(&keys, before, limit).await?;
            for (celebrity, range) in celebrities.iter().zip(ranges) {
                match range {
                    Some(r) => ids.extend(r),
                    None => ids.extend(page_of(
                        &self.rebuild_author(*celebrity).await?,
                        before,
                        limit,
                    )),
                }
            }
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.dedup();
            ids.truncate(limit);
        }
        let next_before = (ids.len() == limit).then(|| ids.last().copied()).flatten();
        let posts = self.hydrate(&ids).await?;
        Ok(Page { posts, next_before })
    }

    /// The celebrities `user` follows, from the cache or the feed service.
    async fn celebrities_followed(&self, user: Id) -> Result<Vec<Id>, TimelineError> {
        if let Some(cached) = self.engine.follow_cache.celebrities_followed(user).await? {
            return Ok(cached);
        }
        let celebrities = self.following(user, true).await?;
        self.engine
            .follow_cache
            .store_celebrities_followed(user, &celebrities, self.celebrity_ttl)
            .await?;
        Ok(celebrities)
    }

    async fn following(&self, user: Id, celebrities_only: bool) -> Result<Vec<Id>, TimelineError> {
        let mut feed = self.feed.clone();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = feed
                .list_following(ListFollowingRequest {
                    user_id: user.0,
                    after,
                    limit: 10_000,
                    celebrities_only,
                })
                .await?
                .into_inner();
            out.extend(page.followee_ids.into_iter().map(Id));
            if page.next_after == 0 {
                return Ok(out);
            }
            after = page.next_after;
        }
    }

    /// Rebuilds `user`'s home timeline from the follow graph and returns its ids, newest first.
    ///
    /// Materialising first makes concurrent fan-out appends land, so a post committed while the
    /// rebuild reads the database is either in that read or appended afterwards.
    pub async fn rebuild(&self, user: Id) -> Result<Vec<Id>, TimelineError> {
        self.metrics.rebuilds.inc();
        let key = TimelineKey::Home(user);
        self.engine.timelines.materialise(key).await?;
        let mut authors = self.following(user, false).await?;
        authors.push(user);
        let mut posts = Vec::new();
        for chunk in authors.chunks(AUTHORS_PER_CALL) {
            posts.extend(self.recent_posts(chunk).await?);
        }
        posts.sort_unstable_by_key(|p| std::cmp::Reverse(p.id));
        posts.dedup_by_key(|p| p.id);
        posts.truncate(self.cap);
        self.fill(key, &posts).await
    }

    async fn rebuild_author(&self, author: Id) -> Result<Vec<Id>, TimelineError> {
        self.metrics.rebuilds.inc();
        let key = TimelineKey::Author(author);
        self.engine.timelines.materialise(key).await?;
        let posts = self.recent_posts(&[author]).await?;
        self.fill(key, &posts).await
    }

    async fn recent_posts(&self, authors: &[Id]) -> Result<Vec<Post>, TimelineError> {
        let mut feed = self.feed.clone();
        Ok(feed
            .list_posts_by_authors(ListPostsByAuthorsRequest {
                author_ids: authors.iter().map(|a| a.0).collect(),
                before: 0,
                limit: self.cap as u32,
            })
            .await?
            .into_inner()
            .posts)
    }

    async fn fill(&self, key: TimelineKey, posts: &[Post]) -> Result<Vec<Id>, TimelineError> {
        let ids: Vec<Id> = posts.iter().map(|p| Id(p.id)).collect();
        self.engine.timelines.fill(key, &ids, self.cap).await?;
        // The rebuild read the posts anyway: warm the cache so the first page hydrates locally.
        let entries: Vec<(Id, Bytes)> = posts
            .iter()
            .map(|p| (Id(p.id), Bytes::from(p.encode_to_vec())))
            .collect();
        if let Err(e) = self.engine.posts.put_many(&entries, self.post_ttl).await {
            tracing::debug!(error = %e, "post cache warm-up failed");
        }
        Ok(ids)
    }

    /// Posts for `ids`, in order, from the cache or (for misses) the feed service.
    async fn hydrate(&self, ids: &[Id]) -> Result<Vec<Post>, TimelineError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cached = self.engine.posts.get_many(ids).await?;
        let mut slots: Vec<Option<Post>> = cached
            .into_iter()
            .map(|b| b.and_then(|bytes| Post::decode(bytes).ok()))
            .collect();
        let missing: Vec<Id> = ids
            .iter()
            .zip(&slots)
            .filter(|(_, s)| s.is_none())
            .map(|(id, _)| *id)
            .collect();
        self.metrics
            .cache_hits
            .inc_by((ids.len() - missing.len()) as u64);
        if !missing.is_empty() {
            self.metrics.cache_misses.inc_by(missing.len() as u64);
            let mut feed = self.feed.clone();
            let mut fetched = std::collections::HashMap::new();
            for chunk in missing.chunks(POSTS_PER_CALL) {
                let posts = feed
                    .get_posts(GetPostsRequest {
                        ids: chunk.iter().map(|i| i.0).collect(),
                    })
                    .await?
                    .into_inner()
                    .posts;
                fetched.extend(posts.into_iter().map(|p| (p.id, p)));
            }
            let entries: Vec<(Id, Bytes)> = fetched
                .values()
                .map(|p| (Id(p.id), Bytes::from(p.encode_to_vec())))
                .collect();
            if let Err(e) = self.engine.posts.put_many(&entries, self.post_ttl).await {
                tracing::debug!(error = %e, "post cache write failed");
            }
            for (id, slot) in ids.iter().zip(slots.iter_mut()) {
                if slot.is_none() {
                    *slot = fetched.remove(&id.0);
                }
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

/// The `limit` newest ids below `before` of a newest-first list.
fn page_of(ids: &[Id], before: Option<Id>, limit: usize) -> Vec<Id> {
    ids.iter()
        .copied()
        .filter(|id| before.is_none_or(|b| *id < b))
        .take(limit)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_of_respects_cursor_and_limit() {
        let ids: Vec<Id> = [9, 7, 5, 3, 1].into_iter().map(Id).collect();
        assert_eq!(page_of(&ids, None, 2), vec![Id(9), Id(7)]);
        assert_eq!(page_of(&ids, Some(Id(7)), 2), vec![Id(5), Id(3)]);
        assert_eq!(page_of(&ids, Some(Id(1)), 2), Vec::<Id>::new());
    }
}
