//! Correlation ids: every message a handler produces carries the correlation id of the
//! message it was handling, and a causation id naming that message, so that a chain of
//! events can be followed across services.
//!
//! [`CorrelationLayer`] reads the correlation id of the incoming message from its metadata
//! (key [`CORRELATION_ID`], configurable); a message without one starts a chain, and its own
//! UUID is the id. On the handler's way out, every outgoing message of the
//! [`Outcome`] gets:
//!
//! - `correlation_id`: that id, unless the handler set one itself (an empty value counts as
//!   none);
//! - `causation_id` ([`CAUSATION_ID`]): the UUID of the incoming message, always (the message
//!   being handled is by definition what caused the output).
//!
//! Handlers can take the id as an argument with the [`CorrelationId`] extractor, for logs or
//! for calls to other systems.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use streamwise::Message;
//! use streamwise::router::{Incoming, Outcome, handler_service};
//! use streamwise_middleware::correlation::{CorrelationId, CorrelationLayer};
//! use tower::{Layer, ServiceExt};
//!
//! async fn ship(CorrelationId(id): CorrelationId) -> Outcome {
//!     assert_eq!(id, "checkout-81");
//!     Outcome::ack().publish("shipments", Message::new("order.shipped", &7).unwrap())
//! }
//!
//! let svc = CorrelationLayer::new().layer(handler_service(ship, ()));
//! let order = Message::new("order.placed", &7)?.with_metadata("correlation_id", "checkout-81");
//! let outcome = svc.oneshot(Incoming::for_test(order.clone())).await.unwrap();
//! let shipped = outcome.messages()[0].message.metadata();
//! assert_eq!(shipped.get("correlation_id"), Some("checkout-81"));
//! assert_eq!(shipped.get("causation_id"), Some(order.uuid().to_string().as_str()));
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use streamwise::router::{FromIncoming, Incoming, Outcome};
use streamwise::{BoxError, Error, Message, Result};
use tower::{Layer, Service};

/// The default metadata key of the correlation id.
pub const CORRELATION_ID: &str = "correlation_id";

/// The default metadata key of the causation id.
pub const CAUSATION_ID: &str = "causation_id";

/// The correlation id of a message: the value of its `correlation_id` metadata when present
/// and not empty, otherwise its own UUID (the message starts a chain).
///
/// As a handler argument it reads the default key [`CORRELATION_ID`]; with a layer configured
/// for another key, use [`CorrelationId::of`] on the [`Message`] instead.
///
/// ```
/// use streamwise::Message;
/// use streamwise_middleware::correlation::CorrelationId;
///
/// let first = Message::new("order.placed", &7)?;
/// assert_eq!(CorrelationId::from_message(&first).as_str(), first.uuid().to_string());
/// let next = Message::new("order.paid", &7)?.with_metadata("correlation_id", "c-1");
/// assert_eq!(CorrelationId::from_message(&next).as_str(), "c-1");
/// # Ok::<(), streamwise::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CorrelationId(pub String);

impl CorrelationId {
    /// The correlation id of `message` under the default key [`CORRELATION_ID`].
    pub fn from_message(message: &Message) -> Self {
        Self::of(message, CORRELATION_ID)
    }

    /// The correlation id of `message` under metadata key `key`: its value when present and
    /// not empty, otherwise the message's UUID.
    pub fn of(message: &Message, key: &str) -> Self {
        match message.metadata().get(key) {
            Some(id) if !id.is_empty() => CorrelationId(id.to_owned()),
            _ => CorrelationId(message.uuid().to_string()),
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for CorrelationId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Extracts the correlation id of the incoming message (never fails).
impl<S> FromIncoming<S> for CorrelationId {
    fn from_incoming(incoming: &Incoming, _: &S) -> std::result::Result<Self, Outcome> {
        Ok(CorrelationId::from_message(incoming.message()))
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Keys {
    correlation: String,
    causation: String,
}

/// Wraps services in [`Correlation`].
#[derive(Clone, Debug)]
pub struct CorrelationLayer {
    keys: Arc<Keys>,
}

impl Default for CorrelationLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CorrelationLayer {
    /// The layer with the default keys, [`CORRELATION_ID`] and [`CAUSATION_ID`].
    pub fn new() -> Self {
        CorrelationLayer {
            keys: Arc::new(Keys {
                correlation: CORRELATION_ID.to_owned(),
                causation: CAUSATION_ID.to_owned(),
            }),
        }
    }

    /// The layer reading and writing the correlation id under `correlation_key` (the
    /// causation id keeps [`CAUSATION_ID`]).
    ///
    /// Fails with [`Error::Invalid`] (`correlation_key`) when the key is empty or equal to
    /// the causation key.
    pub fn with_key(correlation_key: &str) -> Result<Self> {
        Self::with_keys(correlation_key, CAUSATION_ID)
    }

    /// The layer with both metadata keys chosen.
    ///
    /// Fails with [`Error::Invalid`] naming `correlation_key` or `causation_key` when one is
    /// empty, or `causation_key` when both are the same.
    ///
    /// ```
    /// use streamwise_middleware::correlation::CorrelationLayer;
    ///
    /// let layer = CorrelationLayer::with_keys("x-correlation-id", "x-causation-id")?;
    /// assert_eq!(layer.correlation_key(), "x-correlation-id");
    /// let err = CorrelationLayer::with_keys("id", "id").unwrap_err();
    /// assert_eq!(err.invalid_field(), Some("causation_key"));
    /// # Ok::<(), streamwise::Error>(())
    /// ```
    pub fn with_keys(correlation_key: &str, causation_key: &str) -> Result<Self> {
        if correlation_key.is_empty() {
            return Err(Error::invalid("correlation_key", "must not be empty"));
        }
        if causation_key.is_empty() {
            return Err(Error::invalid("causation_key", "must not be empty"));
        }
        if correlation_key == causation_key {
            return Err(Error::invalid(
                "causation_key",
                format_args!("{causation_key:?} is also the correlation key"),
            ));
        }
        Ok(CorrelationLayer {
            keys: Arc::new(Keys {
                correlation: correlation_key.to_owned(),
                causation: causation_key.to_owned(),
            }),
        })
    }

    /// The metadata key of the correlation id.
    pub fn correlation_key(&self) -> &str {
        &self.keys.correlation
    }

    /// The metadata key of the causation id.
    pub fn causation_key(&self) -> &str {
        &self.keys.causation
    }
}

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;
    fn layer(&self, inner: S) -> Correlation<S> {
        Correlation {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// Stamps the correlation and causation ids on the messages the inner service produces; see
/// the [module docs](self).
#[derive(Clone, Debug)]
pub struct Correlation<S> {
    inner: S,
    keys: Arc<Keys>,
}

impl<S> Service<Incoming> for Correlation<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = CorrelationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> CorrelationFuture<S::Future> {
        // A clone of the delivery (one reference count), so that the ids are only worked out
        // for an outcome that carries messages.
        let cause = incoming.clone();
        CorrelationFuture {
            inner: self.inner.call(incoming),
            cause,
            keys: self.keys.clone(),
        }
    }
}

pin_project! {
    /// The future of [`Correlation`]: the inner service's, with the ids stamped on the
    /// messages of its outcome.
    pub struct CorrelationFuture<F> {
        #[pin]
        inner: F,
        cause: Incoming,
        keys: Arc<Keys>,
    }
}

impl<F, E> Future for CorrelationFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut outcome = ready!(this.inner.poll(cx)).map_err(Into::into)?;
        if !outcome.messages().is_empty() {
            let keys = &**this.keys;
            let message = this.cause.message();
            let correlation = CorrelationId::of(message, &keys.correlation).into_string();
            let causation = message.uuid().to_string();
            for out in outcome.messages_mut() {
                let metadata = out.message.metadata_mut();
                if metadata.get(&keys.correlation).is_none_or(str::is_empty) {
                    metadata.insert(keys.correlation.as_str(), correlation.as_str());
                }
                metadata.insert(keys.causation.as_str(), causation.as_str());
            }
        }
        Poll::Ready(Ok(outcome))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use streamwise::memory::MemoryBackend;
    use streamwise::router::{Outgoing, Router, Routes, handler_service};
    use streamwise::{Publisher, SubscribeOptions, Subscriber};
    use tower::ServiceExt;

    use super::*;

    fn out(event_type: &str) -> Message {
        Message::new(event_type, &0).unwrap()
    }

    #[tokio::test]
    async fn outgoing_messages_get_the_incoming_correlation_and_causation() {
        async fn produce() -> Vec<Outgoing> {
            vec![
                Outgoing::new("a", out("plain")),
                Outgoing::new("b", out("own").with_metadata(CORRELATION_ID, "set-by-handler")),
                Outgoing::new("c", out("empty").with_metadata(CORRELATION_ID, "")),
                Outgoing::new("d", out("stale").with_metadata(CAUSATION_ID, "grandparent")),
            ]
        }
        let svc = CorrelationLayer::new().layer(handler_service(produce, ()));
        let incoming = Message::new("in", &1)
            .unwrap()
            .with_metadata(CORRELATION_ID, "c-42");
        let cause = incoming.uuid().to_string();
        let outcome = svc.oneshot(Incoming::for_test(incoming)).await.unwrap();
        let ids: Vec<(Option<&str>, Option<&str>)> = outcome
            .messages()
            .iter()
            .map(|o| {
                let m = o.message.metadata();
                (m.get(CORRELATION_ID), m.get(CAUSATION_ID))
            })
            .collect();
        let cause = Some(cause.as_str());
        assert_eq!(
            ids,
            [
                (Some("c-42"), cause),
                (Some("set-by-handler"), cause),
                (Some("c-42"), cause),
                (Some("c-42"), cause),
            ]
        );
    }

    #[tokio::test]
    async fn a_message_without_correlation_id_starts_a_chain_with_its_uuid() {
        async fn produce(CorrelationId(id): CorrelationId, message: Message) -> Outgoing {
            assert_eq!(id, message.uuid().to_string());
            Outgoing::new("next", out("next"))
        }
        let svc = CorrelationLayer::new().layer(handler_service(produce, ()));
        for first in [
            Message::new("in", &1).unwrap(),
            Message::new("in", &1).unwrap().with_metadata(CORRELATION_ID, ""),
        ] {
            let uuid = first.uuid().to_string();
            let outcome = svc.clone().oneshot(Incoming::for_test(first)).await.unwrap();
            let m = outcome.messages()[0].message.metadata();
            assert_eq!(m.get(CORRELATION_ID), Some(uuid.as_str()));
            assert_eq!(m.get(CAUSATION_ID), Some(uuid.as_str()));
        }
    }

    #[tokio::test]
    async fn custom_keys_are_read_and_written() {
        async fn produce() -> Outgoing {
            Outgoing::new("next", out("next"))
        }
        let layer = CorrelationLayer::with_keys("x-corr", "x-cause").unwrap();
        let svc = layer.layer(handler_service(produce, ()));
        let incoming = Message::new("in", &1)
            .unwrap()
            .with_metadata("x-corr", "abc")
            .with_metadata(CORRELATION_ID, "ignored");
        let cause = incoming.uuid().to_string();
        let outcome = svc.oneshot(Incoming::for_test(incoming)).await.unwrap();
        let m = outcome.messages()[0].message.metadata();
        assert_eq!(m.get("x-corr"), Some("abc"));
        assert_eq!(m.get("x-cause"), Some(cause.as_str()));
        assert_eq!((m.get(CORRELATION_ID), m.get(CAUSATION_ID)), (None, None));

        let layer = CorrelationLayer::with_key("trace").unwrap();
        assert_eq!(
            (layer.correlation_key(), layer.causation_key()),
            ("trace", CAUSATION_ID)
        );
    }

    #[test]
    fn bad_keys_are_refused_naming_the_field() {
        let cases = [
            ("", "cause", "correlation_key"),
            ("corr", "", "causation_key"),
            ("same", "same", "causation_key"),
        ];
        for (correlation, causation, field) in cases {
            let err = CorrelationLayer::with_keys(correlation, causation).unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{correlation:?} {causation:?}");
        }
        let err = CorrelationLayer::with_key(CAUSATION_ID).unwrap_err();
        assert_eq!(err.invalid_field(), Some("causation_key"));
        assert_eq!(
            CorrelationLayer::with_key("").unwrap_err().invalid_field(),
            Some("correlation_key")
        );
    }

    #[tokio::test]
    async fn errors_and_other_verdicts_pass_through() {
        let failing = CorrelationLayer::new().layer(handler_service(|| async { Err::<(), _>("no") }, ()));
        let err = failing.oneshot(Incoming::for_test(out("in"))).await.unwrap_err();
        assert_eq!(err.to_string(), "no");
        let nack = CorrelationLayer::new().layer(handler_service(|| async { Outcome::nack() }, ()));
        let outcome = nack.oneshot(Incoming::for_test(out("in"))).await.unwrap();
        assert_eq!(outcome, Outcome::nack());
    }

    #[tokio::test]
    async fn in_a_router_a_chain_keeps_one_correlation_id() {
        let backend = MemoryBackend::new();
        // placed -> paid -> shipped, across two subscriptions.
        async fn on_placed(CorrelationId(id): CorrelationId) -> Outgoing {
            Outgoing::new("payments", Message::new("order.paid", &id).unwrap())
        }
        async fn on_paid(message: Message) -> Outgoing {
            Outgoing::new(
                "shipments",
                Message::new("order.shipped", &message.json().unwrap()).unwrap(),
            )
        }
        let options = || SubscribeOptions::new("svc", "w1");
        let running = Router::new()
            .layer(CorrelationLayer::new())
            .subscribe(
                "orders",
                options(),
                Routes::new().route("order.placed", on_placed),
            )
            .subscribe("payments", options(), Routes::new().route("order.paid", on_paid))
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let watcher = backend.subscriber();
        let mut paid = watcher
            .subscribe("payments", SubscribeOptions::new("inspector", "i"))
            .await
            .unwrap();
        let mut shipped = watcher
            .subscribe("shipments", SubscribeOptions::new("inspector", "i"))
            .await
            .unwrap();
        let placed = Message::new("order.placed", &7)
            .unwrap()
            .with_metadata(CORRELATION_ID, "checkout-9");
        backend
            .publisher()
            .publish("orders", placed.clone())
            .await
            .unwrap();

        let wait = Duration::from_secs(20);
        let paid = tokio::time::timeout(wait, paid.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let shipped = tokio::time::timeout(wait, shipped.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        running.shutdown().await.unwrap();

        let (paid, shipped) = (paid.message(), shipped.message());
        assert_eq!(paid.json().unwrap(), "checkout-9", "the extractor saw the id");
        assert_eq!(paid.metadata().get(CORRELATION_ID), Some("checkout-9"));
        assert_eq!(
            paid.metadata().get(CAUSATION_ID),
            Some(placed.uuid().to_string().as_str())
        );
        assert_eq!(shipped.metadata().get(CORRELATION_ID), Some("checkout-9"));
        assert_eq!(
            shipped.metadata().get(CAUSATION_ID),
            Some(paid.uuid().to_string().as_str())
        );
    }
}
