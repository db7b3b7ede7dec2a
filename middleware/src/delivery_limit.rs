//! A per-route delivery limit. An entry a consumer did not finish (it crashed, or was too slow)
//! is reclaimed by another consumer and delivered again with a higher delivery count. This
//! layer:
//!
//! - dead-letters, without calling the handler, an entry delivered more than `max_deliveries`
//!   times (a per-route limit, tighter than the subscription's `max_deliveries`), so that a
//!   message that keeps killing its consumers does not go round for ever;
//! - optionally warns (once per delivery) when a handler runs longer than `warn_after`, as
//!   such a handler's entry is the one at risk of being reclaimed. Slow handlers keep their
//!   entries: the Redis backend heartbeats held entries (`XCLAIM ... JUSTID` every third of the
//!   lease TTL), so reclaim does not take them while the handler works. Keep the
//!   subscription's reclaim `min_idle` above two thirds of the lease TTL.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use streamwise::Message;
//! use streamwise::router::{DeliveryInfo, Incoming, Verdict, handler_service};
//! use streamwise::{EntryId, Origin};
//! use streamwise_middleware::delivery_limit::DeliveryLimitLayer;
//! use tower::{Layer, ServiceExt};
//!
//! let layer = DeliveryLimitLayer::new(3)?.warn_after(Duration::from_secs(20))?;
//! let svc = layer.layer(handler_service(|| async {}, ()));
//! let fourth = DeliveryInfo::new(EntryId::new(9, 0), 4, Arc::new(Origin::new("jobs", "workers", "w2")));
//! let outcome = svc.oneshot(Incoming::for_test_with(Message::new("job", &1)?, fourth)).await.unwrap();
//! assert!(matches!(outcome.verdict(), Verdict::DeadLetter { .. }));
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use streamwise::router::{Incoming, Outcome};
use streamwise::{BoxError, EntryId, Error, Result};
use tokio::time::Sleep;
use tower::{Layer, Service};

/// Wraps services in [`DeliveryLimit`].
#[derive(Clone, Copy, Debug)]
pub struct DeliveryLimitLayer {
    max_deliveries: u64,
    warn_after: Option<Duration>,
}

impl DeliveryLimitLayer {
    /// Dead-letter entries delivered more than `max_deliveries` times.
    ///
    /// A zero `max_deliveries` is refused with [`Error::Invalid`] (`max_deliveries`).
    pub fn new(max_deliveries: u64) -> Result<Self> {
        if max_deliveries == 0 {
            return Err(Error::invalid("max_deliveries", "must be at least 1"));
        }
        Ok(DeliveryLimitLayer {
            max_deliveries,
            warn_after: None,
        })
    }

    /// Warn when a handler is still running after `after`.
    ///
    /// A zero `after` is refused with [`Error::Invalid`] (`warn_after`).
    pub fn warn_after(mut self, after: Duration) -> Result<Self> {
        if after.is_zero() {
            return Err(Error::invalid("warn_after", "must be longer than zero"));
        }
        self.warn_after = Some(after);
        Ok(self)
    }
}

impl<S> Layer<S> for DeliveryLimitLayer {
    type Service = DeliveryLimit<S>;
    fn layer(&self, inner: S) -> DeliveryLimit<S> {
        DeliveryLimit {
            inner,
            max_deliveries: self.max_deliveries,
            warn_after: self.warn_after,
        }
    }
}

/// Enforces the delivery limit and watches for slow handlers.
#[derive(Clone, Debug)]
pub struct DeliveryLimit<S> {
    inner: S,
    max_deliveries: u64,
    warn_after: Option<Duration>,
}

impl<S> Service<Incoming> for DeliveryLimit<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = DeliveryLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> DeliveryLimitFuture<S::Future> {
        let count = incoming.info().delivery_count();
        if count > self.max_deliveries {
            let reason = format!(
                "delivered {count} times, more than this route's limit of {}; it may keep crashing its consumers",
                self.max_deliveries
            );
            return DeliveryLimitFuture {
                state: State::OverLimit {
                    outcome: Some(Outcome::dead_letter(reason)),
                },
            };
        }
        let id = incoming.info().id();
        DeliveryLimitFuture {
            state: State::Running {
                future: self.inner.call(incoming),
                warning: self.warn_after.map(|after| SlowWarning {
                    id,
                    after,
                    timer: tokio::time::sleep(after),
                }),
            },
        }
    }
}

pin_project! {
    /// The future of [`DeliveryLimit`]: a dead letter at once for a delivery over the limit,
    /// otherwise the inner service's (with the slow-handler warning, if configured).
    pub struct DeliveryLimitFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        OverLimit { outcome: Option<Outcome> },
        Running {
            #[pin]
            future: F,
            #[pin]
            warning: Option<SlowWarning>,
        },
    }
}

pin_project! {
    /// The pending warning about a slow handler: given once, when `timer` fires first.
    struct SlowWarning {
        id: EntryId,
        after: Duration,
        #[pin]
        timer: Sleep,
    }
}

impl<F, E> Future for DeliveryLimitFuture<F>
where
    F: Future<Output = std::result::Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = std::result::Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::OverLimit { outcome } => crate::decided(outcome, "DeliveryLimitFuture"),
            StateProj::Running { future, mut warning } => {
                if let Poll::Ready(result) = future.poll(cx) {
                    return Poll::Ready(result.map_err(Into::into));
                }
                if let Some(slow) = warning.as_mut().as_pin_mut() {
                    let slow = slow.project();
                    if slow.timer.poll(cx).is_ready() {
                        tracing::warn!(id = %slow.id, running_for = ?slow.after, "slow handler; its entry is kept by the backend's heartbeat");
                        warning.set(None);
                    }
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use streamwise::router::{DeliveryInfo, Incoming, Outcome, State, Verdict, handler_service};
    use streamwise::{EntryId, Message, Origin};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn delivery(n: u64) -> Incoming {
        let info = DeliveryInfo::new(EntryId::new(1, 0), n, Arc::new(Origin::new("s", "g", "c")));
        Incoming::for_test_with(Message::new("t", &1).unwrap(), info)
    }

    async fn counted(State(calls): State<Arc<AtomicU32>>) {
        calls.fetch_add(1, Ordering::SeqCst);
    }

    #[tokio::test]
    async fn over_the_limit_is_dead_lettered_without_calling_the_handler() {
        let (subscriber, captured) = crate::test_util::log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let calls = Arc::new(AtomicU32::new(0));
        let svc = DeliveryLimitLayer::new(2)
            .unwrap()
            .layer(handler_service(counted, calls.clone()));
        assert_eq!(svc.clone().oneshot(delivery(2)).await.unwrap(), Outcome::ack());
        let out = svc.oneshot(delivery(3)).await.unwrap();
        match out.verdict() {
            Verdict::DeadLetter { reason } => assert!(reason.starts_with("delivered 3 times"), "{reason}"),
            other => panic!("expected a dead letter, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            !captured.text().contains("slow handler"),
            "no warning without warn_after"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_is_reported_and_still_completes() {
        async fn slow() {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let (subscriber, captured) = crate::test_util::log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let started = tokio::time::Instant::now();
        let svc = DeliveryLimitLayer::new(5)
            .unwrap()
            .warn_after(Duration::from_secs(10))
            .unwrap()
            .layer(handler_service(slow, ()));
        assert_eq!(svc.oneshot(delivery(1)).await.unwrap(), Outcome::ack());
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30),
            "the warning does not cut the handler short"
        );
        let log = captured.text();
        assert_eq!(log.matches("slow handler").count(), 1, "{log}");
        assert!(log.contains("WARN") && log.contains("id=1-0"), "{log}");
    }

    #[test]
    fn bad_settings_name_the_field() {
        assert_eq!(
            DeliveryLimitLayer::new(0).unwrap_err().invalid_field(),
            Some("max_deliveries")
        );
        assert_eq!(
            DeliveryLimitLayer::new(1)
                .unwrap()
                .warn_after(Duration::ZERO)
                .unwrap_err()
                .invalid_field(),
            Some("warn_after")
        );
    }
}
