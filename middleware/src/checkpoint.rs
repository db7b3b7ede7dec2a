//! Checkpoints from the handler side: after a handler succeeds with [`Verdict::Ack`], the
//! position of its consumer (stream, group, consumer) moves up to the delivery's entry id and
//! is saved in a [`CheckpointStore`] as `{message_id, timestamp}`.
//!
//! For backends that do not record checkpoints themselves. (The Redis subscriber does, after
//! its acks, as an exact low watermark; do not point this layer at the same store as it.)
//!
//! Writes are coalesced, not a round trip per message:
//!
//! - at most one write per [`min_interval`](CheckpointLayer::min_interval) (default
//!   [`DEFAULT_MIN_INTERVAL`], 100 ms) for each (stream, group, consumer), and one at a time;
//! - the position never moves back: a redelivered older entry does not lower it;
//! - the latest position is not lost: the first delivery to finish after the interval
//!   writes it, whatever its own id or outcome, and [`CheckpointLayer::flush`] writes every pending
//!   position at once (call it after the router has shut down).
//!
//! While deliveries run concurrently (`max_in_flight` above 1), the position stays just
//! below the oldest delivery still in the handler, so it never passes an entry that is
//! being worked on. It does not wait for deliveries that failed or were nacked: those come
//! back, but the position may already be past them. It is also taken when the handler
//! decides, before the router publishes the outcome's messages and acks. So use it as a
//! progress marker ("handled up to here"), and put it at the subscription level so that it
//! sees every delivery.
//!
//! A store that fails is logged with `tracing` and does not change the outcome; the next
//! delivery after the interval tries again.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use std::sync::Arc;
//! use streamwise::checkpoint::{CheckpointStore, MemoryCheckpointStore};
//! use streamwise::router::{DeliveryInfo, Incoming, handler_service};
//! use streamwise::{EntryId, Message, Origin};
//! use streamwise_middleware::checkpoint::CheckpointLayer;
//! use tower::{Layer, ServiceExt};
//!
//! let store = Arc::new(MemoryCheckpointStore::new());
//! let layer = CheckpointLayer::new(store.clone());
//! let svc = layer.layer(handler_service(|| async {}, ()));
//!
//! let origin = Arc::new(Origin::new("orders", "billing", "worker-1"));
//! for seq in 1..=3 {
//!     let info = DeliveryInfo::new(EntryId::new(1_700_000_000_000, seq), 1, origin.clone());
//!     let incoming = Incoming::for_test_with(Message::new("order.placed", &seq)?, info);
//!     svc.clone().oneshot(incoming).await.unwrap();
//! }
//! // The first delivery wrote at once; the next two were coalesced until a flush.
//! let saved = store.load("orders", "billing", "worker-1").await?.unwrap();
//! assert_eq!(saved.message_id, EntryId::new(1_700_000_000_000, 1));
//! layer.flush().await?;
//! let saved = store.load("orders", "billing", "worker-1").await?.unwrap();
//! assert_eq!(saved.message_id, EntryId::new(1_700_000_000_000, 3));
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use streamwise::checkpoint::{Checkpoint, CheckpointStore};
use streamwise::router::{Incoming, Outcome, Verdict};
use streamwise::{BoxError, EntryId, Origin, Result};
use tower::{Layer, Service};

/// The default [`CheckpointLayer::min_interval`]: 100 ms.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The positions of every consumer seen, shared by a layer and its services.
struct Shared {
    store: Arc<dyn CheckpointStore>,
    tracks: Mutex<HashMap<Arc<Origin>, Track>>,
}

/// One consumer's progress.
#[derive(Default)]
struct Track {
    /// Deliveries in the handler now (an entry may be in twice, if reclaimed while running).
    in_flight: BTreeMap<EntryId, usize>,
    /// The highest entry whose handler succeeded with Ack.
    done: Option<EntryId>,
    /// The highest position saved (or being saved).
    written: Option<EntryId>,
    /// When the last write started.
    last_write: Option<Instant>,
    /// A write is under way.
    writing: bool,
}

impl Track {
    /// The position to save: the highest Ack, but below the oldest delivery still running.
    fn position(&self) -> Option<EntryId> {
        let done = self.done?;
        match self.in_flight.keys().next() {
            Some(&oldest) if oldest <= done => oldest.prev(),
            _ => Some(done),
        }
    }

    /// The position, if it is above what was written and no write is under way.
    fn pending(&self) -> Option<EntryId> {
        if self.writing {
            return None;
        }
        self.position().filter(|p| self.written.is_none_or(|w| *p > w))
    }
}

impl Shared {
    fn tracks(&self) -> MutexGuard<'_, HashMap<Arc<Origin>, Track>> {
        // Every update leaves the map consistent; a panic elsewhere cannot corrupt it.
        self.tracks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, origin: &Arc<Origin>, id: EntryId) {
        let mut tracks = self.tracks();
        let track = tracks.entry(origin.clone()).or_default();
        *track.in_flight.entry(id).or_default() += 1;
    }

    fn leave(track: &mut Track, id: EntryId) {
        if let Some(n) = track.in_flight.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                track.in_flight.remove(&id);
            }
        }
    }

    /// Records the end of a delivery; returns the write to make now, if one is due.
    fn finish(
        self: &Arc<Self>,
        origin: &Arc<Origin>,
        id: EntryId,
        acked: bool,
        min_interval: Duration,
    ) -> Option<Writing> {
        let mut tracks = self.tracks();
        let track = tracks.get_mut(origin)?;
        Self::leave(track, id);
        if acked {
            track.done = track.done.max(Some(id));
        }
        let now = Instant::now();
        if track
            .last_write
            .is_some_and(|at| now.saturating_duration_since(at) < min_interval)
        {
            return None;
        }
        let position = track.pending()?;
        track.writing = true;
        track.last_write = Some(now);
        drop(tracks);
        Some(Writing {
            shared: self.clone(),
            origin: origin.clone(),
            position,
        })
    }
}

/// A write under way for one consumer: while it lives no other write starts for that
/// consumer; dropping it (done, failed or cancelled) lets the next one start.
struct Writing {
    shared: Arc<Shared>,
    origin: Arc<Origin>,
    position: EntryId,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if let Some(track) = self.shared.tracks().get_mut(&self.origin) {
            track.writing = false;
        }
    }
}

impl Writing {
    /// Saves the position; records it when saved, logs a failure.
    async fn save(self) -> Result<()> {
        let Writing {
            shared,
            origin,
            position,
        } = &self;
        let checkpoint = Checkpoint {
            message_id: *position,
            timestamp: SystemTime::now(),
        };
        let result = shared
            .store
            .save(origin.stream(), origin.group(), origin.consumer(), checkpoint)
            .await;
        match &result {
            Ok(()) => {
                if let Some(track) = shared.tracks().get_mut(origin) {
                    track.written = track.written.max(Some(*position));
                }
            }
            Err(e) => tracing::warn!(
                stream = origin.stream(),
                group = origin.group(),
                consumer = origin.consumer(),
                position = %position,
                error = %e,
                "checkpoint not saved; the next delivery tries again"
            ),
        }
        result
    }
}

/// Leaves the in-flight set if the delivery's future is dropped or panics before it
/// finished normally.
struct InFlight {
    shared: Arc<Shared>,
    origin: Arc<Origin>,
    id: EntryId,
    armed: bool,
}

impl InFlight {
    /// The delivery finished normally: [`Shared::finish`] takes it out, and returns the write
    /// to make now, if one is due.
    fn finish(mut self, acked: bool, min_interval: Duration) -> Option<Writing> {
        self.armed = false;
        self.shared.finish(&self.origin, self.id, acked, min_interval)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.armed
            && let Some(track) = self.shared.tracks().get_mut(&self.origin)
        {
            Shared::leave(track, self.id);
        }
    }
}

/// Wraps services in [`CheckpointService`]. Clones share the positions (and the store).
#[derive(Clone)]
pub struct CheckpointLayer {
    shared: Arc<Shared>,
    min_interval: Duration,
}

impl fmt::Debug for CheckpointLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointLayer")
            .field("min_interval", &self.min_interval)
            .field("consumers", &self.shared.tracks().len())
            .finish_non_exhaustive()
    }
}

impl CheckpointLayer {
    /// Saves positions in `store`, at most once per [`DEFAULT_MIN_INTERVAL`] per consumer.
    pub fn new(store: Arc<dyn CheckpointStore>) -> Self {
        CheckpointLayer {
            shared: Arc::new(Shared {
                store,
                tracks: Mutex::new(HashMap::new()),
            }),
            min_interval: DEFAULT_MIN_INTERVAL,
        }
    }

    /// The least time between two writes for one consumer; zero writes after every
    /// successful delivery. Default [`DEFAULT_MIN_INTERVAL`].
    #[must_use]
    pub fn min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// The position this layer has reached for a consumer (saved or not yet), if any.
    pub fn position(&self, stream: &str, group: &str, consumer: &str) -> Option<EntryId> {
        let origin = Origin::new(stream, group, consumer);
        self.shared.tracks().get(&origin).and_then(Track::position)
    }

    /// Saves every position not saved yet, now, whatever the interval (for example after
    /// the router has shut down). Positions being written by a delivery right now are left
    /// to it. Returns the first store error; every consumer is tried.
    pub async fn flush(&self) -> Result<()> {
        let due: Vec<(Arc<Origin>, EntryId)> = {
            let mut tracks = self.shared.tracks();
            let now = Instant::now();
            tracks
                .iter_mut()
                .filter_map(|(origin, track)| {
                    let position = track.pending()?;
                    track.writing = true;
                    track.last_write = Some(now);
                    Some((origin.clone(), position))
                })
                .collect()
        };
        // Guards made at once, so that a flush dropped halfway blocks no later write.
        let writes: Vec<Writing> = due
            .into_iter()
            .map(|(origin, position)| Writing {
                shared: self.shared.clone(),
                origin,
                position,
            })
            .collect();
        let mut first_error = None;
        for write in writes {
            if let Err(e) = write.save().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<S> Layer<S> for CheckpointLayer {
    type Service = CheckpointService<S>;
    fn layer(&self, inner: S) -> CheckpointService<S> {
        CheckpointService {
            inner,
            shared: self.shared.clone(),
            min_interval: self.min_interval,
        }
    }
}

/// Records the position after successful deliveries; see the [module docs](self).
#[derive(Clone)]
pub struct CheckpointService<S> {
    inner: S,
    shared: Arc<Shared>,
    min_interval: Duration,
}

impl<S: fmt::Debug> fmt::Debug for CheckpointService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointService")
            .field("inner", &self.inner)
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Incoming> for CheckpointService<S>
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = CheckpointFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, incoming: Incoming) -> CheckpointFuture<S::Future> {
        let origin = incoming.info().origin().clone();
        let id = incoming.info().id();
        // In flight from the call on, so that a delivery started earlier holds the position.
        self.shared.enter(&origin, id);
        let in_flight = InFlight {
            shared: self.shared.clone(),
            origin,
            id,
            armed: true,
        };
        CheckpointFuture {
            state: State::Handling {
                future: self.inner.call(incoming),
                in_flight: Some(in_flight),
                min_interval: self.min_interval,
            },
        }
    }
}

pin_project! {
    /// The future of [`CheckpointService`]: the inner service's, then, when a write is due,
    /// the save of the position (its outcome is the inner service's either way).
    pub struct CheckpointFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Handling {
            #[pin]
            future: F,
            in_flight: Option<InFlight>,
            min_interval: Duration,
        },
        // Boxed: a save is due at most once per `min_interval` per consumer, not per delivery,
        // and the store's own future is boxed already (`dyn CheckpointStore`).
        Saving {
            save: BoxFuture<'static, Result<()>>,
            result: Option<Result<Outcome, BoxError>>,
        },
    }
}

impl<F, E> Future for CheckpointFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Handling {
                    future,
                    in_flight,
                    min_interval,
                } => {
                    let result = ready!(future.poll(cx)).map_err(Into::into);
                    let acked = matches!(&result, Ok(outcome) if *outcome.verdict() == Verdict::Ack);
                    let in_flight = in_flight
                        .take()
                        .expect("CheckpointFuture polled after it completed");
                    match in_flight.finish(acked, *min_interval) {
                        Some(write) => state.set(State::Saving {
                            save: Box::pin(write.save()),
                            result: Some(result),
                        }),
                        None => return Poll::Ready(result),
                    }
                }
                StateProj::Saving { save, result } => {
                    // Logged inside; a failed save does not change the outcome.
                    let _ = ready!(save.as_mut().poll(cx));
                    return Poll::Ready(result.take().expect("CheckpointFuture polled after it completed"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures::future::BoxFuture;
    use streamwise::checkpoint::MemoryCheckpointStore;
    use streamwise::memory::MemoryBackend;
    use streamwise::router::{DeliveryInfo, Router, Routes, handler_service};
    use streamwise::{Error, Message, Publisher, SubscribeOptions};
    use tokio::sync::Notify;
    use tower::ServiceExt;

    use super::*;
    use crate::test_util::log_subscriber;

    /// A memory store that records every save and can be made to fail.
    #[derive(Default)]
    struct Recording {
        inner: MemoryCheckpointStore,
        saves: Mutex<Vec<EntryId>>,
        fail: AtomicBool,
        hang: AtomicBool,
    }

    impl Recording {
        fn saves(&self) -> Vec<EntryId> {
            self.saves.lock().unwrap().clone()
        }
    }

    impl CheckpointStore for Recording {
        fn save<'a>(
            &'a self,
            stream: &'a str,
            group: &'a str,
            consumer: &'a str,
            checkpoint: Checkpoint,
        ) -> BoxFuture<'a, Result<()>> {
            if self.fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err(Error::connection("checkpoint store away", None)) });
            }
            if self.hang.load(Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            self.saves.lock().unwrap().push(checkpoint.message_id);
            self.inner.save(stream, group, consumer, checkpoint)
        }
        fn load<'a>(
            &'a self,
            stream: &'a str,
            group: &'a str,
            consumer: &'a str,
        ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
            self.inner.load(stream, group, consumer)
        }
        fn load_group<'a>(
            &'a self,
            stream: &'a str,
            group: &'a str,
        ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
            self.inner.load_group(stream, group)
        }
    }

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    fn delivery_of(consumer: &str, n: u64) -> Incoming {
        let origin = Arc::new(Origin::new("orders", "svc", consumer));
        Incoming::for_test_with(
            Message::new("t", &n).unwrap(),
            DeliveryInfo::new(id(n), 1, origin),
        )
    }

    fn delivery(n: u64) -> Incoming {
        delivery_of("w1", n)
    }

    /// Acks, except: payload 0 -> nack, odd payloads above 100 -> error.
    async fn handler(message: Message) -> std::result::Result<Outcome, String> {
        let n: u64 = message.decode().unwrap();
        match n {
            0 => Ok(Outcome::nack()),
            n if n > 100 && n % 2 == 1 => Err("failed".into()),
            _ => Ok(Outcome::ack()),
        }
    }

    fn service(
        layer: &CheckpointLayer,
    ) -> impl Service<Incoming, Response = Outcome, Error = BoxError> + Clone + Send + 'static {
        layer.layer(handler_service(handler, ()))
    }

    #[tokio::test]
    async fn only_acked_deliveries_move_the_position() {
        let store = Arc::new(Recording::default());
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        let svc = service(&layer);
        svc.clone().oneshot(delivery(5)).await.unwrap();
        // 103 fails, a nack verdict: neither moves it.
        svc.clone().oneshot(delivery(103)).await.unwrap_err();
        let nacked = Incoming::for_test_with(
            Message::new("t", &0).unwrap(),
            DeliveryInfo::new(id(104), 1, Arc::new(Origin::new("orders", "svc", "w1"))),
        );
        assert_eq!(svc.clone().oneshot(nacked).await.unwrap(), Outcome::nack());
        assert_eq!(store.saves(), [id(5)]);
        let saved = store.load("orders", "svc", "w1").await.unwrap().unwrap();
        assert_eq!(saved.message_id, id(5));
        assert!(saved.timestamp <= SystemTime::now());
        assert_eq!(layer.position("orders", "svc", "w1"), Some(id(5)));
        assert_eq!(layer.position("orders", "svc", "nobody"), None);
    }

    #[tokio::test]
    async fn the_position_never_moves_back_and_consumers_are_separate() {
        let store = Arc::new(Recording::default());
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        let svc = service(&layer);
        for n in [7, 3, 9, 8] {
            svc.clone().oneshot(delivery(n)).await.unwrap();
        }
        svc.clone().oneshot(delivery_of("w2", 2)).await.unwrap();
        assert_eq!(store.saves(), [id(7), id(9), id(2)]);
        let w1 = store.load("orders", "svc", "w1").await.unwrap().unwrap();
        assert_eq!(w1.message_id, id(9));
    }

    #[tokio::test]
    async fn writes_are_coalesced_and_the_latest_position_is_not_lost() {
        let store = Arc::new(Recording::default());
        let interval = Duration::from_millis(50);
        let layer = CheckpointLayer::new(store.clone()).min_interval(interval);
        let svc = service(&layer);
        for n in 1..=4 {
            svc.clone().oneshot(delivery(n)).await.unwrap();
        }
        assert_eq!(store.saves(), [id(1)], "one write per interval");
        tokio::time::sleep(interval + Duration::from_millis(10)).await;
        // The next success after the interval writes the latest position, though it is an
        // older entry itself (a redelivery).
        svc.clone().oneshot(delivery(2)).await.unwrap();
        assert_eq!(store.saves(), [id(1), id(4)]);
        // flush writes at once; with nothing new it writes nothing.
        svc.clone().oneshot(delivery(6)).await.unwrap();
        assert_eq!(store.saves().len(), 2);
        layer.flush().await.unwrap();
        layer.flush().await.unwrap();
        assert_eq!(store.saves(), [id(1), id(4), id(6)]);
    }

    #[tokio::test]
    async fn the_position_stays_below_deliveries_still_running() {
        let store = Arc::new(Recording::default());
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        let release = Arc::new(Notify::new());
        async fn slow(message: Message, State(release): State<Arc<Notify>>) {
            if message.decode::<u64>().unwrap() == 10 {
                release.notified().await;
            }
        }
        use streamwise::router::State;
        let mut svc = layer.layer(handler_service(slow, release.clone()));
        // 10 enters the layer first and blocks; 11 and 12 finish while it runs.
        let first = svc.ready().await.unwrap().call(delivery(10));
        let first = tokio::spawn(first);
        svc.clone().oneshot(delivery(11)).await.unwrap();
        svc.clone().oneshot(delivery(12)).await.unwrap();
        let below_ten = id(10).prev().unwrap();
        assert_eq!(store.saves(), [below_ten]);
        assert_eq!(layer.position("orders", "svc", "w1"), Some(below_ten));
        release.notify_one();
        first.await.unwrap().unwrap();
        assert_eq!(store.saves(), [below_ten, id(12)]);
    }

    #[tokio::test]
    async fn a_panicking_or_dropped_delivery_does_not_hold_the_position() {
        let store = Arc::new(Recording::default());
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        async fn boom(message: Message) {
            if message.decode::<u64>().unwrap() == 1 {
                panic!("handler bug");
            }
        }
        let svc = layer.layer(handler_service(boom, ()));
        let panicked = tokio::spawn(svc.clone().oneshot(delivery(1))).await;
        assert!(panicked.unwrap_err().is_panic());
        // A delivery whose future is dropped unpolled (a shutdown deadline) leaves too.
        let mut dropped = svc.clone();
        drop(dropped.ready().await.unwrap().call(delivery(2)));
        svc.clone().oneshot(delivery(3)).await.unwrap();
        assert_eq!(store.saves(), [id(3)]);
    }

    #[tokio::test]
    async fn a_write_cancelled_halfway_does_not_block_later_writes() {
        let store = Arc::new(Recording::default());
        store.hang.store(true, Ordering::SeqCst);
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        let svc = service(&layer);
        let stuck = tokio::time::timeout(Duration::from_millis(20), svc.clone().oneshot(delivery(1))).await;
        assert!(stuck.is_err(), "the save hangs, and the delivery is dropped");
        store.hang.store(false, Ordering::SeqCst);
        svc.clone().oneshot(delivery(2)).await.unwrap();
        assert_eq!(store.saves(), [id(2)]);
    }

    #[tokio::test]
    async fn a_failing_store_is_logged_and_does_not_change_the_outcome() {
        let (subscriber, logs) = log_subscriber();
        let _guard = tracing::subscriber::set_default(subscriber);
        let store = Arc::new(Recording::default());
        store.fail.store(true, Ordering::SeqCst);
        let layer = CheckpointLayer::new(store.clone()).min_interval(Duration::ZERO);
        let svc = service(&layer);
        assert_eq!(svc.clone().oneshot(delivery(1)).await.unwrap(), Outcome::ack());
        let text = logs.text();
        assert!(text.contains("checkpoint not saved"), "{text}");
        assert!(text.contains("checkpoint store away"), "{text}");
        let err = layer.flush().await.unwrap_err();
        assert!(matches!(err, Error::Connection { .. }), "{err}");
        // Once the store is back, the position is saved.
        store.fail.store(false, Ordering::SeqCst);
        layer.flush().await.unwrap();
        assert_eq!(store.saves(), [id(1)]);
    }

    #[tokio::test]
    async fn in_a_router_the_position_reaches_the_last_entry() {
        let backend = MemoryBackend::new();
        let store = Arc::new(MemoryCheckpointStore::new());
        let layer = CheckpointLayer::new(store.clone());
        let routes = Routes::new()
            .route("order.placed", || async {})
            .layer(layer.clone());
        let running = Router::new()
            .subscribe(
                "orders",
                SubscribeOptions::new("svc", "w1").max_in_flight(4),
                routes,
            )
            .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
            .await
            .unwrap();
        let mut last = EntryId::ZERO;
        for n in 0..20 {
            last = backend
                .publisher()
                .publish("orders", Message::new("order.placed", &n).unwrap())
                .await
                .unwrap();
        }
        streamwise::testing::wait_until_handled(&running, 20).await;
        running.shutdown().await.unwrap();
        assert_eq!(layer.position("orders", "svc", "w1"), Some(last));
        layer.flush().await.unwrap();
        let saved = store.load("orders", "svc", "w1").await.unwrap().unwrap();
        assert_eq!(saved.message_id, last);
    }
}
