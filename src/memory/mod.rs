//! The in-memory backend: Redis Streams semantics (entry ids, consumer groups, pending lists,
//! redelivery, delivery counts, reclaim, trimming) inside the process, for tests and demos.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use futures::StreamExt;
//! use streamwise::{Message, Publisher, SubscribeOptions, Subscriber, memory::MemoryBackend};
//!
//! let backend = MemoryBackend::new();
//! let publisher = backend.publisher();
//! let subscriber = backend.subscriber();
//! let mut orders = subscriber.subscribe("orders", SubscribeOptions::new("billing", "worker-1")).await?;
//!
//! publisher.publish("orders", Message::new("order.placed", &serde_json::json!({"id": 7}))?).await?;
//! let delivery = orders.next().await.expect("open")?;
//! assert_eq!(delivery.message().event_type(), "order.placed");
//! delivery.ack().await?;
//! assert_eq!(backend.pending_count("orders", "billing")?, 0);
//! subscriber.close().await?;
//! # Ok(()) }
//! ```

mod coordinator;
mod log;
mod pending;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::signal::Signal;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::codec::Codec;
use crate::dead_letter::{self, DeadLetter, GaveUp};
use crate::delivery::{Delivery, DeliveryInfo, Origin, SettleError, Settlement, Settler};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{EntryId, Message, check_json};
use crate::metrics::DeadLetterReason;
use crate::pubsub::{
    InFlight, Publisher, ReclaimOptions, StartFrom, SubscribeOptions, Subscriber, Subscription,
};

pub use self::coordinator::MemoryCoordinator;
use self::log::{FetchOut, FetchPlan, GiveUp, GivenUp, StreamLog};

/// This backend's name in traces (`messaging.system`).
const SYSTEM: &str = "memory";

/// Streams shared by every publisher and subscriber made from one backend.
///
/// Cloning is cheap and shares the streams.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    broker: Arc<Broker>,
}

#[derive(Debug, Default)]
struct Broker {
    streams: Mutex<HashMap<Arc<str>, Arc<SharedStream>>>,
    partitions: Mutex<coordinator::Partitions>,
    /// Whether any topic is partitioned: plain publishes skip the look at `partitions` until
    /// one is.
    any_partitioned: std::sync::atomic::AtomicBool,
    /// Delayed messages ([`Publisher::publish_at`]), by due time and order of arrival.
    schedule: Mutex<Schedule>,
    /// Wakes the scheduler task: a message was scheduled, or the broker is gone.
    schedule_changed: Arc<Notify>,
}

/// Delayed messages, each with the publisher that appends it when due.
#[derive(Debug, Default)]
struct Schedule {
    due: std::collections::BTreeMap<(tokio::time::Instant, u64), (String, Message, MemoryPublisher)>,
    /// Messages scheduled so far: the tie-break of equal due times.
    scheduled: u64,
    /// Whether the scheduler task runs.
    running: bool,
}

impl Drop for Broker {
    fn drop(&mut self) {
        // The scheduler task ends when it finds the broker gone.
        self.schedule_changed.notify_one();
    }
}

/// Appends the broker's delayed messages when due, in due order, until the broker is gone.
async fn run_schedule(broker: std::sync::Weak<Broker>, changed: Arc<Notify>) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let Some(broker) = broker.upgrade() else {
                return;
            };
            let now = tokio::time::Instant::now();
            let (due, next) = {
                let mut schedule = broker.schedule.lock().unwrap_or_else(|p| p.into_inner());
                let mut due = Vec::new();
                while let Some(entry) = schedule.due.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    due.push(entry.remove());
                }
                (due, schedule.due.keys().next().map(|(at, _)| *at))
            };
            for (topic, message, publisher) in due {
                if let Err(e) = publisher.append(&topic, vec![message]) {
                    tracing::warn!(topic = %topic, error = %e, "a delayed message could not be appended when due");
                }
            }
            next
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = sleep_until(next) => {}
        }
    }
}

#[derive(Debug)]
struct SharedStream {
    name: Arc<str>,
    log: Mutex<StreamLog>,
    /// Woken when entries are added or nacked.
    changed: Notify,
}

impl SharedStream {
    fn log(&self) -> MutexGuard<'_, StreamLog> {
        // A panic while holding the lock cannot leave the log half-updated in a way that
        // matters more than losing the whole backend would, so keep serving.
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Broker {
    fn partitions(&self) -> MutexGuard<'_, coordinator::Partitions> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<SharedStream>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, topic: &str) -> Option<Arc<SharedStream>> {
        self.streams().get(topic).cloned()
    }

    /// The stream, created when missing; `bool` tells whether it was created.
    fn get_or_create(&self, topic: &str) -> (Arc<SharedStream>, bool) {
        let mut streams = self.streams();
        if let Some(s) = streams.get(topic) {
            return (s.clone(), false);
        }
        let name: Arc<str> = topic.into();
        let stream = Arc::new(SharedStream {
            name: name.clone(),
            log: Mutex::new(StreamLog::default()),
            changed: Notify::new(),
        });
        streams.insert(name, stream.clone());
        (stream, true)
    }

    fn existing(&self, topic: &str) -> Result<Arc<SharedStream>> {
        self.get(topic).ok_or_else(|| Error::StreamNotFound {
            stream: topic.to_owned(),
        })
    }
}

impl MemoryBackend {
    /// The keeper of this backend's partitioned topics, for
    /// [`PartitionedPublisher`](crate::partition::PartitionedPublisher) and
    /// [`PartitionedSubscriber`](crate::partition::PartitionedSubscriber).
    pub fn coordinator(&self) -> MemoryCoordinator {
        MemoryCoordinator {
            broker: self.broker.clone(),
        }
    }

    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A publisher onto this backend's streams with the default options (auto-create on, no
    /// length limit, 1 MiB entry limit).
    pub fn publisher(&self) -> MemoryPublisher {
        self.publisher_with(MemoryPublisherOptions::default())
            .unwrap_or_else(|_| unreachable!("the default options are valid"))
    }

    /// A publisher with `options`, checked first ([`Error::Invalid`] names the one at fault).
    ///
    /// ```
    /// use streamwise::memory::{MemoryBackend, MemoryPublisherOptions};
    ///
    /// let backend = MemoryBackend::new();
    /// let publisher = backend.publisher_with(MemoryPublisherOptions::default().max_length(1000))?;
    /// # let _ = publisher;
    /// let err = backend.publisher_with(MemoryPublisherOptions::default().max_entry_size(0)).unwrap_err();
    /// assert_eq!(err.invalid_field(), Some("max_entry_size"));
    /// # Ok::<(), streamwise::Error>(())
    /// ```
    pub fn publisher_with(&self, options: MemoryPublisherOptions) -> Result<MemoryPublisher> {
        options.validate()?;
        Ok(MemoryPublisher {
            broker: self.broker.clone(),
            options,
            closed: Arc::new(AtomicBool::new(false)),
            metrics: Arc::default(),
        })
    }

    /// A subscriber onto this backend's streams. Each subscriber closes on its own.
    pub fn subscriber(&self) -> MemorySubscriber {
        MemorySubscriber {
            broker: self.broker.clone(),
            closed: Signal::new(),
            settlers: Arc::default(),
        }
    }

    /// Creates an empty stream; `false` when it existed.
    pub fn create_stream(&self, topic: &str) -> Result<bool> {
        validate_stream_name("topic", topic)?;
        Ok(self.broker.get_or_create(topic).1)
    }

    /// Creates a consumer group on an existing stream; `false` when it existed.
    pub fn create_group(&self, topic: &str, group: &str, start: StartFrom) -> Result<bool> {
        validate_stream_name("topic", topic)?;
        validate_name("group", group)?;
        Ok(self.broker.existing(topic)?.log().create_group(group, start))
    }

    /// Number of entries in the stream.
    pub fn stream_len(&self, topic: &str) -> Result<usize> {
        Ok(self.broker.existing(topic)?.log().len())
    }

    /// Number of entries delivered in `group` and not yet acknowledged.
    pub fn pending_count(&self, topic: &str, group: &str) -> Result<usize> {
        self.broker
            .existing(topic)?
            .log()
            .pending_count(group)
            .ok_or_else(|| Error::GroupNotFound {
                stream: topic.to_owned(),
                group: group.to_owned(),
            })
    }

    /// The checkpoint of `consumer` in `group`, kept as the Redis backend keeps it: the entry
    /// up to which everything the consumer received is acknowledged, never past an entry
    /// still pending for it. `None` before its first acknowledgement.
    pub fn position(&self, topic: &str, group: &str, consumer: &str) -> Result<Option<EntryId>> {
        let stream = self.broker.existing(topic)?;
        let log = stream.log();
        if !log.has_group(group) {
            return Err(Error::GroupNotFound {
                stream: topic.to_owned(),
                group: group.to_owned(),
            });
        }
        Ok(log.position(group, consumer))
    }

    /// The entries pending for `consumer` in `group`, oldest first.
    pub fn pending_of(&self, topic: &str, group: &str, consumer: &str) -> Result<Vec<EntryId>> {
        self.broker
            .existing(topic)?
            .log()
            .pending_of(group, consumer)
            .ok_or_else(|| Error::GroupNotFound {
                stream: topic.to_owned(),
                group: group.to_owned(),
            })
    }

    /// The entries of a stream, oldest first (a snapshot, for tests and inspection).
    pub fn messages(&self, topic: &str) -> Result<Vec<(EntryId, Message)>> {
        Ok(self.broker.existing(topic)?.log().entries())
    }

    /// Whether every consumer group of every stream has read everything and has nothing
    /// pending: all messages published so far are handled.
    pub fn is_idle(&self) -> bool {
        let streams: Vec<Arc<SharedStream>> = self.broker.streams().values().cloned().collect();
        streams.iter().all(|s| s.log().is_idle())
    }

    /// Entries that were trimmed (by `max_length`) while still pending, and so could not be
    /// redelivered.
    pub fn trimmed_pending(&self, topic: &str) -> Result<u64> {
        Ok(self.broker.existing(topic)?.log().trimmed_pending)
    }
}

/// Options of a [`MemoryPublisher`] ([`MemoryBackend::publisher_with`]), the counterpart of
/// the Redis [`PublisherOptions`](crate::redis::PublisherOptions): set with the chained
/// methods, read from the public fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryPublisherOptions {
    /// Keep at most this many entries per stream, trimming the oldest (exactly, where Redis
    /// trims about). Default none; at least 1, at most [`MAX_CAP`](crate::MAX_CAP).
    pub max_length: Option<u64>,
    /// Whether publishing creates a missing stream (default) or fails with
    /// [`Error::StreamNotFound`].
    pub auto_create: bool,
    /// The limit on the encoded size of one entry. Default 1 MiB; at least 1 byte.
    pub max_entry_size: usize,
}

impl Default for MemoryPublisherOptions {
    fn default() -> Self {
        MemoryPublisherOptions {
            max_length: None,
            auto_create: true,
            max_entry_size: crate::codec::DEFAULT_MAX_ENTRY_SIZE,
        }
    }
}

impl MemoryPublisherOptions {
    /// Keeps at most `n` entries per stream, trimming the oldest.
    #[must_use]
    pub fn max_length(mut self, n: u64) -> Self {
        self.max_length = Some(n);
        self
    }

    /// Whether publishing to a missing stream creates it (default) or fails with
    /// [`Error::StreamNotFound`].
    #[must_use]
    pub fn auto_create(mut self, auto_create: bool) -> Self {
        self.auto_create = auto_create;
        self
    }

    /// The limit on the encoded size of one entry (default 1 MiB).
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// Checks the options; [`Error::Invalid`] names the one at fault.
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.max_length {
            crate::pubsub::check_cap(n)?;
        }
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        Ok(())
    }
}

/// Publishes into a [`MemoryBackend`].
#[derive(Clone, Debug)]
pub struct MemoryPublisher {
    broker: Arc<Broker>,
    options: MemoryPublisherOptions,
    closed: Arc<AtomicBool>,
    metrics: Arc<crate::metrics::PublishMetrics>,
}

impl MemoryPublisher {
    /// The options it publishes with.
    pub fn options(&self) -> &MemoryPublisherOptions {
        &self.options
    }

    fn check(&self, topic: &str, messages: &[Message]) -> Result<Arc<SharedStream>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("publisher"));
        }
        validate_stream_name("topic", topic)?;
        coordinator::refuse_partitioned(&self.broker, topic)?;
        for m in messages {
            let size = crate::codec::wire_size(m);
            if size > self.options.max_entry_size {
                return Err(Error::PayloadTooLarge {
                    size,
                    limit: self.options.max_entry_size,
                });
            }
        }
        if self.options.auto_create {
            Ok(self.broker.get_or_create(topic).0)
        } else {
            self.broker.existing(topic)
        }
    }

    fn append(&self, topic: &str, messages: Vec<Message>) -> Result<Vec<EntryId>> {
        self.append_capped(topic, messages, None)
    }

    fn append_capped(
        &self,
        topic: &str,
        mut messages: Vec<Message>,
        cap: Option<u64>,
    ) -> Result<Vec<EntryId>> {
        let span = crate::pubsub::publish_trace(SYSTEM, topic, &mut messages);
        let _in_span = span.enter();
        if !cfg!(feature = "metrics") {
            return self.append_unmetered(topic, messages, cap);
        }
        let (started, n) = (std::time::Instant::now(), messages.len());
        let result = self.append_unmetered(topic, messages, cap);
        self.metrics.record(topic, n, result.is_ok(), started.elapsed());
        result
    }

    fn append_unmetered(
        &self,
        topic: &str,
        messages: Vec<Message>,
        cap: Option<u64>,
    ) -> Result<Vec<EntryId>> {
        let max_length = match (self.options.max_length, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let stream = self.check(topic, &messages)?;
        // Checked here, outside the lock and once for every group; a payload that is not JSON
        // is stored (as Redis would store it) and dead-lettered when a group reads it.
        let checked: Vec<(Message, bool)> = messages
            .into_iter()
            .map(|m| {
                let json = check_json(m.payload()).is_ok();
                (m, json)
            })
            .collect();
        let now_ms = now_ms();
        let ids = {
            let mut log = stream.log();
            checked
                .into_iter()
                .map(|(m, json)| log.append_checked(m, json, now_ms, max_length))
                .collect()
        };
        stream.changed.notify_waiters();
        Ok(ids)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Publisher for MemoryPublisher {
    // Each publish happens when its future is first polled, as on Redis (a future dropped
    // unpolled publishes nothing), and inside the span the caller polls it in.
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move { self.append(topic, vec![message]).map(|ids| ids[0]) })
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(async move { self.append(topic, messages) })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.store(true, Ordering::Release);
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish_at<'a>(
        &'a self,
        topic: &'a str,
        at: std::time::SystemTime,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // Checked now, as any publish: a message that could not be appended is refused.
            self.check(topic, std::slice::from_ref(&message))?;
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            let due = tokio::time::Instant::now()
                .checked_add(wait)
                .ok_or_else(|| Error::invalid("at", "is too far in the future"))?;
            // Accepted now: appended when due even if this publisher is closed meanwhile.
            let mut appender = self.clone();
            appender.closed = Arc::new(AtomicBool::new(false));
            let start = {
                let mut schedule = self.broker.schedule.lock().unwrap_or_else(|p| p.into_inner());
                schedule.scheduled += 1;
                let key = (due, schedule.scheduled);
                schedule.due.insert(key, (topic.to_owned(), message, appender));
                !std::mem::replace(&mut schedule.running, true)
            };
            if start {
                tokio::spawn(run_schedule(
                    Arc::downgrade(&self.broker),
                    self.broker.schedule_changed.clone(),
                ));
            }
            self.broker.schedule_changed.notify_one();
            Ok(())
        })
    }

    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            crate::pubsub::check_cap(max_length)
                .and_then(|()| self.append_capped(topic, vec![message], Some(max_length)))
                .map(|ids| ids[0])
        })
    }
}

/// Subscribes to a [`MemoryBackend`]'s streams.
#[derive(Clone, Debug)]
pub struct MemorySubscriber {
    broker: Arc<Broker>,
    closed: Signal,
    /// The subscriptions made, so that close frees their consumer names at once.
    settlers: Arc<Mutex<Vec<std::sync::Weak<MemorySettler>>>>,
}

impl Subscriber for MemorySubscriber {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(std::future::ready(self.start(topic, options)))
    }

    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        let result = validate_stream_name("topic", topic).map(|()| {
            // Subscriptions still on it keep the old stream and see nothing more.
            self.broker.streams().remove(topic);
        });
        Box::pin(std::future::ready(result))
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.cancel();
        let settlers = std::mem::take(&mut *self.settlers.lock().unwrap_or_else(|p| p.into_inner()));
        for settler in settlers.iter().filter_map(std::sync::Weak::upgrade) {
            settler.unregister();
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl MemorySubscriber {
    fn start(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed("subscriber"));
        }
        options.validate(topic)?;
        coordinator::refuse_partitioned(&self.broker, topic)?;
        let group = options.group.as_str();
        let stream = if options.create_group {
            let (stream, _) = self.broker.get_or_create(topic);
            stream.log().create_group(group, options.start_from);
            stream
        } else {
            let missing = || Error::GroupNotFound {
                stream: topic.to_owned(),
                group: group.to_owned(),
            };
            let stream = self.broker.get(topic).ok_or_else(missing)?;
            if !stream.log().has_group(group) {
                return Err(missing());
            }
            stream
        };
        let origin =
            Arc::new(Origin::new(stream.name.clone(), group, options.consumer.as_str()).with_system(SYSTEM));
        let consumer: Arc<str> = options.consumer.as_str().into();
        if !stream.log().register_consumer(group, &consumer) {
            return Err(Error::ConsumerActive {
                stream: topic.to_owned(),
                group: group.to_owned(),
                consumer: consumer.to_string(),
            });
        }
        let in_flight = options.in_flight_limit();
        let settler = Arc::new(MemorySettler {
            broker: self.broker.clone(),
            stream: stream.clone(),
            origin: origin.clone(),
            in_flight: in_flight.clone(),
            closed: self.closed.clone(),
            abandoned: Signal::new(),
            registration: Mutex::new(Some(Registration {
                stream: stream.clone(),
                origin: origin.clone(),
            })),
        });
        // The reader stops at the subscriber's close, or when the subscription is abandoned.
        let stop = match &options.abandon {
            None => self.closed.clone(),
            Some(abandon) => {
                let (stop, abandon, closed) = (Signal::new(), abandon.0.clone(), self.closed.clone());
                let (stopping, settling) = (stop.clone(), Arc::downgrade(&settler));
                tokio::spawn(async move {
                    tokio::select! {
                        _ = closed.cancelled() => stopping.cancel(),
                        _ = abandon.cancelled() => {
                            // The reader stops first, so that it fetches nothing more.
                            stopping.cancel();
                            if let Some(settler) = settling.upgrade() {
                                settler.abandon();
                            }
                        }
                    }
                });
                stop
            }
        };
        {
            let mut settlers = self.settlers.lock().unwrap_or_else(|p| p.into_inner());
            settlers.retain(|s| s.strong_count() > 0);
            settlers.push(Arc::downgrade(&settler));
        }
        let reader = Reader {
            metrics: crate::metrics::SubscriptionMetrics::new(origin.stream(), origin.group()),
            buffer: VecDeque::new(),
            stream,
            origin,
            consumer,
            settler,
            in_flight,
            batch_size: options.batch_size,
            max_deliveries: options.max_deliveries,
            reclaim: options.reclaim,
            next_reclaim: Instant::now(),
            drained: false,
            closed: stop,
        };
        Ok(Subscription::from_reader(reader))
    }
}

/// Keeps the consumer name taken while the subscription or any of its deliveries lives (a
/// handler still working on an entry keeps the name from being reused), or until close.
struct Registration {
    stream: Arc<SharedStream>,
    origin: Arc<Origin>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stream
            .log()
            .unregister_consumer(self.origin.group(), self.origin.consumer());
    }
}

struct Reader {
    buffer: VecDeque<Delivery>,
    stream: Arc<SharedStream>,
    origin: Arc<Origin>,
    consumer: Arc<str>,
    settler: Arc<MemorySettler>,
    in_flight: InFlight,
    batch_size: usize,
    max_deliveries: u64,
    reclaim: Option<ReclaimOptions>,
    next_reclaim: Instant,
    drained: bool,
    closed: Signal,
    metrics: crate::metrics::SubscriptionMetrics,
}

impl crate::pubsub::BackendReader for Reader {
    fn ready(&mut self) -> Option<Delivery> {
        if self.closed.is_cancelled() {
            return None;
        }
        self.buffer.pop_front()
    }

    async fn next(mut self) -> (Self, Option<Result<Delivery>>) {
        let item = self.next_item().await;
        (self, item)
    }
}

impl Reader {
    async fn next_item(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.closed.is_cancelled() {
                self.stop();
                return None;
            }
            if let Some(d) = self.buffer.pop_front() {
                return Some(Ok(d));
            }
            let taken = tokio::select! {
                biased;
                _ = self.closed.cancelled() => continue,
                n = self.in_flight.acquire(self.batch_size) => n,
            };
            self.fill(taken).await;
        }
    }

    /// After close: unsettled buffered deliveries go back to pending and the consumer name is
    /// free, without waiting for the subscription to be dropped.
    fn stop(&mut self) {
        self.buffer.clear();
        self.settler.unregister();
    }

    /// Fetches into the buffer using the `taken` slots, and gives back the slots it did not
    /// use; when there was nothing to fetch, waits until something may have changed (or
    /// until closed) without holding any.
    async fn fill(&mut self, taken: usize) {
        let stream = self.stream.clone();
        loop {
            let changed = stream.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            let now = Instant::now();
            let reclaim_due = self.reclaim.filter(|_| now >= self.next_reclaim);
            let plan = FetchPlan {
                drain_own: !self.drained,
                reclaim_min_idle: reclaim_due.map(|r| r.min_idle),
                max_deliveries: self.max_deliveries,
            };
            let mut out = FetchOut {
                fetched: Vec::with_capacity(taken),
                ..FetchOut::default()
            };
            {
                let mut log = stream.log();
                // Checked under the lock that abandoning takes: nothing is fetched for a
                // subscription whose entries were handed back.
                if self.settler.abandoned.is_cancelled() {
                    drop(log);
                    self.in_flight.release(taken);
                    return;
                }
                log.fetch(self.origin.group(), &self.consumer, taken, now, plan, &mut out);
            }
            self.drained = !out.own_left;
            if let Some(r) = reclaim_due.filter(|_| out.reclaim_ran) {
                self.next_reclaim = now + r.interval;
            }
            let gave_up = !out.given_up.is_empty();
            self.dead_letter(std::mem::take(&mut out.given_up));
            if !out.fetched.is_empty() {
                self.in_flight.release(taken - out.fetched.len());
                let settler: Arc<dyn Settler> = self.settler.clone();
                for f in out.fetched {
                    let info = DeliveryInfo::new(f.id, f.delivery_count, self.origin.clone());
                    self.buffer
                        .push_back(Delivery::new(f.message, info, settler.clone()));
                }
                return;
            }
            if !self.drained || gave_up {
                continue;
            }
            let wake_at = match (out.next_retry, self.reclaim.map(|_| self.next_reclaim)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Nothing to hand out: the slots go back while it waits, so that a limit shared
            // with other subscriptions (a member's partitions) is not held by an idle one.
            self.in_flight.release(taken);
            tokio::select! {
                biased;
                _ = self.closed.cancelled() => {}
                _ = &mut changed => {}
                _ = sleep_until(wake_at) => {}
            }
            return;
        }
    }

    /// Dead-letters every entry given up on (already out of the pending list).
    fn dead_letter(&self, given_up: Vec<GivenUp>) {
        if given_up.is_empty() {
            return;
        }
        let origin = &self.origin;
        let records = given_up.into_iter().map(|g| {
            self.metrics.dead_lettered(match g.why {
                GiveUp::Exceeded => DeadLetterReason::MaxDeliveries,
                GiveUp::Trimmed => DeadLetterReason::Trimmed,
                GiveUp::NotJson => DeadLetterReason::Decode,
            });
            let reason = match g.why {
                GiveUp::Exceeded => GaveUp::TooManyDeliveries {
                    delivered: g.delivery_count,
                    limit: self.max_deliveries,
                }
                .to_string(),
                GiveUp::Trimmed => GaveUp::Trimmed.to_string(),
                // Checked again for the parser's words (where it failed), as Redis gives.
                GiveUp::NotJson => match g.message.as_ref().map(|m| check_json(m.payload())) {
                    Some(Err(e)) => crate::codec::not_json(g.id, e).to_string(),
                    _ => "its payload is not JSON".to_owned(),
                },
            };
            let why = DeadLetter {
                reason: &reason,
                original_id: g.id,
                stream: origin.stream(),
                group: origin.group(),
                delivery_count: g.delivery_count,
            };
            // The records are the Redis subscriber's, field for field.
            let record = match (g.why, &g.message) {
                (GiveUp::NotJson, Some(m)) => {
                    why.for_undecodable(&crate::codec::JsonCodec.encode(m).unwrap_or_default())
                }
                (_, Some(m)) => why.for_message(m),
                (_, None) => why.for_trimmed(),
            };
            (g.id, record)
        });
        self.settler.write_dead_letters(records);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct MemorySettler {
    broker: Arc<Broker>,
    stream: Arc<SharedStream>,
    origin: Arc<Origin>,
    in_flight: InFlight,
    closed: Signal,
    /// Set when the subscription was abandoned: its entries were handed back, and its
    /// deliveries settle nothing any more.
    abandoned: Signal,
    registration: Mutex<Option<Registration>>,
}

impl MemorySettler {
    /// Abandons the subscription while deliveries may still be out: they settle nothing from
    /// now on, the entries they hold stay pending for the consumer name, to be drained by its
    /// next holder, and the name is freed.
    fn abandon(&self) {
        {
            let mut log = self.stream.log();
            self.abandoned.cancel();
            log.release_all(self.origin.group(), self.origin.consumer());
        }
        self.unregister();
        self.stream.changed.notify_waiters();
    }

    /// Frees the consumer name.
    fn unregister(&self) {
        self.registration.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Appends each record to `<stream>-dead`: the one place where this backend writes dead
    /// letters, for entries given up on by the subscription and by handlers alike.
    fn write_dead_letters(&self, records: impl IntoIterator<Item = (EntryId, Message)>) {
        let origin = &self.origin;
        let (dead, _) = self
            .broker
            .get_or_create(&dead_letter::stream_for(origin.stream()));
        let now_ms = now_ms();
        let mut written = false;
        {
            let mut log = dead.log();
            for (id, record) in records {
                tracing::warn!(stream = origin.stream(), group = origin.group(), %id,
                    reason = record.metadata().get(dead_letter::keys::REASON).unwrap_or(""), "dead-lettered");
                log.append_checked(record, true, now_ms, None);
                written = true;
            }
        }
        if written {
            dead.changed.notify_waiters();
        }
    }
}

impl Settler for MemorySettler {
    fn settle(
        &self,
        info: &DeliveryInfo,
        message: &Message,
        settlement: Settlement,
    ) -> std::result::Result<(), SettleError> {
        if self.abandoned.is_cancelled() {
            self.in_flight.release(1);
            return Err(SettleError::Closed { id: info.id() });
        }
        if self.closed.is_cancelled() {
            self.release(info);
            return Err(SettleError::Closed { id: info.id() });
        }
        let group = self.origin.group();
        match settlement {
            Settlement::Ack | Settlement::Nack { .. } => {
                let mut log = self.stream.log();
                // Checked again under the lock that abandoning takes.
                if self.abandoned.is_cancelled() {
                    drop(log);
                    self.in_flight.release(1);
                    return Err(SettleError::Closed { id: info.id() });
                }
                if let Settlement::Nack { delay } = settlement {
                    log.nack(group, info.id(), self.origin.consumer(), Instant::now() + delay);
                    drop(log);
                    self.stream.changed.notify_waiters();
                } else {
                    log.ack(group, info.id());
                }
            }
            Settlement::DeadLetter { reason } => {
                let record = DeadLetter {
                    reason: &reason,
                    original_id: info.id(),
                    stream: self.origin.stream(),
                    group,
                    delivery_count: info.delivery_count(),
                }
                .for_message(message);
                let mut log = self.stream.log();
                // Checked again under the lock that abandoning takes.
                if self.abandoned.is_cancelled() {
                    drop(log);
                    self.in_flight.release(1);
                    return Err(SettleError::Closed { id: info.id() });
                }
                // Written before the ack: at no moment is the entry neither pending nor kept.
                self.write_dead_letters([(info.id(), record)]);
                log.ack(group, info.id());
            }
        }
        self.in_flight.release(1);
        Ok(())
    }

    fn release(&self, info: &DeliveryInfo) {
        // Abandoned: the entry was handed back already, maybe to the name's next holder.
        if !self.abandoned.is_cancelled() {
            self.stream
                .log()
                .release(self.origin.group(), info.id(), self.origin.consumer());
        }
        self.in_flight.release(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_publish_happens_when_its_future_is_polled() {
        let backend = MemoryBackend::new();
        let publisher = backend.publisher();
        let unpolled = publisher.publish("lazy", Message::new("n", &1).unwrap());
        drop(unpolled);
        assert!(
            backend.stream_len("lazy").is_err(),
            "a dropped publish wrote nothing"
        );
        publisher
            .publish("lazy", Message::new("n", &2).unwrap())
            .await
            .unwrap();
        assert_eq!(backend.stream_len("lazy").unwrap(), 1);
    }

    #[tokio::test]
    async fn publisher_options_trim_refuse_and_are_checked() {
        let backend = MemoryBackend::new();
        let publisher = backend
            .publisher_with(
                MemoryPublisherOptions::default()
                    .max_length(2)
                    .max_entry_size(200),
            )
            .unwrap();
        for n in 0..5 {
            publisher
                .publish("t", Message::new("n", &n).unwrap())
                .await
                .unwrap();
        }
        assert_eq!(backend.stream_len("t").unwrap(), 2, "trimmed to max_length");
        let big = Message::new("n", &"x".repeat(300)).unwrap();
        assert!(matches!(
            publisher.publish("t", big).await,
            Err(Error::PayloadTooLarge { limit: 200, .. })
        ));
        let strict = backend
            .publisher_with(MemoryPublisherOptions::default().auto_create(false))
            .unwrap();
        assert!(matches!(
            strict.publish("absent", Message::new("n", &1).unwrap()).await,
            Err(Error::StreamNotFound { .. })
        ));
        for (bad, field) in [
            (MemoryPublisherOptions::default().max_length(0), "max_length"),
            (
                MemoryPublisherOptions::default().max_entry_size(0),
                "max_entry_size",
            ),
        ] {
            let err = backend.publisher_with(bad).unwrap_err();
            assert_eq!(err.invalid_field(), Some(field));
        }
    }
}
