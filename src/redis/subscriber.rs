//! [`RedisSubscriber`]: consumer-group subscriptions on Redis Streams.
//!
//! Each subscription reads on a connection of its own with `XREADGROUP COUNT n BLOCK t` (a
//! blocking read would stall a shared connection), with a response timeout above `BLOCK`. On
//! start and after every read error it first drains its own pending list (id `0`), then reads
//! `>`; entries it still holds are never handed out twice. Acks go to a flusher task that sends
//! one multi-id `XACK` per short interval, records the checkpoint, and flushes on close. A
//! nacked entry waits in a local retry queue and is claimed back (`XCLAIM`, which counts the
//! delivery) when due, if this consumer still owns it. Reclaim (`XAUTOCLAIM`), leases,
//! heartbeats and dead-lettering are in the neighbouring modules.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::checkpoint::RedisCheckpointStore;
use super::codec::{self, Codec, JsonCodec, ReplyEntry};
use super::connection::{CommandError, RedisConnection, is_transient};
use super::{keys, scripts};
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::dead_letter::{self, DeadLetter};
use crate::delivery::{Delivery, DeliveryInfo, Origin, Settlement, Settler};
use crate::error::{Error, Result};
use crate::message::{EntryId, Message};
use crate::pubsub::{InFlight, ReclaimOptions, StartFrom, SubscribeOptions, Subscriber, Subscription};

/// Most ids in one `XACK`.
const MAX_ACK_BATCH: usize = 1000;

/// Options of a [`RedisSubscriber`] (per-subscription knobs are in [`SubscribeOptions`]).
#[derive(Clone)]
pub struct RedisSubscriberOptions {
    codec: Arc<dyn Codec>,
    checkpoints: Checkpoints,
    lease_ttl: Duration,
    ack_flush_interval: Duration,
}

#[derive(Clone)]
enum Checkpoints {
    Redis,
    Store(Arc<dyn CheckpointStore>),
    Off,
}

impl Default for RedisSubscriberOptions {
    /// JSON wire format, checkpoints in Redis, 10 s leases, acks flushed every 5 ms.
    fn default() -> Self {
        RedisSubscriberOptions {
            codec: Arc::new(JsonCodec),
            checkpoints: Checkpoints::Redis,
            lease_ttl: Duration::from_secs(10),
            ack_flush_interval: Duration::from_millis(5),
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
    /// Default 10 s.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long acks gather before one `XACK` sends them. Default 5 ms.
    #[must_use]
    pub fn ack_flush_interval(mut self, interval: Duration) -> Self {
        self.ack_flush_interval = interval;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.lease_ttl < Duration::from_millis(30) {
            return Err(Error::invalid("lease_ttl", "must be at least 30 ms"));
        }
        if self.ack_flush_interval.is_zero() {
            return Err(Error::invalid("ack_flush_interval", "must be longer than zero"));
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
    trimmed_pending: AtomicU64,
    reclaimed: AtomicU64,
    crashed_consumers: AtomicU64,
    read_errors: AtomicU64,
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
    /// Pending entries found trimmed from their stream (reported and dead-lettered).
    pub trimmed_pending: u64,
    /// Entries taken over from other consumers.
    pub reclaimed: u64,
    /// Crashed consumers found (lease gone, entries pending).
    pub crashed_consumers: u64,
    /// Failed reads (each retried).
    pub read_errors: u64,
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
            trimmed_pending: get(&self.trimmed_pending),
            reclaimed: get(&self.reclaimed),
            crashed_consumers: get(&self.crashed_consumers),
            read_errors: get(&self.read_errors),
        }
    }
}

/// Subscribes to Redis streams in consumer groups.
pub struct RedisSubscriber {
    conn: RedisConnection,
    options: RedisSubscriberOptions,
    store: Option<Arc<dyn CheckpointStore>>,
    closed: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<SubscriberStats>,
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
            closed: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            stats: Arc::new(SubscriberStats::default()),
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

        let sub_token = self.closed.child_token();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let sub = Arc::new(Shared {
            conn: self.conn.clone(),
            origin: origin.clone(),
            capacity: InFlight::new(options.max_in_flight_value()),
            ledger: ledger.clone(),
            ops: ops_tx,
            blocked_client: AtomicI64::new(0),
            closed: self.closed.clone(),
        });
        let flusher = Flusher {
            ledger,
            conn: self.conn.clone(),
            origin: origin.clone(),
            store: self.store.clone(),
            stats: self.stats.clone(),
            interval: self.options.ack_flush_interval,
        };
        let heartbeat = super::lease::Heartbeat {
            lease,
            shared: Arc::downgrade(&sub),
            interval: self.options.lease_ttl / 3,
        };
        {
            let mut tasks = self.tasks();
            tasks.retain(|t| !t.is_finished());
            tasks.push(tokio::spawn(flusher.run(ops_rx, self.closed.clone())));
            tasks.push(tokio::spawn(heartbeat.run(sub_token.clone())));
        }
        let reader = Reader {
            settler: sub.clone(),
            shared: sub,
            codec: self.options.codec.clone(),
            store: self.store.clone(),
            stats: self.stats.clone(),
            options,
            read_conn: None,
            drain_from: Some(EntryId::ZERO),
            autoclaim_cursor: EntryId::ZERO,
            next_reclaim: Instant::now(),
            buffer: VecDeque::new(),
            failures: 0,
            _stop: sub_token.drop_guard(),
        };
        Ok(Subscription::new(futures::stream::unfold(
            reader,
            |mut reader| async move {
                let item = reader.next().await?;
                Some((item, reader))
            },
        )))
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

/// Makes sure the group exists: created at the group's furthest checkpoint when it vanished,
/// else at the configured start; or `GroupNotFound` when creating is off.
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
        Ok(groups) => Ok(super::admin::group_names(groups)?.iter().any(|g| g == group)),
        // No such key: no stream, so no group either.
        Err(CommandError::Server(e)) if e.to_string().contains("no such key") => Ok(false),
        Err(e) => Err(e.into_error()),
    }
}

async fn create_group(
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

/// What one subscription knows of the entries it owns in Redis and must not hand out again
/// when it re-reads its pending list: held by a delivery, acked but not yet flushed, or
/// nacked and waiting to be retried.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Handed out and not settled, with the time they were last kept alive.
    pub(crate) held: HashMap<EntryId, Instant>,
    /// Acked by the handler; `XACK` not yet confirmed.
    acking: HashSet<EntryId>,
    /// Nacked, by due time, with the delivery count so far.
    retries: BTreeMap<(Instant, EntryId), u64>,
    retry_due: HashMap<EntryId, Instant>,
}

impl Ledger {
    fn is_ours(&self, id: &EntryId) -> bool {
        self.held.contains_key(id) || self.acking.contains(id) || self.retry_due.contains_key(id)
    }

    fn owned_count(&self) -> usize {
        self.held.len() + self.acking.len() + self.retry_due.len()
    }

    fn add_retry(&mut self, id: EntryId, due: Instant, count: u64) {
        self.retries.insert((due, id), count);
        self.retry_due.insert(id, due);
    }

    /// Up to `budget` retries due at `now`, with their delivery counts so far.
    fn take_due(&mut self, now: Instant, budget: usize) -> Vec<(EntryId, u64)> {
        let mut due = Vec::new();
        while due.len() < budget {
            match self.retries.first_key_value() {
                Some(((at, _), _)) if *at <= now => {
                    if let Some(((_, id), count)) = self.retries.pop_first() {
                        self.retry_due.remove(&id);
                        due.push((id, count));
                    }
                }
                _ => break,
            }
        }
        due
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.first_key_value().map(|((at, _), _)| *at)
    }
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// State one subscription shares with its deliveries (through [`Settler`]) and its tasks.
pub(crate) struct Shared {
    pub(crate) conn: RedisConnection,
    pub(crate) origin: Arc<Origin>,
    capacity: InFlight,
    /// Shared with the flusher, which clears acks once `XACK` succeeded.
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    ops: mpsc::UnboundedSender<Op>,
    /// The client id of the read connection while it is blocked in `XREADGROUP`, else 0.
    blocked_client: AtomicI64,
    closed: CancellationToken,
}

impl Shared {
    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Wakes the reader if it is blocked in `XREADGROUP`, so it sees new retries at once.
    fn wake_reader(&self) {
        let client = self.blocked_client.load(Ordering::Acquire);
        if client != 0 {
            let _ = self.ops.send(Op::Unblock(client));
        }
    }
}

impl Settler for Shared {
    fn settle(&self, info: &DeliveryInfo, settlement: Settlement) -> Result<()> {
        let id = info.id();
        let result = if self.closed.is_cancelled() {
            self.ledger().held.remove(&id);
            Err(Error::Closed("subscriber"))
        } else {
            match settlement {
                Settlement::Ack => {
                    {
                        let mut ledger = self.ledger();
                        ledger.held.remove(&id);
                        ledger.acking.insert(id);
                    }
                    self.ops.send(Op::Ack(id)).map_err(|_| {
                        self.ledger().acking.remove(&id);
                        Error::Closed("subscriber")
                    })
                }
                Settlement::Nack { delay } => {
                    {
                        let mut ledger = self.ledger();
                        ledger.held.remove(&id);
                        ledger.add_retry(id, Instant::now() + delay, info.delivery_count());
                    }
                    self.wake_reader();
                    Ok(())
                }
            }
        };
        self.capacity.release(1);
        result
    }

    fn release(&self, info: &DeliveryInfo) {
        self.ledger().held.remove(&info.id());
        self.capacity.release(1);
    }
}

/// Work for the flusher task.
enum Op {
    Ack(EntryId),
    Unblock(i64),
}

/// Sends acks in batches, records checkpoints, and unblocks the reader when asked.
struct Flusher {
    ledger: Arc<Mutex<Ledger>>,
    conn: RedisConnection,
    origin: Arc<Origin>,
    store: Option<Arc<dyn CheckpointStore>>,
    stats: Arc<SubscriberStats>,
    interval: Duration,
}

impl Flusher {
    async fn run(self, mut ops: mpsc::UnboundedReceiver<Op>, closed: CancellationToken) {
        let mut batch = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                _ = closed.cancelled() => None,
                op = ops.recv() => op,
            };
            let Some(first) = first else { break };
            self.take(first, &mut batch).await;
            let gather = tokio::time::sleep(self.interval);
            tokio::pin!(gather);
            while batch.len() < MAX_ACK_BATCH {
                tokio::select! {
                    biased;
                    _ = closed.cancelled() => break,
                    op = ops.recv() => match op {
                        Some(op) => self.take(op, &mut batch).await,
                        None => break,
                    },
                    _ = &mut gather => break,
                }
            }
            self.flush(&mut batch).await;
        }
        // Closed, or every sender is gone: take what was sent before, flush it, stop.
        ops.close();
        while let Ok(op) = ops.try_recv() {
            if let Op::Ack(id) = op {
                batch.push(id);
            }
        }
        self.flush(&mut batch).await;
        if !batch.is_empty() {
            tracing::error!(
                stream = self.origin.stream(),
                group = self.origin.group(),
                unacked = batch.len(),
                "acknowledgements could not be flushed on close; the entries stay pending and will be redelivered"
            );
        }
    }

    async fn take(&self, op: Op, batch: &mut Vec<EntryId>) {
        match op {
            Op::Ack(id) => batch.push(id),
            Op::Unblock(client) => {
                let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(client).clone();
                let result = self
                    .conn
                    .run("CLIENT UNBLOCK", |mut c| {
                        let cmd = unblock.clone();
                        async move { cmd.query_async::<Value>(&mut c).await }
                    })
                    .await;
                if let Err(e) = result {
                    // Without the right to unblock, the reader notices at the end of its BLOCK.
                    tracing::debug!(error = ?e, "CLIENT UNBLOCK failed");
                }
            }
        }
    }

    async fn flush(&self, batch: &mut Vec<EntryId>) {
        if batch.is_empty() {
            return;
        }
        let (stream, group) = (self.origin.stream(), self.origin.group());
        let mut xack = redis::cmd("XACK");
        xack.arg(stream).arg(group);
        for id in batch.iter() {
            xack.arg(id.to_string());
        }
        match self
            .conn
            .run_mapped("XACK", |mut c| {
                let cmd = xack.clone();
                async move { cmd.query_async::<u64>(&mut c).await }
            })
            .await
        {
            Ok(_) => {
                SubscriberStats::add(&self.stats.acked, batch.len() as u64);
                {
                    let mut ledger = lock(&self.ledger);
                    for id in batch.iter() {
                        ledger.acking.remove(id);
                    }
                }
                let furthest = batch.iter().max().copied();
                batch.clear();
                if let (Some(store), Some(id)) = (&self.store, furthest) {
                    let checkpoint = Checkpoint {
                        message_id: id,
                        timestamp: SystemTime::now(),
                    };
                    if let Err(e) = store
                        .save(stream, group, self.origin.consumer(), checkpoint)
                        .await
                    {
                        tracing::warn!(stream, group, error = %e, "checkpoint not saved");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(stream, group, pending = batch.len(), error = %e, "XACK failed; will try again");
            }
        }
    }
}

/// The read side of one subscription: the state behind its [`Subscription`] stream.
struct Reader {
    shared: Arc<Shared>,
    settler: Arc<dyn Settler>,
    codec: Arc<dyn Codec>,
    store: Option<Arc<dyn CheckpointStore>>,
    stats: Arc<SubscriberStats>,
    options: SubscribeOptions,
    read_conn: Option<(MultiplexedConnection, i64)>,
    /// Where the drain of this consumer's own pending list has got to; `None` once done.
    drain_from: Option<EntryId>,
    autoclaim_cursor: EntryId,
    next_reclaim: Instant,
    buffer: VecDeque<Delivery>,
    failures: u32,
    /// Stops the heartbeat and releases the lease when the subscription is dropped.
    _stop: DropGuard,
}

/// Entries fetched by one step of the reader, with their delivery counts.
type Fetched = Vec<(ReplyEntry, u64)>;

impl Reader {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.shared.closed.is_cancelled() {
                return None;
            }
            if let Some(d) = self.buffer.pop_front() {
                return Some(Ok(d));
            }
            let taken = tokio::select! {
                biased;
                _ = self.shared.closed.cancelled() => return None,
                n = self.shared.capacity.acquire(self.options.batch_size_value()) => n,
            };
            let closed = self.shared.closed.clone();
            let result = tokio::select! {
                biased;
                _ = closed.cancelled() => return None,
                r = self.fetch(taken) => r,
            };
            match result {
                Ok(used) => {
                    self.shared.capacity.release(taken - used);
                    self.failures = 0;
                }
                Err(e) => {
                    self.shared.capacity.release(taken);
                    if let Some(e) = self.after_error(e).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// Handles a failed step: reconnects and re-drains after connection trouble, re-creates a
    /// vanished group. Returns the error to yield once the retry budget is spent.
    async fn after_error(&mut self, e: ReadError) -> Option<Error> {
        SubscriberStats::add(&self.stats.read_errors, 1);
        self.read_conn = None;
        self.drain_from = Some(EntryId::ZERO);
        if let ReadError::Redis(e) = &e
            && e.code() == Some("NOGROUP")
        {
            {
                let (conn, origin) = (&self.shared.conn, &self.shared.origin);
                tracing::warn!(
                    stream = origin.stream(),
                    group = origin.group(),
                    "consumer group vanished; re-creating it"
                );
                let recreated = create_group(
                    conn,
                    self.store.as_deref(),
                    origin.stream(),
                    origin.group(),
                    self.options.start_from_value(),
                )
                .await;
                return recreated.err();
            }
        }
        let conn = &self.shared.conn;
        let delay = conn.backoff(self.failures);
        self.failures += 1;
        tracing::warn!(stream = self.shared.origin.stream(), error = %e, attempt = self.failures, "read failed; retrying");
        tokio::select! {
            _ = self.shared.closed.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        if self.failures > conn.max_retries() {
            self.failures = 0;
            return Some(match e {
                ReadError::Redis(e) => conn.connection_error("XREADGROUP", e, conn.max_retries()),
                ReadError::Other(e) => e,
            });
        }
        None
    }

    /// One step: due retries, else the drain of our pending list, else reclaim when due, else
    /// new entries. Turns what it got into deliveries; returns how many slots they use.
    async fn fetch(&mut self, budget: usize) -> std::result::Result<usize, ReadError> {
        let now = Instant::now();
        let due = self.take_due_retries(now, budget);
        let fetched = if !due.is_empty() {
            self.claim_retries(due).await?
        } else if let Some(from) = self.drain_from {
            let entries = self.read_group(budget, &from.to_string(), None).await?;
            match entries.last() {
                None => self.drain_from = None,
                Some(last) => self.drain_from = Some(last.id()),
            }
            self.with_counts(entries).await?
        } else if let Some(reclaim) = self.options.reclaim_value().filter(|_| now >= self.next_reclaim) {
            self.next_reclaim = now + reclaim.interval;
            self.reclaim(reclaim, budget).await?
        } else {
            let block = self.block_for(now);
            let entries = self.read_group(budget, ">", Some(block)).await?;
            entries.into_iter().map(|e| (e, 1)).collect()
        };
        self.admit(fetched).await
    }

    /// How long the next blocking read may wait: `block`, but no longer than until the next
    /// retry or reclaim is due.
    fn block_for(&self, now: Instant) -> Duration {
        let mut until = now + self.options.block_value();
        if let Some(at) = self.shared.ledger().next_retry() {
            until = until.min(at);
        }
        if self.options.reclaim_value().is_some() {
            until = until.min(self.next_reclaim);
        }
        until.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn take_due_retries(&self, now: Instant, budget: usize) -> Vec<(EntryId, u64)> {
        self.shared.ledger().take_due(now, budget)
    }

    async fn read_conn(&mut self) -> std::result::Result<&mut MultiplexedConnection, ReadError> {
        if self.read_conn.is_none() {
            let timeout = self.options.block_value() + Duration::from_secs(10);
            let mut conn = self
                .shared
                .conn
                .dedicated(timeout)
                .await
                .map_err(ReadError::Other)?;
            let client_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await?;
            self.read_conn = Some((conn, client_id));
        }
        Ok(&mut self.read_conn.as_mut().expect("just set").0)
    }

    async fn read_group(
        &mut self,
        count: usize,
        from: &str,
        block: Option<Duration>,
    ) -> std::result::Result<Vec<ReplyEntry>, ReadError> {
        let origin = self.shared.origin.clone();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(origin.group())
            .arg(origin.consumer())
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(origin.stream()).arg(from);
        let client_id = self.read_conn_id().await?;
        let shared = self.shared.clone();
        let conn = self.read_conn().await?;
        if block.is_some() {
            shared.blocked_client.store(client_id, Ordering::Release);
        }
        let reply = cmd.query_async::<Value>(conn).await;
        shared.blocked_client.store(0, Ordering::Release);
        Ok(codec::parse_read_reply(reply?)?)
    }

    async fn read_conn_id(&mut self) -> std::result::Result<i64, ReadError> {
        self.read_conn().await?;
        Ok(self.read_conn.as_ref().map_or(0, |(_, id)| *id))
    }

    /// Delivery counts of entries re-read from the pending list (Redis does not put them in
    /// the read reply).
    async fn with_counts(&mut self, entries: Vec<ReplyEntry>) -> std::result::Result<Fetched, ReadError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        let origin = &self.shared.origin;
        let limit = entries.len() + self.shared.ledger().owned_count();
        let rows: Value = redis::cmd("XPENDING")
            .arg(origin.stream())
            .arg(origin.group())
            .arg(first.id().to_string())
            .arg(last.id().to_string())
            .arg(limit)
            .arg(origin.consumer())
            .query_async(self.read_conn().await?)
            .await?;
        let counts: HashMap<EntryId, u64> = codec::parse_pending_rows(rows)?
            .into_iter()
            .map(|row| (row.id, row.delivery_count))
            .collect();
        Ok(entries
            .into_iter()
            .map(|e| {
                let count = counts.get(&e.id()).copied().unwrap_or(1);
                (e, count)
            })
            .collect())
    }

    async fn claim_retries(&mut self, due: Vec<(EntryId, u64)>) -> std::result::Result<Fetched, ReadError> {
        let origin = self.shared.origin.clone();
        let mut invocation = scripts::CLAIM_OWN.key(origin.stream());
        invocation.arg(origin.group()).arg(origin.consumer());
        for (id, _) in &due {
            invocation.arg(id.to_string());
        }
        let reply: Value = invocation.invoke_async(self.read_conn().await?).await?;
        let mut fetched = Vec::new();
        for item in codec_array(reply)? {
            let mut parts = codec_array(item)?.into_iter();
            let (Some(entry), Some(count)) = (parts.next(), parts.next()) else {
                continue;
            };
            let count = match count {
                Value::Int(n) => n,
                _ => -1,
            };
            if count < 0 {
                fetched.push((ReplyEntry::Trimmed(codec::entry_id(entry)?), 0));
            } else {
                let mut entries = codec::parse_entries(Value::Array(vec![entry]))?;
                if let Some(e) = entries.pop() {
                    fetched.push((e, count as u64));
                }
            }
        }
        Ok(fetched)
    }

    /// Takes over entries of crashed consumers at once and entries idle past `min_idle`.
    async fn reclaim(
        &mut self,
        reclaim: ReclaimOptions,
        budget: usize,
    ) -> std::result::Result<Fetched, ReadError> {
        let origin = self.shared.origin.clone();
        let (stream, group, me) = (origin.stream(), origin.group(), origin.consumer());
        let mut fetched = Vec::new();

        let crashed: Vec<(String, i64)> = scripts::CRASHED_CONSUMERS
            .key(stream)
            .key(keys::leased_consumers(stream, group))
            .arg(group)
            .arg(me)
            .arg(keys::lease(stream, group, ""))
            .invoke_async(self.read_conn().await?)
            .await?;
        for (name, pending) in crashed {
            SubscriberStats::add(&self.stats.crashed_consumers, 1);
            let report = Error::ConsumerCrashed {
                stream: stream.to_owned(),
                group: group.to_owned(),
                consumer: name.clone(),
                pending: pending.max(0) as u64,
            };
            tracing::warn!(error = %report, "taking over the entries of a crashed consumer");
            let want = budget - fetched.len();
            if want == 0 {
                break;
            }
            let rows: Value = redis::cmd("XPENDING")
                .arg(stream)
                .arg(group)
                .arg("-")
                .arg("+")
                .arg(want)
                .arg(&name)
                .query_async(self.read_conn().await?)
                .await?;
            let rows = codec::parse_pending_rows(rows)?;
            if rows.is_empty() {
                continue;
            }
            let mut claim = redis::cmd("XCLAIM");
            claim.arg(stream).arg(group).arg(me).arg(0);
            for row in &rows {
                claim.arg(row.id.to_string());
            }
            let claimed = codec::parse_entries(claim.query_async(self.read_conn().await?).await?)?;
            let counts: HashMap<EntryId, u64> = rows.iter().map(|r| (r.id, r.delivery_count + 1)).collect();
            let claimed_ids: Vec<EntryId> = claimed.iter().map(ReplyEntry::id).collect();
            for row in rows.iter().filter(|r| !claimed_ids.contains(&r.id)) {
                // XCLAIM drops entries that no longer exist from the pending list.
                fetched.push((ReplyEntry::Trimmed(row.id), row.delivery_count));
            }
            fetched.extend(claimed.into_iter().map(|e| {
                let count = counts.get(&e.id()).copied().unwrap_or(1);
                (e, count)
            }));
        }

        let want = budget.saturating_sub(fetched.len());
        if want > 0 {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(group)
                .arg(me)
                .arg(reclaim.min_idle.as_millis() as u64)
                .arg(self.autoclaim_cursor.to_string())
                .arg("COUNT")
                .arg(want)
                .query_async(self.read_conn().await?)
                .await?;
            let (cursor, claimed, deleted) = codec::parse_autoclaim_reply(reply)?;
            self.autoclaim_cursor = cursor;
            let claimed = self.with_counts(claimed).await?;
            fetched.extend(claimed);
            fetched.extend(deleted.into_iter().map(|id| (ReplyEntry::Trimmed(id), 0)));
        }
        let reclaimed = fetched
            .iter()
            .filter(|(e, _)| matches!(e, ReplyEntry::Present(_)))
            .count();
        SubscriberStats::add(&self.stats.reclaimed, reclaimed as u64);
        Ok(fetched)
    }

    /// Turns fetched entries into deliveries: skips entries this subscription holds already,
    /// dead-letters the undecodable, the trimmed and those past `max_deliveries`.
    async fn admit(&mut self, fetched: Fetched) -> std::result::Result<usize, ReadError> {
        let max = self.options.max_deliveries_value();
        let mut used = 0;
        let mut dead: Vec<(EntryId, Message)> = Vec::new();
        for (entry, count) in fetched {
            let id = entry.id();
            if self.shared.ledger().is_ours(&id) {
                continue;
            }
            let origin = &self.shared.origin;
            let record = |reason, delivered| dead_letter_of(origin, id, reason, delivered);
            match entry {
                ReplyEntry::Trimmed(_) => {
                    SubscriberStats::add(&self.stats.trimmed_pending, 1);
                    tracing::warn!(stream = origin.stream(), group = origin.group(), %id,
                        "pending entry was trimmed from the stream before it was acknowledged");
                    let r = record("trimmed from the stream while pending", count.saturating_sub(1))
                        .for_trimmed();
                    dead.push((id, r));
                }
                ReplyEntry::Present(raw) => {
                    let fields = raw.fields.clone();
                    match self.codec.decode(raw) {
                        Err(e) => {
                            SubscriberStats::add(&self.stats.undecodable, 1);
                            dead.push((id, record(&e.to_string(), count).for_undecodable(&fields)));
                        }
                        Ok(message) if count > max => {
                            let reason = format!("delivered {} times, the limit is {max}", count - 1);
                            dead.push((id, record(&reason, count - 1).for_message(&message)));
                        }
                        Ok(message) => {
                            self.shared.ledger().held.insert(id, Instant::now());
                            let info = DeliveryInfo::new(id, count, origin.clone());
                            self.buffer
                                .push_back(Delivery::new(message, info, self.settler.clone()));
                            used += 1;
                        }
                    }
                }
            }
        }
        for (id, record) in dead {
            self.dead_letter(id, record).await?;
        }
        Ok(used)
    }

    /// Writes `record` to `<stream>-dead`, then acknowledges `id` in the source; if the write
    /// fails the entry stays pending. (An entry the server already dropped from the pending
    /// list, seen trimmed through `XAUTOCLAIM`, needs no ack; acking it is harmless.)
    async fn dead_letter(&mut self, id: EntryId, record: Message) -> std::result::Result<(), ReadError> {
        let origin = self.shared.origin.clone();
        let fields = self.codec.encode(&record).map_err(ReadError::Other)?;
        let dead_stream = dead_letter::stream_for(origin.stream());
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&dead_stream).arg("*");
        for (name, value) in &fields {
            xadd.arg(*name).arg(&value[..]);
        }
        self.shared
            .conn
            .run_mapped("dead-letter XADD", |mut c| {
                let cmd = xadd.clone();
                async move { cmd.query_async::<Value>(&mut c).await }
            })
            .await
            .map_err(ReadError::Other)?;
        let xack = redis::cmd("XACK")
            .arg(origin.stream())
            .arg(origin.group())
            .arg(id.to_string())
            .clone();
        self.shared
            .conn
            .run_mapped("dead-letter XACK", |mut c| {
                let cmd = xack.clone();
                async move { cmd.query_async::<u64>(&mut c).await }
            })
            .await
            .map_err(ReadError::Other)?;
        SubscriberStats::add(&self.stats.dead_lettered, 1);
        tracing::warn!(stream = origin.stream(), group = origin.group(), %id,
            reason = record.metadata().get(dead_letter::keys::REASON).unwrap_or(""), "dead-lettered");
        Ok(())
    }
}

fn dead_letter_of<'a>(origin: &'a Origin, id: EntryId, reason: &'a str, delivered: u64) -> DeadLetter<'a> {
    DeadLetter {
        reason,
        original_id: id,
        stream: origin.stream(),
        group: origin.group(),
        delivery_count: delivered,
    }
}

fn codec_array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(Error::Decode {
            what: "redis reply".into(),
            reason: format!("expected an array, got {other:?}"),
        }),
    }
}

/// Why a reader step failed.
#[derive(Debug)]
enum ReadError {
    Redis(redis::RedisError),
    Other(Error),
}

impl From<redis::RedisError> for ReadError {
    fn from(e: redis::RedisError) -> Self {
        ReadError::Redis(e)
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Other(e)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Redis(e) if is_transient(e) => write!(f, "connection trouble: {e}"),
            ReadError::Redis(e) => e.fmt(f),
            ReadError::Other(e) => e.fmt(f),
        }
    }
}
