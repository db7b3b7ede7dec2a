//! The two traits every backend implements, [`Publisher`] and [`Subscriber`], the options of a
//! subscription, and [`InFlight`], the capacity gate that keeps backends from prefetching.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::delivery::Delivery;
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{EntryId, Message};

/// Publishes messages to topics (streams). Object safe: use it as `Arc<dyn Publisher>`.
///
/// ```
/// # async fn demo() -> streamwise::Result<()> {
/// use std::sync::Arc;
/// use streamwise::{Message, Publisher, memory::MemoryBackend};
///
/// let publisher: Arc<dyn Publisher> = Arc::new(MemoryBackend::new().publisher());
/// let id = publisher.publish("orders", Message::new("order.placed", &42)?).await?;
/// println!("published as {id}");
/// # Ok(()) }
/// ```
pub trait Publisher: Send + Sync {
    /// Appends one message to `topic` and returns its entry id.
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>>;

    /// Appends several messages to `topic`, in order, and returns their ids in the same order.
    ///
    /// Backends send the batch in one go where they can (a Redis pipeline). Every message is
    /// validated before any is written.
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>>;

    /// Closes the publisher. Idempotent; later publishes fail with [`Error::Closed`].
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// Appends `message` to `topic` and trims the topic to about `max_length` entries (the
    /// oldest go), whatever the publisher's own limit; for topics that must not grow without
    /// bound (command and reply topics of [`cqrs`](crate::cqrs)). `max_length` must be between
    /// 1 and [`MAX_CAP`] ([`Error::Invalid`], `max_length`, before anything is written). The
    /// default ignores the limit (backends that cannot trim).
    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        match check_cap(max_length) {
            Ok(()) => self.publish(topic, message),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// Appends `message` to `topic` once `at` has come (delayed delivery): it is checked and
    /// kept now, and appears in the topic when due, in due-time order with the others, exactly
    /// once. A time in the past is due at once. It has no entry id until it is appended.
    ///
    /// On Redis the schedule is kept beside the topic, and moved into it by the topic's
    /// subscriptions (each looks at least once a second, and a message due sooner is moved by
    /// its publisher at its time); with no subscription running, due
    /// messages wait for the first. The default is [`Error::Unsupported`].
    ///
    /// ```
    /// # async fn demo() -> streamwise::Result<()> {
    /// use std::time::Duration;
    /// use streamwise::memory::MemoryBackend;
    /// use streamwise::{Message, Publisher};
    ///
    /// let backend = MemoryBackend::new();
    /// let publisher = backend.publisher();
    /// let reminder = Message::new("cart.reminder", &serde_json::json!({"cart": 7}))?;
    /// publisher.publish_after("reminders", Duration::from_secs(3600), reminder).await?;
    /// # Ok(()) }
    /// ```
    fn publish_at<'a>(
        &'a self,
        topic: &'a str,
        at: std::time::SystemTime,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        let _ = (topic, at, message);
        Box::pin(std::future::ready(Err(Error::Unsupported("delayed publish"))))
    }

    /// Appends `message` to `topic` after `delay` ([`publish_at`](Self::publish_at) now plus
    /// `delay`).
    fn publish_after<'a>(
        &'a self,
        topic: &'a str,
        delay: Duration,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        match std::time::SystemTime::now().checked_add(delay) {
            Some(at) => self.publish_at(topic, at, message),
            None => Box::pin(std::future::ready(Err(Error::invalid(
                "delay",
                format_args!("{delay:?} is too far in the future"),
            )))),
        }
    }
}

/// Subscribes to topics as a consumer in a consumer group. Object safe.
///
/// Within a group, consumers compete: each entry goes to one of them. Every group sees every
/// entry. Deliveries are handed out only while the subscription has capacity
/// ([`SubscribeOptions::max_in_flight`]), so nothing is fetched that nobody can handle.
pub trait Subscriber: Send + Sync {
    /// Starts consuming `topic` with `options`.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>>;

    /// Closes the subscriber: every subscription's stream ends, buffered acknowledgements are
    /// flushed, unsettled deliveries stay pending. Idempotent.
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// Settlements accepted but not yet written to the backend (acks waiting for their
    /// write), over all subscriptions: what a close that is cut short leaves pending. Zero for
    /// backends that write settlements at once (the default).
    fn unflushed(&self) -> u64 {
        0
    }

    /// Deletes `topic` with everything the backend keeps beside it (its groups, checkpoints,
    /// leases): for topics of one process's own, such as a reply topic, once it is done.
    /// Close or drop the subscriptions to it first: what they do afterwards depends on the
    /// backend (Redis re-creates the group and stream when allowed; the in-memory backend's
    /// see nothing more). The default refuses ([`Error::Unsupported`]): the backend cannot
    /// delete topics.
    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = topic;
        Box::pin(async { Err(Error::Unsupported("deleting topics")) })
    }
}

impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        (**self).publish(topic, message)
    }
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        (**self).publish_batch(topic, messages)
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        (**self).close()
    }
    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        (**self).publish_capped(topic, message, max_length)
    }
    fn publish_at<'a>(
        &'a self,
        topic: &'a str,
        at: std::time::SystemTime,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        (**self).publish_at(topic, at, message)
    }
    fn publish_after<'a>(
        &'a self,
        topic: &'a str,
        delay: Duration,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        (**self).publish_after(topic, delay, message)
    }
}

impl<S: Subscriber + ?Sized> Subscriber for Arc<S> {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        (**self).subscribe(topic, options)
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        (**self).close()
    }
    fn unflushed(&self) -> u64 {
        (**self).unflushed()
    }
    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        (**self).delete_topic(topic)
    }
}

/// A consumer name of its own for this process: `<prefix>-<host>-<pid>-<random>`, made of the
/// characters a name may have (others in the host name become `-`).
///
/// Which name to use:
/// - **A stable name** (a StatefulSet's pod name such as `worker-0`, a systemd unit's
///   instance) when the same process comes back after a crash: the restart takes over its own
///   lease once it runs out (at most the lease TTL) and gets the entries it held first.
/// - **A unique name** from this function when replicas come and go (a Deployment, autoscaling):
///   a name is never taken by two processes at once, and turn on
///   [`SubscribeOptions::reclaim`] so that the entries of a replica that vanished are taken
///   over by the others once its lease is gone.
///
/// ```
/// let name = streamwise::unique_consumer_name("billing");
/// assert!(name.starts_with("billing-"));
/// streamwise::validate_name("consumer", &name)?;
/// assert_ne!(name, streamwise::unique_consumer_name("billing"));
/// # Ok::<(), streamwise::Error>(())
/// ```
pub fn unique_consumer_name(prefix: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    // The last hex digits of a UUID v7 are random.
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!(
        "{}-{}-{}-{}",
        clean(prefix),
        clean(&host),
        std::process::id(),
        &random[random.len() - 8..]
    )
}

/// The largest `max_length` of [`Publisher::publish_capped`] (Redis counts in signed 64-bit
/// integers).
pub const MAX_CAP: u64 = i64::MAX as u64;

/// Checks a `max_length` for [`Publisher::publish_capped`]; for backends.
pub fn check_cap(max_length: u64) -> Result<()> {
    if max_length == 0 || max_length > MAX_CAP {
        return Err(Error::invalid(
            "max_length",
            format_args!("{max_length} is not between 1 and {MAX_CAP}"),
        ));
    }
    Ok(())
}

/// The largest `max_in_flight` and `batch_size` accepted.
pub const MAX_IN_FLIGHT: usize = 1 << 20;

/// The longest `block`, reclaim `interval` and `min_idle` accepted: one day.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Where a newly created consumer group starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// From the first entry (`0`).
    #[default]
    Beginning,
    /// Only entries added after the group is created (`$`).
    Latest,
    /// Entries after this id.
    After(EntryId),
}

impl StartFrom {
    /// Parses a Redis start id: `0` (beginning), `$` (latest) or an entry id.
    ///
    /// ```
    /// use streamwise::{EntryId, StartFrom};
    /// assert_eq!(StartFrom::parse("0")?, StartFrom::Beginning);
    /// assert_eq!(StartFrom::parse("$")?, StartFrom::Latest);
    /// assert_eq!(StartFrom::parse("5-1")?, StartFrom::After(EntryId::new(5, 1)));
    /// assert_eq!(StartFrom::parse("x").unwrap_err().invalid_field(), Some("start_id"));
    /// # Ok::<(), streamwise::Error>(())
    /// ```
    pub fn parse(start_id: &str) -> Result<Self> {
        match start_id {
            "0" | "0-0" => Ok(StartFrom::Beginning),
            "$" => Ok(StartFrom::Latest),
            other => other.parse().map(StartFrom::After).map_err(|_| {
                Error::invalid(
                    "start_id",
                    format_args!("{other:?} is neither \"0\", \"$\" nor an entry id"),
                )
            }),
        }
    }
}

impl fmt::Display for StartFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartFrom::Beginning => f.write_str("0"),
            StartFrom::Latest => f.write_str("$"),
            StartFrom::After(id) => id.fmt(f),
        }
    }
}

/// When and how a subscription takes over entries that other consumers left pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimOptions {
    /// How often to look for idle entries.
    pub interval: Duration,
    /// How long an entry must have been idle before it is taken over.
    pub min_idle: Duration,
}

impl ReclaimOptions {
    /// Reclaim every `interval` the entries idle longer than `min_idle`.
    pub fn new(interval: Duration, min_idle: Duration) -> Self {
        ReclaimOptions { interval, min_idle }
    }
}

impl Default for ReclaimOptions {
    /// Every 30 s, entries idle longer than 30 s (the seed's `reclaim_interval_ms` and
    /// `reclaim_min_idle_ms`).
    fn default() -> Self {
        ReclaimOptions::new(Duration::from_secs(30), Duration::from_secs(30))
    }
}

/// How to subscribe: the consumer group and consumer name, and the knobs of the read loop.
/// Set with the chained methods, read from the public fields; backends check them with
/// [`validate`](Self::validate) when subscribing.
///
/// ```
/// use std::time::Duration;
/// use streamwise::{StartFrom, SubscribeOptions};
///
/// let options = SubscribeOptions::new("processors", "worker-1")
///     .batch_size(100)
///     .max_in_flight(200)
///     .start_from(StartFrom::Latest)
///     .block(Duration::from_secs(2));
/// assert_eq!(options.max_in_flight, 200);
/// assert_eq!(options.group, "processors");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The consumer group.
    pub group: String,
    /// The consumer's name within the group.
    pub consumer: String,
    /// The most entries fetched in one read (Redis `COUNT`). Default 10; 1 to
    /// [`MAX_IN_FLIGHT`].
    pub batch_size: usize,
    /// The most deliveries handed out and not yet settled. Default 10; 1 to [`MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// How long one read waits for new entries (Redis `BLOCK`). Default 5 s; longer than
    /// zero, at most [`MAX_INTERVAL`].
    pub block: Duration,
    /// Where a group created by this subscription starts. Default [`StartFrom::Beginning`].
    pub start_from: StartFrom,
    /// Whether to create a missing group (and stream). Default `true`.
    pub create_group: bool,
    /// Taking over entries other consumers left idle. Default off.
    pub reclaim: Option<ReclaimOptions>,
    /// After this many deliveries an entry is dead-lettered. Default 10; at least 1.
    pub max_deliveries: u64,
    /// The limit this subscription's deliveries count against, when it is shared with other
    /// subscriptions (a partition's share of its member's limit); `None`: its own, of
    /// `max_in_flight`.
    pub(crate) in_flight: Option<InFlight>,
    /// Acks and dead letters are written only while this consumer's lease is still its own
    /// (a partition's owner: a member that lost the partition cannot ack into it).
    pub(crate) fenced: bool,
    /// The group member this subscription reads for (a partition's owner), written into its
    /// lease so that operators can see who owns the partition.
    pub(crate) member: Option<String>,
    /// Reads without blocking, on a connection shared with other such subscriptions (a
    /// member's partitions past its bound of dedicated readers), instead of one of its own.
    pub(crate) shared_read: bool,
    /// Set when the subscription must end even though deliveries are still out (a partition
    /// handed off whose handlers ran past the hand-off deadline): reading stops, settlements
    /// made after it are refused (their entries stay pending for the next holder of the
    /// consumer name), what was settled before is written, and the consumer name is freed.
    pub(crate) abandon: Option<Abandon>,
}

/// The signal of [`SubscribeOptions::abandon`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Abandon(pub(crate) crate::signal::Signal);

impl PartialEq for Abandon {
    fn eq(&self, other: &Self) -> bool {
        self.0.same_as(&other.0)
    }
}

impl Eq for Abandon {}

impl SubscribeOptions {
    /// Options for consumer `consumer` in group `group`, with the defaults: batches of 10,
    /// at most 10 deliveries in flight, 5 s blocking reads, group created from the beginning
    /// when missing, no reclaim, dead-letter after 10 deliveries.
    pub fn new(group: impl Into<String>, consumer: impl Into<String>) -> Self {
        SubscribeOptions {
            group: group.into(),
            consumer: consumer.into(),
            batch_size: 10,
            max_in_flight: 10,
            block: Duration::from_secs(5),
            start_from: StartFrom::Beginning,
            create_group: true,
            reclaim: None,
            max_deliveries: 10,
            in_flight: None,
            fenced: false,
            member: None,
            shared_read: false,
            abandon: None,
        }
    }

    /// The in-flight limit the subscription's deliveries count against.
    pub(crate) fn in_flight_limit(&self) -> InFlight {
        self.in_flight
            .clone()
            .unwrap_or_else(|| InFlight::new(self.max_in_flight))
    }

    /// The most entries fetched in one read (Redis `COUNT`). Default 10.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// The most deliveries handed out and not yet settled. Default 10. With 1, the next
    /// delivery comes only after the previous one was settled or dropped.
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// How long one read waits for new entries before asking again (Redis `BLOCK`).
    /// Default 5 s. Closing never waits for it.
    #[must_use]
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Where a group created by this subscription starts. Default [`StartFrom::Beginning`].
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Whether to create the group (and stream) when missing. Default `true`; with `false`
    /// a missing group is [`Error::GroupNotFound`].
    #[must_use]
    pub fn create_group(mut self, create: bool) -> Self {
        self.create_group = create;
        self
    }

    /// Takes over entries that other consumers of the group left idle. Default off.
    #[must_use]
    pub fn reclaim(mut self, reclaim: impl Into<Option<ReclaimOptions>>) -> Self {
        self.reclaim = reclaim.into();
        self
    }

    /// After this many deliveries an entry is not delivered again: it goes to the dead-letter
    /// stream `{<topic>}-dead` with the reason, and is acknowledged. Default 10.
    #[must_use]
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.max_deliveries = n;
        self
    }

    /// Checks every option, naming the first bad one. Backends call this in `subscribe`.
    pub fn validate(&self, topic: &str) -> Result<()> {
        validate_stream_name("topic", topic)?;
        validate_name("group", &self.group)?;
        validate_name("consumer", &self.consumer)?;
        let count = |field: &'static str, n: usize| {
            if n == 0 || n > MAX_IN_FLIGHT {
                return Err(Error::invalid(
                    field,
                    format_args!("{n} is not between 1 and {MAX_IN_FLIGHT}"),
                ));
            }
            Ok(())
        };
        let interval = |field: &'static str, d: Duration, zero_ok: bool| {
            if (d.is_zero() && !zero_ok) || d > MAX_INTERVAL {
                let least = if zero_ok { "zero" } else { "longer than zero" };
                return Err(Error::invalid(
                    field,
                    format_args!("{d:?} must be {least} and at most {MAX_INTERVAL:?}"),
                ));
            }
            Ok(())
        };
        count("batch_size", self.batch_size)?;
        count("max_in_flight", self.max_in_flight)?;
        if self.max_deliveries == 0 {
            return Err(Error::invalid("max_deliveries", "must be at least 1"));
        }
        interval("block", self.block, false)?;
        if let Some(r) = self.reclaim {
            interval("reclaim.interval", r.interval, false)?;
            interval("reclaim.min_idle", r.min_idle, true)?;
        }
        Ok(())
    }
}

/// A live subscription: a [`Stream`] of deliveries that ends when the subscriber closes.
///
/// An `Err` item reports a problem the backend could not get past on its own (for example a
/// connection that stayed down after all retries); the stream goes on after it.
pub struct Subscription {
    inner: Inner,
    flush: Option<Arc<dyn Flush>>,
    health: Option<Arc<dyn HealthProbe>>,
}

enum Inner {
    /// A backend's own stream.
    Stream(Pin<Box<dyn Stream<Item = Result<Delivery>> + Send>>),
    /// A built-in backend's reader, whose buffered deliveries can be taken without a fetch.
    Reader(Box<dyn Buffered>),
}

/// A stream that can tell what it holds already.
pub(crate) trait Buffered: Stream<Item = Result<Delivery>> + Send + Unpin {
    /// A delivery held already, if any; taking it starts no fetch. `None` also when something
    /// else (an error, a change the stream must look at) should come out of the next poll.
    fn take_buffered(&mut self) -> Option<Delivery>;
}

impl Subscription {
    /// Wraps a backend's stream of deliveries.
    pub fn new(stream: impl Stream<Item = Result<Delivery>> + Send + 'static) -> Self {
        Subscription {
            inner: Inner::Stream(Box::pin(stream)),
            flush: None,
            health: None,
        }
    }

    /// Gives the subscription its backend's [`Flush`], for [`flush`](Self::flush). Backends
    /// that write settlements at once need none.
    #[must_use]
    pub fn with_flush(mut self, flush: Arc<dyn Flush>) -> Self {
        self.flush = Some(flush);
        self
    }

    /// Waits until every settlement made so far on this subscription's deliveries is written
    /// to the backend, and returns the error that stopped it if one did. An `ack` that
    /// returned `Ok` is only queued (acks are batched); after `flush` returns `Ok`, it is
    /// recorded. After the subscription ended, [`Error::Closed`].
    ///
    /// The future does not borrow the subscription (it is `Send` and `'static`).
    pub fn flush(&self) -> impl Future<Output = Result<()>> + Send + 'static {
        let handle = self.flush_handle();
        async move { handle.flush().await }
    }

    /// Gives the subscription its backend's [`HealthProbe`], for
    /// [`health_handle`](Self::health_handle). Without one it counts as ready.
    #[must_use]
    pub fn with_health(mut self, probe: Arc<dyn HealthProbe>) -> Self {
        self.health = Some(probe);
        self
    }

    /// A handle that tells whether this subscription is reading as it should, from elsewhere
    /// (the router's health report, say). It does not keep the subscription alive.
    pub fn health_handle(&self) -> HealthHandle {
        HealthHandle(self.health.clone())
    }

    /// A handle that flushes this subscription from elsewhere (another task, or while the
    /// subscription is borrowed by a loop over it).
    pub fn flush_handle(&self) -> FlushHandle {
        FlushHandle(self.flush.clone())
    }

    /// The subscription of a built-in backend's reader.
    pub(crate) fn from_reader<R: BackendReader>(reader: R) -> Self {
        Self::from_buffered(ReaderStream {
            reader: Some(reader),
            waiting: None,
        })
    }

    /// The subscription of a stream whose buffered deliveries can be taken without a fetch
    /// (a reader's, or the partitions' of a member).
    pub(crate) fn from_buffered(stream: impl Buffered + 'static) -> Self {
        Subscription {
            inner: Inner::Reader(Box::new(stream)),
            flush: None,
            health: None,
        }
    }

    /// A delivery the subscription holds already, if any: taking it starts no fetch (the
    /// router takes these in one go, and lets handlers run before the next read goes out).
    pub(crate) fn take_buffered(&mut self) -> Option<Delivery> {
        match &mut self.inner {
            Inner::Stream(_) => None,
            Inner::Reader(reader) => reader.take_buffered(),
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            Inner::Stream(stream) => stream.as_mut().poll_next(cx),
            Inner::Reader(reader) => Pin::new(&mut **reader).poll_next(cx),
        }
    }
}

/// A backend's reader behind a [`Subscription`] ([`Subscription::from_reader`]): deliveries it holds
/// already are handed out by a plain call; only when it has to wait does a future run, and
/// that future owns the reader meanwhile. (A stream made with `unfold` moves the reader in
/// and out of a new future for every delivery.)
pub(crate) trait BackendReader: Send + Unpin + Sized + 'static {
    /// A delivery that can be handed out right now, if there is one and nothing (a close, an
    /// error to report) has to be looked at first.
    fn ready(&mut self) -> Option<Delivery>;

    /// The next item, however long it takes; `None` ends the subscription.
    fn next(self) -> impl Future<Output = (Self, Option<Result<Delivery>>)> + Send;
}

struct ReaderStream<R> {
    /// `None` while `waiting` owns it, and once the stream ended.
    reader: Option<R>,
    waiting: Option<BoxFuture<'static, (R, Option<Result<Delivery>>)>>,
}

impl<R: BackendReader> Buffered for ReaderStream<R> {
    fn take_buffered(&mut self) -> Option<Delivery> {
        // While a fetch runs, the reader is inside it.
        self.reader.as_mut()?.ready()
    }
}

impl<R: BackendReader> Stream for ReaderStream<R> {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let waiting = match &mut this.waiting {
            Some(waiting) => waiting,
            None => {
                let Some(reader) = this.reader.as_mut() else {
                    return Poll::Ready(None);
                };
                if let Some(delivery) = reader.ready() {
                    return Poll::Ready(Some(Ok(delivery)));
                }
                let Some(reader) = this.reader.take() else {
                    return Poll::Ready(None);
                };
                this.waiting.insert(Box::pin(reader.next()))
            }
        };
        let (reader, item) = std::task::ready!(waiting.as_mut().poll(cx));
        this.waiting = None;
        if item.is_some() {
            this.reader = Some(reader);
        }
        Poll::Ready(item)
    }
}

/// The backend side of [`Subscription::flush`]: resolves once every settlement made before
/// the call is written (or with the error that stopped it).
pub trait Flush: Send + Sync + 'static {
    /// Flushes what was settled so far.
    fn flush(&self) -> BoxFuture<'static, Result<()>>;
}

/// The span of a publish to `topic` of messaging system `system`, with its trace context
/// written into `messages`' metadata (the `opentelemetry` feature, [`crate::otel`]); without
/// the feature, no span and nothing written. Backends run the publish inside the span.
pub(crate) fn publish_trace(system: &'static str, topic: &str, messages: &mut [Message]) -> tracing::Span {
    #[cfg(feature = "opentelemetry")]
    {
        let span = crate::otel::publish_span(system, topic);
        crate::otel::inject(&span, messages);
        span
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = (system, topic, messages);
        tracing::Span::none()
    }
}

/// Whether a subscription reads as it should ([`Subscription::health_handle`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionHealth {
    /// Reading, or waiting for entries, as it should.
    Ready,
    /// Not reading as it should, for `reason` (a read not answered in time, reconnecting,
    /// a lease it cannot renew); it keeps trying.
    Degraded {
        /// What is wrong.
        reason: String,
    },
}

/// A backend's view of one subscription's health ([`Subscription::with_health`]).
pub trait HealthProbe: Send + Sync + 'static {
    /// The subscription's health now.
    fn health(&self) -> SubscriptionHealth;
}

/// Tells one subscription's health ([`Subscription::health_handle`]). Cheap to clone.
#[derive(Clone)]
pub struct HealthHandle(Option<Arc<dyn HealthProbe>>);

impl HealthHandle {
    /// The subscription's health now; [`SubscriptionHealth::Ready`] for a backend that has
    /// no probe.
    pub fn health(&self) -> SubscriptionHealth {
        self.0
            .as_ref()
            .map_or(SubscriptionHealth::Ready, |probe| probe.health())
    }
}

impl fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HealthHandle").field(&self.health()).finish()
    }
}

/// Flushes one subscription's settlements ([`Subscription::flush_handle`]). Cheap to clone;
/// it does not keep the subscription alive.
#[derive(Clone)]
pub struct FlushHandle(Option<Arc<dyn Flush>>);

impl FlushHandle {
    /// See [`Subscription::flush`].
    pub async fn flush(&self) -> Result<()> {
        match &self.0 {
            Some(flush) => flush.flush().await,
            None => Ok(()),
        }
    }
}

impl fmt::Debug for FlushHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushHandle").finish_non_exhaustive()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// The in-flight limit of one subscription, for backends: a fetch first takes capacity with
/// [`acquire`](Self::acquire), and a settled or dropped delivery gives its slot back with
/// [`release`](Self::release). This is what makes "no hidden prefetch" hold.
///
/// The partitions a member of a partitioned group owns share one limit: each partition's
/// subscription gets a share of it (`share`), and when the last clone of a share is dropped
/// (its subscription ended, its deliveries are gone), the slots it still held go back.
#[derive(Clone, Debug)]
pub struct InFlight {
    inner: Arc<Slots>,
}

#[derive(Debug)]
struct Slots {
    semaphore: Arc<Semaphore>,
    /// The limit: every slot there is.
    limit: usize,
    /// Slots of the whole limit held by reads that may wait for entries ([`InFlight::park`]):
    /// not coming back soon, so not worth waiting for.
    parked: Arc<AtomicUsize>,
    /// Slots this holder took and did not give back.
    held: AtomicUsize,
    /// The most one `acquire` takes, when the limit is shared.
    most_per_take: Option<Arc<AtomicUsize>>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.semaphore.add_permits(held);
        }
    }
}

/// Slots marked by [`InFlight::park`], unmarked when dropped.
#[derive(Debug)]
pub(crate) struct ParkedSlots {
    parked: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for ParkedSlots {
    fn drop(&mut self) {
        self.parked.fetch_sub(self.n, Ordering::Relaxed);
    }
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner.semaphore, &other.inner.semaphore)
    }
}

impl Eq for InFlight {}

impl InFlight {
    /// A limit of `max` deliveries in flight.
    pub fn new(max: usize) -> Self {
        InFlight {
            inner: Arc::new(Slots {
                semaphore: Arc::new(Semaphore::new(max)),
                limit: max,
                parked: Arc::default(),
                held: AtomicUsize::new(0),
                most_per_take: None,
            }),
        }
    }

    /// A holder of slots of the same limit, which takes at most `most_per_take` in one
    /// `acquire` (so that reads of several partitions that wait for entries cannot hold all
    /// of it; `try_acquire` is not capped), and gives back what it holds when its last clone
    /// is dropped.
    pub(crate) fn share(&self, most_per_take: Arc<AtomicUsize>) -> Self {
        InFlight {
            inner: Arc::new(Slots {
                semaphore: self.inner.semaphore.clone(),
                limit: self.inner.limit,
                parked: self.inner.parked.clone(),
                held: AtomicUsize::new(0),
                most_per_take: Some(most_per_take),
            }),
        }
    }

    fn cap(&self, want: usize) -> usize {
        match &self.inner.most_per_take {
            Some(most) => want.min(most.load(Ordering::Relaxed).max(1)),
            None => want,
        }
    }

    fn took(&self, n: usize) -> usize {
        if n > 0 && self.inner.most_per_take.is_some() {
            self.inner.held.fetch_add(n, Ordering::Relaxed);
        }
        n
    }

    /// Waits until at least one slot is free, then takes up to `want` of them (at least one)
    /// and returns how many it took.
    pub async fn acquire(&self, want: usize) -> usize {
        match self.inner.semaphore.acquire().await {
            Ok(first) => first.forget(),
            // The semaphore is never closed; treat it as one slot rather than panic.
            Err(_) => return 1,
        }
        self.took(1);
        1 + self.try_acquire(self.cap(want.max(1)) - 1)
    }

    /// For a share of a limit: waits until `at_least` slots are free (at most half the
    /// limit, and no more than the slots not [parked](Self::park) by waiting reads), then
    /// takes up to `want`, uncapped; gives up waiting after `patience` and takes what
    /// [`acquire`](Self::acquire) would. A partition with a backlog reads this way, so that
    /// the partitions of a member make a few large reads rather than many reads of their
    /// share each. Anything else, or a wait for no more than the share, takes what `acquire`
    /// would.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) async fn acquire_at_least(&self, at_least: usize, want: usize, patience: Duration) -> usize {
        let Some(most) = &self.inner.most_per_take else {
            return self.acquire(want).await;
        };
        let not_parked = self
            .inner
            .limit
            .saturating_sub(self.inner.parked.load(Ordering::Relaxed));
        let at_least = at_least.min(self.inner.limit / 2).min(want).min(not_parked);
        if at_least <= most.load(Ordering::Relaxed).max(1) {
            return self.acquire(want).await;
        }
        let Ok(n) = u32::try_from(at_least) else {
            return self.acquire(want).await;
        };
        match tokio::time::timeout(patience, self.inner.semaphore.acquire_many(n)).await {
            Ok(Ok(first)) => first.forget(),
            // Slots held by slow handlers: read what is free rather than wait for them.
            Ok(Err(_)) | Err(_) => return self.acquire(want).await,
        }
        self.took(at_least);
        at_least + self.try_acquire(want - at_least)
    }

    /// Marks `n` slots of this holder as held by a read that may wait for entries, until the
    /// returned guard is dropped: a backlog read of another share does not wait for them.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn park(&self, n: usize) -> ParkedSlots {
        self.inner.parked.fetch_add(n, Ordering::Relaxed);
        ParkedSlots {
            parked: self.inner.parked.clone(),
            n,
        }
    }

    /// Takes up to `want` slots that are free right now, without waiting, and returns how
    /// many it took (maybe none).
    ///
    /// A share of a limit takes at most its share in [`acquire`](Self::acquire), which a
    /// read that may wait for entries follows, and as much as is free here, which a read sent
    /// ahead of a full one (that never waits) follows: so an idle partition holds little of
    /// the limit while a busy one reads full batches.
    pub fn try_acquire(&self, want: usize) -> usize {
        loop {
            let free = self.inner.semaphore.available_permits().min(want);
            let Ok(n) = u32::try_from(free) else {
                return 0;
            };
            if n == 0 {
                return 0;
            }
            match self.inner.semaphore.try_acquire_many(n) {
                Ok(permits) => {
                    permits.forget();
                    return self.took(free);
                }
                // Someone took slots in between: look again.
                Err(tokio::sync::TryAcquireError::NoPermits) => continue,
                Err(tokio::sync::TryAcquireError::Closed) => return 0,
            }
        }
    }

    /// Gives `n` slots back.
    pub fn release(&self, n: usize) {
        if n > 0 {
            if self.inner.most_per_take.is_some() {
                self.inner.held.fetch_sub(n, Ordering::Relaxed);
            }
            self.inner.semaphore.add_permits(n);
        }
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.inner.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validation_names_the_field() {
        let ok = SubscribeOptions::new("g", "c");
        assert!(ok.validate("t").is_ok());
        let cases: Vec<(SubscribeOptions, &str, &str)> = vec![
            (ok.clone(), "bad topic", "topic"),
            (SubscribeOptions::new("", "c"), "t", "group"),
            (SubscribeOptions::new("g", "c d"), "t", "consumer"),
            (ok.clone().batch_size(0), "t", "batch_size"),
            (ok.clone().max_in_flight(0), "t", "max_in_flight"),
            (ok.clone().block(Duration::ZERO), "t", "block"),
            (ok.clone().max_deliveries(0), "t", "max_deliveries"),
            (ok.clone().max_in_flight(usize::MAX), "t", "max_in_flight"),
            (ok.clone().batch_size(MAX_IN_FLIGHT + 1), "t", "batch_size"),
            (ok.clone().block(Duration::MAX), "t", "block"),
            (
                ok.clone()
                    .reclaim(ReclaimOptions::new(Duration::MAX, Duration::ZERO)),
                "t",
                "reclaim.interval",
            ),
            (
                ok.clone()
                    .reclaim(ReclaimOptions::new(Duration::from_secs(1), Duration::MAX)),
                "t",
                "reclaim.min_idle",
            ),
            (
                ok.clone()
                    .reclaim(ReclaimOptions::new(Duration::ZERO, Duration::ZERO)),
                "t",
                "reclaim.interval",
            ),
        ];
        for (options, topic, field) in cases {
            assert_eq!(options.validate(topic).unwrap_err().invalid_field(), Some(field));
        }
    }

    #[test]
    fn start_from_prints_as_redis_start_ids() {
        assert_eq!(StartFrom::Beginning.to_string(), "0");
        assert_eq!(StartFrom::Latest.to_string(), "$");
        assert_eq!(StartFrom::After(EntryId::new(3, 1)).to_string(), "3-1");
    }

    #[tokio::test]
    async fn in_flight_takes_what_is_free_and_gets_it_back() {
        let gate = InFlight::new(3);
        assert_eq!(gate.acquire(10).await, 3);
        assert_eq!(gate.available(), 0);
        gate.release(2);
        assert_eq!(gate.acquire(1).await, 1);
        assert_eq!(gate.acquire(5).await, 1);
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire(2).await })
        };
        gate.release(1);
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(gate.try_acquire(4), 0, "nothing free, nothing taken");
        gate.release(3);
        assert_eq!(gate.try_acquire(2), 2);
        assert_eq!(gate.try_acquire(4), 1);
        assert_eq!(gate.available(), 0);
    }

    #[tokio::test]
    async fn a_share_waits_for_at_least_what_it_asks_then_takes_what_is_free() {
        // One thread: the waiter runs only where this test yields.
        let limit = InFlight::new(100);
        let share = limit.share(Arc::new(AtomicUsize::new(10)));
        let patience = Duration::from_secs(30);
        assert_eq!(limit.acquire(100).await, 100);
        let waiter = {
            let share = share.clone();
            tokio::spawn(async move { share.acquire_at_least(40, 60, patience).await })
        };
        tokio::task::yield_now().await;
        limit.release(30);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "30 free of the 40 it waits for");
        assert_eq!(limit.available(), 0, "set aside for the waiter");
        limit.release(30);
        // 40 for the wait, 20 more of what is free, above the share's cap of 10.
        assert_eq!(waiter.await.unwrap(), 60);
        assert_eq!(limit.available(), 0);
        // Never more than half the limit is waited for: of 60 free, 80 asked, 50 waited for
        // (80 would wait its whole patience) and then the rest taken.
        share.release(60);
        assert_eq!(share.acquire_at_least(80, 70, patience).await, 60);
        share.release(60);
        // An own limit (not a share) takes what `acquire` takes: what is free, at once.
        assert_eq!(limit.acquire(100).await, 60, "all the share gave back");
        limit.release(30);
        let took =
            tokio::time::timeout(Duration::from_secs(5), limit.acquire_at_least(40, 60, patience)).await;
        assert_eq!(took.expect("no wait on an own limit"), 30);
    }

    #[tokio::test]
    async fn a_share_does_not_wait_for_slots_parked_in_waiting_reads() {
        let limit = InFlight::new(100);
        let share = limit.share(Arc::new(AtomicUsize::new(10)));
        let other = limit.share(Arc::new(AtomicUsize::new(10)));
        assert_eq!(limit.acquire(100).await, 100);
        limit.release(15);
        // Other partitions' reads that wait for entries hold 90 slots: at most 10 can come
        // back soon, no more than the share, so it takes its share of what is free at once.
        let parked = other.park(90);
        let took = tokio::time::timeout(
            Duration::from_secs(5),
            share.acquire_at_least(40, 60, Duration::from_secs(30)),
        )
        .await;
        assert_eq!(took.expect("no wait for parked slots"), 10);
        drop(parked);
        share.release(10);
        // Unparked: it waits for 40 again (15 free), until its patience runs out.
        let took = share.acquire_at_least(40, 60, Duration::from_millis(5)).await;
        assert_eq!(took, 10, "after its patience, its share");
    }

    #[tokio::test]
    async fn a_share_that_waited_its_patience_takes_what_acquire_would() {
        let limit = InFlight::new(100);
        let share = limit.share(Arc::new(AtomicUsize::new(10)));
        assert_eq!(limit.acquire(100).await, 100);
        limit.release(30);
        let started = std::time::Instant::now();
        let took = share.acquire_at_least(40, 60, Duration::from_millis(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(5));
        assert_eq!(took, 10, "its share's cap of the 30 free");
        assert_eq!(limit.available(), 20, "what the wait had set aside is free again");
    }
}
