//! [`RedisSubscriber`]: consumer-group subscriptions on Redis Streams.
//!
//! Each subscription reads on a connection of its own with `XREADGROUP COUNT n BLOCK t` (a
//! blocking read would stall a shared connection), with a response timeout above `BLOCK`. On
//! start and after every read error it first drains its own pending list, then reads `>`;
//! entries it owns already are never handed out twice ([`read_loop`]). Acks go to a flusher
//! task that sends one multi-id `XACK` per short interval and records the checkpoint
//! ([`flusher`]). A nacked entry waits in the subscription's ledger and is claimed back when
//! due, if this consumer still owns it ([`shared`]). Leases and heartbeats are in
//! [`super::lease`].

mod flusher;
mod read_loop;
mod shared;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::signal::Signal;
use futures::future::BoxFuture;
use redis::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::flusher::Flusher;
use self::read_loop::Reader;
use self::shared::{Ledger, Op, Shared};
use super::checkpoint::RedisCheckpointStore;
use super::connection::RedisConnection;
use super::protocol::replies;
use crate::checkpoint::CheckpointStore;
use crate::codec::{Codec, JsonCodec};
use crate::delivery::Origin;
use crate::error::{Error, Result};
use crate::pubsub::{InFlight, StartFrom, SubscribeOptions, Subscriber, Subscription};

pub(crate) use self::shared::RepeatedWarnings;
pub(crate) use self::shared::Shared as SubscriptionState;

/// The longest [`RedisSubscriberOptions::lease_ttl`]: one hour.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// The longest [`RedisSubscriberOptions::ack_flush_interval`]: 10 s.
pub const MAX_ACK_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Options of a [`RedisSubscriber`] (per-subscription knobs are in [`SubscribeOptions`]).
#[derive(Clone)]
pub struct RedisSubscriberOptions {
    codec: Arc<dyn Codec>,
    checkpoints: Checkpoints,
    lease_ttl: Duration,
    ack_flush_interval: Duration,
    max_entry_size: usize,
}

#[derive(Clone)]
enum Checkpoints {
    Redis,
    Store(Arc<dyn CheckpointStore>),
    Off,
}

impl Default for RedisSubscriberOptions {
    /// JSON wire format, checkpoints in Redis, 10 s leases, acks sent as soon as the previous
    /// `XACK` returned, entries up to 1 MiB.
    fn default() -> Self {
        RedisSubscriberOptions {
            codec: Arc::new(JsonCodec),
            checkpoints: Checkpoints::Redis,
            lease_ttl: Duration::from_secs(10),
            ack_flush_interval: Duration::ZERO,
            max_entry_size: crate::codec::DEFAULT_MAX_ENTRY_SIZE,
        }
    }
}

impl std::fmt::Debug for RedisSubscriberOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checkpoints = match self.checkpoints {
            Checkpoints::Redis => "redis",
            Checkpoints::Store(_) => "custom",
            Checkpoints::Off => "off",
        };
        f.debug_struct("RedisSubscriberOptions")
            .field("checkpoints", &checkpoints)
            .field("lease_ttl", &self.lease_ttl)
            .field("ack_flush_interval", &self.ack_flush_interval)
            .field("max_entry_size", &self.max_entry_size)
            .finish_non_exhaustive()
    }
}

impl RedisSubscriberOptions {
    /// Another wire layout.
    #[must_use]
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// Keep checkpoints in `store` instead of Redis (for example a
    /// [`MemoryCheckpointStore`](crate::checkpoint::MemoryCheckpointStore)).
    #[must_use]
    pub fn checkpoint_store(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.checkpoints = Checkpoints::Store(store);
        self
    }

    /// Record no checkpoints.
    #[must_use]
    pub fn without_checkpoints(mut self) -> Self {
        self.checkpoints = Checkpoints::Off;
        self
    }

    /// How long a consumer's lease lives without renewal. It is renewed (and held entries are
    /// heartbeated) every third of it, so keep reclaim `min_idle` above two thirds of it.
    /// Default 10 s; at least 30 ms, at most [`MAX_LEASE_TTL`].
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long acks gather before one `XACK` sends them. Default zero: an `XACK` goes out as
    /// soon as the previous one returned, carrying every ack that queued meanwhile (batches
    /// grow with the load by themselves). A longer interval means fewer, bigger `XACK`s, and
    /// more acknowledged entries redelivered after a crash. At most [`MAX_ACK_FLUSH_INTERVAL`].
    #[must_use]
    pub fn ack_flush_interval(mut self, interval: Duration) -> Self {
        self.ack_flush_interval = interval;
        self
    }

    /// The largest entry (field names and values, in bytes) handed to the application.
    /// Larger entries are dead-lettered whole, with the sizes in the reason, and the
    /// subscription goes on. Default
    /// [`DEFAULT_MAX_ENTRY_SIZE`](crate::codec::DEFAULT_MAX_ENTRY_SIZE) (1 MiB), the
    /// publisher's default: raise both together. At least 1; `usize::MAX` means no limit. Dead-letter streams (`<stream>-dead`) are read without
    /// the limit, since their records are as large as the entries they keep.
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// Checks every option ([`RedisSubscriber::new`] does); [`Error::Invalid`] names the one at
    /// fault. The limits keep each value within what the scripts and commands take.
    pub fn validate(&self) -> Result<()> {
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        if self.lease_ttl < Duration::from_millis(30) || self.lease_ttl > MAX_LEASE_TTL {
            return Err(Error::invalid(
                "lease_ttl",
                format_args!(
                    "{:?} must be at least 30 ms and at most {MAX_LEASE_TTL:?}",
                    self.lease_ttl
                ),
            ));
        }
        if self.ack_flush_interval > MAX_ACK_FLUSH_INTERVAL {
            return Err(Error::invalid(
                "ack_flush_interval",
                format_args!(
                    "{:?} must be at most {MAX_ACK_FLUSH_INTERVAL:?}",
                    self.ack_flush_interval
                ),
            ));
        }
        Ok(())
    }
}

/// Counters of what a subscriber had to deal with, for metrics.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    acked: AtomicU64,
    dead_lettered: AtomicU64,
    undecodable: AtomicU64,
    oversized: AtomicU64,
    trimmed_pending: AtomicU64,
    reclaimed: AtomicU64,
    crashed_consumers: AtomicU64,
    read_errors: AtomicU64,
    dead_letter_failures: AtomicU64,
    unclaimable: AtomicU64,
}

/// A snapshot of [`SubscriberStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Entries acknowledged in Redis.
    pub acked: u64,
    /// Entries written to a dead-letter stream.
    pub dead_lettered: u64,
    /// Entries that could not be decoded (dead-lettered).
    pub undecodable: u64,
    /// Entries larger than `max_entry_size` (dead-lettered).
    pub oversized: u64,
    /// Pending entries found trimmed from their stream (reported and dead-lettered).
    pub trimmed_pending: u64,
    /// Entries taken over from other consumers.
    pub reclaimed: u64,
    /// Crashed consumers found (lease gone, entries pending).
    pub crashed_consumers: u64,
    /// Failed reads (each retried).
    pub read_errors: u64,
    /// Dead-letter records that could not be written (the entries stay pending).
    pub dead_letter_failures: u64,
    /// Nacked entries found in no pending list when their retry was due (their group was
    /// re-created past them): dead-lettered, since the group would not deliver them again.
    pub unclaimable: u64,
}

impl SubscriberStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            acked: get(&self.acked),
            dead_lettered: get(&self.dead_lettered),
            undecodable: get(&self.undecodable),
            oversized: get(&self.oversized),
            trimmed_pending: get(&self.trimmed_pending),
            reclaimed: get(&self.reclaimed),
            crashed_consumers: get(&self.crashed_consumers),
            read_errors: get(&self.read_errors),
            dead_letter_failures: get(&self.dead_letter_failures),
            unclaimable: get(&self.unclaimable),
        }
    }
}

/// Subscribes to Redis streams in consumer groups.
pub struct RedisSubscriber {
    conn: RedisConnection,
    options: RedisSubscriberOptions,
    store: Option<Arc<dyn CheckpointStore>>,
    closed: Signal,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<SubscriberStats>,
    /// Every subscription's ledger, for [`Subscriber::unflushed`].
    ledgers: Mutex<Vec<std::sync::Weak<Mutex<Ledger>>>>,
}

impl std::fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("conn", &self.conn)
            .field("options", &self.options)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl RedisSubscriber {
    /// A subscriber on `conn`. Fails when an option is invalid.
    pub fn new(conn: RedisConnection, options: RedisSubscriberOptions) -> Result<Self> {
        options.validate()?;
        let store: Option<Arc<dyn CheckpointStore>> = match &options.checkpoints {
            Checkpoints::Redis => Some(Arc::new(RedisCheckpointStore::new(conn.clone()))),
            Checkpoints::Store(store) => Some(store.clone()),
            Checkpoints::Off => None,
        };
        Ok(RedisSubscriber {
            conn,
            options,
            store,
            closed: Signal::new(),
            tasks: Mutex::new(Vec::new()),
            stats: Arc::new(SubscriberStats::default()),
            ledgers: Mutex::new(Vec::new()),
        })
    }

    /// What this subscriber had to deal with so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    fn tasks(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn start(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed("subscriber"));
        }
        options.validate(topic)?;
        let origin = Arc::new(Origin::new(topic, options.group(), options.consumer()));
        ensure_group(&self.conn, self.store.as_deref(), &origin, &options).await?;
        let lease = super::lease::Lease::acquire(&self.conn, &origin, self.options.lease_ttl).await?;

        let ledger = Arc::new(Mutex::new(Ledger::default()));
        {
            let mut ledgers = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            ledgers.retain(|l| l.strong_count() > 0);
            ledgers.push(Arc::downgrade(&ledger));
        }
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let ops_weak = ops_tx.downgrade();
        let released = Signal::new();
        let lease_lost = Signal::new();
        let shared = Arc::new(Shared {
            conn: self.conn.clone(),
            origin: origin.clone(),
            capacity: InFlight::new(options.max_in_flight_value()),
            ledger: ledger.clone(),
            ops: ops_tx,
            blocked_client: AtomicI64::new(0),
            closed: self.closed.clone(),
            released: released.clone(),
            reclaim_after: Mutex::new(None),
        });
        let flusher = Flusher {
            ledger,
            conn: self.conn.clone(),
            origin,
            store: self.store.clone(),
            stats: self.stats.clone(),
            codec: self.options.codec.clone(),
            dead_letters: Vec::new(),
            interval: self.options.ack_flush_interval,
            acked_up_to: None,
            saved: None,
            saved_at: None,
            checkpoint_behind: false,
            flush_waiters: Vec::new(),
            floor: None,
            log: Default::default(),
        };
        let heartbeat = super::lease::Heartbeat {
            lease: lease.clone(),
            shared: Arc::downgrade(&shared),
            interval: self.options.lease_ttl / 3,
            lease_lost: lease_lost.clone(),
        };
        {
            let mut tasks = self.tasks();
            tasks.retain(|t| !t.is_finished());
            tasks.push(tokio::spawn(flusher.run(ops_rx, self.closed.clone())));
            tasks.push(tokio::spawn(heartbeat.run(self.closed.clone(), released)));
        }
        let reader = Reader {
            settler: shared.clone(),
            shared,
            codec: self.options.codec.clone(),
            max_entry_size: if topic.ends_with(crate::dead_letter::SUFFIX) {
                usize::MAX
            } else {
                self.options.max_entry_size
            },
            store: self.store.clone(),
            stats: self.stats.clone(),
            options,
            read_conn: None,
            read_ahead: None,
            drain_from: Some("-".to_owned()),
            lease,
            next_reclaim: Instant::now(),
            buffer: VecDeque::new(),
            failures: 0,
            sending: "XREADGROUP",
            lease_lost,
            lease_loss_reported: false,
            log: Default::default(),
            unclaimed: Vec::new(),
        };
        let flush = Arc::new(FlushAcks(ops_weak));
        Ok(Subscription::from_reader(reader).with_flush(flush))
    }
}

/// [`Subscription::flush`] for a Redis subscription: a request to its flusher, in line with
/// the acks sent before it. Holds no sender, so it keeps neither flusher nor lease alive.
struct FlushAcks(mpsc::WeakUnboundedSender<Op>);

impl crate::pubsub::Flush for FlushAcks {
    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        let ops = self.0.upgrade();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            ops.and_then(|ops| ops.send(Op::Flush(tx)).ok())
                .ok_or(Error::Closed("subscription"))?;
            rx.await.map_err(|_| Error::Closed("subscription"))?
        })
    }
}

impl Subscriber for RedisSubscriber {
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Subscription>> {
        Box::pin(self.start(topic, options))
    }

    fn unflushed(&self) -> u64 {
        let ledgers = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        ledgers
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|ledger| {
                let ledger = shared::lock(&ledger);
                (ledger.acking.len() + ledger.dead_lettering.len()) as u64
            })
            .sum()
    }

    fn delete_topic<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { super::admin::delete_stream(&self.conn, topic).await.map(drop) })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.closed.cancel();
        let tasks = std::mem::take(&mut *self.tasks());
        Box::pin(async move {
            for task in tasks {
                // A task that panicked has nothing left to flush; closing still succeeds.
                let _ = task.await;
            }
            Ok(())
        })
    }
}

/// Makes sure the group exists: when it vanished, created at the lowest checkpoint of its
/// consumers (so nothing unacked is skipped), else at the configured start; or
/// `GroupNotFound` when creating is off.
async fn ensure_group(
    conn: &RedisConnection,
    store: Option<&dyn CheckpointStore>,
    origin: &Origin,
    options: &SubscribeOptions,
) -> Result<()> {
    let (stream, group) = (origin.stream(), origin.group());
    let exists = group_exists(conn, stream, group).await?;
    if exists {
        return Ok(());
    }
    if !options.create_group_value() {
        return Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        });
    }
    create_group(conn, store, stream, group, options.start_from_value()).await
}

async fn group_exists(conn: &RedisConnection, stream: &str, group: &str) -> Result<bool> {
    let reply = conn
        .run("XINFO GROUPS", |mut c| {
            let cmd = redis::cmd("XINFO").arg("GROUPS").arg(stream).clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    match reply {
        Ok(groups) => Ok(replies::group_names(groups)?.iter().any(|g| g == group)),
        // No such key: no stream, so no group either.
        Err(e) if e.is_no_such_key() => Ok(false),
        Err(e) => Err(e.into_error()),
    }
}

pub(crate) async fn create_group(
    conn: &RedisConnection,
    store: Option<&dyn CheckpointStore>,
    stream: &str,
    group: &str,
    start: StartFrom,
) -> Result<()> {
    let checkpoint = match store {
        Some(store) => store.load_group(stream, group).await?,
        None => None,
    };
    let start_id = match checkpoint {
        Some(cp) => {
            tracing::info!(stream, group, at = %cp.message_id, "re-creating consumer group at its checkpoint");
            cp.message_id.to_string()
        }
        None => start.to_string(),
    };
    let created = conn
        .run("XGROUP CREATE", |mut c| {
            let cmd = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg(&start_id)
                .arg("MKSTREAM")
                .clone();
            async move { cmd.query_async::<()>(&mut c).await }
        })
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_bounded_before_it_reaches_redis() {
        let o = RedisSubscriberOptions::default;
        let refused = [
            (o().lease_ttl(Duration::MAX), "lease_ttl"),
            (
                o().lease_ttl(MAX_LEASE_TTL + Duration::from_millis(1)),
                "lease_ttl",
            ),
            (o().lease_ttl(Duration::from_millis(29)), "lease_ttl"),
            (o().ack_flush_interval(Duration::MAX), "ack_flush_interval"),
            (o().max_entry_size(0), "max_entry_size"),
        ];
        for (options, field) in refused {
            let err = options.validate().unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{err}");
        }
        let limits = o()
            .lease_ttl(MAX_LEASE_TTL)
            .ack_flush_interval(MAX_ACK_FLUSH_INTERVAL)
            .max_entry_size(usize::MAX);
        limits.validate().unwrap();
        // The longest lease fits the scripts' millisecond argument (a Redis integer).
        assert!(MAX_LEASE_TTL.as_millis() < i64::MAX as u128);
    }
}
