//! What one subscription shares between its reader, its deliveries (through [`Settler`]), its
//! flusher and its heartbeat: the [`Ledger`] of entries it owns, the in-flight limit, the
//! channel to the flusher ([`Op`]), the hold on reclaim, and how deliveries are settled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::dead_letter::DeadLetter;
use crate::delivery::{DeliveryInfo, Origin, SettleError, Settlement, Settler};
use crate::error::Result;
use crate::message::{EntryId, Message};
use crate::metrics::DeadLetterReason;
use crate::pubsub::InFlight;
use crate::redis::connection::RedisConnection;

/// The flusher is gone (the subscriber closed): what was to be sent to it stays undone.
#[derive(Debug)]
pub(super) struct FlusherGone;

/// What one subscription knows of the entries it owns in Redis and must not hand out again
/// when it re-reads its pending list: held by a delivery, acked but not yet flushed, or
/// nacked and waiting to be retried.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Handed out and not settled, with the time they were last kept alive.
    pub(super) held: HashMap<EntryId, Instant>,
    /// Acked by the handler; `XACK` not yet confirmed.
    pub(super) acking: HashSet<EntryId>,
    /// Nacked, by due time, with the delivery count so far.
    retries: BTreeMap<(Instant, EntryId), u64>,
    pub(super) retry_due: HashMap<EntryId, Instant>,
    /// Given up on, with a dead-letter record that could not be written yet (retried).
    pub(super) dead_lettering: HashSet<EntryId>,
}

impl Ledger {
    pub(super) fn is_ours(&self, id: &EntryId) -> bool {
        self.held.contains_key(id)
            || self.acking.contains(id)
            || self.retry_due.contains_key(id)
            || self.dead_lettering.contains(id)
    }

    /// The oldest entry this subscription still owns (held, acking or waiting to retry).
    pub(super) fn oldest_owned(&self) -> Option<EntryId> {
        let held = self.held.keys().min();
        let acking = self.acking.iter().min();
        let retrying = self.retry_due.keys().min();
        [held, acking, retrying].into_iter().flatten().min().copied()
    }

    pub(super) fn add_retry(&mut self, id: EntryId, due: Instant, count: u64) {
        self.retries.insert((due, id), count);
        self.retry_due.insert(id, due);
    }

    /// Up to `budget` retries due at `now`, with their delivery counts so far.
    pub(super) fn take_due(&mut self, now: Instant, budget: usize) -> Vec<(EntryId, u64)> {
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

    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.first_key_value().map(|((at, _), _)| *at)
    }
}

pub(super) use crate::lock;

/// Work for the flusher task.
pub(super) enum Op {
    Ack(EntryId),
    /// Write `record` to the dead-letter stream and ack `id`, in one step.
    DeadLetter {
        id: EntryId,
        record: Message,
        /// Why the subscription gave the entry up (`None`: a handler dead-lettered it).
        reason: Option<DeadLetterReason>,
    },
    /// Before entries from `EntryId` on are taken over: keep the checkpoint below it, and
    /// answer once saved (so that a crash right after the claim leaves no checkpoint past
    /// an entry this consumer holds); no save passes it until `ClaimsDone`.
    Lower(EntryId, tokio::sync::oneshot::Sender<Result<()>>),
    /// The claims prepared by `Lower` are done (what they took is in the pending list).
    ClaimsDone,
    /// Unblock the read connection of this client id, on this cluster node (`None`: on the
    /// one server).
    Unblock(i64, Option<Arc<(String, u16)>>),
    /// Answer once every ack and dead letter sent before this is written (or could not be).
    Flush(tokio::sync::oneshot::Sender<Result<()>>),
}

/// State one subscription shares with its deliveries and its tasks.
pub(super) struct Shared {
    conn: RedisConnection,
    origin: Arc<Origin>,
    capacity: InFlight,
    /// Shared with the flusher, which clears acks once `XACK` succeeded.
    ledger: Arc<Mutex<Ledger>>,
    ops: mpsc::UnboundedSender<Op>,
    /// The client id of the read connection while it is blocked in `XREADGROUP`, else 0.
    blocked_client: AtomicI64,
    /// The cluster node of the read connection (`None` on a single server).
    read_node: Mutex<Option<Arc<(String, u16)>>>,
    /// The subscription ended: the subscriber closed, or the subscription was abandoned.
    closed: Signal,
    /// Cancelled when the last user of this state (reader or delivery) is gone: the heartbeat
    /// then releases the lease.
    released: Signal,
    /// No reclaim before this time: set when this consumer's lease had run out (an outage or
    /// a pause cut it off, and perhaps everyone), so that the others get one lease TTL to
    /// renew theirs and touch their entries before any is taken for crashed.
    reclaim_after: Mutex<Option<Instant>>,
    /// What the reader and the heartbeat tell of the subscription's health.
    health: Arc<super::health::ReadHealth>,
}

impl Shared {
    /// The state of the subscription of `origin`: at most `capacity` deliveries out, its
    /// entries in `ledger`, writes through `ops` to its flusher. `closed` ends it (the
    /// subscriber's close, or this subscription's abandonment); `released` is cancelled when
    /// this state is dropped.
    pub(super) fn new(
        conn: RedisConnection,
        origin: Arc<Origin>,
        capacity: InFlight,
        ledger: Arc<Mutex<Ledger>>,
        ops: mpsc::UnboundedSender<Op>,
        closed: Signal,
        released: Signal,
    ) -> Self {
        Shared {
            conn,
            origin,
            capacity,
            ledger,
            ops,
            blocked_client: AtomicI64::new(0),
            read_node: Mutex::new(None),
            closed,
            released,
            reclaim_after: Mutex::new(None),
            health: Arc::default(),
        }
    }

    /// The subscriber's connection.
    pub(super) fn conn(&self) -> &RedisConnection {
        &self.conn
    }

    /// What the reader and the heartbeat tell of the subscription's health.
    pub(super) fn health(&self) -> &Arc<super::health::ReadHealth> {
        &self.health
    }

    /// The stream, group and consumer of this subscription.
    pub(super) fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }

    /// The slots of `max_in_flight`: taken for each read, given back as deliveries settle.
    pub(super) fn capacity(&self) -> &InFlight {
        &self.capacity
    }

    /// Cancelled when the subscription ends: the subscriber closes, or abandons it.
    pub(super) fn closed(&self) -> &Signal {
        &self.closed
    }

    /// The ledger of what this subscription owns, locked.
    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Sends `op` to the flusher.
    pub(super) fn send_to_flusher(&self, op: Op) -> std::result::Result<(), FlusherGone> {
        self.ops.send(op).map_err(|_| FlusherGone)
    }

    /// Records that the read connection `client` is blocked in `XREADGROUP` (`None`: no
    /// longer), so that a nack can wake it.
    pub(super) fn set_blocked_client(&self, client: Option<i64>) {
        self.blocked_client.store(client.unwrap_or(0), Ordering::Release);
    }

    /// Records the cluster node the read connection just opened to.
    pub(super) fn set_read_node(&self, node: Option<&(String, u16)>) {
        *self.read_node.lock().unwrap_or_else(|p| p.into_inner()) = node.cloned().map(Arc::new);
    }

    /// Holds reclaim back for `ttl` from now.
    pub(super) fn hold_back_reclaim(&self, ttl: std::time::Duration) {
        let until = Instant::now() + ttl;
        let mut after = self.reclaim_after.lock().unwrap_or_else(|p| p.into_inner());
        *after = Some(after.map_or(until, |at| at.max(until)));
    }

    /// When reclaim may run again, if it is held back.
    pub(super) fn reclaim_held_until(&self, now: Instant) -> Option<Instant> {
        let after = *self.reclaim_after.lock().unwrap_or_else(|p| p.into_inner());
        after.filter(|at| *at > now)
    }

    /// Hands `record` to the flusher, which writes it to `{<stream>}-dead` and acks `id` in one
    /// step (retrying while that fails); meanwhile the entry stays this subscription's.
    /// `Err` when the flusher is gone (closed): the entry stays pending.
    pub(super) fn dead_letter(
        &self,
        id: EntryId,
        record: Message,
        reason: Option<DeadLetterReason>,
    ) -> std::result::Result<(), FlusherGone> {
        self.ledger().dead_lettering.insert(id);
        self.send_to_flusher(Op::DeadLetter { id, record, reason })
            .inspect_err(|_| {
                self.ledger().dead_lettering.remove(&id);
            })
    }

    /// Wakes the reader if it is blocked in `XREADGROUP`, so it sees new retries at once.
    fn wake_reader(&self) {
        let client = self.blocked_client.load(Ordering::Acquire);
        if client != 0 {
            let node = self.read_node.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let _ = self.ops.send(Op::Unblock(client, node));
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.released.cancel();
    }
}

impl Settler for Shared {
    fn settle(
        &self,
        info: &DeliveryInfo,
        message: &Message,
        settlement: Settlement,
    ) -> Result<(), SettleError> {
        let id = info.id();
        let closed = SettleError::Closed { id };
        let result = if self.closed.is_cancelled() {
            self.ledger().held.remove(&id);
            Err(closed)
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
                        closed
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
                Settlement::DeadLetter { reason } => {
                    let record = DeadLetter {
                        reason: &reason,
                        original_id: id,
                        stream: self.origin.stream(),
                        group: self.origin.group(),
                        delivery_count: info.delivery_count(),
                    }
                    .for_message(message);
                    // Dead-lettering before it is no longer held: never in neither set.
                    let handed = self.dead_letter(id, record, None);
                    self.ledger().held.remove(&id);
                    handed.map_err(|FlusherGone| closed)
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
