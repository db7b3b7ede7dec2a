//! Circuit breaking: stops calling a handler that keeps failing, for a while, instead of
//! hammering it (or what it depends on) with every delivery.
//!
//! The breaker is shared by every service its layer made (and their clones), and has three
//! states ([`CircuitState`]):
//!
//! - **closed**: calls pass. After `failure_threshold` consecutive failures it opens.
//! - **open**, for `open_for`: the handler is not called; each delivery gets
//!   [`Outcome::nack_after`] the time the breaker still stays open, so it comes back when a
//!   trial may already have closed it.
//! - **half-open**, once `open_for` has passed: the next delivery is a trial and is let
//!   through; until it ends, the others get `nack_after(open_for)`. A successful trial closes
//!   the breaker, a failed one opens it again for `open_for`. A trial that is dropped before
//!   it ends (a timeout outside this layer, the shutdown deadline) decides nothing: the next
//!   delivery becomes the trial.
//!
//! A **failure** is, by default, an error (a [`Permanent`] one too; it is still passed through
//! unchanged, so the router dead-letters it) or an outcome whose verdict is
//! [`Verdict::Nack`]; acks and dead letters are successes. Change that with
//! [`failure_when`](CircuitBreakerLayer::failure_when). Results of calls that started before
//! the last change of state are ignored (a slow call that began while the breaker was closed
//! does not close or reopen it later).
//!
//! Transitions are logged with `tracing` (open: `warn`, half-open and closed: `info`), and
//! [`state`](CircuitBreakerLayer::state) reports the state for monitoring: keep a clone of
//! the layer.
//!
//! Things to know:
//! - A delivery nacked by an open breaker is a delivery: its delivery count goes up, and
//!   after `max_deliveries` it is dead-lettered. With a long outage, raise `max_deliveries`
//!   or `open_for` so that each message is not bounced too often.
//! - Put timeouts and panic recovery *inside* the breaker, so that they count as failures.
//! - One layer is one breaker: a router-level layer trips for every subscription together,
//!   a route-level one for one event type.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> streamwise::Result<()> {
//! use std::time::Duration;
//! use streamwise::Message;
//! use streamwise::router::{Incoming, Outcome, handler_service};
//! use streamwise_middleware::circuit_breaker::{CircuitBreakerLayer, CircuitState};
//! use tower::{Layer, ServiceExt};
//!
//! async fn payment_gateway_is_down() -> Result<(), &'static str> { Err("503 from the gateway") }
//!
//! let breaker = CircuitBreakerLayer::new(2, Duration::from_secs(30))?;
//! let svc = breaker.layer(handler_service(payment_gateway_is_down, ()));
//! let incoming = || Incoming::for_test(Message::new("payment.requested", &7).unwrap());
//! for _ in 0..2 {
//!     assert!(svc.clone().oneshot(incoming()).await.is_err());
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//! // Open: the handler is not called; the delivery comes back once the breaker may close.
//! let outcome = svc.clone().oneshot(incoming()).await.unwrap();
//! assert_eq!(outcome, Outcome::nack_after(Duration::from_secs(30)));
//!
//! tokio::time::sleep(Duration::from_secs(30)).await;
//! assert_eq!(breaker.state(), CircuitState::HalfOpen);
//! # Ok(()) }
//! ```
//!
//! [`Permanent`]: streamwise::router::Permanent

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use streamwise::router::{Incoming, Outcome, Verdict};
use streamwise::{BoxError, Error, MAX_NACK_DELAY, Result};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The state of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls pass; consecutive failures are counted.
    Closed,
    /// Calls are not made; deliveries are nacked until the open time has passed.
    Open,
    /// The open time has passed: one trial call decides whether to close or open again.
    HalfOpen,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        })
    }
}

/// Decides whether the result of a call is a failure.
type Classifier = Arc<dyn Fn(Result<&Outcome, &BoxError>) -> bool + Send + Sync>;

/// The default classification: an error, or a nack.
fn error_or_nack(result: Result<&Outcome, &BoxError>) -> bool {
    match result {
        Ok(outcome) => matches!(outcome.verdict(), Verdict::Nack { .. }),
        Err(_) => true,
    }
}

/// Wraps services in [`CircuitBreaker`]; every service it makes (and every clone of this
/// layer) shares one breaker.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<Mutex<Breaker>>,
    is_failure: Classifier,
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &*lock(&self.breaker))
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// A breaker that opens after `failure_threshold` consecutive failures and stays open for
    /// `open_for`.
    ///
    /// A zero `failure_threshold` is refused naming `failure_threshold`; a zero `open_for`,
    /// or one longer than the longest nack delay ([`MAX_NACK_DELAY`]), naming `open_for`.
    pub fn new(failure_threshold: u32, open_for: Duration) -> Result<Self> {
        if failure_threshold == 0 {
            return Err(Error::invalid("failure_threshold", "must be at least 1"));
        }
        if open_for.is_zero() {
            return Err(Error::invalid("open_for", "must be longer than zero"));
        }
        if open_for > MAX_NACK_DELAY {
            return Err(Error::invalid(
                "open_for",
                format_args!("{open_for:?} is longer than the longest nack delay, {MAX_NACK_DELAY:?}"),
            ));
        }
        Ok(CircuitBreakerLayer {
            breaker: Arc::new(Mutex::new(Breaker {
                name: None,
                failure_threshold,
                open_for,
                phase: Phase::Closed { failures: 0 },
                generation: 0,
            })),
            is_failure: Arc::new(error_or_nack),
        })
    }

    /// Decides what counts as a failure (default: an error or a nack). The predicate gets the
    /// result of the inner service.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use streamwise_middleware::circuit_breaker::CircuitBreakerLayer;
    ///
    /// // Only errors trip the breaker; a handler's own nacks do not.
    /// let breaker = CircuitBreakerLayer::new(5, Duration::from_secs(10))?
    ///     .failure_when(|result| result.is_err());
    /// # Ok::<(), streamwise::Error>(())
    /// ```
    #[must_use]
    pub fn failure_when<P>(mut self, predicate: P) -> Self
    where
        P: Fn(Result<&Outcome, &BoxError>) -> bool + Send + Sync + 'static,
    {
        self.is_failure = Arc::new(predicate);
        self
    }

    /// Names the breaker in its log lines (`breaker` field), to tell several apart.
    #[must_use]
    pub fn name(self, name: impl Into<String>) -> Self {
        lock(&self.breaker).name = Some(name.into());
        self
    }

    /// The state now (open turns into half-open once `open_for` has passed).
    pub fn state(&self) -> CircuitState {
        lock(&self.breaker).state(Instant::now())
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
            is_failure: self.is_failure.clone(),
        }
    }
}

/// Calls the inner service while its breaker lets it; see the [module docs](self).
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Mutex<Breaker>>,
    is_failure: Classifier,
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &*lock(&self.breaker))
            .finish_non_exhaustive()
    }
}

impl<S> CircuitBreaker<S> {
    /// The state of the breaker now.
    pub fn state(&self) -> CircuitState {
        lock(&self.breaker).state(Instant::now())
    }
}

impl<S> Service<Incoming> for CircuitBreaker<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = CircuitBreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> CircuitBreakerFuture<S::Future> {
        let admission = lock(&self.breaker).admit(Instant::now());
        let ticket = match admission {
            Admission::Reject { retry_after } => {
                tracing::debug!(id = %incoming.info().id(), ?retry_after, "circuit breaker rejected the delivery");
                return CircuitBreakerFuture {
                    state: State::Rejected {
                        outcome: Some(Outcome::nack_after(retry_after)),
                    },
                };
            }
            Admission::Call { generation, trial } => Ticket {
                breaker: self.breaker.clone(),
                generation,
                trial,
                settled: false,
            },
        };
        CircuitBreakerFuture {
            state: State::Called {
                future: self.inner.call(incoming),
                ticket,
                is_failure: self.is_failure.clone(),
            },
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`]: a nack at once while the breaker is open, otherwise
    /// the inner service's, whose result the breaker records.
    pub struct CircuitBreakerFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { outcome: Option<Outcome> },
        Called {
            #[pin]
            future: F,
            ticket: Ticket,
            is_failure: Classifier,
        },
    }
}

impl<F, E> Future for CircuitBreakerFuture<F>
where
    F: Future<Output = std::result::Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = std::result::Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Rejected { outcome } => crate::decided(outcome, "CircuitBreakerFuture"),
            StateProj::Called {
                future,
                ticket,
                is_failure,
            } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                ticket.settle(is_failure(result.as_ref()));
                Poll::Ready(result)
            }
        }
    }
}

fn lock(breaker: &Mutex<Breaker>) -> MutexGuard<'_, Breaker> {
    // Nothing that can panic runs under the lock, but a poisoned lock must not take the
    // router down either.
    breaker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_running: bool },
}

/// The shared state of one breaker.
#[derive(Debug)]
struct Breaker {
    name: Option<String>,
    failure_threshold: u32,
    open_for: Duration,
    phase: Phase,
    /// Goes up at every change of state; a result counts only for the generation it started
    /// in.
    generation: u64,
}

enum Admission {
    Call { generation: u64, trial: bool },
    Reject { retry_after: Duration },
}

impl Breaker {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// Moves from open to half-open once the open time has passed.
    fn refresh(&mut self, now: Instant) {
        if let Phase::Open { until } = self.phase
            && now >= until
        {
            self.phase = Phase::HalfOpen { trial_running: false };
            self.generation += 1;
            tracing::info!(
                breaker = self.name(),
                "circuit breaker half-open: the next call is a trial"
            );
        }
    }

    fn state(&mut self, now: Instant) -> CircuitState {
        self.refresh(now);
        match self.phase {
            Phase::Closed { .. } => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    fn admit(&mut self, now: Instant) -> Admission {
        self.refresh(now);
        let generation = self.generation;
        match &mut self.phase {
            Phase::Closed { .. } => Admission::Call {
                generation,
                trial: false,
            },
            // `refresh` left it open, so `until` is still ahead.
            Phase::Open { until } => Admission::Reject {
                retry_after: until.saturating_duration_since(now),
            },
            Phase::HalfOpen { trial_running } if !*trial_running => {
                *trial_running = true;
                Admission::Call {
                    generation,
                    trial: true,
                }
            }
            Phase::HalfOpen { .. } => Admission::Reject {
                retry_after: self.open_for,
            },
        }
    }

    /// Records the result of a call admitted in `generation`.
    fn record(&mut self, generation: u64, trial: bool, failed: bool, now: Instant) {
        if generation != self.generation {
            return;
        }
        match &mut self.phase {
            Phase::Closed { failures } if failed => {
                *failures += 1;
                if *failures >= self.failure_threshold {
                    let failures = *failures;
                    self.open(now);
                    tracing::warn!(
                        breaker = self.name(),
                        failures,
                        open_for = ?self.open_for,
                        "circuit breaker opened after consecutive failures"
                    );
                }
            }
            Phase::Closed { failures } => *failures = 0,
            Phase::HalfOpen { .. } if trial && failed => {
                self.open(now);
                tracing::warn!(breaker = self.name(), open_for = ?self.open_for, "circuit breaker trial failed; opened again");
            }
            Phase::HalfOpen { .. } if trial => {
                self.phase = Phase::Closed { failures: 0 };
                self.generation += 1;
                tracing::info!(breaker = self.name(), "circuit breaker trial succeeded; closed");
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => {}
        }
    }

    /// A trial of `generation` ended without a result: the next call becomes the trial.
    fn release_trial(&mut self, generation: u64) {
        if generation == self.generation
            && let Phase::HalfOpen { trial_running } = &mut self.phase
        {
            *trial_running = false;
        }
    }

    fn open(&mut self, now: Instant) {
        // `open_for` is at most MAX_NACK_DELAY (30 days): no overflow.
        self.phase = Phase::Open {
            until: now + self.open_for,
        };
        self.generation += 1;
    }
}

/// A call let through by the breaker; its result is recorded once, and a trial dropped
/// without a result gives its place up.
struct Ticket {
    breaker: Arc<Mutex<Breaker>>,
    generation: u64,
    trial: bool,
    settled: bool,
}

impl Ticket {
    fn settle(&mut self, failed: bool) {
        self.settled = true;
        lock(&self.breaker).record(self.generation, self.trial, failed, Instant::now());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled && self.trial {
            lock(&self.breaker).release_trial(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use streamwise::Message;
    use streamwise::router::{Incoming, Json, Outcome, Permanent, State, handler_service};
    use tokio::sync::Notify;
    use tower::{Layer, ServiceExt};

    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(10);

    fn incoming(n: u32) -> Incoming {
        Incoming::for_test(Message::new("t", &n).unwrap())
    }

    /// A handler whose behaviour each test picks by payload: 0 fails, 1 succeeds, 2 nacks,
    /// 3 fails permanently, 4 waits for `release` and then succeeds, 5 waits and then fails.
    #[derive(Clone, Default)]
    struct Backend {
        calls: Arc<AtomicU32>,
        release: Arc<Notify>,
    }

    impl Backend {
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    async fn handler(
        Json(n): Json<u32>,
        State(backend): State<Backend>,
    ) -> std::result::Result<Outcome, BoxError> {
        backend.calls.fetch_add(1, Ordering::SeqCst);
        match n {
            0 => Err("the backend is down".into()),
            1 => Ok(Outcome::ack()),
            2 => Ok(Outcome::nack()),
            3 => Err(Permanent::new("order 7 refers to an unknown customer").into()),
            4 => {
                backend.release.notified().await;
                Ok(Outcome::ack())
            }
            _ => {
                backend.release.notified().await;
                Err("slow and down".into())
            }
        }
    }

    fn breaker(threshold: u32) -> (CircuitBreakerLayer, Backend) {
        (
            CircuitBreakerLayer::new(threshold, OPEN_FOR).unwrap(),
            Backend::default(),
        )
    }

    async fn call<S>(svc: &S, n: u32) -> std::result::Result<Outcome, BoxError>
    where
        S: Service<Incoming, Response = Outcome, Error = BoxError> + Clone,
    {
        svc.clone().oneshot(incoming(n)).await
    }

    /// Fails `threshold` times, leaving the breaker open.
    async fn trip<S>(svc: &S, threshold: u32)
    where
        S: Service<Incoming, Response = Outcome, Error = BoxError> + Clone,
    {
        for _ in 0..threshold {
            call(svc, 0).await.unwrap_err();
        }
    }

    /// The router boxes services as `BoxCloneSyncService`.
    fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}

    #[tokio::test(start_paused = true)]
    async fn closed_passes_calls_and_counts_only_consecutive_failures() {
        let (layer, backend) = breaker(3);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        for n in [0, 0, 1, 0, 2, 1] {
            call(&svc, n).await.ok();
        }
        assert_eq!(layer.state(), CircuitState::Closed);
        assert_eq!(backend.calls(), 6, "every call reached the handler");
        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::ack());
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_it_and_open_nacks_with_the_remaining_time() {
        let (layer, backend) = breaker(3);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        call(&svc, 0).await.unwrap_err();
        call(&svc, 2).await.unwrap(); // a nack is a failure by default
        assert_eq!(layer.state(), CircuitState::Closed);
        call(&svc, 0).await.unwrap_err();
        assert_eq!(layer.state(), CircuitState::Open);
        assert_eq!(svc.state(), CircuitState::Open);
        assert_eq!(backend.calls(), 3);

        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::nack_after(OPEN_FOR));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            call(&svc, 1).await.unwrap(),
            Outcome::nack_after(Duration::from_secs(6))
        );
        tokio::time::sleep(Duration::from_millis(5999)).await;
        assert_eq!(layer.state(), CircuitState::Open);
        assert_eq!(
            call(&svc, 1).await.unwrap(),
            Outcome::nack_after(Duration::from_millis(1))
        );
        assert_eq!(backend.calls(), 3, "the handler was not called while open");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_trial_through_and_a_success_closes_it() {
        let (layer, backend) = breaker(1);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        trip(&svc, 1).await;
        tokio::time::sleep(OPEN_FOR).await;
        assert_eq!(layer.state(), CircuitState::HalfOpen);

        let trial = tokio::spawn(svc.clone().oneshot(incoming(4)));
        while backend.calls() < 2 {
            tokio::task::yield_now().await;
        }
        // While the trial runs, the others are turned away for a whole open time.
        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::nack_after(OPEN_FOR));
        assert_eq!(backend.calls(), 2);
        assert_eq!(layer.state(), CircuitState::HalfOpen);

        backend.release.notify_one();
        assert_eq!(trial.await.unwrap().unwrap(), Outcome::ack());
        assert_eq!(layer.state(), CircuitState::Closed);
        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::ack());
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_again_for_the_whole_time() {
        let (layer, backend) = breaker(2);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        trip(&svc, 2).await;
        tokio::time::sleep(OPEN_FOR).await;
        call(&svc, 0).await.unwrap_err();
        assert_eq!(layer.state(), CircuitState::Open, "one failed trial is enough");
        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::nack_after(OPEN_FOR));
        assert_eq!(backend.calls(), 3);
        tokio::time::sleep(OPEN_FOR).await;
        assert_eq!(layer.state(), CircuitState::HalfOpen);
        assert_eq!(call(&svc, 1).await.unwrap(), Outcome::ack());
        assert_eq!(layer.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trial_gives_its_place_to_the_next_call() {
        let (layer, backend) = breaker(1);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        trip(&svc, 1).await;
        tokio::time::sleep(OPEN_FOR).await;
        let abandoned = tokio::time::timeout(Duration::from_secs(1), call(&svc, 4)).await;
        assert!(abandoned.is_err(), "the trial was still waiting");
        assert_eq!(layer.state(), CircuitState::HalfOpen);
        assert_eq!(
            call(&svc, 1).await.unwrap(),
            Outcome::ack(),
            "the next call was the trial"
        );
        assert_eq!(layer.state(), CircuitState::Closed);
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_counts_as_a_failure_and_passes_through_unchanged() {
        let (layer, backend) = breaker(1);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        let err = call(&svc, 3).await.unwrap_err();
        assert!(Permanent::is_permanent(&err), "still a Permanent error: {err:?}");
        assert_eq!(err.to_string(), "order 7 refers to an unknown customer");
        assert_eq!(layer.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_letters_are_successes_and_failure_when_changes_what_counts() {
        let backend = Backend::default();
        async fn dead(State(backend): State<Backend>) -> Outcome {
            backend.calls.fetch_add(1, Ordering::SeqCst);
            Outcome::dead_letter("bad message")
        }
        let layer = CircuitBreakerLayer::new(1, OPEN_FOR).unwrap();
        let svc = layer.layer(handler_service(dead, backend.clone()));
        call(&svc, 1).await.unwrap();
        assert_eq!(layer.state(), CircuitState::Closed);

        let errors_only = CircuitBreakerLayer::new(1, OPEN_FOR)
            .unwrap()
            .failure_when(|result| result.is_err());
        let svc = errors_only.layer(handler_service(handler, backend.clone()));
        for _ in 0..3 {
            assert_eq!(call(&svc, 2).await.unwrap(), Outcome::nack());
        }
        assert_eq!(errors_only.state(), CircuitState::Closed, "nacks do not count");
        call(&svc, 0).await.unwrap_err();
        assert_eq!(errors_only.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_and_services_of_one_layer_share_the_breaker() {
        let (layer, backend) = breaker(2);
        let a = layer.layer(handler_service(handler, backend.clone()));
        let b = layer.clone().layer(handler_service(handler, backend.clone()));
        assert_clone_send_sync(&a);
        call(&a, 0).await.unwrap_err();
        call(&b.clone(), 0).await.unwrap_err();
        assert_eq!(layer.state(), CircuitState::Open);
        assert_eq!(a.state(), CircuitState::Open);
        assert_eq!(call(&b, 1).await.unwrap(), Outcome::nack_after(OPEN_FOR));
        assert_eq!(backend.calls(), 2);

        // Another layer is another breaker.
        let other = CircuitBreakerLayer::new(2, OPEN_FOR).unwrap();
        assert_eq!(other.state(), CircuitState::Closed);
        let c = other.layer(handler_service(handler, backend.clone()));
        assert_eq!(call(&c, 1).await.unwrap(), Outcome::ack());
    }

    #[tokio::test(start_paused = true)]
    async fn results_of_calls_from_an_earlier_state_are_ignored() {
        let (layer, backend) = breaker(1);
        let svc = layer.layer(handler_service(handler, backend.clone()));
        // A slow call starts while closed; meanwhile another call trips the breaker.
        let slow = tokio::spawn(svc.clone().oneshot(incoming(4)));
        while backend.calls() < 1 {
            tokio::task::yield_now().await;
        }
        call(&svc, 0).await.unwrap_err();
        assert_eq!(layer.state(), CircuitState::Open);
        // Its success does not close the breaker it started under.
        backend.release.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), Outcome::ack());
        assert_eq!(layer.state(), CircuitState::Open);

        // And a slow failure from before does not reopen a breaker that closed since.
        tokio::time::sleep(OPEN_FOR).await;
        call(&svc, 1).await.unwrap();
        assert_eq!(layer.state(), CircuitState::Closed);
        let slow_failure = tokio::spawn(svc.clone().oneshot(incoming(5)));
        while backend.calls() < 4 {
            tokio::task::yield_now().await;
        }
        trip(&svc, 1).await;
        tokio::time::sleep(OPEN_FOR).await;
        call(&svc, 1).await.unwrap();
        assert_eq!(layer.state(), CircuitState::Closed);
        backend.release.notify_one();
        slow_failure.await.unwrap().unwrap_err();
        assert_eq!(layer.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_are_logged_with_the_breakers_name() {
        let (subscriber, captured) = crate::test_util::log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let backend = Backend::default();
        let layer = CircuitBreakerLayer::new(2, OPEN_FOR).unwrap().name("payments");
        let svc = layer.layer(handler_service(handler, backend.clone()));
        trip(&svc, 2).await;
        tokio::time::sleep(OPEN_FOR).await;
        call(&svc, 1).await.unwrap();
        let lines: Vec<String> = captured
            .text()
            .lines()
            .filter(|line| line.contains("circuit breaker"))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        let expected = [
            ("WARN", "circuit breaker opened after consecutive failures"),
            ("INFO", "circuit breaker half-open"),
            ("INFO", "circuit breaker trial succeeded; closed"),
        ];
        for (line, (level, text)) in lines.iter().zip(expected) {
            assert!(
                line.contains(level) && line.contains(text) && line.contains("breaker=\"payments\""),
                "{line}"
            );
        }
        assert!(lines[0].contains("failures=2"), "{}", lines[0]);
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        let field = |r: Result<CircuitBreakerLayer>| r.unwrap_err().invalid_field().map(str::to_owned);
        assert_eq!(
            field(CircuitBreakerLayer::new(0, OPEN_FOR)).as_deref(),
            Some("failure_threshold")
        );
        assert_eq!(
            field(CircuitBreakerLayer::new(1, Duration::ZERO)).as_deref(),
            Some("open_for")
        );
        assert_eq!(
            field(CircuitBreakerLayer::new(
                1,
                MAX_NACK_DELAY + Duration::from_nanos(1)
            ))
            .as_deref(),
            Some("open_for")
        );
        assert!(CircuitBreakerLayer::new(1, MAX_NACK_DELAY).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn inside_a_router_an_open_breaker_sends_deliveries_back_until_it_closes() {
        use streamwise::memory::MemoryBackend;
        use streamwise::router::{Router, Routes};
        use streamwise::{Publisher, SubscribeOptions};

        /// Fails its first two calls, then succeeds; records when each call was made.
        #[derive(Clone)]
        struct Flaky {
            calls: Arc<Mutex<Vec<Duration>>>,
            started: Instant,
        }
        async fn flaky(State(flaky): State<Flaky>) -> std::result::Result<(), &'static str> {
            let mut calls = flaky.calls.lock().unwrap();
            calls.push(flaky.started.elapsed());
            if calls.len() <= 2 { Err("down") } else { Ok(()) }
        }
        let state = Flaky {
            calls: Arc::new(Mutex::new(Vec::new())),
            started: Instant::now(),
        };
        let backend = MemoryBackend::new();
        let breaker = CircuitBreakerLayer::new(2, Duration::from_secs(5))
            .unwrap()
            .name("flaky");
        let routes = Routes::with_state(state.clone()).route_layered("t", flaky, breaker.clone());
        let running = Router::with_state(state.clone())
            .subscribe(
                "r",
                SubscribeOptions::new("g", "c")
                    .max_in_flight(1)
                    .max_deliveries(100),
                routes,
            )
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let publisher = backend.publisher();
        for n in 0..3 {
            publisher
                .publish("r", Message::new("t", &n).unwrap())
                .await
                .unwrap();
        }
        // Five calls (two failures, three successes), and every message acked.
        let deadline = Instant::now() + Duration::from_secs(60);
        while state.calls.lock().unwrap().len() < 5 || backend.pending_count("r", "g").unwrap() > 0 {
            assert!(Instant::now() < deadline, "{:?}", state.calls.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running.shutdown().await.unwrap();
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(
            backend.stream_len("{r}-dead").unwrap_or(0),
            0,
            "nothing was dead-lettered"
        );
        let calls = state.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 5, "two failures, then the three messages: {calls:?}");
        // The breaker opened at the second failure; the next call came no sooner than 5 s later.
        assert!(calls[2] >= calls[1] + Duration::from_secs(5), "{calls:?}");
    }
}
