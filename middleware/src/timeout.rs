//! Timeouts: a handler that takes longer than the limit is dropped and fails with
//! [`TimedOut`]; the router then nacks the delivery after its retry backoff (or a retry or
//! dead-letter layer outside this one acts on the error).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::time::Duration;
//! use streamwise::Message;
//! use streamwise::router::{Incoming, handler_service};
//! use streamwise_middleware::timeout::{TimedOut, TimeoutLayer};
//! use tower::{Layer, ServiceExt};
//!
//! async fn stuck() { std::future::pending::<()>().await }
//!
//! let svc = TimeoutLayer::new(Duration::from_millis(10))?.layer(handler_service(stuck, ()));
//! let err = svc.oneshot(Incoming::for_test(Message::new("t", &1)?)).await.unwrap_err();
//! assert!(err.is::<TimedOut>());
//! # Ok(()) }
//! ```

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use streamwise::router::{Incoming, Outcome};
use streamwise::{BoxError, Error, Result};
use tower::{Layer, Service};

use crate::{BoxResponse, take_ready};

/// The error of a handler that ran past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    /// The limit.
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler timed out after {:?}", self.after)
    }
}

impl std::error::Error for TimedOut {}

/// Wraps services in [`Timeout`].
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// Handlers may run for `limit` (longer than zero).
    pub fn new(limit: Duration) -> Result<Self> {
        if limit.is_zero() {
            return Err(Error::invalid("timeout", "must be longer than zero"));
        }
        Ok(TimeoutLayer { limit })
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// Fails the inner service's call with [`TimedOut`] when it takes longer than the limit.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Incoming> for Timeout<S>
where
    S: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = BoxResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> BoxResponse {
        let future = take_ready(&mut self.inner).call(incoming);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, future).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(TimedOut { after: limit }.into()),
            }
        })
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

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_fails_at_the_limit_and_a_fast_one_passes() {
        async fn slow() {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let started = tokio::time::Instant::now();
        let err = TimeoutLayer::new(Duration::from_secs(2))
            .unwrap()
            .layer(handler_service(slow, ()))
            .oneshot(incoming())
            .await
            .unwrap_err();
        assert_eq!(
            err.downcast_ref::<TimedOut>(),
            Some(&TimedOut {
                after: Duration::from_secs(2)
            })
        );
        assert_eq!(err.to_string(), "handler timed out after 2s");
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let ok = TimeoutLayer::new(Duration::from_secs(10))
            .unwrap()
            .layer(handler_service(slow, ()))
            .oneshot(incoming())
            .await
            .unwrap();
        assert_eq!(ok, Outcome::ack());
    }

    #[test]
    fn a_zero_limit_is_refused() {
        assert_eq!(
            TimeoutLayer::new(Duration::ZERO).unwrap_err().invalid_field(),
            Some("timeout")
        );
    }
}
