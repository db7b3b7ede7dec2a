//! How long the router waits before a delivery whose handler failed comes back.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::MAX_NACK_DELAY;
use crate::error::{Error, Result};

/// The redelivery backoff of a subscription: when a handler returns an error or panics on
/// the n-th delivery of an entry, the router nacks it with a delay of
/// `initial × multiplier^(n-1)`, at most `max`, plus a random part of up to `jitter` times
/// that delay (never beyond `max`). [`Permanent`](super::Permanent) errors are dead-lettered
/// at once instead, and a handler's own [`Outcome::nack_after`](super::Outcome::nack_after)
/// keeps its delay.
///
/// Set it per subscription with [`Routes::retry_backoff`](super::Routes::retry_backoff), or
/// for every subscription that sets none with
/// [`Router::retry_backoff`](super::Router::retry_backoff).
///
/// The default is 100 ms doubling to 10 s, with 50 % jitter (the schedule of
/// `streamwise-middleware`'s retry layer). With the default `max_deliveries` of 10, the nine
/// waits before the tenth and last delivery are at least 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 +
/// 6.4 + 10 + 10 = 32.7 s: a dependency down for a few seconds sends nothing to the dead-letter
/// stream (a 3 s outage is over by the sixth delivery, which comes at least 3.1 s after the
/// first). To ride out longer outages, raise `max` or `max_deliveries`.
///
/// ```
/// use std::time::Duration;
/// use streamwise::router::{RetryBackoff, Routes};
///
/// let default = RetryBackoff::default();
/// assert_eq!(default, RetryBackoff::exponential(Duration::from_millis(100), Duration::from_secs(10)));
/// let waits: Duration = (1..10).map(|delivery| default.delay(delivery)).sum();
/// assert!(waits >= Duration::from_millis(32_700));
///
/// // A steady 2 s between deliveries, without jitter.
/// let steady = RetryBackoff::exponential(Duration::from_secs(2), Duration::from_secs(2))
///     .multiplier(1.0)
///     .jitter(0.0);
/// assert_eq!(steady.delay(7), Duration::from_secs(2));
///
/// // Redeliver at once, as if the handler had returned `Outcome::nack()`.
/// let routes = Routes::new().retry_backoff(RetryBackoff::none());
/// # let _ = routes;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl RetryBackoff {
    /// No backoff: a failed delivery is redelivered as soon as possible.
    pub const fn none() -> Self {
        RetryBackoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// `initial` after the first failed delivery, doubling per delivery up to `max`, with
    /// 50 % jitter.
    pub const fn exponential(initial: Duration, max: Duration) -> Self {
        RetryBackoff {
            initial,
            max,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    /// The factor from one delay to the next (at least 1; 1 keeps the delay steady).
    #[must_use]
    pub const fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Up to this fraction of the delay is added at random, so that deliveries that failed
    /// together do not all come back together (0 for none, 1 for up to double).
    #[must_use]
    pub const fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Checks the settings; the router does when it starts. Fails with [`Error::Invalid`]
    /// naming the field: `max` above [`MAX_NACK_DELAY`], `initial` above `max`, a multiplier
    /// below 1 or not finite, a jitter outside 0..=1.
    pub fn validate(&self) -> Result<()> {
        if self.max > MAX_NACK_DELAY {
            return Err(Error::invalid(
                "retry_backoff.max",
                format_args!(
                    "{:?} is longer than the longest nack delay, {MAX_NACK_DELAY:?}",
                    self.max
                ),
            ));
        }
        if self.initial > self.max {
            return Err(Error::invalid(
                "retry_backoff.initial",
                format_args!("{:?} is longer than the maximum {:?}", self.initial, self.max),
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(Error::invalid(
                "retry_backoff.multiplier",
                format_args!("{} is not a finite number of at least 1", self.multiplier),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::invalid(
                "retry_backoff.jitter",
                format_args!("{} is not between 0 and 1", self.jitter),
            ));
        }
        Ok(())
    }

    /// The delay before redelivery after the delivery numbered `delivery_count` (the first is
    /// 1) failed, jitter included. Never above `max` nor [`MAX_NACK_DELAY`].
    pub fn delay(&self, delivery_count: u64) -> Duration {
        self.delay_with(delivery_count, unit_random())
    }

    /// [`delay`](Self::delay) with the random part drawn as `unit`, in `[0, 1)`.
    fn delay_with(&self, delivery_count: u64, unit: f64) -> Duration {
        let max = self.max.min(MAX_NACK_DELAY);
        // Zero times an overflowing power would be NaN, not zero.
        if self.initial.is_zero() {
            return Duration::ZERO;
        }
        let exponent = i32::try_from(delivery_count.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let jittered = base * (1.0 + self.jitter * unit);
        // Past any duration (infinite), or NaN from settings that do not validate: the cap.
        Duration::try_from_secs_f64(jittered).map_or(max, |delay| delay.min(max))
    }
}

/// A random fraction in `[0, 1)`, from the standard library's randomly keyed hasher (jitter
/// needs no better, and no dependency).
fn unit_random() -> f64 {
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let draw = DRAWS.fetch_add(1, Ordering::Relaxed);
    let bits = std::collections::hash_map::RandomState::new().hash_one(draw);
    // The top 53 bits: every value exact in an f64, below 1.
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Just below 1: the most jitter `unit_random` can draw.
    const ALMOST_ONE: f64 = 1.0 - f64::EPSILON;

    #[test]
    fn the_default_doubles_from_100_ms_to_10_s() {
        let b = RetryBackoff::default();
        assert!(b.validate().is_ok());
        let schedule: Vec<Duration> = (1..=10).map(|n| b.delay_with(n, 0.0)).collect();
        let expected = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000].map(|ms| ms * MS);
        assert_eq!(schedule, expected);
        // The budget the type's docs promise: 32.7 s of waits before the tenth delivery.
        let waits: Duration = schedule[..9].iter().sum();
        assert_eq!(waits, 32_700 * MS);
        // Delivery 6 is the first to come 3 s or more after delivery 1.
        assert!(schedule[..4].iter().sum::<Duration>() < 3000 * MS);
        assert!(schedule[..5].iter().sum::<Duration>() >= 3000 * MS);
    }

    #[test]
    fn delays_grow_monotonically_until_the_cap() {
        let b = RetryBackoff::exponential(7 * MS, Duration::from_secs(90)).multiplier(1.5);
        for unit in [0.0, 0.5, ALMOST_ONE] {
            let mut previous = Duration::ZERO;
            for n in 0..200 {
                let delay = b.delay_with(n, unit);
                assert!(delay >= previous, "delivery {n}: {delay:?} < {previous:?}");
                assert!(delay <= Duration::from_secs(90));
                previous = delay;
            }
            assert_eq!(previous, Duration::from_secs(90), "the cap is reached");
        }
    }

    #[test]
    fn jitter_adds_at_most_its_fraction_and_never_passes_the_cap() {
        let b = RetryBackoff::exponential(100 * MS, Duration::from_secs(10)).jitter(0.25);
        for n in 1..=12 {
            let base = b.delay_with(n, 0.0);
            for _ in 0..100 {
                let delay = b.delay(n);
                assert!(delay >= base, "{delay:?}");
                assert!(
                    delay <= base.mul_f64(1.25).min(Duration::from_secs(10)),
                    "{delay:?}"
                );
            }
            assert!(b.delay_with(n, ALMOST_ONE) <= base.mul_f64(1.25));
        }
        assert_eq!(b.delay_with(1, 0.5), 112_500 * Duration::from_micros(1));
        // The jitter is drawn afresh: 100 draws are not all the same.
        let draws: std::collections::HashSet<Duration> = (0..100).map(|_| b.delay(1)).collect();
        assert!(draws.len() > 1);
        // Without jitter, the schedule is exact.
        let plain = b.jitter(0.0);
        assert!((0..100).all(|_| plain.delay(3) == 400 * MS));
    }

    #[test]
    fn extreme_delivery_counts_and_settings_stay_in_bounds() {
        let long = RetryBackoff::exponential(Duration::from_secs(1), MAX_NACK_DELAY).multiplier(1e6);
        let steep = RetryBackoff::exponential(Duration::from_nanos(1), Duration::from_secs(5)).jitter(1.0);
        for b in [RetryBackoff::default(), long, steep] {
            assert!(b.validate().is_ok());
            for n in [0, 1, 2, 64, 1 << 31, u64::MAX - 1, u64::MAX] {
                for unit in [0.0, ALMOST_ONE] {
                    let delay = b.delay_with(n, unit);
                    assert!(delay <= MAX_NACK_DELAY, "{b:?} {n}: {delay:?}");
                }
            }
        }
        assert_eq!(RetryBackoff::default().delay(u64::MAX), Duration::from_secs(10));
        assert_eq!(long.delay(u64::MAX), MAX_NACK_DELAY);
        // Delivery 0 does not happen; it is treated like the first.
        assert_eq!(RetryBackoff::default().delay_with(0, 0.0), 100 * MS);
        // Settings the router refuses still give a delay within the cap.
        let unchecked = RetryBackoff::exponential(Duration::from_secs(1), Duration::from_secs(2))
            .multiplier(f64::NAN)
            .jitter(-3.0);
        assert!(unchecked.validate().is_err());
        assert!(unchecked.delay(5) <= Duration::from_secs(2));
        let huge = RetryBackoff::exponential(Duration::MAX, Duration::MAX);
        assert_eq!(huge.delay(1), MAX_NACK_DELAY);
    }

    #[test]
    fn no_backoff_is_always_zero() {
        let none = RetryBackoff::none();
        assert!(none.validate().is_ok());
        assert!([0, 1, 2, 10, u64::MAX].iter().all(|&n| none.delay(n).is_zero()));
        // An initial of zero is no backoff too, whatever the cap.
        let zero = RetryBackoff::exponential(Duration::ZERO, Duration::from_secs(10));
        assert!([1, 5000, u64::MAX].iter().all(|&n| zero.delay(n).is_zero()));
    }

    #[test]
    fn bad_settings_name_the_field() {
        let field = |b: RetryBackoff| b.validate().unwrap_err().invalid_field().map(str::to_owned);
        let b = RetryBackoff::default();
        let cases = [
            (
                RetryBackoff::exponential(MS, MAX_NACK_DELAY + MS),
                "retry_backoff.max",
            ),
            (RetryBackoff::exponential(2 * MS, MS), "retry_backoff.initial"),
            (b.multiplier(0.5), "retry_backoff.multiplier"),
            (b.multiplier(f64::INFINITY), "retry_backoff.multiplier"),
            (b.multiplier(f64::NAN), "retry_backoff.multiplier"),
            (b.jitter(1.5), "retry_backoff.jitter"),
            (b.jitter(-0.1), "retry_backoff.jitter"),
            (b.jitter(f64::NAN), "retry_backoff.jitter"),
        ];
        for (backoff, expected) in cases {
            assert_eq!(field(backoff).as_deref(), Some(expected), "{backoff:?}");
        }
        assert!(b.multiplier(1.0).jitter(1.0).validate().is_ok());
    }
}
