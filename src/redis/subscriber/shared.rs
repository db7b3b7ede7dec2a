//! What one subscription shares between its reader, its deliveries (through [`Settler`]), its
//! flusher and its heartbeat: the ledger of entries it owns, the in-flight limit, and the
//! channel to the flusher.

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
use crate::pubsub::InFlight;
use crate::redis::connection::RedisConnection;

/// What one subscription knows of the entries it owns in Redis and must not hand out again
/// when it re-reads its pending list: held by a delivery, acked but not yet flushed, or
/// nacked and waiting to be retried.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Handed out and not settled, with the time they were last kept alive.
    pub(crate) held: HashMap<EntryId, Instant>,
    /// Acked by the handler; `XACK` not yet confirmed.
    pub(crate) acking: HashSet<EntryId>,
    /// Nacked, by due time, with the delivery count so far.
    retries: BTreeMap<(Instant, EntryId), u64>,
    pub(crate) retry_due: HashMap<EntryId, Instant>,
    /// Given up on, with a dead-letter record that could not be written yet (retried).
    pub(crate) dead_lettering: HashSet<EntryId>,
}

impl Ledger {
    pub(crate) fn is_ours(&self, id: &EntryId) -> bool {
        self.held.contains_key(id)
            || self.acking.contains(id)
            || self.retry_due.contains_key(id)
            || self.dead_lettering.contains(id)
    }

    /// The oldest entry this subscription still owns (held, acking or waiting to retry).
    pub(crate) fn oldest_owned(&self) -> Option<EntryId> {
        let held = self.held.keys().min();
        let acking = self.acking.iter().min();
        let retrying = self.retry_due.keys().min();
        [held, acking, retrying].into_iter().flatten().min().copied()
    }

    pub(crate) fn add_retry(&mut self, id: EntryId, due: Instant, count: u64) {
        self.retries.insert((due, id), count);
        self.retry_due.insert(id, due);
    }

    /// Up to `budget` retries due at `now`, with their delivery counts so far.
    pub(crate) fn take_due(&mut self, now: Instant, budget: usize) -> Vec<(EntryId, u64)> {
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

    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.retries.first_key_value().map(|((at, _), _)| *at)
    }
}

pub(crate) fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// Work for the flusher task.
pub(crate) enum Op {
    Ack(EntryId),
    /// Write `record` to the dead-letter stream and ack `id`, in one step.
    DeadLetter {
        id: EntryId,
        record: Message,
    },
    /// Before entries from `EntryId` on are taken over: keep the checkpoint below it, and
    /// answer once saved (so that a crash right after the claim leaves no checkpoint past
    /// an entry this consumer holds); no save passes it until `ClaimsDone`.
    Lower(EntryId, tokio::sync::oneshot::Sender<Result<()>>),
    /// The claims prepared by `Lower` are done (what they took is in the pending list).
    ClaimsDone,
    Unblock(i64),
    /// Answer once every ack and dead letter sent before this is written (or could not be).
    Flush(tokio::sync::oneshot::Sender<Result<()>>),
}

/// State one subscription shares with its deliveries and its tasks.
pub(crate) struct Shared {
    pub(crate) conn: RedisConnection,
    pub(crate) origin: Arc<Origin>,
    pub(crate) capacity: InFlight,
    /// Shared with the flusher, which clears acks once `XACK` succeeded.
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    pub(crate) ops: mpsc::UnboundedSender<Op>,
    /// The client id of the read connection while it is blocked in `XREADGROUP`, else 0.
    pub(crate) blocked_client: AtomicI64,
    /// The subscriber was closed.
    pub(crate) closed: Signal,
    /// Cancelled when the last user of this state (reader or delivery) is gone: the heartbeat
    /// then releases the lease.
    pub(crate) released: Signal,
    /// No reclaim before this time: set when this consumer's lease had run out (an outage or
    /// a pause cut it off, and perhaps everyone), so that the others get one lease TTL to
    /// renew theirs and touch their entries before any is taken for crashed.
    pub(crate) reclaim_after: Mutex<Option<Instant>>,
}

impl Shared {
    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Holds reclaim back for `ttl` from now.
    pub(crate) fn hold_back_reclaim(&self, ttl: std::time::Duration) {
        let until = Instant::now() + ttl;
        let mut after = self.reclaim_after.lock().unwrap_or_else(|p| p.into_inner());
        *after = Some(after.map_or(until, |at| at.max(until)));
    }

    /// When reclaim may run again, if it is held back.
    pub(crate) fn reclaim_held_until(&self, now: Instant) -> Option<Instant> {
        let after = *self.reclaim_after.lock().unwrap_or_else(|p| p.into_inner());
        after.filter(|at| *at > now)
    }

    /// Hands `record` to the flusher, which writes it to `<stream>-dead` and acks `id` in one
    /// step (retrying while that fails); meanwhile the entry stays this subscription's.
    /// `Err` when the flusher is gone (closed): the entry stays pending.
    pub(crate) fn dead_letter(&self, id: EntryId, record: Message) -> std::result::Result<(), ()> {
        self.ledger().dead_lettering.insert(id);
        self.ops.send(Op::DeadLetter { id, record }).map_err(|_| {
            self.ledger().dead_lettering.remove(&id);
        })
    }

    /// Wakes the reader if it is blocked in `XREADGROUP`, so it sees new retries at once.
    fn wake_reader(&self) {
        let client = self.blocked_client.load(Ordering::Acquire);
        if client != 0 {
            let _ = self.ops.send(Op::Unblock(client));
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
                    self.ledger().held.remove(&id);
                    self.dead_letter(id, record).map_err(|()| closed)
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

/// Logs a warning the first time, then the same warning again only with how often it came
/// meanwhile (at most every [`RepeatedWarnings::EVERY`]): a fault that persists does not
/// flood the log.
#[derive(Default)]
pub(crate) struct RepeatedWarnings {
    last: Option<(String, Instant)>,
    repeats: u64,
}

impl RepeatedWarnings {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub(crate) fn warn(&mut self, stream: &str, message: &str) {
        let now = Instant::now();
        match &self.last {
            Some((last, at)) if last == message && now.duration_since(*at) < Self::EVERY => {
                self.repeats += 1;
            }
            Some((last, _)) if last == message => {
                tracing::warn!(stream, repeated = self.repeats + 1, "{message}");
                self.last = Some((message.to_owned(), now));
                self.repeats = 0;
            }
            _ => {
                if self.repeats > 0 {
                    tracing::warn!(
                        stream,
                        repeated = self.repeats,
                        "(the warning before this one came again)"
                    );
                }
                tracing::warn!(stream, "{message}");
                self.last = Some((message.to_owned(), now));
                self.repeats = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::RepeatedWarnings;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_repeated_warning_is_logged_once_then_with_its_count() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut log = RepeatedWarnings::default();
            for _ in 0..1000 {
                log.warn("s", "read failed: connection refused");
            }
            log.warn("s", "consumer group vanished");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("read failed: connection refused"), "{text}");
        assert!(lines[1].contains("repeated=999"), "{text}");
        assert!(lines[2].contains("consumer group vanished"), "{text}");
    }
}
