//! Pure schedules behind the executors: a piecewise-linear ramp through stages, when the k-th
//! iteration of an arrival-rate executor starts, and when a ramping-VUs VU becomes active.

use std::time::Duration;

use crate::spec::Stage;

/// A value ramped linearly from breakpoint to breakpoint: `(0, start)`, then one breakpoint at the
/// end of each stage. After the last stage the value is the last target.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    /// (seconds, value), strictly increasing in time (zero-length stages are jumps).
    points: Vec<(f64, f64)>,
}

impl Ramp {
    /// A ramp from `start` through `stages`.
    pub fn new(start: f64, stages: &[Stage]) -> Ramp {
        let mut points = vec![(0.0, start)];
        let mut t = 0.0;
        for stage in stages {
            t += stage.duration.as_secs_f64();
            points.push((t, f64::from(stage.target)));
        }
        Ramp { points }
    }

    /// A constant value for `duration`.
    pub fn constant(value: f64, duration: Duration) -> Ramp {
        Ramp {
            points: vec![(0.0, value), (duration.as_secs_f64(), value)],
        }
    }

    /// End of the last stage, in seconds.
    pub fn end(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.0)
    }

    /// Largest value anywhere on the ramp.
    pub fn max_value(&self) -> f64 {
        self.points.iter().map(|p| p.1).fold(0.0, f64::max)
    }

    /// The value at `t` seconds.
    pub fn value_at(&self, t: f64) -> f64 {
        for w in self.points.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if t < t1 {
                if t <= t0 || t1 <= t0 {
                    return v0;
                }
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0);
            }
        }
        self.points.last().map_or(0.0, |p| p.1)
    }

    /// ∫₀ᵗ value, with `t` clamped to the ramp.
    pub fn integral(&self, t: f64) -> f64 {
        let mut total = 0.0;
        for w in self.points.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if t <= t0 {
                break;
            }
            let end = t.min(t1);
            let v_end = if t1 > t0 {
                v0 + (v1 - v0) * (end - t0) / (t1 - t0)
            } else {
                v0
            };
            total += (v0 + v_end) / 2.0 * (end - t0);
        }
        total
    }

    /// The earliest `t` with `integral(t) >= x`, or `None` when the ramp ends first.
    pub fn inverse_integral(&self, x: f64) -> Option<f64> {
        if x <= 0.0 {
            return Some(0.0);
        }
        let mut before = 0.0;
        for w in self.points.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            let len = t1 - t0;
            if len <= 0.0 {
                continue;
            }
            let area = (v0 + v1) / 2.0 * len;
            if before + area >= x {
                let need = x - before;
                let slope = (v1 - v0) / len;
                // Solve slope/2·τ² + v0·τ = need in the cancellation-free form.
                let disc = (v0 * v0 + 2.0 * slope * need).max(0.0);
                let denom = v0 + disc.sqrt();
                let tau = if denom > 0.0 { 2.0 * need / denom } else { 0.0 };
                return Some((t0 + tau).min(t1));
            }
            before += area;
        }
        None
    }

    /// The earliest `t >= from` at which the value is at least `level`, before the end.
    pub fn next_time_at_least(&self, level: f64, from: f64) -> Option<f64> {
        if self.value_at(from) >= level {
            return Some(from);
        }
        for w in self.points.windows(2) {
            let ((t0, v0), (t1, v1)) = (w[0], w[1]);
            if t1 <= from {
                continue;
            }
            if t1 <= t0 {
                // A jump at t0.
                if v1 >= level && t0 >= from {
                    return Some(t0);
                }
                continue;
            }
            if v1 >= level && v1 > v0 {
                let t = t0 + (level - v0) / (v1 - v0) * (t1 - t0);
                let t = t.max(from).max(t0);
                if t < t1 || (t <= t1 && v1 >= level) {
                    return Some(t);
                }
            }
        }
        None
    }
}

/// When iterations of an arrival-rate executor start: the k-th (from 0) starts when the
/// integral of the rate reaches k, so any window holds the integral of the rate over it ±1.
#[derive(Debug, Clone)]
pub struct ArrivalSchedule {
    /// Rate per second over time.
    ramp: Ramp,
    /// Iterations in the whole schedule, computed once so that `start_of` and `total` agree
    /// even where floating-point rounding puts the last inverse a hair before the end.
    total: u64,
}

impl ArrivalSchedule {
    /// A schedule of `ramp` iterations per `time_unit`.
    pub fn new(ramp: Ramp, time_unit: Duration) -> ArrivalSchedule {
        let per_second = 1.0 / time_unit.as_secs_f64().max(1e-9);
        let points = ramp
            .points
            .iter()
            .map(|(t, v)| (*t, v * per_second))
            .collect();
        let ramp = Ramp { points };
        let area = ramp.integral(ramp.end());
        // Iteration k starts when the integral reaches k (k = 0 at t = 0), strictly before the
        // end; an area a rounding error above a whole number does not add an iteration.
        let whole = (area - 1e-9).ceil();
        let total = if whole <= 0.0 { 0 } else { whole as u64 };
        ArrivalSchedule { ramp, total }
    }

    /// Seconds after the start at which iteration `k` starts, or `None` past the end.
    pub fn start_of(&self, k: u64) -> Option<f64> {
        if k >= self.total {
            return None;
        }
        let t = self.ramp.inverse_integral(k as f64)?;
        Some(t.min(self.ramp.end()))
    }

    /// Iterations the schedule starts in total.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Length in seconds.
    pub fn end(&self) -> f64 {
        self.ramp.end()
    }

    /// Iterations per second at `t`.
    pub fn rate_at(&self, t: f64) -> f64 {
        self.ramp.value_at(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stage(secs: u64, target: u32) -> Stage {
        Stage {
            duration: Duration::from_secs(secs),
            target,
        }
    }

    #[test]
    fn ramp_values_and_integrals() {
        let r = Ramp::new(0.0, &[stage(10, 100), stage(10, 100), stage(5, 0)]);
        assert_eq!(r.end(), 25.0);
        assert_eq!(r.value_at(5.0), 50.0);
        assert_eq!(r.value_at(15.0), 100.0);
        assert_eq!(r.value_at(22.5), 50.0);
        assert_eq!(r.value_at(99.0), 0.0);
        assert!((r.integral(10.0) - 500.0).abs() < 1e-9);
        assert!((r.integral(25.0) - 1750.0).abs() < 1e-9);
        assert!((r.inverse_integral(500.0).expect("inside") - 10.0).abs() < 1e-9);
        assert!((r.inverse_integral(125.0).expect("inside") - 5.0).abs() < 1e-9);
        assert_eq!(r.inverse_integral(1750.1), None);
        assert_eq!(r.next_time_at_least(50.0, 0.0), Some(5.0));
        assert_eq!(r.next_time_at_least(50.0, 12.0), Some(12.0));
        assert_eq!(r.next_time_at_least(101.0, 0.0), None);
    }

    #[test]
    fn constant_rate_starts_evenly() {
        let s = ArrivalSchedule::new(
            Ramp::constant(10.0, Duration::from_secs(2)),
            Duration::from_secs(1),
        );
        let starts: Vec<f64> = (0..).map_while(|k| s.start_of(k)).collect();
        assert_eq!(starts.len(), 20);
        assert_eq!(s.total(), 20);
        assert!((starts[1] - 0.1).abs() < 1e-9 && (starts[19] - 1.9).abs() < 1e-9);
        // 30 per minute is one every 2 s.
        let slow = ArrivalSchedule::new(
            Ramp::constant(30.0, Duration::from_secs(10)),
            Duration::from_secs(60),
        );
        assert_eq!((0..).map_while(|k| slow.start_of(k)).count(), 5);
    }

    proptest! {
        // Any ramping-arrival-rate plan starts, in every second, the integral of its rate over
        // that second, within ±1 — and in total, the integral over the whole plan (rounded up).
        #[test]
        fn arrival_counts_match_the_rate(
            start in 0u32..500,
            stages in proptest::collection::vec((1u64..8, 0u32..2_000), 1..5),
        ) {
            let stages: Vec<Stage> = stages.into_iter().map(|(d, t)| stage(d, t)).collect();
            let ramp = Ramp::new(f64::from(start), &stages);
            let s = ArrivalSchedule::new(ramp.clone(), Duration::from_secs(1));
            let starts: Vec<f64> = (0..).map_while(|k| s.start_of(k)).collect();
            prop_assert!(starts.windows(2).all(|w| w[0] <= w[1]));
            let end = ramp.end().ceil() as u64;
            for sec in 0..end {
                let (a, b) = (sec as f64, ((sec + 1) as f64).min(ramp.end()));
                let expected = ramp.integral(b) - ramp.integral(a);
                let got = starts.iter().filter(|t| **t >= a && **t < b).count() as f64;
                prop_assert!((got - expected).abs() <= 1.0 + 1e-6, "second {}: {} starts, rate integral {}", sec, got, expected);
            }
            prop_assert_eq!(starts.len() as u64, s.total());
        }

        // A VU with index i is active exactly when the ramp is at least i + 1.
        #[test]
        fn vu_activation_times_are_consistent(
            start in 0u32..20,
            stages in proptest::collection::vec((1u64..6, 0u32..40), 1..4),
            level in 1u32..40,
            from in 0.0f64..20.0,
        ) {
            let stages: Vec<Stage> = stages.into_iter().map(|(d, t)| stage(d, t)).collect();
            let ramp = Ramp::new(f64::from(start), &stages);
            let level = f64::from(level);
            match ramp.next_time_at_least(level, from) {
                Some(t) => {
                    prop_assert!(t >= from - 1e-9);
                    prop_assert!(ramp.value_at(t) >= level - 1e-6, "value {} at {} below {}", ramp.value_at(t), t, level);
                    // Nothing earlier (sampled) qualifies.
                    let mut probe = from;
                    while probe < t - 1e-3 {
                        prop_assert!(ramp.value_at(probe) < level + 1e-6);
                        probe += 0.01;
                    }
                }
                None => {
                    let mut probe = from;
                    while probe < ramp.end() {
                        prop_assert!(ramp.value_at(probe) < level, "value {} at {} reaches {}", ramp.value_at(probe), probe, level);
                        probe += 0.01;
                    }
                }
            }
        }
    }
}
