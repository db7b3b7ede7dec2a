//! Middleware for streamwise handlers: tower layers, one module per middleware, each behind a
//! cargo feature (in the manner of tower-http next to axum). Enable `full` for all of them.
//!
//! Every layer wraps a service from [`Incoming`] to [`Outcome`] (a handler, or a stack around
//! one) and can be added at any of the router's three levels:
//!
//! ```
//! # #[cfg(all(feature = "trace", feature = "timeout"))] fn main() -> streamwise::Result<()> {
//! use std::time::Duration;
//! use streamwise::router::{Router, Routes};
//! use streamwise::SubscribeOptions;
//! use streamwise_middleware::{timeout::TimeoutLayer, trace::TraceLayer};
//!
//! let router = Router::new()
//!     .layer(TraceLayer::new())
//!     .subscribe(
//!         "orders",
//!         SubscribeOptions::new("billing", "worker-1"),
//!         Routes::new().route("order.placed", || async {}).layer(TimeoutLayer::new(Duration::from_secs(5))?),
//!     );
//! # let _ = router; Ok(()) }
//! # #[cfg(not(all(feature = "trace", feature = "timeout")))] fn main() {}
//! ```
//!
//! | feature | module | what it does |
//! |---|---|---|
//! | `retry` | `retry` | retries failed handlers in-process with exponential backoff and jitter, bounded, never [`Permanent`](streamwise::router::Permanent) errors |
//! | `trace` | `trace` | a `tracing` span per delivery (stream, group, event type, id, delivery count), outcome and duration |
//! | `timeout` | `timeout` | fails a handler that runs too long (the delivery is nacked) |
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
#[cfg(feature = "timeout")]
pub mod timeout;
#[cfg(feature = "trace")]
pub mod trace;

#[cfg(test)]
#[allow(dead_code)] // each feature's tests use part of it
mod test_util;

/// The future of the timeout layer.
pub type BoxResponse =
    futures::future::BoxFuture<'static, Result<streamwise::router::Outcome, streamwise::BoxError>>;

/// The name of the dead-letter stream of `stream`: `<stream>-dead` (the same rule as the
/// backends, [`streamwise::dead_letter::stream_for`]).
///
/// ```
/// assert_eq!(streamwise_middleware::dead_letter_stream("orders"), "orders-dead");
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

#[cfg(test)]
mod tests {
    #[test]
    fn dead_letter_stream_names_are_valid_stream_names() {
        let name = super::dead_letter_stream("data-updates");
        assert_eq!(name, "data-updates-dead");
        assert!(streamwise::validate_name("stream", &name).is_ok());
    }
}
