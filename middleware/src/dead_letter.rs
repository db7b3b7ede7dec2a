//! Dead-lettering after N attempts: when a handler fails (an error, or a nack outcome) on the
//! `max_attempts`-th delivery of an entry, or fails with a [`Permanent`] error, the outcome
//! becomes a dead letter with the reason: the delivery is dead-lettered, and the backend writes
//! the record (the message with the reason, the original id, stream, group and delivery count)
//! to `{<stream>}-dead` (see [`Delivery::dead_letter`](streamwise::Delivery::dead_letter)).
//! Earlier failures pass through (the router nacks; the entry comes back).
//!
//! Put retry inside this layer: in-process retries happen within one delivery, this layer counts
//! deliveries.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use streamwise::Message;
//! use streamwise::router::{DeliveryInfo, Incoming, Verdict, handler_service};
//! use streamwise::{EntryId, Origin};
//! use streamwise_middleware::dead_letter::DeadLetterLayer;
//! use tower::{Layer, ServiceExt};
//!
//! async fn broken() -> Result<(), &'static str> { Err("schema mismatch") }
//!
//! let svc = DeadLetterLayer::new(3)?.layer(handler_service(broken, ()));
//! let third = DeliveryInfo::new(EntryId::new(5, 0), 3, Arc::new(Origin::new("orders", "billing", "w1")));
//! let outcome = svc.oneshot(Incoming::for_test_with(Message::new("t", &1)?, third)).await.unwrap();
//! assert_eq!(
//!     outcome.verdict(),
//!     &Verdict::DeadLetter { reason: "failed on delivery 3 of 3: schema mismatch".into() }
//! );
//! # Ok(()) }
//! ```
//!
//! [`Permanent`]: streamwise::router::Permanent

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use streamwise::router::{Incoming, Outcome, Permanent, Verdict};
use streamwise::{BoxError, Error, Result};
use tower::{Layer, Service};

/// Wraps services in [`DeadLetter`].
#[derive(Clone, Copy, Debug)]
pub struct DeadLetterLayer {
    max_attempts: u64,
}

impl DeadLetterLayer {
    /// Dead-letter when the `max_attempts`-th delivery fails.
    ///
    /// A zero `max_attempts` is refused with [`Error::Invalid`] (`max_attempts`).
    pub fn new(max_attempts: u64) -> Result<Self> {
        if max_attempts == 0 {
            return Err(Error::invalid("max_attempts", "must be at least 1"));
        }
        Ok(DeadLetterLayer { max_attempts })
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;
    fn layer(&self, inner: S) -> DeadLetter<S> {
        DeadLetter {
            inner,
            max_attempts: self.max_attempts,
        }
    }
}

/// Turns the last allowed failure into a dead letter.
#[derive(Clone, Debug)]
pub struct DeadLetter<S> {
    inner: S,
    max_attempts: u64,
}

impl<S> Service<Incoming> for DeadLetter<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = DeadLetterFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> DeadLetterFuture<S::Future> {
        let attempt = incoming.info().delivery_count();
        DeadLetterFuture {
            inner: self.inner.call(incoming),
            attempt,
            max_attempts: self.max_attempts,
        }
    }
}

pin_project! {
    /// The future of [`DeadLetter`]: the inner service's, with the last allowed failure (or a
    /// permanent one) turned into a dead letter.
    pub struct DeadLetterFuture<F> {
        #[pin]
        inner: F,
        attempt: u64,
        max_attempts: u64,
    }
}

impl<F, E> Future for DeadLetterFuture<F>
where
    F: Future<Output = std::result::Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = std::result::Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (attempt, max) = (*this.attempt, *this.max_attempts);
        let last = attempt >= max;
        Poll::Ready(match ready!(this.inner.poll(cx)).map_err(Into::into) {
            Err(e) if Permanent::is_permanent(&e) => {
                Ok(Outcome::dead_letter(format!("permanent error: {e}")))
            }
            Err(e) if last => Ok(Outcome::dead_letter(format!(
                "failed on delivery {attempt} of {max}: {e}"
            ))),
            Ok(outcome) if last && matches!(outcome.verdict(), Verdict::Nack { .. }) => Ok(
                Outcome::dead_letter(format!("nacked on delivery {attempt} of {max}")),
            ),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use streamwise::dead_letter::keys;
    use streamwise::memory::MemoryBackend;
    use streamwise::router::{DeliveryInfo, Incoming, Outcome, Router, Routes, handler_service};
    use streamwise::{EntryId, Message, Origin, Publisher, SubscribeOptions, Subscriber};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn attempt(n: u64) -> Incoming {
        let info = DeliveryInfo::new(EntryId::new(1, 0), n, Arc::new(Origin::new("s", "g", "c")));
        Incoming::for_test_with(Message::new("t", &1).unwrap(), info)
    }

    async fn fails() -> std::result::Result<(), &'static str> {
        Err("boom")
    }

    #[tokio::test]
    async fn failures_pass_through_until_the_last_attempt() {
        let svc = DeadLetterLayer::new(3).unwrap().layer(handler_service(fails, ()));
        for n in 1..3 {
            let err = svc.clone().oneshot(attempt(n)).await.unwrap_err();
            assert_eq!(err.to_string(), "boom");
        }
        let out = svc.clone().oneshot(attempt(3)).await.unwrap();
        assert_eq!(out, Outcome::dead_letter("failed on delivery 3 of 3: boom"));
        let out = svc.oneshot(attempt(7)).await.unwrap();
        assert!(
            matches!(out.verdict(), Verdict::DeadLetter { .. }),
            "beyond the limit too"
        );
    }

    #[tokio::test]
    async fn nacks_count_permanent_errors_go_at_once_and_successes_pass() {
        let nacks = DeadLetterLayer::new(2)
            .unwrap()
            .layer(handler_service(|| async { Outcome::nack() }, ()));
        assert_eq!(nacks.clone().oneshot(attempt(1)).await.unwrap(), Outcome::nack());
        assert_eq!(
            nacks.oneshot(attempt(2)).await.unwrap(),
            Outcome::dead_letter("nacked on delivery 2 of 2")
        );
        let permanent = DeadLetterLayer::new(9).unwrap().layer(handler_service(
            || async { Err::<(), _>(streamwise::router::Permanent::new("no such customer")) },
            (),
        ));
        assert_eq!(
            permanent.oneshot(attempt(1)).await.unwrap(),
            Outcome::dead_letter("permanent error: no such customer")
        );
        let ok = DeadLetterLayer::new(1)
            .unwrap()
            .layer(handler_service(|| async {}, ()));
        assert_eq!(ok.oneshot(attempt(5)).await.unwrap(), Outcome::ack());
    }

    #[tokio::test]
    async fn inside_a_router_the_message_lands_in_the_dead_letter_stream_and_is_acked() {
        let backend = MemoryBackend::new();
        let routes = Routes::new().route_layered("t", fails, DeadLetterLayer::new(3).unwrap());
        let running = Router::new()
            .subscribe("orders", SubscribeOptions::new("billing", "w1"), routes)
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let original = Message::new("t", &"payload").unwrap();
        let id = backend
            .publisher()
            .publish("orders", original.clone())
            .await
            .unwrap();
        let inspector = backend.subscriber();
        let mut dead = inspector
            .subscribe("{orders}-dead", SubscribeOptions::new("inspect", "i"))
            .await
            .unwrap();
        let record = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut dead))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let m = record.message();
        assert_eq!(m.uuid(), original.uuid());
        assert_eq!(m.payload(), original.payload());
        assert_eq!(
            m.metadata().get(keys::REASON),
            Some("failed on delivery 3 of 3: boom")
        );
        assert_eq!(m.metadata().get(keys::ORIGINAL_ID), Some(id.to_string().as_str()));
        assert_eq!(m.metadata().get(keys::STREAM), Some("orders"));
        assert_eq!(m.metadata().get(keys::DELIVERY_COUNT), Some("3"));
        running.shutdown().await.unwrap();
        assert_eq!(backend.pending_count("orders", "billing").unwrap(), 0);
    }

    #[test]
    fn zero_attempts_is_refused() {
        assert_eq!(
            DeadLetterLayer::new(0).unwrap_err().invalid_field(),
            Some("max_attempts")
        );
    }
}
