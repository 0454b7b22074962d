//! Executors (k6 semantics): who starts iterations, when, on which VU.
//!
//! * VU executors (`constant-vus`, `ramping-vus`, `per-vu-iterations`, `shared-iterations`) run
//!   a task per VU that loops iterations; a ramping VU waits while the ramp is below its index.
//! * Arrival-rate executors (`constant-arrival-rate`, `ramping-arrival-rate`) follow an
//!   [`schedule::ArrivalSchedule`] and hand each start to an idle VU (allocating up to `maxVUs`);
//!   when none is free the iteration is dropped and counted (open model, k6's semantics) —
//!   unless `maxLateness` is set, in which case it waits for the next free VU for at most that
//!   long (wrk2's semantics: a stalled target is then seen as latency rather than as dropped
//!   iterations). Either way the time an iteration waited behind its intended start is passed to
//!   it, so latency is measured from the intended start (no coordinated omission) while the raw
//!   service time is kept apart.
//!
//! After the schedule ends no iteration starts; in-flight ones get `gracefulStop`, then are
//! interrupted. A stop request (Ctrl-C, abort) ends the schedule early the same way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use loadlab_kit::Shutdown;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::{Recorder, Registry};
use crate::spec::ExecutorSpec;

pub mod pool;
pub mod schedule;

use schedule::{ArrivalSchedule, Ramp};

/// What one iteration does. Implemented by the scenarios.
#[async_trait]
pub trait Iteration: Send + Sync + 'static {
    /// Per-VU state (connections, identity).
    type Vu: Send + 'static;

    /// Creates VU `id`'s state.
    fn new_vu(&self, id: u64, recorder: Recorder) -> Self::Vu;

    /// Runs one iteration; `queued` is how long it waited behind its intended start.
    async fn run(&self, vu: &mut Self::Vu, queued: Duration);
}

/// Outcome of an execution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Execution {
    /// Seconds from the first scheduled start to the end of the last iteration.
    pub duration: Duration,
    /// Iterations cut off by the end of `gracefulStop`.
    pub interrupted: u64,
    /// Whether a stop request ended it early.
    pub stopped_early: bool,
}

/// Live figures the generator guard reads.
#[derive(Debug, Default)]
pub struct Pacing {
    /// Largest lateness of an iteration start behind schedule since the last reset, µs
    /// (arrival-rate executors).
    pub max_dispatch_lag_us: AtomicU64,
    /// Largest lateness of a 100 ms probe timer since the last reset, µs: a starved runtime.
    pub max_timer_lag_us: AtomicU64,
}

/// Measures how late a 100 ms timer fires, on its own task, until `stop`.
pub async fn probe_timer_lag(pacing: Arc<Pacing>, stop: Shutdown) {
    let period = Duration::from_millis(100);
    let mut next = Instant::now() + period;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.wait() => return,
        }
        let late = Instant::now().saturating_duration_since(next).as_micros() as u64;
        pacing.max_timer_lag_us.fetch_max(late, Ordering::Relaxed);
        next += period;
        if next < Instant::now() {
            next = Instant::now() + period;
        }
    }
}

/// Runs `spec` with `iteration` until the schedule ends or `stop` fires.
pub async fn execute<I: Iteration>(
    spec: &ExecutorSpec,
    iteration: Arc<I>,
    registry: Arc<Registry>,
    pacing: Arc<Pacing>,
    stop: Shutdown,
) -> Execution {
    let start = Instant::now();
    let graceful = spec.graceful_stop();
    // VUs run on the engine's threads: the generator guard watches their timers too.
    let probes = Shutdown::new();
    if let Some(pool) = pool::pool() {
        for handle in pool.handles() {
            handle.spawn(probe_timer_lag(pacing.clone(), probes.clone()));
        }
    }
    let mut vus = JoinSet::new();
    let spawn_loop = |vus: &mut JoinSet<()>, id: u64, plan: VuPlan| {
        pool::spawn_vu(
            vus,
            vu_loop(
                iteration.clone(),
                registry.clone(),
                id,
                plan,
                start,
                stop.clone(),
            ),
        );
    };
    let stopped_early = match spec {
        ExecutorSpec::ConstantVus(e) => {
            let end = start + e.duration;
            for id in 0..u64::from(e.vus) {
                let plan = VuPlan::Until(end);
                spawn_loop(&mut vus, id, plan);
            }
            registry.vus_max.store(u64::from(e.vus), Ordering::Relaxed);
            wait_until(end, &stop).await
        }
        ExecutorSpec::RampingVus(e) => {
            let ramp = Arc::new(Ramp::new(f64::from(e.start_vus), &e.stages));
            let max = ramp.max_value().ceil() as u64;
            let end = start + Duration::from_secs_f64(ramp.end());
            for id in 0..max {
                let plan = VuPlan::Ramping {
                    ramp: ramp.clone(),
                    index: id,
                    end,
                };
                spawn_loop(&mut vus, id, plan);
            }
            registry.vus_max.store(max, Ordering::Relaxed);
            wait_until(end, &stop).await
        }
        ExecutorSpec::PerVuIterations(e) => {
            let end = start + e.max_duration;
            for id in 0..u64::from(e.vus) {
                let plan = VuPlan::Count {
                    left: u64::from(e.iterations),
                    end,
                };
                spawn_loop(&mut vus, id, plan);
            }
            registry.vus_max.store(u64::from(e.vus), Ordering::Relaxed);
            wait_for_vus_or(&mut vus, end, &stop).await
        }
        ExecutorSpec::SharedIterations(e) => {
            let end = start + e.max_duration;
            let left = Arc::new(AtomicU64::new(u64::from(e.iterations)));
            for id in 0..u64::from(e.vus) {
                let plan = VuPlan::Shared {
                    left: left.clone(),
                    end,
                };
                spawn_loop(&mut vus, id, plan);
            }
            registry.vus_max.store(u64::from(e.vus), Ordering::Relaxed);
            wait_for_vus_or(&mut vus, end, &stop).await
        }
        ExecutorSpec::ConstantArrivalRate(e) => {
            let schedule =
                ArrivalSchedule::new(Ramp::constant(f64::from(e.rate), e.duration), e.time_unit);
            arrivals(
                &schedule,
                e.pre_allocated_vus,
                e.max_vus,
                e.max_lateness,
                &iteration,
                &registry,
                &pacing,
                start,
                &stop,
                &mut vus,
            )
            .await
        }
        ExecutorSpec::RampingArrivalRate(e) => {
            let schedule =
                ArrivalSchedule::new(Ramp::new(f64::from(e.start_rate), &e.stages), e.time_unit);
            arrivals(
                &schedule,
                e.pre_allocated_vus,
                e.max_vus,
                e.max_lateness,
                &iteration,
                &registry,
                &pacing,
                start,
                &stop,
                &mut vus,
            )
            .await
        }
    };
    // Graceful stop: nothing new starts (VU loops check the schedule's end and `stop` before
    // every iteration; idle arrival-rate VUs have been released); in-flight iterations get
    // `graceful` to finish.
    let deadline = Instant::now() + graceful;
    let mut interrupted = 0;
    loop {
        tokio::select! {
            next = vus.join_next() => {
                if next.is_none() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                interrupted = vus.len() as u64;
                vus.abort_all();
                while vus.join_next().await.is_some() {}
                break;
            }
        }
    }
    probes.trigger();
    registry.vus.store(0, Ordering::Relaxed);
    Execution {
        duration: start.elapsed(),
        interrupted,
        stopped_early,
    }
}

/// Waits until `end`; true when `stop` fired first.
async fn wait_until(end: Instant, stop: &Shutdown) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(end) => false,
        () = stop.wait() => true,
    }
}

/// Waits until every VU finished its iterations, `end`, or `stop`.
async fn wait_for_vus_or(vus: &mut JoinSet<()>, end: Instant, stop: &Shutdown) -> bool {
    loop {
        tokio::select! {
            next = vus.join_next() => {
                if next.is_none() {
                    return false;
                }
            }
            () = tokio::time::sleep_until(end) => return false,
            () = stop.wait() => return true,
        }
    }
}

enum VuPlan {
    Until(Instant),
    Ramping {
        ramp: Arc<Ramp>,
        index: u64,
        end: Instant,
    },
    Count {
        left: u64,
        end: Instant,
    },
    Shared {
        left: Arc<AtomicU64>,
        end: Instant,
    },
}

async fn vu_loop<I: Iteration>(
    iteration: Arc<I>,
    registry: Arc<Registry>,
    id: u64,
    mut plan: VuPlan,
    start: Instant,
    stop: Shutdown,
) {
    let recorder = registry.recorder(id);
    let mut vu = iteration.new_vu(id, recorder.clone());
    let mut active = false;
    let set_active = |active: &mut bool, now_active: bool| {
        if *active != now_active {
            if now_active {
                registry.busy();
            } else {
                registry.vus.fetch_sub(1, Ordering::Relaxed);
            }
            *active = now_active;
        }
    };
    loop {
        if stop.is_triggered() {
            break;
        }
        let now = Instant::now();
        let go = match &mut plan {
            VuPlan::Until(end) => now < *end,
            VuPlan::Count { left, end } => {
                let go = *left > 0 && now < *end;
                *left = left.saturating_sub(1);
                go
            }
            VuPlan::Shared { left, end } => {
                now < *end
                    && left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok()
            }
            VuPlan::Ramping { ramp, index, end } => {
                if now >= *end {
                    false
                } else {
                    let t = now.duration_since(start).as_secs_f64();
                    let level = (*index + 1) as f64;
                    if ramp.value_at(t) >= level {
                        true
                    } else {
                        // Below the ramp: idle until it reaches this VU (or the end).
                        set_active(&mut active, false);
                        let wake = ramp
                            .next_time_at_least(level, t)
                            .map_or(*end, |s| start + Duration::from_secs_f64(s));
                        // Re-check at least every second: floating-point edges must not strand a VU.
                        let wake = wake.min(now + Duration::from_secs(1)).min(*end);
                        tokio::select! {
                            () = tokio::time::sleep_until(wake) => {}
                            () = stop.wait() => {}
                        }
                        continue;
                    }
                }
            }
        };
        if !go {
            break;
        }
        set_active(&mut active, true);
        let began = Instant::now();
        iteration.run(&mut vu, Duration::ZERO).await;
        recorder.iteration(began.elapsed());
    }
    set_active(&mut active, false);
}

/// The hand-off between the arrival schedule and its VUs: idle VUs, and iterations waiting for
/// one (only with `maxLateness`). One lock keeps "no VU free → queue" and "VU frees up → take
/// from the queue" from missing each other.
#[derive(Default)]
struct Dispatch {
    idle: Vec<mpsc::Sender<Instant>>,
    waiting: std::collections::VecDeque<Instant>,
}

type SharedDispatch = Arc<Mutex<Dispatch>>;

#[allow(clippy::too_many_arguments)]
async fn arrivals<I: Iteration>(
    schedule: &ArrivalSchedule,
    pre_allocated: u32,
    max_vus: u32,
    max_lateness: Duration,
    iteration: &Arc<I>,
    registry: &Arc<Registry>,
    pacing: &Arc<Pacing>,
    start: Instant,
    stop: &Shutdown,
    vus: &mut JoinSet<()>,
) -> bool {
    let max_vus = u64::from(max_vus.max(pre_allocated).max(1));
    let dispatch: SharedDispatch = Arc::new(Mutex::new(Dispatch::default()));
    // Fires when the schedule is over, releasing idle VUs (busy ones finish their iteration).
    let done = stop.child();
    let recorder = registry.recorder(u64::MAX);
    let mut allocated = 0u64;
    let spawn_vu = |allocated: &mut u64, vus: &mut JoinSet<()>, first: Option<Instant>| {
        let (tx, rx) = mpsc::channel(1);
        if let Some(at) = first {
            // Capacity 1 and a fresh channel: this cannot fail.
            let _ = tx.try_send(at);
        } else {
            lock(&dispatch).idle.push(tx.clone());
        }
        let vu = ArrivalVu {
            id: *allocated,
            jobs: rx,
            me: tx,
            dispatch: dispatch.clone(),
            max_lateness,
            done: done.clone(),
        };
        pool::spawn_vu(vus, vu.run(iteration.clone(), registry.clone()));
        *allocated += 1;
        registry.vus_max.store(*allocated, Ordering::Relaxed);
    };
    for _ in 0..u64::from(pre_allocated).min(max_vus) {
        spawn_vu(&mut allocated, vus, None);
    }
    let mut k = 0u64;
    let mut stopped = false;
    while let Some(offset) = schedule.start_of(k) {
        k += 1;
        let at = start + Duration::from_secs_f64(offset);
        if at > Instant::now() {
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = stop.wait() => {
                    stopped = true;
                    break;
                }
            }
        } else if stop.is_triggered() {
            stopped = true;
            break;
        }
        // Latency counts from this moment: the iteration is due and released. Timer lateness
        // (usually below a millisecond) is the generator's own and goes to the guard instead.
        let released = Instant::now();
        let lag = released.saturating_duration_since(at).as_micros() as u64;
        pacing.max_dispatch_lag_us.fetch_max(lag, Ordering::Relaxed);
        let at = released;
        let mut d = lock(&dispatch);
        if let Some(tx) = d.idle.pop() {
            drop(d);
            if tx.try_send(at).is_err() {
                recorder.dropped(1);
            }
        } else if allocated < max_vus {
            drop(d);
            spawn_vu(&mut allocated, vus, Some(at));
        } else if !max_lateness.is_zero() {
            d.waiting.push_back(at);
        } else {
            drop(d);
            recorder.dropped(1);
        }
    }
    if !stopped {
        // The schedule ends at its end, not at its last start.
        stopped = wait_until(start + Duration::from_secs_f64(schedule.end()), stop).await;
    }
    done.trigger();
    if stopped {
        // Nothing queued starts after a stop request.
        let left = std::mem::take(&mut lock(&dispatch).waiting).len();
        recorder.dropped(left as u64);
    }
    stopped
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One arrival-rate VU: runs the iterations handed to it, then serves the waiting queue, then
/// goes idle.
struct ArrivalVu {
    id: u64,
    jobs: mpsc::Receiver<Instant>,
    me: mpsc::Sender<Instant>,
    dispatch: SharedDispatch,
    max_lateness: Duration,
    done: Shutdown,
}

impl ArrivalVu {
    async fn run<I: Iteration>(mut self, iteration: Arc<I>, registry: Arc<Registry>) {
        let recorder = registry.recorder(self.id);
        let mut vu = iteration.new_vu(self.id, recorder.clone());
        let mut next: Option<Instant> = None;
        loop {
            let intended = match next.take() {
                Some(at) => at,
                // A job already handed over wins over `done`: it was scheduled before the end.
                None => tokio::select! {
                    biased;
                    job = self.jobs.recv() => match job {
                        Some(at) => at,
                        None => return,
                    },
                    () = self.done.wait() => return,
                },
            };
            registry.busy();
            let began = Instant::now();
            let queued = began.saturating_duration_since(intended);
            iteration.run(&mut vu, queued).await;
            recorder.iteration(began.elapsed() + queued);
            registry.vus.fetch_sub(1, Ordering::Relaxed);
            // Take the oldest waiting iteration that is not too late; drop the stale ones.
            let mut d = lock(&self.dispatch);
            let now = Instant::now();
            let mut stale = 0;
            while let Some(at) = d.waiting.pop_front() {
                if now.saturating_duration_since(at) <= self.max_lateness {
                    next = Some(at);
                    break;
                }
                stale += 1;
            }
            if next.is_none() {
                d.idle.push(self.me.clone());
            }
            drop(d);
            if stale > 0 {
                recorder.dropped(stale);
            }
        }
    }
}
