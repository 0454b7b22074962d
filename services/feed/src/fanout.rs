//! Fan-out on write: workers take posts off the queue, push them into followers' home timelines
//! through `timeline.Append` in batches, then mark them done in the database.
//!
//! Delivery is at-least-once and every step is idempotent, so a post is never lost and never
//! duplicated: a job is acked only after its fan-out completed and `posts.fanned_out_at` is set;
//! a job held by a dead worker is reclaimed after `--fanout-claim-idle`; a job lost with Redis
//! (restart, flush) is re-published by the outbox sweep, which finds posts whose `fanned_out_at`
//! is still NULL after `--fanout-sweep-after`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use loadlab_kit::Id;
use loadlab_kit::engine::{Delivery, Engine, FanoutConsumer};
use loadlab_kit::grpc::TracedChannel;
use loadlab_kit::metrics::Metrics;
use loadlab_kit::shutdown::Shutdown;
use loadlab_proto::timeline::v1::AppendRequest;
use loadlab_proto::timeline::v1::timeline_service_client::TimelineServiceClient;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tracing::Instrument as _;

use crate::store::{FanoutPlan, FeedStore};

/// The outbox sweep runs only while fewer jobs than this are queued.
const SWEEP_MAX_BACKLOG: u64 = 1_000;

/// Fan-out tuning.
#[derive(Debug, Clone)]
pub struct FanoutSettings {
    /// Followers per Append call.
    pub batch: usize,
    /// Posts processed concurrently per consumer.
    pub concurrency: usize,
    /// Consumers (queue readers) in this process, each with its own batch in flight.
    pub consumers: usize,
    /// Pause between batches of one post.
    pub batch_delay: Duration,
    /// Sweep period.
    pub sweep_interval: Duration,
    /// Age after which an unfinished fan-out is re-published.
    pub sweep_after: Duration,
    /// Idle time before reclaiming another worker's job.
    pub claim_idle: Duration,
    /// Timeline cap is the timeline service's business; authors at or above this many
    /// followers are merged on read instead of pushed.
    pub celebrity_threshold: u64,
}

/// Fan-out metrics.
#[derive(Clone)]
pub struct FanoutMetrics {
    /// Post committed → last follower timeline written.
    pub lag: Histogram,
    /// Posts whose fan-out completed.
    pub posts: Counter,
    /// Timeline entries written.
    pub deliveries: Counter,
    /// Fan-outs that failed and will be retried.
    pub failures: Counter,
    /// Jobs re-published by the outbox sweep.
    pub republished: Counter,
    /// Jobs waiting or in flight.
    pub backlog: Gauge,
    /// The lag again, over OTLP (`fanout.lag`).
    pub otel_lag: opentelemetry::metrics::Histogram<f64>,
}

impl FanoutMetrics {
    /// Registers the fan-out metrics.
    pub fn register(metrics: &Metrics) -> Self {
        let m = FanoutMetrics {
            lag: Histogram::new(exponential_buckets(0.001, 1.5, 32)),
            posts: Counter::default(),
            deliveries: Counter::default(),
            failures: Counter::default(),
            republished: Counter::default(),
            backlog: Gauge::default(),
            otel_lag: metrics
                .meter()
                .f64_histogram("fanout.lag")
                .with_unit("s")
                .with_description("Post committed to last follower timeline written")
                .with_boundaries(exponential_buckets(0.001, 1.5, 32).collect())
                .build(),
        };
        metrics.register(
            "fanout_lag_seconds",
            "Post committed to last follower timeline written",
            m.lag.clone(),
        );
        metrics.register("fanout_posts", "Posts fanned out", m.posts.clone());
        metrics.register(
            "fanout_deliveries",
            "Timeline entries written by fan-out",
            m.deliveries.clone(),
        );
        metrics.register(
            "fanout_failures",
            "Fan-outs that failed and will be retried",
            m.failures.clone(),
        );
        metrics.register(
            "fanout_republished",
            "Posts re-published by the outbox sweep",
            m.republished.clone(),
        );
        metrics.register(
            "fanout_backlog",
            "Fan-out jobs waiting or in flight",
            m.backlog.clone(),
        );
        m
    }
}

/// A fan-out worker process: consumers plus the outbox sweep.
#[derive(Clone)]
pub struct Fanout {
    store: FeedStore,
    engine: Engine,
    timeline: TimelineServiceClient<TracedChannel>,
    settings: Arc<FanoutSettings>,
    metrics: FanoutMetrics,
}

impl Fanout {
    /// A worker.
    pub fn new(
        store: FeedStore,
        engine: Engine,
        timeline: TimelineServiceClient<TracedChannel>,
        settings: FanoutSettings,
        metrics: FanoutMetrics,
    ) -> Self {
        Fanout {
            store,
            engine,
            timeline,
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// Runs the consumer and the sweep until `shutdown`; in-flight jobs finish first. Both run
    /// in this one future, so dropping it (a killed worker) stops everything at once.
    pub async fn run(self, consumer_name: String, shutdown: Shutdown) {
        let consumers = futures::future::join_all(
            (0..self.settings.consumers.max(1))
                .map(|i| self.consume_loop(format!("{consumer_name}-{i}"), shutdown.clone())),
        );
        tokio::join!(self.sweep_loop(shutdown.clone()), consumers);
    }

    async fn consume_loop(&self, name: String, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        let mut consumer: Option<Box<dyn FanoutConsumer>> = None;
        let mut last_reclaim: Option<Instant> = None;
        while !shutdown.is_triggered() {
            let c = match consumer.as_mut() {
                Some(c) => c,
                None => match self.engine.fanout.consumer(&name).await {
                    Ok(c) => consumer.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "fan-out consumer unavailable; retrying");
                        self.pause(&shutdown, &mut backoff).await;
                        continue;
                    }
                },
            };
            let reclaim_due =
                last_reclaim.is_none_or(|t| t.elapsed() >= self.settings.claim_idle / 2);
            let batch = if reclaim_due {
                last_reclaim = Some(Instant::now());
                match c
                    .reclaim(self.settings.claim_idle, self.settings.concurrency * 4)
                    .await
                {
                    Ok(b) if !b.is_empty() => {
                        tracing::info!(
                            jobs = b.len(),
                            "reclaimed fan-out jobs from a stalled worker"
                        );
                        Ok(b)
                    }
                    Ok(_) => self.receive(c.as_mut(), &shutdown).await,
                    Err(e) => Err(e),
                }
            } else {
                self.receive(c.as_mut(), &shutdown).await
            };
            let batch = match batch {
                Ok(b) => {
                    backoff = Duration::from_millis(100);
                    b
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fan-out queue read failed; retrying");
                    self.pause(&shutdown, &mut backoff).await;
                    continue;
                }
            };
            if batch.is_empty() {
                continue;
            }
            let done = self.process_batch(batch).await;
            if let Err(e) = c.ack(&done).await {
                // Unacked jobs are reclaimed and redone; fan-out is idempotent.
                tracing::warn!(error = %e, jobs = done.len(), "fan-out ack failed");
            }
        }
        tracing::info!("fan-out consumer stopped");
    }

    async fn receive(
        &self,
        consumer: &mut dyn FanoutConsumer,
        shutdown: &Shutdown,
    ) -> Result<Vec<Delivery>, loadlab_kit::engine::EngineError> {
        tokio::select! {
            r = consumer.receive(self.settings.concurrency * 4, Duration::from_secs(1)) => r,
            () = shutdown.wait() => Ok(Vec::new()),
        }
    }

    async fn pause(&self, shutdown: &Shutdown, backoff: &mut Duration) {
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = shutdown.wait() => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
    }

    /// Fans out a batch of jobs; returns the delivery ids to ack. Bookkeeping is batched: one
    /// query reads every post's plan, one statement marks the finished ones. A job that failed
    /// is not acked, so it is retried (reclaimed) later.
    async fn process_batch(&self, batch: Vec<Delivery>) -> Vec<String> {
        // The batch is its own trace (it serves many requests), linked to each post's trace:
        // from a post's trace in Jaeger, the link leads to the fan-out that delivered it.
        let span = tracing::info_span!(
            "fanout.batch",
            otel.kind = "consumer",
            messaging.operation.type = "process",
            messaging.batch.message_count = batch.len(),
            fanout.posts_pushed = tracing::field::Empty,
        );
        for d in &batch {
            if let Some(tp) = d.job.trace {
                tp.link(&span);
            }
        }
        self.process_batch_in(batch).instrument(span).await
    }

    async fn process_batch_in(&self, batch: Vec<Delivery>) -> Vec<String> {
        let ids: Vec<Id> = batch.iter().map(|d| d.job.post).collect();
        let plans = match self.store.fanout_plans(&ids).await {
            Ok(plans) => plans,
            Err(e) => {
                self.metrics.failures.inc_by(batch.len() as u64);
                tracing::warn!(error = %e, jobs = batch.len(), "cannot read fan-out plans; the jobs will be retried");
                return Vec::new();
            }
        };
        let mut ack = Vec::with_capacity(batch.len());
        let mut waiting: HashMap<Id, Vec<String>> = HashMap::new();
        let mut todo = Vec::new();
        for d in batch {
            match plans.get(&d.job.post) {
                // Gone (nothing to do) or already done (a duplicate delivery).
                None => ack.push(d.id),
                Some(plan) if plan.done => ack.push(d.id),
                Some(plan) => {
                    if plan.author != d.job.author {
                        tracing::warn!(post = %d.job.post, job = %d.job.author, stored = %plan.author, "fan-out job names the wrong author; using the stored one");
                    }
                    let entry = waiting.entry(d.job.post).or_default();
                    if entry.is_empty() {
                        todo.push((d.job.post, *plan, d.job.trace));
                    }
                    entry.push(d.id);
                }
            }
        }
        let pushed: Vec<Id> = futures::stream::iter(todo)
            .map(|(post, plan, trace)| async move {
                let span = tracing::info_span!(
                    "fanout.post",
                    post.id = post.0,
                    post.author_id = plan.author.0,
                    post.author_followers = plan.author_followers,
                    fanout.appends = tracing::field::Empty,
                );
                if let Some(tp) = trace {
                    tp.link(&span);
                }
                match self.push(post, plan).instrument(span).await {
                    Ok(()) => Some(post),
                    Err(e) => {
                        self.metrics.failures.inc();
                        tracing::warn!(%post, error = %e, "fan-out failed; it will be retried");
                        None
                    }
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .filter_map(|p| async move { p })
            .collect()
            .await;
        tracing::Span::current().record("fanout.posts_pushed", pushed.len());
        if pushed.is_empty() {
            return ack;
        }
        if let Err(e) = self.store.mark_fanned_out(&pushed).await {
            // Not acked: redelivered later, and the pushes are idempotent.
            tracing::warn!(error = %e, posts = pushed.len(), "cannot record finished fan-outs; they will be redone");
            return ack;
        }
        let now = chrono::Utc::now().timestamp_millis();
        for post in &pushed {
            let lag = (now - post.unix_ms()).max(0) as f64 / 1_000.0;
            self.metrics.lag.observe(lag);
            self.metrics.otel_lag.record(lag, &[]);
            ack.extend(waiting.remove(post).unwrap_or_default());
        }
        self.metrics.posts.inc_by(pushed.len() as u64);
        ack
    }

    /// Pushes `post` into its author's timelines and every follower's home timeline, unless the
    /// author is a celebrity (then readers merge it on read). Idempotent.
    async fn push(
        &self,
        post: Id,
        plan: FanoutPlan,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let author = plan.author;
        let celebrity = plan.author_followers >= self.settings.celebrity_threshold as i64;
        let mut timeline = self.timeline.clone();
        let mut after = Id(0);
        let mut first = true;
        let mut appends = 0u64;
        loop {
            let (page, next) = if celebrity {
                (Vec::new(), None)
            } else {
                self.store
                    .followers_page(author, after, self.settings.batch as u64)
                    .await?
            };
            // The first batch also carries the author's own home and author timelines.
            let mut users: Vec<u64> = Vec::with_capacity(page.len() + 1);
            if first {
                users.push(author.0);
            }
            users.extend(page.iter().map(|u| u.0));
            if users.is_empty() {
                break;
            }
            let r = timeline
                .append(AppendRequest {
                    post_id: post.0,
                    author_id: author.0,
                    user_ids: users,
                    include_author: first,
                })
                .await?
                .into_inner();
            self.metrics.deliveries.inc_by(u64::from(r.appended));
            appends += 1;
            tracing::Span::current().record("fanout.appends", appends);
            first = false;
            match next {
                Some(n) => after = n,
                None => break,
            }
            if !self.settings.batch_delay.is_zero() {
                tokio::time::sleep(self.settings.batch_delay).await;
            }
        }
        Ok(())
    }

    /// Re-publishes posts whose fan-out did not complete, and refreshes the backlog gauge.
    async fn sweep_loop(&self, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.settings.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.wait() => return,
            }
            let backlog = match self.engine.fanout.backlog().await {
                Ok(n) => {
                    self.metrics.backlog.set(n as i64);
                    n
                }
                // The queue is unreachable: sweeping would fail too.
                Err(_) => continue,
            };
            // A long queue means workers are behind, not that jobs were lost: re-publishing
            // then would only pile duplicates onto the backlog. Lost jobs are found once it drains.
            if backlog >= SWEEP_MAX_BACKLOG {
                continue;
            }
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "outbox sweep failed; retrying next period");
            }
        }
    }

    /// One sweep: publishes every post older than `sweep_after` whose fan-out is not recorded.
    pub async fn sweep_once(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let cutoff =
            chrono::Utc::now().timestamp_millis() - self.settings.sweep_after.as_millis() as i64;
        let older_than = Id::lower_bound_at(cutoff);
        let mut total = 0;
        let mut after = Id(0);
        loop {
            let jobs = self.store.pending_fanouts(after, older_than, 500).await?;
            for job in &jobs {
                self.engine.fanout.publish(*job).await?;
            }
            total += jobs.len();
            self.metrics.republished.inc_by(jobs.len() as u64);
            match jobs.last() {
                Some(last) if jobs.len() == 500 => after = last.post,
                _ => break,
            }
        }
        if total > 0 {
            tracing::info!(
                posts = total,
                "outbox sweep re-published unfinished fan-outs"
            );
        }
        Ok(total)
    }
}
