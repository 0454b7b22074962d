//! Sharding a run over N workers: each worker gets 1/N of the rate or VUs (the remainder goes to
//! the lowest indices, one each, so shares always sum to the total and every worker can compute
//! any other's share), a disjoint range of VU ids and a disjoint slice of the set-up users.
//!
//! Why the remainder goes to the lowest indices rather than rotating per stage: it keeps each
//! worker's ramp a scaled copy of the whole, and a ramp's value and integral are linear in its
//! breakpoints, so the workers' rates sum to the run's rate at every instant — not just at stage
//! ends. What is not exact: each worker rounds its own iteration count of a ramping arrival rate
//! down, so a ramped run may start up to N−1 iterations fewer than one process would; constant
//! rates over whole seconds are exact.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::executor::Iteration;
use crate::metrics::Recorder;
use crate::spec::{ExecutorSpec, Stage};

/// The `index`-th of `parts` shares of `total`: `total / parts`, plus one for the first
/// `total % parts` indices. Shares of all indices sum to `total`.
pub fn share(total: u64, parts: u32, index: u32) -> u64 {
    let parts = u64::from(parts.max(1));
    let index = u64::from(index);
    if index >= parts {
        return 0;
    }
    total / parts + u64::from(index < total % parts)
}

/// The sum of the shares of the indices below `index`.
pub fn share_offset(total: u64, parts: u32, index: u32) -> u64 {
    let parts64 = u64::from(parts.max(1));
    let index = u64::from(index).min(parts64);
    index * (total / parts64) + index.min(total % parts64)
}

fn share32(total: u32, parts: u32, index: u32) -> u32 {
    // A share is at most the total, so it fits.
    u32::try_from(share(u64::from(total), parts, index)).unwrap_or(total)
}

/// Which part of a run one process generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// This worker, 0..total.
    pub index: u32,
    /// Workers of the run.
    pub total: u32,
    /// This worker's VU ids start here (VU `i` of the worker is VU `vu_offset + i` of the run).
    pub vu_offset: u64,
    /// The set-up users this worker acts as.
    pub users: Range<u32>,
}

impl Shard {
    /// The whole run, in one process.
    pub fn whole() -> Shard {
        Shard {
            index: 0,
            total: 1,
            vu_offset: 0,
            users: 0..u32::MAX,
        }
    }

    /// The users to act as, out of `n` set-up users. When there are fewer users than workers a
    /// slice can be empty; such a worker acts as any user (disjointness cannot hold then).
    pub fn actors(&self, n: usize) -> Range<usize> {
        let from = (self.users.start as usize).min(n);
        let to = (self.users.end as usize).min(n);
        if from < to { from..to } else { 0..n }
    }
}

/// Worker `index`'s share of `spec` out of `parts` workers.
///
/// * arrival rates: the rate (each stage target, the start rate) and the VU pool are shared; a
///   worker with a share of the rate keeps at least one VU;
/// * VU executors: the VUs (each stage target) are shared;
/// * `per-vu-iterations`: VUs are shared, each VU still runs `iterations`;
/// * `shared-iterations`: VUs are shared, and the iterations among the workers that have VUs.
///
/// Durations, time units, graceful stops and lateness are the run's. A worker can get a zero
/// share (fewer VUs or iterations per second than workers): it then joins the barrier, runs an
/// empty schedule and reports nothing.
pub fn executor_share(spec: &ExecutorSpec, parts: u32, index: u32) -> ExecutorSpec {
    let s = |n: u32| share32(n, parts, index);
    let stages = |stages: &[Stage]| -> Vec<Stage> {
        stages
            .iter()
            .map(|st| Stage {
                duration: st.duration,
                target: s(st.target),
            })
            .collect()
    };
    let pool = |pre: u32, max: u32, has_rate: bool| -> (u32, u32) {
        let (pre, max) = (s(pre), s(max));
        if has_rate && pre == 0 && max == 0 {
            (1, 1)
        } else {
            (pre, max)
        }
    };
    match spec {
        ExecutorSpec::ConstantVus(e) => {
            let mut e = e.clone();
            e.vus = s(e.vus);
            ExecutorSpec::ConstantVus(e)
        }
        ExecutorSpec::RampingVus(e) => {
            let mut e = e.clone();
            e.start_vus = s(e.start_vus);
            e.stages = stages(&e.stages);
            ExecutorSpec::RampingVus(e)
        }
        ExecutorSpec::ConstantArrivalRate(e) => {
            let mut e = e.clone();
            e.rate = s(e.rate);
            (e.pre_allocated_vus, e.max_vus) = pool(e.pre_allocated_vus, e.max_vus, e.rate > 0);
            ExecutorSpec::ConstantArrivalRate(e)
        }
        ExecutorSpec::RampingArrivalRate(e) => {
            let mut e = e.clone();
            e.start_rate = s(e.start_rate);
            e.stages = stages(&e.stages);
            let has_rate = e.start_rate > 0 || e.stages.iter().any(|st| st.target > 0);
            (e.pre_allocated_vus, e.max_vus) = pool(e.pre_allocated_vus, e.max_vus, has_rate);
            ExecutorSpec::RampingArrivalRate(e)
        }
        ExecutorSpec::PerVuIterations(e) => {
            let mut e = e.clone();
            e.vus = s(e.vus);
            ExecutorSpec::PerVuIterations(e)
        }
        ExecutorSpec::SharedIterations(e) => {
            let mut e = e.clone();
            // Only workers with VUs can run iterations: share them among those.
            let with_vus = parts.min(e.vus).max(1);
            e.iterations = if index < with_vus {
                share32(e.iterations, with_vus, index)
            } else {
                0
            };
            e.vus = s(e.vus);
            ExecutorSpec::SharedIterations(e)
        }
    }
}

/// The most VUs an executor can run at once (the width of its VU id range).
pub fn vu_capacity(spec: &ExecutorSpec) -> u64 {
    match spec {
        ExecutorSpec::ConstantVus(e) => u64::from(e.vus),
        ExecutorSpec::RampingVus(e) => e
            .stages
            .iter()
            .map(|s| u64::from(s.target))
            .fold(u64::from(e.start_vus), u64::max),
        ExecutorSpec::ConstantArrivalRate(e) => u64::from(e.max_vus.max(e.pre_allocated_vus)),
        ExecutorSpec::RampingArrivalRate(e) => u64::from(e.max_vus.max(e.pre_allocated_vus)),
        ExecutorSpec::PerVuIterations(e) => u64::from(e.vus),
        ExecutorSpec::SharedIterations(e) => u64::from(e.vus),
    }
}

/// Worker `index`'s executor and shard out of `parts` workers, `users` set-up users.
pub fn plan(spec: &ExecutorSpec, users: u32, parts: u32, index: u32) -> (ExecutorSpec, Shard) {
    let mine = executor_share(spec, parts, index);
    // Arrival-rate executors allocate at least one VU even with an empty pool.
    let width = |e: &ExecutorSpec| vu_capacity(e).max(1);
    let vu_offset = (0..index)
        .map(|j| width(&executor_share(spec, parts, j)))
        .sum();
    let from = share_offset(u64::from(users), parts, index);
    let to = from + share(u64::from(users), parts, index);
    let shard = Shard {
        index,
        total: parts,
        vu_offset,
        users: u32::try_from(from).unwrap_or(u32::MAX)..u32::try_from(to).unwrap_or(u32::MAX),
    };
    (mine, shard)
}

/// A workload whose VU ids are shifted into this worker's range, so VU-derived identities (chat
/// users, `{{vu}}`, random seeds) do not repeat across workers.
pub struct ShardVus<I> {
    inner: Arc<I>,
    offset: u64,
}

impl<I> ShardVus<I> {
    /// Wraps `inner` for `shard`.
    pub fn new(inner: Arc<I>, shard: &Shard) -> Arc<ShardVus<I>> {
        Arc::new(ShardVus {
            inner,
            offset: shard.vu_offset,
        })
    }
}

// Written out rather than with `#[async_trait]` so the inner workload's boxed future is passed
// through as is: the adaptor adds no allocation per iteration.
impl<I: Iteration> Iteration for ShardVus<I> {
    type Vu = I::Vu;

    fn new_vu(&self, id: u64, recorder: Recorder) -> I::Vu {
        self.inner.new_vu(id.saturating_add(self.offset), recorder)
    }

    fn run<'life0, 'life1, 'async_trait>(
        &'life0 self,
        vu: &'life1 mut I::Vu,
        queued: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.inner.run(vu, queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ConstantArrivalRate, RampingArrivalRate, RampingVus, SharedIterations};
    use proptest::prelude::*;

    fn rate_of(e: &ExecutorSpec) -> u32 {
        match e {
            ExecutorSpec::ConstantArrivalRate(e) => e.rate,
            _ => unreachable!("constant-arrival-rate"),
        }
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_total_for_any_split(total in 0u64..1_000_000, parts in 1u32..200) {
            let shares: Vec<u64> = (0..parts).map(|i| share(total, parts, i)).collect();
            prop_assert_eq!(shares.iter().sum::<u64>(), total);
            // Fair: no two shares differ by more than one, and larger ones come first.
            prop_assert!(shares.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
            for i in 0..=parts {
                prop_assert_eq!(share_offset(total, parts, i), shares[..i as usize].iter().sum::<u64>());
            }
        }

        #[test]
        fn executor_shares_sum_to_the_run(rate in 1u32..100_000, vus in 1u32..5_000, iterations in 1u32..100_000, parts in 1u32..64) {
            let car = ExecutorSpec::ConstantArrivalRate(ConstantArrivalRate {
                rate,
                time_unit: Duration::from_secs(1),
                duration: Duration::from_secs(10),
                pre_allocated_vus: vus,
                max_vus: vus * 2,
                max_lateness: Duration::ZERO,
                graceful_stop: Duration::from_secs(1),
            });
            let total: u32 = (0..parts).map(|i| rate_of(&executor_share(&car, parts, i))).sum();
            prop_assert_eq!(total, rate);
            let shared = ExecutorSpec::SharedIterations(SharedIterations {
                vus,
                iterations,
                max_duration: Duration::from_secs(10),
                graceful_stop: Duration::from_secs(1),
            });
            let (mut v, mut it) = (0, 0);
            for i in 0..parts {
                let ExecutorSpec::SharedIterations(e) = executor_share(&shared, parts, i) else {
                    unreachable!("shared-iterations");
                };
                // A worker without VUs never holds iterations it could not run.
                prop_assert!(e.vus > 0 || e.iterations == 0);
                v += e.vus;
                it += e.iterations;
            }
            prop_assert_eq!((v, it), (vus, iterations));
            // VU id ranges are disjoint and contiguous; user slices partition the users.
            let mut next_vu = 0;
            let mut next_user = 0;
            for i in 0..parts {
                let (e, shard) = plan(&car, vus, parts, i);
                prop_assert_eq!(shard.vu_offset, next_vu);
                next_vu += vu_capacity(&e).max(1);
                prop_assert_eq!(shard.users.start, next_user);
                next_user = shard.users.end;
            }
            prop_assert_eq!(next_user, vus);
        }
    }

    #[test]
    fn ramps_are_shared_stage_by_stage() {
        let spec = ExecutorSpec::RampingArrivalRate(RampingArrivalRate {
            start_rate: 10,
            time_unit: Duration::from_secs(1),
            stages: vec![
                Stage {
                    duration: Duration::from_secs(5),
                    target: 100,
                },
                Stage {
                    duration: Duration::from_secs(5),
                    target: 7,
                },
            ],
            pre_allocated_vus: 5,
            max_vus: 0,
            max_lateness: Duration::ZERO,
            graceful_stop: Duration::from_secs(1),
        });
        let shares: Vec<_> = (0..3).map(|i| executor_share(&spec, 3, i)).collect();
        let ExecutorSpec::RampingArrivalRate(first) = &shares[0] else {
            unreachable!("ramping-arrival-rate");
        };
        assert_eq!(first.start_rate, 4);
        assert_eq!(first.stages[0].target, 34);
        assert_eq!(first.stages[1].target, 3);
        assert_eq!(first.stages[1].duration, Duration::from_secs(5));
        // The ramps' values sum to the run's at any instant (linear between breakpoints).
        let ramp = |e: &ExecutorSpec| match e {
            ExecutorSpec::RampingArrivalRate(e) => {
                crate::executor::schedule::Ramp::new(f64::from(e.start_rate), &e.stages)
            }
            _ => unreachable!("ramping-arrival-rate"),
        };
        let whole = ramp(&spec);
        for t in [0.0, 1.3, 5.0, 7.7, 10.0] {
            let sum: f64 = shares.iter().map(|e| ramp(e).value_at(t)).sum();
            assert!((sum - whole.value_at(t)).abs() < 1e-9, "t={t}: {sum}");
        }
    }

    #[test]
    fn a_worker_with_a_rate_keeps_a_vu_and_zero_shares_stay_empty() {
        let spec = ExecutorSpec::ConstantArrivalRate(ConstantArrivalRate {
            rate: 2,
            time_unit: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            pre_allocated_vus: 1,
            max_vus: 1,
            max_lateness: Duration::ZERO,
            graceful_stop: Duration::from_secs(1),
        });
        let ExecutorSpec::ConstantArrivalRate(second) = executor_share(&spec, 3, 1) else {
            unreachable!("constant-arrival-rate");
        };
        assert_eq!((second.rate, second.pre_allocated_vus), (1, 1));
        let ExecutorSpec::ConstantArrivalRate(third) = executor_share(&spec, 3, 2) else {
            unreachable!("constant-arrival-rate");
        };
        assert_eq!(
            (third.rate, third.pre_allocated_vus, third.max_vus),
            (0, 0, 0)
        );
        let ramping = ExecutorSpec::RampingVus(RampingVus {
            start_vus: 0,
            stages: vec![Stage {
                duration: Duration::from_secs(1),
                target: 5,
            }],
            graceful_stop: Duration::from_secs(1),
        });
        let (_, shard) = plan(&ramping, 10, 2, 1);
        assert_eq!(shard.vu_offset, 3);
        assert_eq!(shard.users, 5..10);
        assert_eq!(shard.actors(7), 5..7);
        assert_eq!(shard.actors(3), 0..3, "too few users: act as any");
    }
}
