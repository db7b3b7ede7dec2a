//! Panic recovery: a panic in the wrapped handler becomes an error ([`Panicked`]) instead of
//! unwinding through the router, so the layers outside it (retry, dead-letter, tracing) see it
//! as a failure like any other.
//!
//! The router catches panics too (and nacks, after its retry backoff), but only at the outside
//! of the whole stack; put this layer inside retry or dead-letter so that they can act on
//! panics.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use streamwise::Message;
//! use streamwise::router::{Incoming, handler_service};
//! use streamwise_middleware::catch_panic::{CatchPanicLayer, Panicked};
//! use tower::{Layer, ServiceExt};
//!
//! async fn buggy() { panic!("index out of bounds") }
//!
//! let svc = CatchPanicLayer::new().layer(handler_service(buggy, ()));
//! let err = svc.oneshot(Incoming::for_test(Message::new("t", &1).unwrap())).await.unwrap_err();
//! assert!(err.downcast_ref::<Panicked>().is_some());
//! assert_eq!(err.to_string(), "handler panicked: index out of bounds");
//! # }
//! ```

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::FutureExt;
use futures::future::CatchUnwind;
use pin_project_lite::pin_project;
use streamwise::BoxError;
use streamwise::router::{Incoming, Outcome};
use tower::{Layer, Service};

/// The error a caught panic becomes; its message is the panic's, when it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked {
    message: String,
}

impl Panicked {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Panicked { message }
    }

    /// The panic message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler panicked: {}", self.message)
    }
}

impl std::error::Error for Panicked {}

/// Wraps services in [`CatchPanic`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer {
    _private: (),
}

impl CatchPanicLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

/// Turns panics of the inner service (while called or while its future runs) into
/// [`Panicked`] errors.
#[derive(Clone, Debug)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> Service<Incoming> for CatchPanic<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> CatchPanicFuture<S::Future> {
        // The call itself may panic before it returns a future.
        let state = match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(incoming))) {
            Ok(future) => State::Running {
                future: AssertUnwindSafe(future).catch_unwind(),
            },
            Err(payload) => State::CallPanicked {
                panicked: Some(Panicked::from_payload(payload)),
            },
        };
        CatchPanicFuture { state }
    }
}

pin_project! {
    /// The future of [`CatchPanic`]: the inner service's, with a panic (while called or while
    /// running) turned into a [`Panicked`] error.
    pub struct CatchPanicFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        CallPanicked { panicked: Option<Panicked> },
    }
}

impl<F, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running { future } => Poll::Ready(match ready!(future.poll(cx)) {
                Ok(result) => result.map_err(Into::into),
                Err(payload) => Err(Panicked::from_payload(payload).into()),
            }),
            StateProj::CallPanicked { panicked } => Poll::Ready(Err(panicked
                .take()
                .expect("CatchPanicFuture polled after it completed")
                .into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use streamwise::Message;
    use streamwise::router::{Incoming, Outcome, handler_service};
    use tower::{Layer, ServiceExt};

    use super::*;

    fn incoming() -> Incoming {
        Incoming::for_test(Message::new("t", &1).unwrap())
    }

    #[tokio::test]
    async fn panics_become_errors_with_their_message() {
        async fn with_string() {
            panic!("{} went wrong", "something")
        }
        let err = CatchPanicLayer::new()
            .layer(handler_service(with_string, ()))
            .oneshot(incoming())
            .await
            .unwrap_err();
        let panicked = err.downcast_ref::<Panicked>().expect("a Panicked error");
        assert_eq!(panicked.message(), "something went wrong");
    }

    #[tokio::test]
    async fn a_panic_while_calling_is_caught_too() {
        #[derive(Clone)]
        struct PanicsOnCall;
        impl Service<Incoming> for PanicsOnCall {
            type Response = Outcome;
            type Error = BoxError;
            type Future = std::future::Ready<Result<Outcome, BoxError>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Incoming) -> Self::Future {
                std::panic::panic_any(42u8)
            }
        }
        let err = CatchPanicLayer::new()
            .layer(PanicsOnCall)
            .oneshot(incoming())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "handler panicked: a panic without a message");
    }

    #[tokio::test]
    async fn outcomes_and_errors_pass_through() {
        let ok = CatchPanicLayer::new()
            .layer(handler_service(|| async { Outcome::nack() }, ()))
            .oneshot(incoming())
            .await
            .unwrap();
        assert_eq!(ok, Outcome::nack());
        let err = CatchPanicLayer::new()
            .layer(handler_service(|| async { Err::<(), _>("plain failure") }, ()))
            .oneshot(incoming())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "plain failure");
    }
}
