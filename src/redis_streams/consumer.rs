//! [`StreamConsumer`]: consumes one stream in a consumer group through a callback (the seed's
//! consumer contract).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointStore, MemoryCheckpointStore};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{EntryId, Metadata};
use crate::pubsub::{MAX_IN_FLIGHT, MAX_INTERVAL, ReclaimOptions, StartFrom, SubscribeOptions, Subscriber};
use crate::redis::admin;
use crate::redis::{RedisCheckpointStore, RedisConnection, RedisSubscriber, RedisSubscriberOptions};

/// One event as the callback sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct EventMessage {
    /// The Redis message id (`<ms>-<seq>`).
    pub id: String,
    /// The stream it came from.
    pub stream: String,
    /// The event type.
    pub event_type: String,
    /// The payload, decoded from JSON.
    pub payload: serde_json::Value,
    /// The metadata.
    pub metadata: Metadata,
    /// When it was produced, ISO 8601.
    pub timestamp: String,
    /// How many times it has been delivered, this time included.
    pub delivery_count: u64,
}

impl EventMessage {
    /// The payload as a typed value.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.payload.clone()).map_err(|e| Error::Decode {
            what: "payload".into(),
            reason: e.to_string(),
        })
    }
}

/// An entry delivered to a consumer and not acknowledged yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingMessage {
    /// The message id.
    pub id: String,
    /// The consumer it was delivered to.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How many times it was delivered.
    pub delivered: u64,
}

fn rename_invalid(e: Error, field: &'static str) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::invalid(field, reason),
        other => other,
    }
}

/// Options of a [`StreamConsumer`], with the seed's defaults.
///
/// ```
/// use streamwise::redis_streams::ConsumerOptions;
/// let o = ConsumerOptions::default();
/// assert_eq!((o.block_ms, o.count, o.auto_ack, o.use_redis_checkpoint), (5000, 10, false, true));
/// assert_eq!((o.reclaim_enabled, o.reclaim_interval_ms, o.reclaim_min_idle_ms), (false, 30_000, 30_000));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// How long one read waits for new events. Default 5000.
    pub block_ms: u64,
    /// Most events per read, and most handled at a time. Default 10.
    pub count: usize,
    /// Acknowledge on delivery, before the callback (at-most-once). Default `false`: the
    /// callback's `true` acknowledges.
    pub auto_ack: bool,
    /// Checkpoints in Redis (default) or in memory.
    pub use_redis_checkpoint: bool,
    /// Take over events other consumers left idle. Default `false`.
    pub reclaim_enabled: bool,
    /// How often to look for idle events. Default 30,000.
    pub reclaim_interval_ms: u64,
    /// How long an event must have been idle to be taken over. Default 30,000.
    pub reclaim_min_idle_ms: u64,
    /// Create the group (from `start_id`) when it is missing, instead of failing with
    /// [`Error::GroupNotFound`]. Default `false`, as the seed asks the group to exist.
    pub create_group: bool,
    /// Where a group created by the consumer starts: `0`, `$` or an id. Default `0`.
    pub start_id: String,
    /// After this many deliveries an event goes to `<stream>-dead`. Default 10.
    pub max_deliveries: u64,
    /// How long this consumer's lease lives without renewal: after a crash, how long until
    /// others see it as crashed, and the longest a restart under the same name waits for its
    /// old lease. Default 10,000.
    pub lease_ttl_ms: u64,
    /// How long acknowledgements gather before one `XACK` sends them; 0 (default) sends them
    /// as soon as the previous `XACK` returned.
    pub ack_flush_interval_ms: u64,
    /// The largest entry handed to the callback, in bytes; larger ones are dead-lettered.
    /// Default 1 MiB, the producer's default limit.
    pub max_entry_size: usize,
    /// The layout of the entries read (`codec` in the configuration file). Default
    /// streamwise's own; natricine's and Watermill's need the `interop` feature.
    pub wire_format: crate::wire_format::WireFormat,
    /// The peer layout's settings beyond its defaults (`codec:` as a mapping in the
    /// configuration file): event type key, fallback or fixed type, field names.
    pub wire_settings: crate::wire_format::WireSettings,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            block_ms: 5000,
            count: 10,
            auto_ack: false,
            use_redis_checkpoint: true,
            reclaim_enabled: false,
            reclaim_interval_ms: 30_000,
            reclaim_min_idle_ms: 30_000,
            create_group: false,
            start_id: "0".into(),
            max_deliveries: 10,
            lease_ttl_ms: 10_000,
            ack_flush_interval_ms: 0,
            max_entry_size: crate::codec::DEFAULT_MAX_ENTRY_SIZE,
            wire_format: crate::wire_format::WireFormat::default(),
            wire_settings: crate::wire_format::WireSettings::default(),
        }
    }
}

impl ConsumerOptions {
    fn subscribe_options(&self, group: &str, consumer: &str) -> Result<SubscribeOptions> {
        let ms = |field: &'static str, ms: u64| {
            let d = Duration::from_millis(ms);
            if d.is_zero() || d > MAX_INTERVAL {
                return Err(Error::invalid(
                    field,
                    format_args!("{ms} must be between 1 and {}", MAX_INTERVAL.as_millis()),
                ));
            }
            Ok(d)
        };
        let block = ms("block_ms", self.block_ms)?;
        if self.count == 0 || self.count > MAX_IN_FLIGHT {
            return Err(Error::invalid(
                "count",
                format_args!("{} is not between 1 and {MAX_IN_FLIGHT}", self.count),
            ));
        }
        let mut options = SubscribeOptions::new(group, consumer)
            .block(block)
            .batch_size(self.count)
            .max_in_flight(self.count)
            .create_group(self.create_group)
            .start_from(StartFrom::parse(&self.start_id)?)
            .max_deliveries(self.max_deliveries);
        if self.reclaim_enabled {
            let interval = ms("reclaim_interval_ms", self.reclaim_interval_ms)?;
            let min_idle = Duration::from_millis(self.reclaim_min_idle_ms);
            if min_idle > MAX_INTERVAL {
                return Err(Error::invalid("reclaim_min_idle_ms", "is longer than a day"));
            }
            options = options.reclaim(ReclaimOptions::new(interval, min_idle));
        }
        Ok(options)
    }
}

/// Consumes one stream as one consumer of a group, through a callback.
///
/// Share it (`Arc<StreamConsumer>`) to call [`close`](Self::close) from another task while
/// [`subscribe`](Self::subscribe) runs.
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use std::sync::Arc;
/// use streamwise::redis_streams::StreamConsumer;
///
/// let consumer = Arc::new(StreamConsumer::new("redis://localhost:6379", "data-updates", "processors", "worker-1")?);
/// let stopper = consumer.clone();
/// tokio::spawn(async move {
///     tokio::signal::ctrl_c().await.ok();
///     stopper.close().await.ok();
/// });
/// consumer
///     .subscribe(
///         |msg| async move {
///             println!("Received: {} - {}", msg.event_type, msg.payload);
///             true // acknowledge
///         },
///         Some(&["price.update"]),
///     )
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StreamConsumer {
    conn: RedisConnection,
    stream: String,
    group: String,
    consumer: String,
    options: ConsumerOptions,
    subscriber: Arc<RedisSubscriber>,
    skipped: AtomicU64,
    /// Asks a running `subscribe` to stop after the event in hand.
    stop: CancellationToken,
    /// How many `subscribe` calls are running (each closes the subscriber on its way out).
    running: AtomicUsize,
    /// Flushes the running subscription's acknowledgements.
    flush: std::sync::Mutex<Option<crate::pubsub::FlushHandle>>,
}

impl StreamConsumer {
    /// Consumer `consumer` of group `group` on `stream`, with the default options. The group
    /// must exist (see [`ConsumerGroupManager`](super::ConsumerGroupManager::create_group)).
    pub fn new(redis_url: &str, stream: &str, group: &str, consumer: &str) -> Result<Self> {
        Self::with_options(
            RedisConnection::new(redis_url)?,
            stream,
            group,
            consumer,
            ConsumerOptions::default(),
        )
    }

    /// A consumer on a shared connection, with `options`. Every option is checked here.
    pub fn with_options(
        conn: RedisConnection,
        stream: &str,
        group: &str,
        consumer: &str,
        options: ConsumerOptions,
    ) -> Result<Self> {
        validate_stream_name("stream", stream)?;
        validate_name("group", group)?;
        validate_name("consumer", consumer)?;
        options.subscribe_options(group, consumer)?.validate(stream)?;
        let mut subscriber_options = RedisSubscriberOptions::default()
            .lease_ttl(Duration::from_millis(options.lease_ttl_ms))
            .ack_flush_interval(Duration::from_millis(options.ack_flush_interval_ms))
            .max_entry_size(options.max_entry_size);
        subscriber_options.codec = options.wire_format.codec_with(&options.wire_settings)?;
        if !options.use_redis_checkpoint {
            subscriber_options = subscriber_options.checkpoint_store(Arc::new(MemoryCheckpointStore::new()));
        }
        // The subscriber's options under the names they have here.
        let subscriber =
            RedisSubscriber::new(conn.clone(), subscriber_options).map_err(|e| match e.invalid_field() {
                Some("lease_ttl") => rename_invalid(e, "lease_ttl_ms"),
                Some("ack_flush_interval") => rename_invalid(e, "ack_flush_interval_ms"),
                _ => e,
            })?;
        Ok(StreamConsumer {
            conn,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            options,
            subscriber: Arc::new(subscriber),
            skipped: AtomicU64::new(0),
            stop: CancellationToken::new(),
            running: AtomicUsize::new(0),
            flush: std::sync::Mutex::new(None),
        })
    }

    /// The options.
    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// Consumes until [`close`](Self::close) is called (from another task), passing each event
    /// to `callback`: `true` acknowledges it, `false` leaves it pending (it comes back on
    /// restart or through reclaim). With `event_types`, events of other types are acknowledged
    /// without calling back, and counted in [`skipped`](Self::skipped).
    ///
    /// After `close`, the event in hand is finished and acknowledged, acknowledgements are
    /// flushed, and `subscribe` returns `Ok(())`.
    ///
    /// Fails with [`Error::GroupNotFound`] when the group does not exist (unless
    /// `create_group`), [`Error::ConsumerActive`] when this consumer name is live elsewhere,
    /// [`Error::Connection`] once the connection stays down past its retries, and
    /// [`Error::Closed`] when called after `close`.
    pub async fn subscribe<F, Fut>(&self, mut callback: F, event_types: Option<&[&str]>) -> Result<()>
    where
        F: FnMut(EventMessage) -> Fut,
        Fut: Future<Output = bool>,
    {
        self.running.fetch_add(1, Ordering::AcqRel);
        let result = self.consume(&mut callback, event_types).await;
        self.running.fetch_sub(1, Ordering::AcqRel);
        if self.stop.is_cancelled() {
            // Stopped by close: flush what was acknowledged and let go of the connection.
            self.subscriber.close().await?;
        }
        result
    }

    async fn consume<F, Fut>(&self, callback: &mut F, event_types: Option<&[&str]>) -> Result<()>
    where
        F: FnMut(EventMessage) -> Fut,
        Fut: Future<Output = bool>,
    {
        if self.stop.is_cancelled() {
            return Err(Error::Closed("consumer"));
        }
        let options = self.options.subscribe_options(&self.group, &self.consumer)?;
        let partitioned = self.partitions().await?.is_some();
        let mut deliveries = if partitioned {
            // This consumer is a member of the group: it reads the partitions it owns.
            let coordinator = Arc::new(crate::redis::RedisCoordinator::new(self.conn.clone()));
            crate::partition::PartitionedSubscriber::new(self.subscriber.clone(), coordinator)
                .subscribe(&self.stream, options)
                .await?
        } else {
            self.subscriber.subscribe(&self.stream, options).await?
        };
        *self.flush.lock().unwrap_or_else(|p| p.into_inner()) = Some(deliveries.flush_handle());
        let mut last_error = None;
        loop {
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(()),
                next = deliveries.next() => next,
            };
            // A lost lease or group, or a connection down past its retries, ends the call; the
            // caller decides whether to subscribe again. On a partitioned topic an error is one
            // partition's (a hand-off, a retried acquire) and the member goes on; the last one
            // is returned if the subscription then ends.
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) if partitioned => {
                    tracing::warn!(stream = %self.stream, error = %e, "a partition of the topic reported an error; the member goes on");
                    last_error = Some(e);
                    continue;
                }
                Some(Err(e)) => return Err(e),
                None => return last_error.map_or(Ok(()), Err),
            };
            let m = delivery.message();
            if event_types.is_some_and(|types| !types.contains(&m.event_type())) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                delivery.ack().await?;
                continue;
            }
            if self.options.auto_ack {
                delivery.ack().await?;
            }
            // The subscriber dead-letters what is not JSON before it gets here.
            let payload = m.json()?;
            let event = EventMessage {
                id: delivery.id().to_string(),
                // The partition's stream on a partitioned topic.
                stream: delivery.info().origin().stream().to_owned(),
                event_type: m.event_type().to_owned(),
                payload,
                metadata: m.metadata().clone(),
                timestamp: m.timestamp_rfc3339(),
                delivery_count: delivery.delivery_count(),
            };
            let acknowledge = callback(event).await;
            if acknowledge && !self.options.auto_ack {
                delivery.ack().await?;
            }
            // `false`: dropping the delivery leaves the event pending.
        }
    }

    /// Acknowledges `message_id` now and returns how many messages were acknowledged (0 when it
    /// was not pending).
    ///
    /// On a partitioned topic, [`Error::Partitioned`]: an id names an entry of one partition
    /// (acknowledge the partition's, `EventMessage::stream`, with `admin::ack`). The same holds
    /// for [`get_pending`](Self::get_pending), [`lag`](Self::lag) and
    /// [`position`](Self::position), which look at one stream.
    pub async fn acknowledge(&self, message_id: &str) -> Result<u64> {
        let id: EntryId = message_id
            .parse()
            .map_err(|_| Error::invalid("message_id", format_args!("{message_id:?} is not a message id")))?;
        self.refuse_partitioned().await?;
        admin::ack(&self.conn, &self.stream, &self.group, &[id]).await
    }

    /// The events delivered to this consumer and not acknowledged, oldest first.
    pub async fn get_pending(&self) -> Result<Vec<PendingMessage>> {
        self.refuse_partitioned().await?;
        let entries =
            admin::pending_entries(&self.conn, &self.stream, &self.group, Some(&self.consumer)).await?;
        Ok(entries
            .into_iter()
            .map(|e| PendingMessage {
                id: e.id.to_string(),
                consumer: e.consumer,
                idle_ms: e.idle_ms,
                delivered: e.delivery_count,
            })
            .collect())
    }

    /// How many entries of the stream the group has not read yet, for monitoring (`None`
    /// when Redis cannot tell).
    pub async fn lag(&self) -> Result<Option<u64>> {
        self.refuse_partitioned().await?;
        Ok(admin::group_info(&self.conn, &self.stream, &self.group)
            .await?
            .lag)
    }

    /// This consumer's position (the data model's `position`): its checkpoint, the entry up to
    /// which everything it received is acknowledged. `None` before its first acknowledgement,
    /// or with in-memory checkpoints.
    pub async fn position(&self) -> Result<Option<Checkpoint>> {
        if !self.options.use_redis_checkpoint {
            return Ok(None);
        }
        self.refuse_partitioned().await?;
        RedisCheckpointStore::new(self.conn.clone())
            .load(&self.stream, &self.group, &self.consumer)
            .await
    }

    /// The partition count of the topic, when it is partitioned (a name with a hash tag never
    /// is).
    async fn partitions(&self) -> Result<Option<u32>> {
        if crate::partition::validate_topic(&self.stream).is_err() {
            return Ok(None);
        }
        crate::redis::coordinator::stored_partitions(&self.conn, &self.stream).await
    }

    async fn refuse_partitioned(&self) -> Result<()> {
        match self.partitions().await? {
            Some(partitions) => Err(Error::Partitioned {
                topic: self.stream.clone(),
                partitions,
            }),
            None => Ok(()),
        }
    }

    /// Waits until every acknowledgement made so far (a callback's `true`, `auto_ack`, skipped
    /// types) is written to Redis, or returns the error that stopped it. A callback's `true`
    /// only queues the acknowledgement (they are sent in batches); after `flush` returns `Ok`
    /// it is recorded. `Ok` at once when no `subscribe` has run.
    pub async fn flush(&self) -> Result<()> {
        let handle = self.flush.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match handle {
            Some(handle) => handle.flush().await,
            None => Ok(()),
        }
    }

    /// Events of other types skipped by the `event_types` filter so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Stops consuming, gracefully: a running [`subscribe`](Self::subscribe) finishes the
    /// event in hand, flushes acknowledgements, closes the connection and returns. When no
    /// `subscribe` is running, the connection closes here. Idempotent. (Call it from another
    /// task than the callback's, or spawn it from the callback.)
    pub async fn close(&self) -> Result<()> {
        self.stop.cancel();
        if self.running.load(Ordering::Acquire) == 0 {
            self.subscriber.close().await?;
        }
        Ok(())
    }
}
