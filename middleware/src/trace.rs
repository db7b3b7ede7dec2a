//! Tracing: one [`tracing`] span per delivery, named `delivery`, with the fields `stream`,
//! `group`, `consumer`, `event_type`, `id` and `delivery_count`, and, once the handler is done,
//! `outcome` (`ack`, `nack`, `dead_letter` or `error`) and `duration_ms`. The handler runs inside
//! the span, so its own events carry these fields. A closing event is logged at `INFO` for an
//! ack and at `WARN` for a nack; a handler's error and a dead letter close at `DEBUG`, since
//! the router logs the error with its verdict and the backend the dead letter with its reason
//! (one line per failed delivery, not two).
//!
//! ```
//! use streamwise::router::{Router, Routes};
//! use streamwise::SubscribeOptions;
//! use streamwise_middleware::trace::TraceLayer;
//!
//! let router = Router::new().layer(TraceLayer::new()).subscribe(
//!     "orders",
//!     SubscribeOptions::new("billing", "worker-1"),
//!     Routes::new().route("order.placed", || async { tracing::info!("billing the order") }),
//! );
//! # let _ = router;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use streamwise::BoxError;
use streamwise::router::{Incoming, Outcome, Verdict};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// Wraps services in [`Trace`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer {
    _private: (),
}

impl TraceLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// Runs each delivery inside a `delivery` span and records its outcome and duration.
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

fn label(result: &Result<Outcome, BoxError>) -> &'static str {
    match result {
        Ok(outcome) => match outcome.verdict() {
            Verdict::Ack => "ack",
            Verdict::Nack { .. } => "nack",
            Verdict::DeadLetter { .. } => "dead_letter",
        },
        Err(_) => "error",
    }
}

impl<S> Service<Incoming> for Trace<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> TraceFuture<S::Future> {
        let info = incoming.info();
        let span = tracing::info_span!(
            "delivery",
            stream = info.stream(),
            group = info.group(),
            consumer = info.consumer(),
            event_type = incoming.message().event_type(),
            id = %info.id(),
            delivery_count = info.delivery_count(),
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let inner = span.in_scope(|| self.inner.call(incoming));
        TraceFuture {
            inner: inner.instrument(span),
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// The future of [`Trace`]: the inner service's, polled (and dropped) inside the
    /// delivery's span, which it closes with the outcome.
    pub struct TraceFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        started: Instant,
    }
}

impl<F, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll(cx)).map_err(Into::into);
        let span = this.inner.span();
        let _entered = span.enter();
        let outcome = label(&result);
        let duration_ms = this.started.elapsed().as_secs_f64() * 1000.0;
        span.record("outcome", outcome);
        span.record("duration_ms", duration_ms);
        // A failure is logged once, where its fate is known: the router logs a handler's
        // error with the verdict it leads to, the backend logs a dead letter with its reason.
        match &result {
            Ok(o) if *o.verdict() == Verdict::Ack => tracing::info!(outcome, duration_ms, "delivery handled"),
            Ok(o) if matches!(o.verdict(), Verdict::DeadLetter { .. }) => {
                tracing::debug!(outcome, duration_ms, "delivery dead-lettered by its handler")
            }
            Ok(o) => {
                tracing::warn!(outcome, duration_ms, verdict = ?o.verdict(), "delivery not acknowledged")
            }
            Err(e) => tracing::debug!(outcome, duration_ms, error = %e, "handler failed"),
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use streamwise::Message;
    use streamwise::router::{Incoming, Outcome, handler_service};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::test_util::log_subscriber;

    async fn traced(handler_outcome: Outcome) -> String {
        let (subscriber, captured) = log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let handler = move || {
            let outcome = handler_outcome.clone();
            async move {
                tracing::info!("inside the handler");
                outcome
            }
        };
        let message = Message::new("order.placed", &1).unwrap();
        let svc = TraceLayer::new().layer(handler_service(handler, ()));
        svc.oneshot(Incoming::for_test(message)).await.unwrap();
        captured.text()
    }

    #[tokio::test]
    async fn every_delivery_gets_a_span_with_its_fields_and_outcome() {
        let log = traced(Outcome::ack()).await;
        for field in [
            "stream=\"test\"",
            "group=\"test\"",
            "event_type=\"order.placed\"",
            "id=0-1",
            "delivery_count=1",
        ] {
            assert!(log.contains(field), "{field} missing from:\n{log}");
        }
        let handler_line = log
            .lines()
            .find(|l| l.contains("inside the handler"))
            .expect("handler event");
        assert!(
            handler_line.contains("delivery{"),
            "the handler's event is inside the span: {handler_line}"
        );
        assert!(log.contains("INFO") && log.contains("delivery handled"), "{log}");
        assert!(log.contains("outcome=\"ack\""), "{log}");
        assert!(log.contains("duration_ms="), "{log}");
    }

    #[tokio::test]
    async fn a_nack_is_a_warning_and_a_dead_letter_is_left_to_the_backend() {
        let log = traced(Outcome::nack()).await;
        assert!(log.contains("WARN") && log.contains("outcome=\"nack\""), "{log}");
        // The backend logs the dead letter with its reason; here it is only recorded.
        let log = traced(Outcome::dead_letter("bad")).await;
        assert!(!log.contains("WARN"), "{log}");
        assert!(log.contains("outcome=\"dead_letter\""), "{log}");
    }
}
