//! Middleware for streamwise handlers: tower layers, one module per middleware, each behind a
//! cargo feature (in the manner of tower-http next to axum). Enable `full` for all of them.
//!
//! Every layer wraps a service from [`Incoming`] to [`Outcome`] (a handler, or a stack around
//! one) and can be added at any of the router's three levels:
//!
//! ```
//! # #[cfg(all(feature = "trace", feature = "dead-letter"))] fn main() -> streamwise::Result<()> {
//! use std::time::Duration;
//! use streamwise::router::{Router, Routes};
//! use streamwise::SubscribeOptions;
//! use streamwise_middleware::{dead_letter::DeadLetterLayer, trace::TraceLayer};
//!
//! let routes = Routes::new()
//!     .route("order.placed", || async {})
//!     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
//!     .layer(DeadLetterLayer::new(3)?);
//! let router = Router::new()
//!     .layer(TraceLayer::new())
//!     .subscribe("orders", SubscribeOptions::new("billing", "worker-1"), routes);
//! # let _ = router; Ok(()) }
//! # #[cfg(not(all(feature = "trace", feature = "dead-letter")))] fn main() {}
//! ```
//!
//! | feature | module | what it does |
//! |---|---|---|
//! | `retry` | `retry` | retries failed handlers in-process with exponential backoff and jitter, bounded, never [`Permanent`](streamwise::router::Permanent) errors |
//! | `trace` | `trace` | a `tracing` span per delivery (stream, group, event type, id, delivery count), outcome and duration |
//! | `catch-panic` | `catch_panic` | turns a panic into an error, so retry and dead-letter see it |
//! | `dead-letter` | `dead_letter` | dead-letters after N failed deliveries, with the reason |
//! | `checkpoint` | `checkpoint` | records the position after each successful delivery |
//! | `delivery-limit` | `delivery_limit` | a per-route limit on deliveries (for entries reclaimed again and again), and warnings for slow handlers |
//! | `dedup` / `dedup-redis` | `dedup` | skips messages already handled, by UUID, in memory or in Redis (`SET NX PX`) |
//! | `correlation` | `correlation` | carries a correlation id from the input to every message a handler produces |
//! | `throttle` | `throttle` | at most N deliveries per second |
//! | `circuit-breaker` | `circuit_breaker` | stops calling a failing handler for a while (deliveries are nacked with a delay) |
//! | `from-fn` | `from_fn` | write a middleware as an async fn |
//!
//! For timeouts, use tower's own `tower::timeout::TimeoutLayer` (tower's `timeout` feature):
//! its `Elapsed` error is a failure like any other, so the router nacks the delivery after its
//! retry backoff, and retry, dead-letter and circuit-breaker layers outside it act on it. Add
//! it before them, so that it is inside.
//!
//! Thin layers return named futures, not boxed ones: a delivery through them costs no heap
//! allocation of theirs (`tests/allocations.rs` counts them).
//!
//! [`Incoming`]: streamwise::router::Incoming
//! [`Outcome`]: streamwise::router::Outcome

#[cfg(feature = "catch-panic")]
pub mod catch_panic;
#[cfg(feature = "checkpoint")]
pub mod checkpoint;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "correlation")]
pub mod correlation;
#[cfg(feature = "dead-letter")]
pub mod dead_letter;
#[cfg(feature = "dedup")]
pub mod dedup;
#[cfg(feature = "delivery-limit")]
pub mod delivery_limit;
#[cfg(feature = "from-fn")]
pub mod from_fn;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(feature = "throttle")]
pub mod throttle;
#[cfg(feature = "trace")]
pub mod trace;

#[cfg(test)]
#[allow(dead_code)] // each feature's tests use part of it
mod test_util;

/// The name of the dead-letter stream of `stream`: `{<stream>}-dead` (the same rule as the
/// backends, [`streamwise::dead_letter::stream_for`]).
///
/// ```
/// assert_eq!(streamwise_middleware::dead_letter_stream("orders"), "{orders}-dead");
/// ```
pub fn dead_letter_stream(stream: &str) -> String {
    streamwise::dead_letter::stream_for(stream)
}

/// Takes the service that was polled ready out of `slot`, leaving a fresh clone behind (the
/// usual tower idiom for calling a cloneable inner service from a `'static` future).
#[allow(dead_code)] // used by some features only
pub(crate) fn take_ready<S: Clone>(slot: &mut S) -> S {
    let fresh = slot.clone();
    std::mem::replace(slot, fresh)
}

/// The outcome a layer decided without calling its inner service, handed out by the one poll
/// of its future `future` (polling a completed future again is the caller's bug).
#[allow(dead_code)] // used by some features only
pub(crate) fn decided(
    outcome: &mut Option<streamwise::router::Outcome>,
    future: &str,
) -> std::task::Poll<Result<streamwise::router::Outcome, streamwise::BoxError>> {
    match outcome.take() {
        Some(outcome) => std::task::Poll::Ready(Ok(outcome)),
        None => panic!("{future} polled after it completed"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letter_stream_names_are_valid_stream_names() {
        let name = super::dead_letter_stream("data-updates");
        assert_eq!(name, "{data-updates}-dead");
        assert!(streamwise::validate_stream_name("stream", &name).is_ok());
    }

    /// What the crate docs promise of `tower::timeout` (it replaced this crate's own timeout
    /// layer): a slow handler fails at the limit, a fast one passes, and the dead-letter layer
    /// acts on the timeout like on any failure.
    #[cfg(feature = "dead-letter")]
    #[tokio::test(start_paused = true)]
    async fn tower_timeout_fails_a_slow_handler_at_the_limit_as_any_failure() {
        use std::sync::Arc;
        use std::time::Duration;

        use streamwise::router::{DeliveryInfo, Incoming, Outcome, handler_service};
        use streamwise::{EntryId, Message, Origin};
        use tower::timeout::TimeoutLayer;
        use tower::{Layer, ServiceBuilder, ServiceExt};

        use crate::dead_letter::DeadLetterLayer;

        async fn slow() {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let delivery = |n| {
            let info = DeliveryInfo::new(EntryId::new(1, 0), n, Arc::new(Origin::new("s", "g", "c")));
            Incoming::for_test_with(Message::new("t", &1).unwrap(), info)
        };
        let started = tokio::time::Instant::now();
        let err = TimeoutLayer::new(Duration::from_secs(2))
            .layer(handler_service(slow, ()))
            .oneshot(delivery(1))
            .await
            .unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let ok = TimeoutLayer::new(Duration::from_secs(10))
            .layer(handler_service(slow, ()))
            .oneshot(delivery(1))
            .await
            .unwrap();
        assert_eq!(ok, Outcome::ack());

        let stack = ServiceBuilder::new()
            .layer(DeadLetterLayer::new(2).unwrap())
            .layer(TimeoutLayer::new(Duration::from_secs(2)))
            .service(handler_service(slow, ()));
        let err = stack.clone().oneshot(delivery(1)).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
        assert_eq!(
            stack.oneshot(delivery(2)).await.unwrap(),
            Outcome::dead_letter("failed on delivery 2 of 2: request timed out")
        );
    }
}
