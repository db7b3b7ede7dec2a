//! Throttling: at most `per_period` deliveries start in any window of one `period`, across
//! every service the layer made (and their clones). A delivery over the budget is not failed:
//! its call **waits** (asynchronously, on tokio's clock) for its slot, then runs.
//!
//! By default the budget is spread evenly: one delivery every `period / per_period`. With
//! [`burst`](ThrottleLayer::burst) up to that many may start at once, and the rest of the
//! budget follows evenly; in either case no window of one `period` ever holds more than
//! `per_period` starts (so 25 deliveries at 10 per second, burst 10, start at 0 s, 1 s and 2 s:
//! 10, 10 and 5).
//!
//! Slots are handed out in the order the calls are made. The wait happens inside the
//! delivery's handling, so a waiting delivery counts against the subscription's
//! `max_in_flight`, which is what holds back fetching: throttling slows the consumer down
//! instead of buffering. A call dropped while it waits (a timeout outside this layer, the
//! shutdown deadline) still uses up its slot.
//!
//! One layer is one budget: a router-level layer throttles all subscriptions together, a
//! route-level one throttles one event type. Make another layer for another budget.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> streamwise::Result<()> {
//! use std::time::Duration;
//! use streamwise::Message;
//! use streamwise::router::{Incoming, handler_service};
//! use streamwise_middleware::throttle::ThrottleLayer;
//! use tokio::time::Instant;
//! use tower::{Layer, ServiceExt};
//!
//! // 5 deliveries per second, all 5 at once if they are there.
//! let throttle = ThrottleLayer::new(5, Duration::from_secs(1))?.burst(5)?;
//! let svc = throttle.layer(handler_service(|| async {}, ()));
//! let started = Instant::now();
//! for n in 0..6 {
//!     svc.clone().oneshot(Incoming::for_test(Message::new("t", &n)?)).await.unwrap();
//! }
//! // The sixth had to wait for the window of the first five to pass.
//! assert_eq!(started.elapsed(), Duration::from_secs(1));
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use streamwise::router::{Incoming, Outcome};
use streamwise::{BoxError, Error, Result};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::take_ready;

/// The longest `period` a [`ThrottleLayer`] accepts: 365 days.
pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// Wraps services in [`Throttle`]; every service it makes (and every clone of this layer)
/// shares one budget.
#[derive(Clone, Debug)]
pub struct ThrottleLayer {
    schedule: Arc<Mutex<Schedule>>,
}

impl ThrottleLayer {
    /// At most `per_period` deliveries per `period`, spread evenly (one every
    /// `period / per_period`).
    ///
    /// A zero `per_period` is refused naming `per_period`; a zero `period`, or one longer
    /// than [`MAX_PERIOD`], naming `period`.
    pub fn new(per_period: u32, period: Duration) -> Result<Self> {
        if per_period == 0 {
            return Err(Error::invalid("per_period", "must be at least 1"));
        }
        if period.is_zero() {
            return Err(Error::invalid("period", "must be longer than zero"));
        }
        if period > MAX_PERIOD {
            return Err(Error::invalid(
                "period",
                format_args!("{period:?} is longer than the longest period, {MAX_PERIOD:?}"),
            ));
        }
        Ok(ThrottleLayer {
            schedule: Arc::new(Mutex::new(Schedule::new(per_period, period, 1))),
        })
    }

    /// Lets up to `burst` deliveries start at once (default 1: evenly spread). The limit of
    /// `per_period` in any window of one `period` still holds; to keep it, the throttle
    /// remembers the start times of the deliveries of the last `period` (at most
    /// `per_period` of them).
    ///
    /// A `burst` of zero or above `per_period` is refused naming `burst`. This makes a new
    /// budget: clones of the layer made before do not share it.
    pub fn burst(self, burst: u32) -> Result<Self> {
        let (per_period, period) = {
            let schedule = lock(&self.schedule);
            (schedule.per_period, schedule.period)
        };
        if burst == 0 || burst > per_period {
            return Err(Error::invalid(
                "burst",
                format_args!("must be between 1 and per_period ({per_period}), not {burst}"),
            ));
        }
        Ok(ThrottleLayer {
            schedule: Arc::new(Mutex::new(Schedule::new(per_period, period, burst))),
        })
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;
    fn layer(&self, inner: S) -> Throttle<S> {
        Throttle {
            inner,
            schedule: self.schedule.clone(),
        }
    }
}

/// Delays calls of the inner service so that they keep to the budget of its
/// [`ThrottleLayer`].
#[derive(Clone, Debug)]
pub struct Throttle<S> {
    inner: S,
    schedule: Arc<Mutex<Schedule>>,
}

impl<S> Service<Incoming> for Throttle<S>
where
    S: Service<Incoming, Response = Outcome> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = ThrottleFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> ThrottleFuture<S> {
        // The slot is reserved now, so that slots go out in the order of the calls.
        let now = Instant::now();
        let start = lock(&self.schedule).reserve(now);
        let state = if start > now {
            tracing::debug!(wait = ?(start - now), id = %incoming.info().id(), "throttled");
            State::Waiting {
                until: tokio::time::sleep_until(start),
                call: Some((take_ready(&mut self.inner), incoming)),
            }
        } else {
            State::Called {
                future: self.inner.call(incoming),
            }
        };
        ThrottleFuture { state }
    }
}

pin_project! {
    /// The future of [`Throttle`]: waits for the delivery's slot, then runs the inner
    /// service's call.
    pub struct ThrottleFuture<S>
    where
        S: Service<Incoming>,
    {
        #[pin]
        state: State<S>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S>
    where
        S: Service<Incoming>,
    {
        // The service (polled ready) and the delivery, to call once the slot has come.
        Waiting {
            #[pin]
            until: Sleep,
            call: Option<(S, Incoming)>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S> Future for ThrottleFuture<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Output = std::result::Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Waiting { until, call } => {
                    ready!(until.poll(cx));
                    let (mut inner, incoming) =
                        call.take().expect("ThrottleFuture polled after it completed");
                    let future = inner.call(incoming);
                    state.set(State::Called { future });
                }
                StateProj::Called { future } => return future.poll(cx).map_err(Into::into),
            }
        }
    }
}

fn lock(schedule: &Mutex<Schedule>) -> std::sync::MutexGuard<'_, Schedule> {
    // The lock is never held across anything that can panic, but a poisoned lock must not
    // take the router down either.
    schedule.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The budget: a GCRA (a token bucket kept as one "theoretical arrival time") for the spacing
/// and the burst, plus, with a burst, the start times of the last `per_period` deliveries for
/// the window limit.
#[derive(Debug)]
struct Schedule {
    per_period: u32,
    period: Duration,
    /// `period / per_period`, rounded up, so that `per_period` intervals cover the period.
    interval: Duration,
    /// How far ahead of its theoretical time a start may be: `(burst - 1) * interval`.
    tolerance: Duration,
    /// When the next delivery would start if they were evenly spread; `None` before the first.
    next_even: Option<Instant>,
    /// Start times of the last `per_period` deliveries (only kept with a burst: without one,
    /// starts are at least `interval` apart, so no period can hold more than `per_period`).
    recent: Option<VecDeque<Instant>>,
}

impl Schedule {
    fn new(per_period: u32, period: Duration, burst: u32) -> Self {
        let nanos = period.as_nanos().div_ceil(u128::from(per_period));
        // `period` is at most MAX_PERIOD, so this fits; the fallback is never taken.
        let interval = u64::try_from(nanos).map_or(period, Duration::from_nanos);
        Schedule {
            per_period,
            period,
            interval,
            tolerance: interval * (burst - 1),
            next_even: None,
            recent: (burst > 1).then(VecDeque::new),
        }
    }

    /// Reserves the earliest slot at or after `now` and returns its start.
    fn reserve(&mut self, now: Instant) -> Instant {
        let mut start = now;
        if let Some(next_even) = self.next_even
            && let Some(earliest) = next_even.checked_sub(self.tolerance)
        {
            start = start.max(earliest);
        }
        if let Some(recent) = &mut self.recent {
            // Starts a whole period ago no longer count; dropping them keeps the memory to
            // what the last period used.
            while recent.front().is_some_and(|&oldest| oldest + self.period <= now) {
                recent.pop_front();
            }
            if recent.len() >= self.per_period as usize
                && let Some(&oldest) = recent.front()
            {
                start = start.max(oldest + self.period);
                recent.pop_front();
            }
            // Starts never decrease, so `recent` stays sorted.
            recent.push_back(start);
        }
        let base = self.next_even.map_or(start, |next| next.max(start));
        self.next_even = Some(base + self.interval);
        start
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::future::join_all;
    use streamwise::Message;
    use streamwise::router::{Incoming, Outcome, State, handler_service};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn incoming(n: u32) -> Incoming {
        Incoming::for_test(Message::new("t", &n).unwrap())
    }

    /// When each call reached the handler, relative to the test's start.
    #[derive(Clone)]
    struct Starts(Arc<Mutex<Vec<Duration>>>, Instant);

    impl Starts {
        fn new() -> Self {
            Starts(Arc::new(Mutex::new(Vec::new())), Instant::now())
        }
        fn taken(&self) -> Vec<Duration> {
            let mut starts = self.0.lock().unwrap().clone();
            starts.sort();
            starts
        }
    }

    async fn record(State(starts): State<Starts>) {
        starts.0.lock().unwrap().push(starts.1.elapsed());
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Makes `n` calls at once (each on a clone) and checks that every one was handled.
    async fn call_all<S>(svc: &S, n: u32)
    where
        S: Service<Incoming, Response = Outcome, Error = BoxError> + Clone,
    {
        let results = join_all((0..n).map(|i| svc.clone().oneshot(incoming(i)))).await;
        assert_eq!(results.len(), n as usize);
        for result in results {
            assert_eq!(
                result.unwrap(),
                Outcome::ack(),
                "throttled calls wait, they do not fail"
            );
        }
    }

    /// No window `[t, t + period)` holds more than `limit` of the sorted `starts`.
    fn assert_window(starts: &[Duration], limit: usize, period: Duration) {
        for (i, first) in starts.iter().enumerate() {
            let within = starts[i..].iter().take_while(|s| **s < *first + period).count();
            assert!(
                within <= limit,
                "{within} starts within {period:?} of {first:?}: {starts:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_burst_deliveries_are_spread_evenly() {
        let starts = Starts::new();
        let svc = ThrottleLayer::new(10, Duration::from_secs(1))
            .unwrap()
            .layer(handler_service(record, starts.clone()));
        call_all(&svc, 25).await;
        let taken = starts.taken();
        let expected: Vec<Duration> = (0..25).map(|i| ms(100 * i)).collect();
        assert_eq!(taken, expected);
        assert_window(&taken, 10, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_burst_lets_a_whole_period_start_at_once_and_no_more() {
        let starts = Starts::new();
        let svc = ThrottleLayer::new(10, Duration::from_secs(1))
            .unwrap()
            .burst(10)
            .unwrap()
            .layer(handler_service(record, starts.clone()));
        call_all(&svc, 25).await;
        let taken = starts.taken();
        let expected: Vec<Duration> = (0..25).map(|i| Duration::from_secs(i / 10)).collect();
        assert_eq!(taken, expected, "10 at 0 s, 10 at 1 s, 5 at 2 s");
        assert_window(&taken, 10, Duration::from_secs(1));
        assert!(starts.1.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_burst_starts_that_many_then_spreads_the_rest() {
        let starts = Starts::new();
        let svc = ThrottleLayer::new(10, Duration::from_secs(1))
            .unwrap()
            .burst(3)
            .unwrap()
            .layer(handler_service(record, starts.clone()));
        call_all(&svc, 20).await;
        let taken = starts.taken();
        // Per second: 3 at once, then one every 100 ms up to the 10 of the period.
        let second: Vec<u64> = vec![0, 0, 0, 100, 200, 300, 400, 500, 600, 700];
        let expected: Vec<Duration> = second
            .iter()
            .chain(second.iter())
            .zip(0..)
            .map(|(at, i)| ms(at + if i < 10 { 0 } else { 1000 }))
            .collect();
        assert_eq!(taken, expected);
        assert_window(&taken, 10, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_throttle_lets_the_next_delivery_through_at_once() {
        let starts = Starts::new();
        let svc = ThrottleLayer::new(2, Duration::from_secs(1))
            .unwrap()
            .layer(handler_service(record, starts.clone()));
        call_all(&svc, 2).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        call_all(&svc, 1).await;
        assert_eq!(
            starts.taken(),
            [ms(0), ms(500), Duration::from_secs(10) + ms(500)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn clones_and_services_of_one_layer_share_the_budget() {
        let starts = Starts::new();
        let layer = ThrottleLayer::new(4, Duration::from_secs(1)).unwrap();
        let a = layer.layer(handler_service(record, starts.clone()));
        let b = layer.clone().layer(handler_service(record, starts.clone()));
        let both = join_all((0..4u32).map(|i| {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            svc.oneshot(incoming(i))
        }))
        .await;
        assert!(both.iter().all(Result::is_ok));
        assert_eq!(starts.taken(), [ms(0), ms(250), ms(500), ms(750)]);

        // Another layer is another budget: it does not wait for this one.
        let other = Starts::new();
        let separate = ThrottleLayer::new(4, Duration::from_secs(1))
            .unwrap()
            .layer(handler_service(record, other.clone()));
        let (_, second) = tokio::join!(a.clone().oneshot(incoming(9)), separate.oneshot(incoming(9)));
        second.unwrap();
        assert_eq!(other.taken(), [ms(0)]);
        assert_eq!(starts.taken().last(), Some(&ms(1000)));
    }

    #[test]
    fn uneven_periods_are_rounded_up_so_the_limit_holds_to_the_nanosecond() {
        // (Tested on the schedule itself: tokio's timers round to milliseconds.)
        for burst in [1, 3] {
            let mut schedule = Schedule::new(3, Duration::from_secs(1), burst);
            let now = Instant::now();
            let starts: Vec<Duration> = (0..7).map(|_| schedule.reserve(now) - now).collect();
            assert_window(&starts, 3, Duration::from_secs(1));
            assert!(starts[3] >= Duration::from_secs(1), "burst {burst}: {starts:?}");
        }
        let mut even = Schedule::new(3, Duration::from_secs(1), 1);
        let now = Instant::now();
        let fourth = (0..4).map(|_| even.reserve(now)).last().unwrap();
        assert_eq!(fourth - now, Duration::from_nanos(3 * 333_333_334));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_outcomes_of_the_inner_service_pass_through() {
        let nack = ThrottleLayer::new(1, Duration::from_secs(1))
            .unwrap()
            .layer(handler_service(|| async { Outcome::nack() }, ()));
        assert_eq!(nack.oneshot(incoming(1)).await.unwrap(), Outcome::nack());
        let fails = ThrottleLayer::new(1, Duration::from_secs(1))
            .unwrap()
            .layer(handler_service(|| async { Err::<(), _>("down") }, ()));
        assert_eq!(fails.oneshot(incoming(1)).await.unwrap_err().to_string(), "down");
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        let field = |r: Result<ThrottleLayer>| r.unwrap_err().invalid_field().map(str::to_owned);
        let second = Duration::from_secs(1);
        assert_eq!(
            field(ThrottleLayer::new(0, second)).as_deref(),
            Some("per_period")
        );
        assert_eq!(
            field(ThrottleLayer::new(1, Duration::ZERO)).as_deref(),
            Some("period")
        );
        assert_eq!(
            field(ThrottleLayer::new(1, Duration::MAX)).as_deref(),
            Some("period")
        );
        assert!(ThrottleLayer::new(1, MAX_PERIOD).is_ok());
        let layer = || ThrottleLayer::new(5, second).unwrap();
        assert_eq!(field(layer().burst(0)).as_deref(), Some("burst"));
        assert_eq!(field(layer().burst(6)).as_deref(), Some("burst"));
        assert!(layer().burst(5).is_ok());
        assert!(ThrottleLayer::new(u32::MAX, Duration::from_nanos(1)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn inside_a_router_deliveries_are_throttled() {
        use streamwise::memory::MemoryBackend;
        use streamwise::router::Router;
        use streamwise::{Publisher, SubscribeOptions};

        let backend = MemoryBackend::new();
        let starts = Starts::new();
        let router =
            Router::with_state(starts.clone()).layer(ThrottleLayer::new(2, Duration::from_secs(1)).unwrap());
        let routes = router.routes().route("t", record);
        let running = router
            .subscribe("r", SubscribeOptions::new("g", "c").max_in_flight(10), routes)
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let publisher = backend.publisher();
        for n in 0..6 {
            publisher
                .publish("r", Message::new("t", &n).unwrap())
                .await
                .unwrap();
        }
        streamwise::testing::wait_until_handled(&running, 6).await;
        running.shutdown().await.unwrap();
        assert_eq!(backend.pending_count("r", "g").unwrap(), 0);
        let taken = starts.taken();
        assert_eq!(taken.len(), 6);
        assert_window(&taken, 2, Duration::from_secs(1));
        for pair in taken.windows(2) {
            assert!(pair[1] - pair[0] >= ms(500), "{taken:?}");
        }
    }
}
