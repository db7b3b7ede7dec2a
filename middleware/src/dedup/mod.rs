//! Deduplication by message UUID: a message whose UUID was already handled (by this consumer
//! group, on this stream, within a time to live) is acknowledged without calling the handler.
//! Producers that retry a publish, or re-publish after a crash, write the same UUID twice;
//! this layer makes the handler see it once.
//!
//! The marks live in a pluggable [`DedupStore`]: [`MemoryDedupStore`] (one process) or, with
//! the `dedup-redis` feature, `RedisDedupStore` (`SET NX PX`, shared by every consumer).
//!
//! How a delivery goes through [`DedupLayer`]:
//!
//! 1. It marks `<stream>:<group>:<uuid>` as seen, with the delivery's entry id as holder.
//! 2. Already marked by another entry: the delivery is a duplicate, the outcome is
//!    [`Outcome::ack`], and the handler is not called.
//! 3. Otherwise the handler runs. When it fails (error) or its verdict is not
//!    [`Verdict::Ack`], the mark is removed again, so that a redelivery is processed.
//!
//! Nothing is lost on the way:
//!
//! - If the store fails, the handler is called anyway (at-least-once) and the failure is
//!   logged.
//! - A mark never blocks *the entry that holds it* (same entry id): that entry only comes
//!   back when its previous run was not acknowledged. The handler panicked, timed out and
//!   was retried, or was abandoned at shutdown; removing the mark failed; or the handler's
//!   outgoing messages could not be published (the router then nacks, and skipping the
//!   redelivery would drop those messages). The price: a crash between a successful
//!   handler and its ack repeats the handler, as at-least-once delivery allows.
//! - A duplicate that arrives while the first copy is still being handled is acknowledged at
//!   once; if the first copy then fails, that copy itself is redelivered and handled.
//!
//! The time to live bounds how far apart two copies can be and still be recognised; make it
//! longer than producers retry and than deliveries stay pending.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use streamwise::router::{DeliveryInfo, Incoming, Outcome, State, handler_service};
//! use streamwise::{EntryId, Message, Origin};
//! use streamwise_middleware::dedup::{DedupLayer, MemoryDedupStore};
//! use tower::{Layer, ServiceExt};
//!
//! async fn charge(State(charges): State<Arc<AtomicUsize>>) {
//!     charges.fetch_add(1, Ordering::SeqCst);
//! }
//!
//! let charges = Arc::new(AtomicUsize::new(0));
//! let layer = DedupLayer::new(Arc::new(MemoryDedupStore::new()), Duration::from_secs(3600))?;
//! let svc = layer.layer(handler_service(charge, charges.clone()));
//!
//! // The same message (same UUID) in two entries, as a producer that retried would write it.
//! let order = Message::new("order.placed", &7)?;
//! let origin = Arc::new(Origin::new("orders", "billing", "worker-1"));
//! for seq in 1..=2 {
//!     let info = DeliveryInfo::new(EntryId::new(1_700_000_000_000, seq), 1, origin.clone());
//!     let outcome = svc.clone().oneshot(Incoming::for_test_with(order.clone(), info)).await.unwrap();
//!     assert_eq!(outcome, Outcome::ack());
//! }
//! assert_eq!(charges.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! Put it at the subscription level, so that every event type is covered, and outside retry
//! and timeout layers (added after them), so that the retries of one delivery happen under
//! one mark.

#[cfg(feature = "dedup-redis")]
mod redis;
mod store;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use streamwise::router::{Incoming, Outcome, Verdict};
use streamwise::{BoxError, Error, Result};
use tower::{Layer, Service};

#[cfg(feature = "dedup-redis")]
pub use self::redis::{DEFAULT_PREFIX, RedisDedupStore};
pub use self::store::{DedupStore, Marked, MemoryDedupStore};
use crate::take_ready;

/// The longest time to live [`DedupLayer::new`] accepts: 365 days.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Wraps services in [`Dedup`].
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    ttl: Duration,
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl DedupLayer {
    /// Deduplicates with marks in `store` that live for `ttl`.
    ///
    /// Fails with [`Error::Invalid`] (`ttl`) when `ttl` is under 1 ms or over [`MAX_TTL`].
    pub fn new(store: Arc<dyn DedupStore>, ttl: Duration) -> Result<Self> {
        store::check_ttl(ttl)?;
        if ttl > MAX_TTL {
            return Err(Error::invalid(
                "ttl",
                format_args!("{ttl:?} is longer than the limit of {MAX_TTL:?}"),
            ));
        }
        Ok(DedupLayer { store, ttl })
    }

    /// How long a mark lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            store: self.store.clone(),
            ttl: self.ttl,
        }
    }
}

/// Calls the inner service once per message UUID; see the [module docs](self).
#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    store: Arc<dyn DedupStore>,
    ttl: Duration,
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The mark of a delivery: its message's UUID, scoped to its stream and consumer group
/// (another group is another reader and must see the message too).
fn key_of(incoming: &Incoming) -> String {
    let info = incoming.info();
    format!("{}:{}:{}", info.stream(), info.group(), incoming.message().uuid())
}

impl<S> Service<Incoming> for Dedup<S>
where
    S: Service<Incoming, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    // Boxed, unlike the thin layers: a delivery awaits the store's mark, then the inner call,
    // then maybe the store's forget, and the store's futures borrow the key and the store, so
    // a named future would have to hold references into itself. A delivery through this layer
    // allocates for the key and the store's (boxed) futures anyway.
    type Future = BoxFuture<'static, Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let store = self.store.clone();
        let ttl = self.ttl;
        Box::pin(async move {
            let key = key_of(&incoming);
            let entry = incoming.info().id().to_string();
            // Whether this delivery holds the mark (and must drop it if it fails).
            let holds_mark = match store.mark(&key, &entry, ttl).await {
                Ok(Marked::New) => true,
                Ok(Marked::Seen { holder }) if holder == entry => {
                    tracing::debug!(key, entry, "the entry holding the mark is back; handled again");
                    true
                }
                Ok(Marked::Seen { holder }) => {
                    tracing::debug!(
                        key,
                        entry,
                        first = holder,
                        "duplicate message; acknowledged without the handler"
                    );
                    return Ok(Outcome::ack());
                }
                Err(e) => {
                    tracing::warn!(key, entry, error = %e, "dedup store failed; handling the message anyway");
                    false
                }
            };
            let result = inner.call(incoming).await.map_err(Into::into);
            let acked = matches!(&result, Ok(outcome) if *outcome.verdict() == Verdict::Ack);
            // Should forgetting fail, the redelivery of this entry is still handled: it holds
            // the mark.
            if holds_mark
                && !acked
                && let Err(e) = store.forget(&key).await
            {
                tracing::warn!(key, entry, error = %e, "dedup store failed to forget a mark");
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use streamwise::memory::MemoryBackend;
    use streamwise::router::{DeliveryInfo, Outgoing, Router, State, handler_service};
    use streamwise::{EntryId, Message, Origin, Publisher, SubscribeOptions};
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::log_subscriber;

    const HOUR: Duration = Duration::from_secs(3600);

    fn delivery(message: &Message, id: u64, count: u64) -> Incoming {
        delivery_in(message, "orders", "svc", id, count)
    }

    fn delivery_in(message: &Message, stream: &str, group: &str, id: u64, count: u64) -> Incoming {
        let origin = Arc::new(Origin::new(stream, group, "w1"));
        Incoming::for_test_with(
            message.clone(),
            DeliveryInfo::new(EntryId::new(id, 0), count, origin),
        )
    }

    /// What the handler returns for each call, in turn (then `Ack`), and how often it ran.
    #[derive(Clone)]
    struct Script {
        calls: Arc<AtomicUsize>,
        replies: Arc<Mutex<Vec<std::result::Result<Outcome, String>>>>,
    }

    impl Script {
        fn new(replies: Vec<std::result::Result<Outcome, String>>) -> Self {
            Script {
                calls: Arc::default(),
                replies: Arc::new(Mutex::new(replies)),
            }
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    async fn scripted(State(script): State<Script>) -> std::result::Result<Outcome, String> {
        script.calls.fetch_add(1, Ordering::SeqCst);
        let mut replies = script.replies.lock().unwrap();
        if replies.is_empty() {
            Ok(Outcome::ack())
        } else {
            replies.remove(0)
        }
    }

    fn layered(
        store: Arc<dyn DedupStore>,
        script: &Script,
    ) -> impl Service<Incoming, Response = Outcome, Error = BoxError> + Clone {
        DedupLayer::new(store, HOUR)
            .unwrap()
            .layer(handler_service(scripted, script.clone()))
    }

    #[tokio::test]
    async fn a_second_copy_is_acked_without_the_handler() {
        let script = Script::new(vec![Ok(
            Outcome::ack().publish("out", Message::new("x", &1).unwrap())
        )]);
        let store = Arc::new(MemoryDedupStore::new());
        let svc = layered(store.clone(), &script);
        let message = Message::new("t", &1).unwrap();
        let first = svc.clone().oneshot(delivery(&message, 1, 1)).await.unwrap();
        assert_eq!(first.messages().len(), 1, "the handler's outcome passes through");
        // Another entry with the same UUID (a producer retry): skipped, acked, no messages.
        let second = svc.clone().oneshot(delivery(&message, 2, 1)).await.unwrap();
        assert_eq!(second, Outcome::ack());
        assert_eq!(script.calls(), 1);
        // Another message is handled.
        let other = Message::new("t", &1).unwrap();
        svc.clone().oneshot(delivery(&other, 3, 1)).await.unwrap();
        assert_eq!(script.calls(), 2);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test]
    async fn marks_are_per_stream_and_group() {
        let script = Script::new(vec![]);
        let svc = layered(Arc::new(MemoryDedupStore::new()), &script);
        let message = Message::new("t", &1).unwrap();
        for (stream, group) in [("orders", "svc"), ("orders", "audit"), ("refunds", "svc")] {
            svc.clone()
                .oneshot(delivery_in(&message, stream, group, 1, 1))
                .await
                .unwrap();
        }
        assert_eq!(
            script.calls(),
            3,
            "each group on each stream sees the message once"
        );
    }

    #[tokio::test]
    async fn failures_and_non_ack_verdicts_release_the_mark() {
        let replies = vec![
            Err("database away".to_owned()),
            Ok(Outcome::nack()),
            Ok(Outcome::dead_letter("bad")),
            Ok(Outcome::ack()),
        ];
        let script = Script::new(replies);
        let store = Arc::new(MemoryDedupStore::new());
        let svc = layered(store.clone(), &script);
        let message = Message::new("t", &1).unwrap();
        let err = svc.clone().oneshot(delivery(&message, 1, 1)).await.unwrap_err();
        assert_eq!(err.to_string(), "database away");
        assert!(store.is_empty(), "the error released the mark");
        // Each copy is handled while the verdicts are not Ack; separate entries, so that the
        // mark (not the redelivery rule) decides.
        assert_eq!(
            svc.clone().oneshot(delivery(&message, 2, 1)).await.unwrap(),
            Outcome::nack()
        );
        assert!(store.is_empty());
        let dead = svc.clone().oneshot(delivery(&message, 3, 1)).await.unwrap();
        assert_eq!(dead, Outcome::dead_letter("bad"));
        assert!(store.is_empty());
        svc.clone().oneshot(delivery(&message, 4, 1)).await.unwrap();
        assert_eq!(store.len(), 1, "the Ack kept the mark");
        svc.clone().oneshot(delivery(&message, 5, 1)).await.unwrap();
        assert_eq!(script.calls(), 4, "the copy after the Ack was skipped");
    }

    #[tokio::test]
    async fn a_redelivery_of_the_entry_holding_the_mark_is_handled_again() {
        let script = Script::new(vec![]);
        let svc = layered(Arc::new(MemoryDedupStore::new()), &script);
        let message = Message::new("t", &1).unwrap();
        svc.clone().oneshot(delivery(&message, 1, 1)).await.unwrap();
        // The same entry again: its ack did not happen (say, publishing its output failed).
        svc.clone().oneshot(delivery(&message, 1, 2)).await.unwrap();
        assert_eq!(script.calls(), 2);
        // A redelivery of another entry with the UUID is still a duplicate.
        svc.clone().oneshot(delivery(&message, 2, 3)).await.unwrap();
        assert_eq!(script.calls(), 2);
    }

    /// A store that always fails, counting calls.
    #[derive(Default)]
    struct Broken {
        calls: AtomicUsize,
    }

    impl DedupStore for Broken {
        fn mark<'a>(&'a self, _: &'a str, _: &'a str, _: Duration) -> BoxFuture<'a, Result<Marked>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(Error::connection("dedup store away", None)) })
        }
        fn forget<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<()>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(Error::connection("dedup store away", None)) })
        }
    }

    #[tokio::test]
    async fn a_retry_after_a_timeout_is_not_taken_for_a_duplicate() {
        // Retry(Timeout(Dedup(handler))): the timed-out attempt is dropped mid-handler, so
        // its mark is never released; the retry is the same delivery, count and all.
        let calls = Arc::new(AtomicUsize::new(0));
        async fn slow_once(State(calls): State<Arc<AtomicUsize>>) {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
        }
        let store = Arc::new(MemoryDedupStore::new());
        let svc = DedupLayer::new(store.clone(), HOUR)
            .unwrap()
            .layer(handler_service(slow_once, calls.clone()));
        let incoming = delivery(&Message::new("t", &1).unwrap(), 1, 1);
        let first =
            tokio::time::timeout(Duration::from_millis(20), svc.clone().oneshot(incoming.clone())).await;
        assert!(first.is_err(), "the first attempt timed out");
        assert_eq!(store.len(), 1, "its mark was left behind");
        let retried = svc.clone().oneshot(incoming).await.unwrap();
        assert_eq!(retried, Outcome::ack());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the retry ran the handler");
    }

    #[tokio::test]
    async fn a_failing_store_never_loses_a_message_and_is_logged() {
        let (subscriber, logs) = log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let script = Script::new(vec![Ok(Outcome::nack())]);
        let store = Arc::new(Broken::default());
        let svc = layered(store.clone(), &script);
        let message = Message::new("t", &1).unwrap();
        assert_eq!(
            svc.clone().oneshot(delivery(&message, 1, 1)).await.unwrap(),
            Outcome::nack()
        );
        assert_eq!(
            svc.clone().oneshot(delivery(&message, 2, 1)).await.unwrap(),
            Outcome::ack()
        );
        assert_eq!(script.calls(), 2, "every copy was handled");
        assert_eq!(
            store.calls.load(Ordering::SeqCst),
            2,
            "no forget for a mark never taken"
        );
        let text = logs.text();
        assert_eq!(
            text.matches("dedup store failed; handling the message anyway")
                .count(),
            2,
            "{text}"
        );
        assert!(text.contains("dedup store away"), "{text}");
    }

    /// Marks fine, but cannot forget.
    struct CannotForget(MemoryDedupStore);

    impl DedupStore for CannotForget {
        fn mark<'a>(&'a self, key: &'a str, holder: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Marked>> {
            self.0.mark(key, holder, ttl)
        }
        fn forget<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { Err(Error::connection("dedup store away", None)) })
        }
    }

    #[tokio::test]
    async fn a_failed_forget_still_lets_the_redelivery_through() {
        let script = Script::new(vec![Err("transient".to_owned())]);
        let svc = layered(Arc::new(CannotForget(MemoryDedupStore::new())), &script);
        let message = Message::new("t", &1).unwrap();
        svc.clone().oneshot(delivery(&message, 1, 1)).await.unwrap_err();
        // The router nacks the error; the entry comes back with a higher delivery count.
        let outcome = svc.clone().oneshot(delivery(&message, 1, 2)).await.unwrap();
        assert_eq!(outcome, Outcome::ack());
        assert_eq!(script.calls(), 2);
    }

    #[test]
    fn bad_ttls_are_refused_naming_the_field() {
        let store: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::new());
        for ttl in [
            Duration::ZERO,
            Duration::from_micros(10),
            MAX_TTL + Duration::from_secs(1),
        ] {
            let err = DedupLayer::new(store.clone(), ttl).unwrap_err();
            assert_eq!(err.invalid_field(), Some("ttl"), "{ttl:?}");
        }
        assert_eq!(DedupLayer::new(store, MAX_TTL).unwrap().ttl(), MAX_TTL);
    }

    /// A publisher that fails its first publish.
    struct FailsOnce {
        inner: streamwise::memory::MemoryPublisher,
        failed: AtomicUsize,
    }

    impl Publisher for FailsOnce {
        fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
            if self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
                return Box::pin(async { Err(Error::connection("broker away", None)) });
            }
            self.inner.publish(topic, message)
        }
        fn publish_batch<'a>(
            &'a self,
            topic: &'a str,
            messages: Vec<Message>,
        ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
            self.inner.publish_batch(topic, messages)
        }
        fn close(&self) -> BoxFuture<'_, Result<()>> {
            self.inner.close()
        }
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn in_a_router_duplicates_are_skipped_and_nothing_is_lost() {
        let backend = MemoryBackend::new();
        let calls = Arc::new(AtomicUsize::new(0));
        async fn invoice(State(calls): State<Arc<AtomicUsize>>, message: Message) -> Vec<Outgoing> {
            calls.fetch_add(1, Ordering::SeqCst);
            vec![Outgoing::new(
                "invoices",
                Message::new("invoice", &message.json().unwrap()).unwrap(),
            )]
        }
        let layer = DedupLayer::new(Arc::new(MemoryDedupStore::new()), HOUR).unwrap();
        let router = Router::with_state(calls.clone());
        let routes = router.routes().route("order.placed", invoice).layer(layer);
        // The first publish of the handler's output fails, so the first run's delivery is
        // nacked and comes back: it must be handled again, not skipped as a duplicate.
        let publisher = Arc::new(FailsOnce {
            inner: backend.publisher(),
            failed: AtomicUsize::new(0),
        });
        let running = router
            .subscribe("orders", SubscribeOptions::new("svc", "w1"), routes)
            .start(Arc::new(backend.subscriber()), publisher)
            .await
            .unwrap();
        let order = Message::new("order.placed", &7).unwrap();
        backend
            .publisher()
            .publish("orders", order.clone())
            .await
            .unwrap();
        wait_until("the first order's invoice", || {
            backend.stream_len("invoices").is_ok_and(|n| n == 1)
        })
        .await;
        // The producer retries: the same message, a second entry.
        backend
            .publisher()
            .publish("orders", order.clone())
            .await
            .unwrap();
        let other = Message::new("order.placed", &8).unwrap();
        backend.publisher().publish("orders", other).await.unwrap();
        wait_until("four deliveries settled", || running.handled() == 4).await;
        running.shutdown().await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "first run, its redelivery, the other order"
        );
        assert_eq!(
            backend.stream_len("invoices").unwrap(),
            2,
            "one invoice per order"
        );
        assert_eq!(
            backend.pending_count("orders", "svc").unwrap(),
            0,
            "the duplicate was acked"
        );
    }
}
