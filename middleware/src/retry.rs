//! In-process retry: a handler that fails (returns an error) is called again, up to
//! `max_retries` times, with exponential backoff and jitter between attempts. Errors marked
//! [`Permanent`] (anywhere in their source chain) are never retried. Outcomes (including nack)
//! are not errors and pass through.
//!
//! Built on [`tower::retry`] and its exponential backoff. When the retries are spent, the last
//! error goes on outwards: the router nacks the delivery after the subscription's
//! [`RetryBackoff`] (or a dead-letter layer outside this one dead-letters it). The two
//! multiply: each delivery makes up to `max_retries + 1` calls, and the delivery holds its
//! `max_in_flight` slot while this layer waits, which the router's backoff does not.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use streamwise::Message;
//! use streamwise::router::{Incoming, Outcome, State, handler_service};
//! use streamwise_middleware::retry::RetryLayer;
//! use tower::{Layer, ServiceExt};
//!
//! async fn flaky(State(calls): State<Arc<AtomicU32>>) -> Result<(), &'static str> {
//!     if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err("database busy") } else { Ok(()) }
//! }
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let layer = RetryLayer::new(3)?.backoff(Duration::from_millis(1), Duration::from_millis(10))?;
//! let svc = layer.layer(handler_service(flaky, calls.clone()));
//! let outcome = svc.oneshot(Incoming::for_test(Message::new("t", &1)?)).await.unwrap();
//! assert_eq!(outcome, Outcome::ack());
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # Ok(()) }
//! ```
//!
//! [`Permanent`]: streamwise::router::Permanent
//! [`RetryBackoff`]: streamwise::router::RetryBackoff

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::TryFutureExt;
use pin_project_lite::pin_project;
use streamwise::router::{Incoming, Outcome, Permanent};
use streamwise::{BoxError, Error, Result};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;
use tower::{Layer, Service};

/// Wraps services in [`Retry`].
#[derive(Clone, Debug)]
pub struct RetryLayer {
    max_retries: u32,
    backoff: ExponentialBackoffMaker,
}

impl RetryLayer {
    /// Up to `max_retries` retries, with backoff from 100 ms doubling to 10 s and 50 % jitter.
    ///
    /// A zero `max_retries` is refused with [`Error::Invalid`] (`max_retries`).
    pub fn new(max_retries: u32) -> Result<Self> {
        if max_retries == 0 {
            return Err(Error::invalid("max_retries", "must be at least 1"));
        }
        Ok(RetryLayer {
            max_retries,
            backoff: maker(Duration::from_millis(100), Duration::from_secs(10), 0.5)?,
        })
    }

    /// The first delay and the longest; the delay doubles per retry.
    ///
    /// A zero `min` is refused with [`Error::Invalid`] naming `backoff.min`, a `max` shorter
    /// than `min` naming `backoff.max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Result<Self> {
        self.backoff = maker(min, max, 0.5)?;
        Ok(self)
    }

    /// Like [`backoff`](Self::backoff), with the jitter: up to this fraction of the delay is
    /// added at random (0 for none, 1 for up to double).
    ///
    /// Refuses what [`backoff`](Self::backoff) refuses, and a `jitter` outside 0 to 1 naming
    /// `backoff.jitter`.
    pub fn backoff_with_jitter(mut self, min: Duration, max: Duration, jitter: f64) -> Result<Self> {
        self.backoff = maker(min, max, jitter)?;
        Ok(self)
    }
}

fn maker(min: Duration, max: Duration, jitter: f64) -> Result<ExponentialBackoffMaker> {
    if min.is_zero() {
        return Err(Error::invalid("backoff.min", "must be longer than zero"));
    }
    if max < min {
        return Err(Error::invalid(
            "backoff.max",
            format_args!("{max:?} is shorter than the minimum {min:?}"),
        ));
    }
    if !(0.0..=1.0).contains(&jitter) {
        return Err(Error::invalid(
            "backoff.jitter",
            format_args!("{jitter} is not between 0 and 1"),
        ));
    }
    ExponentialBackoffMaker::new(min, max, jitter, HasherRng::default())
        .map_err(|e| Error::invalid("backoff", format_args!("{e:?}")))
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        let policy = Policy {
            retries_left: self.max_retries,
            backoff: self.backoff.clone(),
            current: None,
        };
        Retry {
            inner: tower::retry::Retry::new(policy, ErrInto { inner }),
        }
    }
}

/// The retry policy: how many retries are left, and the backoff of this request.
#[derive(Clone, Debug)]
pub struct Policy {
    retries_left: u32,
    backoff: ExponentialBackoffMaker,
    current: Option<ExponentialBackoff>,
}

impl tower::retry::Policy<Incoming, Outcome, BoxError> for Policy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        incoming: &mut Incoming,
        result: &mut std::result::Result<Outcome, BoxError>,
    ) -> Option<Self::Future> {
        let error = result.as_ref().err()?;
        if Permanent::is_permanent(error) || self.retries_left == 0 {
            return None;
        }
        self.retries_left -= 1;
        tracing::debug!(id = %incoming.info().id(), error = %error, retries_left = self.retries_left, "handler failed; retrying");
        let backoff = self.current.get_or_insert_with(|| self.backoff.make_backoff());
        Some(backoff.next_backoff())
    }

    fn clone_request(&mut self, incoming: &Incoming) -> Option<Incoming> {
        Some(incoming.clone())
    }
}

/// Calls the inner service again on errors, as [`RetryLayer`] configured.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    // tower's retry clones itself, this policy included, into each call's future: each
    // delivery gets its own budget.
    inner: tower::retry::Retry<Policy, ErrInto<S>>,
}

impl<S> Service<Incoming> for Retry<S>
where
    S: Service<Incoming, Response = Outcome> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = RetryFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> RetryFuture<S> {
        RetryFuture {
            inner: self.inner.call(incoming),
        }
    }
}

pin_project! {
    /// The future of [`Retry`]: tower's retry future (the calls and the backoff between them).
    pub struct RetryFuture<S>
    where
        S: Service<Incoming, Response = Outcome>,
        S::Error: Into<BoxError>,
    {
        #[pin]
        inner: tower::retry::future::ResponseFuture<Policy, ErrInto<S>, Incoming>,
    }
}

impl<S> Future for RetryFuture<S>
where
    S: Service<Incoming, Response = Outcome> + Clone,
    S::Error: Into<BoxError>,
{
    type Output = std::result::Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

/// The inner service with its errors boxed, as the policy sees them.
#[derive(Clone, Debug)]
struct ErrInto<S> {
    inner: S,
}

impl<S> Service<Incoming> for ErrInto<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = futures::future::ErrInto<S::Future, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        self.inner.call(incoming).err_into()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use streamwise::Message;
    use streamwise::router::{DeliveryInfo, Incoming, Outcome, Permanent, State, handler_service};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn incoming() -> Incoming {
        Incoming::for_test(Message::new("t", &1).unwrap())
    }

    fn layer(retries: u32) -> RetryLayer {
        RetryLayer::new(retries)
            .unwrap()
            .backoff_with_jitter(Duration::from_millis(100), Duration::from_secs(1), 0.0)
            .unwrap()
    }

    /// One delivery through `layer(retries)` around `handler`, whose state counts its calls.
    async fn deliver<H, T>(
        retries: u32,
        handler: H,
        calls: &Arc<AtomicU32>,
    ) -> std::result::Result<Outcome, BoxError>
    where
        H: streamwise::router::Handler<T, Arc<AtomicU32>>,
        T: 'static,
    {
        layer(retries)
            .layer(handler_service(handler, calls.clone()))
            .oneshot(incoming())
            .await
    }

    async fn always_fails(State(calls): State<Arc<AtomicU32>>) -> std::result::Result<(), &'static str> {
        calls.fetch_add(1, Ordering::SeqCst);
        Err("down")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_bounded_and_back_off_exponentially() {
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let err = deliver(3, always_fails, &calls).await.unwrap_err();
        assert_eq!(err.to_string(), "down");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one call and three retries");
        // 100 + 200 + 400 ms of backoff, no jitter.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_adds_at_most_its_fraction() {
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let svc = RetryLayer::new(2)
            .unwrap()
            .backoff_with_jitter(Duration::from_millis(100), Duration::from_secs(10), 0.5)
            .unwrap()
            .layer(handler_service(always_fails, calls.clone()));
        svc.oneshot(incoming()).await.unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited <= Duration::from_millis(450),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_and_outcomes_are_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        async fn permanent(State(calls): State<Arc<AtomicU32>>) -> std::result::Result<(), Permanent> {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Permanent::new("bad input"))
        }
        let err = deliver(5, permanent, &calls).await.unwrap_err();
        assert!(Permanent::is_permanent(&err));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        async fn nacks(State(calls): State<Arc<AtomicU32>>) -> Outcome {
            calls.fetch_add(1, Ordering::SeqCst);
            Outcome::nack()
        }
        let calls = Arc::new(AtomicU32::new(0));
        let out = deliver(5, nacks, &calls).await.unwrap();
        assert_eq!((out, calls.load(Ordering::SeqCst)), (Outcome::nack(), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_wrapped_in_anyhow_are_not_retried() {
        async fn permanent(State(calls): State<Arc<AtomicU32>>) -> anyhow::Result<()> {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(anyhow::anyhow!(Permanent::new("bad input")).context("while pricing"))
        }
        async fn plain(State(calls): State<Arc<AtomicU32>>) -> anyhow::Result<()> {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Permanent::new("bad input"))?;
            Ok(())
        }
        let calls = Arc::new(AtomicU32::new(0));
        let err = deliver(5, permanent, &calls).await.unwrap_err();
        assert!(Permanent::is_permanent(&err));
        let err = deliver(5, plain, &calls).await.unwrap_err();
        assert!(Permanent::is_permanent(&err));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call each, no retry");
    }

    #[tokio::test(start_paused = true)]
    async fn each_delivery_gets_its_own_budget() {
        let calls = Arc::new(AtomicU32::new(0));
        let svc = layer(1).layer(handler_service(always_fails, calls.clone()));
        svc.clone().oneshot(incoming()).await.unwrap_err();
        svc.oneshot(incoming()).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn inside_a_router_a_retried_handler_is_acked_on_the_first_delivery() {
        use streamwise::memory::MemoryBackend;
        use streamwise::router::{Router, Routes};
        use streamwise::{Publisher, SubscribeOptions};

        async fn twice(
            info: DeliveryInfo,
            State(calls): State<Arc<AtomicU32>>,
        ) -> std::result::Result<(), &'static str> {
            assert_eq!(info.delivery_count(), 1, "retried in-process, not redelivered");
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err("once")
            } else {
                Ok(())
            }
        }
        let backend = MemoryBackend::new();
        let calls = Arc::new(AtomicU32::new(0));
        let retry = RetryLayer::new(2)
            .unwrap()
            .backoff(Duration::from_millis(1), Duration::from_millis(2))
            .unwrap();
        let routes = Routes::with_state(calls.clone()).route_layered("t", twice, retry);
        let running = Router::with_state(calls.clone())
            .subscribe("r", SubscribeOptions::new("g", "c"), routes)
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        backend
            .publisher()
            .publish("r", Message::new("t", &1).unwrap())
            .await
            .unwrap();
        streamwise::testing::wait_until_handled(&running, 1).await;
        running.shutdown().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(backend.pending_count("r", "g").unwrap(), 0);
    }

    #[test]
    fn bad_settings_name_the_field() {
        assert_eq!(
            RetryLayer::new(0).unwrap_err().invalid_field(),
            Some("max_retries")
        );
        let l = || RetryLayer::new(1).unwrap();
        assert_eq!(
            l().backoff(Duration::ZERO, Duration::from_secs(1))
                .unwrap_err()
                .invalid_field(),
            Some("backoff.min")
        );
        assert_eq!(
            l().backoff(Duration::from_secs(2), Duration::from_secs(1))
                .unwrap_err()
                .invalid_field(),
            Some("backoff.max")
        );
        assert_eq!(
            l().backoff_with_jitter(Duration::from_secs(1), Duration::from_secs(2), 1.5)
                .unwrap_err()
                .invalid_field(),
            Some("backoff.jitter")
        );
    }
}
