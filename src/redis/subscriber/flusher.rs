//! The flusher task of a subscription: the one place where its settlements are written to
//! Redis. Acks go out as multi-id `XACK`s. A batch is sent as soon as the previous one
//! returned, with every ack that queued meanwhile (so batches grow with the load and few acks
//! wait unflushed), or after an optional gathering interval. Dead letters (from handlers and
//! from the reader alike) are written with their `XACK` in one script step. What failed is
//! retried on a timer. The checkpoint is saved at most every 100 ms and on close. The flusher
//! also unblocks the reader's blocking read when a nack needs it awake.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::signal::Signal;
use redis::Value;
use tokio::sync::mpsc;

use super::lease::Lease;
use super::shared::{Ledger, Op, lock};
use super::stats::SubscriberStats;
use super::warnings::RepeatedWarnings;
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::codec::Codec;
use crate::dead_letter;
use crate::delivery::Origin;
use crate::message::{EntryId, Message};
use crate::metrics::DeadLetterReason;
use crate::redis::connection::RedisConnection;
use crate::redis::scripts;

/// Most ids in one `XACK`.
const MAX_ACK_BATCH: usize = 1000;

/// How often at most the checkpoint is saved while acks flow (it is saved on close too).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// How long the flusher waits for a `CLIENT UNBLOCK` to be answered.
const UNBLOCK_WAIT: Duration = Duration::from_secs(1);

/// The flusher of one subscription: what it has to write, and what it wrote.
pub(super) struct Flusher {
    ledger: Arc<Mutex<Ledger>>,
    conn: RedisConnection,
    origin: Arc<Origin>,
    store: Option<Arc<dyn CheckpointStore>>,
    stats: Arc<SubscriberStats>,
    /// Encodes dead-letter records.
    codec: Arc<dyn Codec>,
    /// Dead letters not written yet, oldest first (their entries are in the ledger's
    /// `dead_lettering` until written).
    /// Records to write, with why the subscription gave their entries up (`None`: a handler's
    /// dead letter, which the router counts).
    dead_letters: Vec<(EntryId, Message, Option<DeadLetterReason>)>,
    /// The dead letters counted once written.
    metrics: crate::metrics::SubscriptionMetrics,
    /// After a failed dead-letter write: when to try again, and what failed. No write is
    /// tried before (a record that failed would fail again on every ack written meanwhile).
    dead_letter_retry: Option<(tokio::time::Instant, String)>,
    dead_letter_failures: u32,
    /// A dead letter came in since the last write: no gathering of acks holds it back.
    dead_letter_waiting: bool,
    /// A dead letter dropped because its record cannot be encoded, not yet told to a `flush`.
    not_encoded: Option<String>,
    interval: Duration,
    /// The highest id acked so far, and the checkpoint last saved.
    acked_up_to: Option<EntryId>,
    saved: Option<EntryId>,
    saved_at: Option<tokio::time::Instant>,
    /// Acks were confirmed since the checkpoint was last saved (held back by the rate limit).
    checkpoint_behind: bool,
    /// Warnings, each repeated one logged with a count.
    log: RepeatedWarnings,
    /// While claims run: no checkpoint above this (see `Op::Lower`).
    floor: Option<EntryId>,
    /// `flush` calls waiting for the acks sent before them to be written.
    flush_waiters: Vec<tokio::sync::oneshot::Sender<crate::Result<()>>>,
    /// Acks are written only while this lease is still the subscription's (a partition's).
    fence: Option<Lease>,
}

enum Wake {
    Op(Op),
    Retry,
    Checkpoint,
    Stop,
}

impl Flusher {
    /// The flusher of the subscription of `origin`, whose `ledger` it clears as writes
    /// succeed; checkpoints go to `store` (none: not kept), dead-letter records are encoded
    /// with `codec`, acks gather for `interval` (zero: sent as soon as the last `XACK` returned).
    pub(super) fn new(
        ledger: Arc<Mutex<Ledger>>,
        conn: RedisConnection,
        origin: Arc<Origin>,
        store: Option<Arc<dyn CheckpointStore>>,
        stats: Arc<SubscriberStats>,
        codec: Arc<dyn Codec>,
        interval: Duration,
    ) -> Self {
        let metrics = crate::metrics::SubscriptionMetrics::new(origin.stream(), origin.group());
        Flusher {
            metrics,
            ledger,
            conn,
            origin,
            store,
            stats,
            codec,
            dead_letters: Vec::new(),
            dead_letter_retry: None,
            dead_letter_failures: 0,
            dead_letter_waiting: false,
            not_encoded: None,
            interval,
            acked_up_to: None,
            saved: None,
            saved_at: None,
            checkpoint_behind: false,
            log: RepeatedWarnings::default(),
            floor: None,
            flush_waiters: Vec::new(),
            fence: None,
        }
    }

    /// Writes acks only while `lease` holds (none: always).
    pub(super) fn fenced(mut self, lease: Option<Lease>) -> Self {
        self.fence = lease;
        self
    }

    /// Takes `ops` until `closed` or every sender is gone, then writes what was sent before
    /// and saves the checkpoint.
    pub(super) async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>, closed: Signal) {
        let mut batch = Vec::new();
        let mut failures = 0;
        loop {
            let retry_in = self.conn.backoff(failures);
            let dead_letter_retry_at = self.dead_letter_retry.as_ref().map(|(at, _)| *at);
            // A checkpoint held back by the rate limit is saved when the limit allows.
            let checkpoint_at = self.saved_at.map(|t| t + CHECKPOINT_EVERY);
            let wake = tokio::select! {
                biased;
                _ = closed.cancelled() => Wake::Stop,
                op = ops.recv() => op.map_or(Wake::Stop, Wake::Op),
                _ = tokio::time::sleep(retry_in), if !batch.is_empty() => Wake::Retry,
                _ = sleep_until(dead_letter_retry_at), if !self.dead_letters.is_empty() => Wake::Retry,
                _ = sleep_until(checkpoint_at), if self.checkpoint_behind => Wake::Checkpoint,
            };
            match wake {
                Wake::Stop => break,
                Wake::Retry => {}
                Wake::Checkpoint => {
                    self.save_checkpoint(false).await;
                    continue;
                }
                Wake::Op(first) => {
                    self.take(first, &mut batch).await;
                    // What queued while the last XACK was on its way: the natural batch.
                    while batch.len() < MAX_ACK_BATCH {
                        match ops.try_recv() {
                            Ok(op) => self.take(op, &mut batch).await,
                            Err(_) => break,
                        }
                    }
                    let gather = tokio::time::sleep(self.interval);
                    tokio::pin!(gather);
                    while !self.interval.is_zero()
                        && batch.len() < MAX_ACK_BATCH
                        && self.flush_waiters.is_empty()
                        && !self.dead_letter_waiting
                    {
                        tokio::select! {
                            biased;
                            _ = closed.cancelled() => break,
                            op = ops.recv() => match op {
                                Some(op) => self.take(op, &mut batch).await,
                                None => break,
                            },
                            _ = &mut gather => break,
                        }
                        // Someone waits for what was acked, or a dead letter came in (its
                        // entry is neither recorded nor redeliverable until written): no more
                        // gathering.
                        if !self.flush_waiters.is_empty() || self.dead_letter_waiting {
                            break;
                        }
                    }
                }
            }
            let acked = self.flush(&mut batch).await;
            if acked.is_ok() {
                failures = 0;
            } else {
                failures += 1;
            }
            let dead_lettered = self.write_dead_letters(false).await;
            // A failed write spent the connection's retries already: tell who waits.
            let answer = unwritten(acked, dead_lettered);
            self.answer_flushes(answer.as_ref().err());
        }
        // Closed, or every sender is gone: take what was sent before, flush it, stop.
        ops.close();
        while let Ok(op) = ops.try_recv() {
            match op {
                Op::Ack(id) => batch.push(id),
                Op::DeadLetter { id, record, reason } => self.dead_letters.push((id, record, reason)),
                Op::Flush(waiter) => self.flush_waiters.push(waiter),
                // Closing: nothing more is taken over.
                Op::Lower(_, answer) => drop(answer),
                Op::ClaimsDone => self.floor = None,
                Op::Unblock(..) => {}
            }
        }
        let acked = self.flush(&mut batch).await;
        // One last attempt, whatever the backoff says.
        let last = unwritten(acked, self.write_dead_letters(true).await);
        self.answer_flushes(last.as_ref().err());
        self.save_checkpoint(true).await;
        if !batch.is_empty() {
            tracing::error!(
                stream = self.origin.stream(),
                group = self.origin.group(),
                unacked = batch.len(),
                "acknowledgements could not be flushed on close; the entries stay pending and will be redelivered"
            );
        }
        if !self.dead_letters.is_empty() {
            tracing::error!(
                stream = self.origin.stream(),
                group = self.origin.group(),
                records = self.dead_letters.len(),
                "dead-letter records could not be written on close; the entries stay pending and will be redelivered"
            );
        }
    }

    /// Answers every `flush` waiting: `None` once everything acked before it is written.
    /// A record that could not be encoded is told to the first `flush` that comes after it.
    fn answer_flushes(&mut self, error: Option<&String>) {
        if self.flush_waiters.is_empty() {
            return;
        }
        let not_encoded = self.not_encoded.take();
        let error = match (error, &not_encoded) {
            (Some(e), _) => Some(e),
            (None, lost) => lost.as_ref(),
        };
        for waiter in self.flush_waiters.drain(..) {
            let answer = match error {
                None => Ok(()),
                Some(e) => Err(crate::Error::connection(e.clone(), None)),
            };
            let _ = waiter.send(answer);
        }
    }

    async fn take(&mut self, op: Op, batch: &mut Vec<EntryId>) {
        match op {
            Op::Ack(id) => batch.push(id),
            Op::DeadLetter { id, record, reason } => {
                self.dead_letters.push((id, record, reason));
                self.dead_letter_waiting = true;
            }
            // Answered after the flush that follows: every ack sent before it is in the batch.
            Op::Flush(waiter) => self.flush_waiters.push(waiter),
            Op::Lower(below, answer) => {
                let _ = answer.send(self.lower_checkpoint(below).await);
            }
            Op::ClaimsDone => self.floor = None,
            Op::Unblock(client, node) => {
                let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(client).clone();
                // Best effort: a reader that is not woken notices at the end of its BLOCK, and
                // acks must not wait behind a node that is gone.
                let result = self
                    .conn
                    .once_on_node(node.as_deref(), &unblock, UNBLOCK_WAIT)
                    .await;
                if let Err(e) = result {
                    // Without the right to unblock, the reader notices at the end of its BLOCK.
                    tracing::debug!(error = ?e, "CLIENT UNBLOCK failed");
                }
            }
        }
    }

    /// Sends the batch as one `XACK`; the error (batch kept) when it failed.
    async fn flush(&mut self, batch: &mut Vec<EntryId>) -> crate::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (stream, group) = (self.origin.stream(), self.origin.group());
        if let Some(lease) = &self.fence {
            return self.flush_fenced(batch, lease.clone()).await;
        }
        let mut xack = redis::cmd("XACK");
        xack.arg(stream).arg(group);
        for id in batch.iter() {
            xack.arg(id.to_string());
        }
        let sent = self
            .conn
            .run_mapped_at("XACK", stream, |mut c| {
                let cmd = &xack;
                async move { cmd.query_async::<u64>(&mut c).await }
            })
            .await;
        if let Err(e) = sent {
            let message = format!("XACK of {} acks failed; will try again: {e}", batch.len());
            self.log.warn(stream, &message);
            return Err(e);
        }
        SubscriberStats::add(&self.stats.acked, batch.len() as u64);
        {
            let mut ledger = lock(&self.ledger);
            for id in batch.iter() {
                ledger.acking.remove(id);
            }
        }
        self.acked_up_to = self.acked_up_to.max(batch.iter().max().copied());
        batch.clear();
        self.save_checkpoint(false).await;
        Ok(())
    }

    /// [`flush`](Self::flush) through the fenced ack: when the lease went to another holder,
    /// the batch is dropped (its entries stay pending for that holder, who has them now).
    async fn flush_fenced(&mut self, batch: &mut Vec<EntryId>, lease: Lease) -> crate::Result<()> {
        let (stream, group) = (self.origin.stream(), self.origin.group());
        let mut call = scripts::FENCED_ACK.key(stream);
        call.key(lease.key()).arg(lease.token()).arg(group);
        for id in batch.iter() {
            call.arg(id.to_string());
        }
        let sent = self
            .conn
            .run_mapped("fenced XACK", |mut c| {
                let call = &call;
                async move { call.invoke_async::<i64>(&mut c).await }
            })
            .await;
        let acked = match sent {
            Ok(acked) => acked,
            Err(e) => {
                let message = format!("XACK of {} acks failed; will try again: {e}", batch.len());
                self.log.warn(stream, &message);
                return Err(e);
            }
        };
        {
            let mut ledger = lock(&self.ledger);
            for id in batch.iter() {
                ledger.acking.remove(id);
            }
        }
        if acked < 0 {
            tracing::error!(
                stream,
                group,
                refused = batch.len(),
                "acks refused: another consumer holds this consumer's lease now (the partition was handed on); it has these entries"
            );
            SubscriberStats::add(&self.stats.fenced, batch.len() as u64);
            batch.clear();
            return Ok(());
        }
        SubscriberStats::add(&self.stats.acked, batch.len() as u64);
        self.acked_up_to = self.acked_up_to.max(batch.iter().max().copied());
        batch.clear();
        self.save_checkpoint(false).await;
        Ok(())
    }

    /// Writes the waiting dead letters, oldest first: each record to `{<stream>}-dead` and the
    /// `XACK` of its entry, in one script step. The first failure stops the round: the rest
    /// stay queued (their entries pending) and nothing is tried again before the backoff
    /// after it has passed, unless `last_chance` (on close). `Err` says what is left unwritten.
    async fn write_dead_letters(&mut self, last_chance: bool) -> Result<(), String> {
        self.dead_letter_waiting = false;
        if self.dead_letters.is_empty() {
            self.dead_letter_retry = None;
            return Ok(());
        }
        if let Some((at, error)) = &self.dead_letter_retry
            && !last_chance
            && tokio::time::Instant::now() < *at
        {
            return Err(error.clone());
        }
        let origin = self.origin.clone();
        let (stream, group) = (origin.stream(), origin.group());
        let dead_stream = dead_letter::stream_for(stream);
        let mut written = Vec::new();
        let mut failed = None;
        let mut queue = std::mem::take(&mut self.dead_letters).into_iter();
        for (id, record, reason) in queue.by_ref() {
            let fields = match self.codec.encode(&record) {
                Ok(fields) => fields,
                Err(e) => {
                    // Retrying cannot help: the entry stays pending and is delivered again.
                    tracing::error!(stream, group, %id, error = %e, "dead-letter record cannot be encoded; the entry stays pending");
                    lock(&self.ledger).dead_lettering.remove(&id);
                    self.not_encoded = Some(format!(
                        "the dead-letter record of {id} cannot be encoded (the entry stays pending): {e}"
                    ));
                    continue;
                }
            };
            let result = self
                .conn
                .run_mapped("dead-letter script", |mut c| {
                    let mut call = match &self.fence {
                        Some(lease) => {
                            let mut call = scripts::FENCED_DEAD_LETTER.key(stream);
                            call.key(&dead_stream).key(lease.key()).arg(lease.token());
                            call
                        }
                        None => {
                            let mut call = scripts::DEAD_LETTER.key(stream);
                            call.key(&dead_stream);
                            call
                        }
                    };
                    call.arg(group).arg(id.to_string());
                    for (name, value) in &fields {
                        call.arg(*name).arg(&value[..]);
                    }
                    async move { call.invoke_async::<Value>(&mut c).await }
                })
                .await;
            match result {
                Ok(Value::Int(-1)) => {
                    // Fenced: the partition's next owner has the entry now.
                    SubscriberStats::add(&self.stats.fenced, 1);
                    tracing::error!(stream, group, %id, "dead letter refused: another consumer holds this consumer's lease now; it has the entry");
                    // Not ours to hold any more, and not acknowledged: no checkpoint past it.
                    lock(&self.ledger).dead_lettering.remove(&id);
                }
                Ok(_) => {
                    SubscriberStats::add(&self.stats.dead_lettered, 1);
                    if let Some(reason) = reason {
                        self.metrics.dead_lettered(reason);
                    }
                    tracing::warn!(stream, group, %id,
                        reason = record.metadata().get(dead_letter::keys::REASON).unwrap_or(""), "dead-lettered");
                    written.push(id);
                }
                Err(e) => {
                    SubscriberStats::add(&self.stats.dead_letter_failures, 1);
                    self.dead_letters.push((id, record, reason));
                    failed = Some(e);
                    break;
                }
            }
        }
        // What the failure left untried waits with it, in order.
        self.dead_letters.extend(queue);
        if !written.is_empty() {
            {
                let mut ledger = lock(&self.ledger);
                for id in &written {
                    ledger.dead_lettering.remove(id);
                }
            }
            self.acked_up_to = self.acked_up_to.max(written.iter().max().copied());
            self.save_checkpoint(false).await;
        }
        match failed {
            Some(e) => {
                let delay = self.conn.backoff(self.dead_letter_failures);
                self.dead_letter_failures = self.dead_letter_failures.saturating_add(1);
                let error = format!(
                    "{} dead-letter records not written (their entries stay pending; retried in {delay:?}): {e}",
                    self.dead_letters.len()
                );
                self.log.warn(stream, &error);
                self.dead_letter_retry = Some((tokio::time::Instant::now() + delay, error.clone()));
                Err(error)
            }
            None => {
                self.dead_letter_failures = 0;
                self.dead_letter_retry = None;
                Ok(())
            }
        }
    }

    /// Saves the low watermark: the highest acked id, unless an older entry is still pending
    /// for this consumer, in which case just below the oldest such entry. Pending means what
    /// Redis says (`XPENDING` for this consumer: held, dropped unsettled, nacked, read but not
    /// yet handed out) and what this subscription still owns (an ack not yet confirmed). A
    /// re-created group resumes from the lowest watermark of its consumers, so nothing
    /// unacked is skipped. The watermark moves back when an older entry became this
    /// consumer's again (taken over from another). (At most every [`CHECKPOINT_EVERY`],
    /// unless `now`.)
    async fn save_checkpoint(&mut self, now: bool) {
        if !now && self.saved_at.is_some_and(|t| t.elapsed() < CHECKPOINT_EVERY) {
            self.checkpoint_behind = true;
            return;
        }
        self.checkpoint_behind = false;
        let (Some(store), Some(acked)) = (&self.store, self.acked_up_to) else {
            return;
        };
        let (stream, group) = (self.origin.stream(), self.origin.group());
        let oldest_pending = match oldest_pending(&self.conn, &self.origin).await {
            Ok(oldest) => oldest,
            Err(e) => {
                // Without knowing what is pending, the watermark might pass it: keep the old one.
                tracing::warn!(stream, group, error = %e, "checkpoint not saved: the pending list could not be read");
                return;
            }
        };
        let oldest_owned = lock(&self.ledger).oldest_owned();
        let oldest = oldest_pending.into_iter().chain(oldest_owned).min();
        let watermark = match oldest {
            Some(oldest) if oldest <= acked => oldest.prev(),
            _ => Some(acked),
        };
        // Entries being taken over are not in the pending list yet: stay below them.
        let watermark = match (watermark, self.floor) {
            (Some(w), Some(floor)) => Some(w.min(floor)),
            (w, _) => w,
        };
        let Some(watermark) = watermark.filter(|w| self.saved != Some(*w)) else {
            return;
        };
        let checkpoint = Checkpoint {
            message_id: watermark,
            timestamp: SystemTime::now(),
        };
        self.saved_at = Some(tokio::time::Instant::now());
        match store
            .save(stream, group, self.origin.consumer(), checkpoint)
            .await
        {
            Ok(()) => self.saved = Some(watermark),
            Err(e) => tracing::warn!(stream, group, error = %e, "checkpoint not saved"),
        }
    }
}

impl Flusher {
    /// Moves the saved checkpoint below `entry` if it is not already, and keeps every save
    /// below it until the claims are done.
    async fn lower_checkpoint(&mut self, entry: EntryId) -> crate::Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let Some(below) = entry.prev() else {
            // Nothing is below the first id: the checkpoint cannot pass it.
            return Ok(());
        };
        self.floor = Some(self.floor.map_or(below, |f| f.min(below)));
        let saved = match self.saved {
            Some(saved) => Some(saved),
            // What an earlier run of this consumer saved.
            None => store
                .load(self.origin.stream(), self.origin.group(), self.origin.consumer())
                .await?
                .map(|cp| cp.message_id),
        };
        if saved.is_none_or(|saved| saved <= below) {
            self.saved = saved;
            return Ok(());
        }
        let checkpoint = Checkpoint {
            message_id: below,
            timestamp: SystemTime::now(),
        };
        store
            .save(
                self.origin.stream(),
                self.origin.group(),
                self.origin.consumer(),
                checkpoint,
            )
            .await?;
        self.saved = Some(below);
        Ok(())
    }
}

/// The oldest entry of the group's pending list that belongs to this consumer, if any.
async fn oldest_pending(conn: &RedisConnection, origin: &Origin) -> crate::Result<Option<EntryId>> {
    let reply = conn
        .run("XPENDING", |mut c| {
            let cmd = redis::cmd("XPENDING")
                .arg(origin.stream())
                .arg(origin.group())
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(origin.consumer())
                .clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await
        .map_err(|e| e.into_error())?;
    Ok(crate::redis::protocol::replies::parse_pending_rows(reply)?
        .first()
        .map(|row| row.id))
}

/// What a round of writes left unwritten, in words for those waiting on a flush.
fn unwritten(acked: crate::Result<()>, dead_lettered: Result<(), String>) -> Result<(), String> {
    match (acked, dead_lettered) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(format!("acknowledgements not written: {e}")),
        (Ok(()), Err(d)) => Err(d),
        (Err(a), Err(d)) => Err(format!("acknowledgements not written: {a}; {d}")),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
