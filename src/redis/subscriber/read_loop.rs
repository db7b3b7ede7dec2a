//! The read side of one subscription: the state behind its [`Subscription`] stream, and the
//! commands of each step. Which step comes next is the [`Planner`]'s decision
//! ([`plan`](super::plan)); this module takes capacity, sends the step's commands, and feeds
//! what they found back.
//!
//! The steps: nacked entries that are due; the drain of this consumer's own pending list (on
//! start and after every read error); reclaim (crashed consumers at once, then entries idle
//! past `min_idle`, found with `XPENDING IDLE`); else a blocking read of new entries. Every
//! redelivery goes through one owner-checked claim ([`scripts::CLAIM`]) that counts the
//! delivery; entries the subscription owns already (held, being acked, waiting to retry) are
//! never claimed or handed out again.
//!
//! A read that came back full is followed at once by the next ones, sent ahead without
//! `BLOCK` (two under way at most, one after a large reply: see
//! [`MAX_READS_AHEAD`](super::plan::MAX_READS_AHEAD)) while at least half a batch of
//! capacity is free and nothing else is due (a retry, the drain, a reclaim): the server
//! prepares those batches while this one is handled, and has the next read queued when it
//! answers one; the next steps only take their replies, so whatever falls due waits two
//! batches at most. The slots a read may fill are taken when it is sent, so `max_in_flight`
//! still bounds everything read.
//! On a limit shared with other subscriptions (a member's partitions), each read that may
//! block takes at most its share of the free slots; after a read came back full, the next one
//! waits for a whole batch of slots instead (briefly: see [`BACKLOG_PATIENCE`]) and does not
//! block, so busy partitions read full batches, as one stream would, not a share each.
//! Entries of a read sent ahead that is outstanding when the subscription ends stay pending
//! for this consumer, like buffered deliveries, and come back on its next start (or by
//! reclaim).
//!
//! [`Subscription`]: crate::Subscription

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;

use super::group;
use super::lanes::{LANE_POLL, Lane, ReadLanes};
use super::lease::{Held, Lease};
use super::options::RedisSubscriberOptions;
use super::plan::{BACKLOG_BLOCK, DrainFrom, Facts, Next, Planner, Step};
use super::shared::{Op, Shared};
use super::stats::SubscriberStats;
use super::warnings::RepeatedWarnings;
use crate::checkpoint::CheckpointStore;
use crate::codec::Codec;
use crate::dead_letter::{DeadLetter, GaveUp};
use crate::delivery::{Delivery, DeliveryInfo, Origin, Settler};
use crate::error::{Error, Result};
use crate::message::{EntryId, Message};
use crate::metrics::DeadLetterReason;
use crate::pubsub::{ReclaimOptions, SubscribeOptions};
use crate::redis::connection::{is_cluster_change, is_transient};
use crate::redis::dedicated::{BLOCK_REPLY_MARGIN, DedicatedConnection};
use crate::redis::protocol::replies::{self, Claimed, ReplyEntry};
use crate::redis::{admin, keys, scripts};
use crate::signal::Signal;

/// How long a partition with a backlog waits for a batch of slots before it reads
/// what is free ([`InFlight::acquire_at_least`](crate::pubsub::InFlight::acquire_at_least)):
/// under load slots come back far faster; only handlers that hold most of them wait this.
const BACKLOG_PATIENCE: Duration = Duration::from_millis(50);

/// Entries fetched by one step, with their delivery counts (this delivery included).
type Fetched = Vec<(ReplyEntry, u64)>;

/// The read side of one subscription.
pub(super) struct Reader {
    shared: Arc<Shared>,
    settler: Arc<dyn Settler>,
    codec: Arc<dyn Codec>,
    max_entry_size: usize,
    store: Option<Arc<dyn CheckpointStore>>,
    stats: Arc<SubscriberStats>,
    metrics: crate::metrics::SubscriptionMetrics,
    health: Arc<super::health::ReadHealth>,
    options: SubscribeOptions,
    read_conn: Option<(DedicatedConnection, i64)>,
    /// The subscriber's read lanes, when this subscription reads without blocking on a
    /// connection it shares ([`lanes`](super::lanes)) instead of one of its own.
    lanes: Option<ReadLanes>,
    /// The lane this subscription's commands go to (found again after a failure).
    lane: Option<Lane>,
    /// After a read on a lane found nothing: how long to wait before the next step.
    poll_wait: Option<Duration>,
    /// Which step comes next, and the state that decision rests on (the reads sent ahead,
    /// the drain's cursor, the next reclaim).
    plan: Planner,
    /// This consumer's lease, re-asserted before each reclaim.
    lease: Lease,
    buffer: VecDeque<Delivery>,
    failures: u32,
    /// What the step under way sends, to name it when it fails (a script's error names only
    /// its SHA).
    sending: &'static str,
    /// Cancelled by the heartbeat when another consumer took this consumer's lease.
    lease_lost: Signal,
    lease_loss_reported: bool,
    /// Warnings of the read loop, each repeated one logged with a count.
    log: RepeatedWarnings,
    /// Ids the last claim found in no pending list.
    unclaimed: Vec<EntryId>,
}

impl crate::pubsub::BackendReader for Reader {
    fn ready(&mut self) -> Option<Delivery> {
        if self.shared.closed().is_cancelled() || self.lease_lost.is_cancelled() {
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
    /// The reader of the subscription whose state is `shared`, holding `lease` (the
    /// heartbeat cancels `lease_lost` when another consumer takes it). `subscriber` gives the
    /// wire format and the entry size limit; checkpoints are in `store`.
    pub(super) fn new(
        shared: Arc<Shared>,
        lease: Lease,
        lease_lost: Signal,
        options: SubscribeOptions,
        subscriber: &RedisSubscriberOptions,
        store: Option<Arc<dyn CheckpointStore>>,
        stats: Arc<SubscriberStats>,
    ) -> Self {
        let (stream, group) = (shared.origin().stream(), shared.origin().group());
        let health = shared.health().clone();
        health.set_longest_step(options.block, BLOCK_REPLY_MARGIN);
        let metrics = crate::metrics::SubscriptionMetrics::new(stream, group);
        Reader {
            settler: shared.clone(),
            max_entry_size: subscriber.max_entry_size_of(shared.origin().stream()),
            shared,
            codec: subscriber.codec.clone(),
            store,
            stats,
            metrics,
            health,
            plan: Planner::new(&options, lease.ttl(), Instant::now()),
            options,
            read_conn: None,
            lanes: None,
            lane: None,
            poll_wait: None,
            lease,
            buffer: VecDeque::new(),
            failures: 0,
            sending: "XREADGROUP",
            lease_lost,
            lease_loss_reported: false,
            log: RepeatedWarnings::default(),
            unclaimed: Vec::new(),
        }
    }

    /// Reads without blocking, on the subscriber's shared `lanes`, instead of a connection
    /// of its own.
    pub(super) fn reading_on(mut self, lanes: Option<ReadLanes>) -> Self {
        self.lanes = lanes;
        self
    }

    async fn next_item(&mut self) -> Option<Result<Delivery>> {
        'steps: loop {
            if self.shared.closed().is_cancelled() {
                self.buffer.clear();
                return None;
            }
            if self.lease_lost.is_cancelled() {
                self.buffer.clear();
                if self.lease_loss_reported {
                    return None;
                }
                self.lease_loss_reported = true;
                let origin = self.shared.origin();
                return Some(Err(Error::ConsumerActive {
                    stream: origin.stream().to_owned(),
                    group: origin.group().to_owned(),
                    consumer: origin.consumer().to_owned(),
                }));
            }
            if let Some(d) = self.buffer.pop_front() {
                return Some(Ok(d));
            }
            let (closed, lease_lost) = (self.shared.closed().clone(), self.lease_lost.clone());
            let mut budget = 0;
            let (started, step) = loop {
                let now = Instant::now();
                match self.plan.next(now, self.facts(budget, now)) {
                    Next::WaitForCapacity { batch, at_least } => {
                        let capacity = self.shared.capacity();
                        budget = tokio::select! {
                            biased;
                            _ = closed.cancelled() => continue 'steps,
                            _ = lease_lost.cancelled() => continue 'steps,
                            n = capacity.acquire_at_least(at_least, batch, BACKLOG_PATIENCE) => n,
                        };
                    }
                    Next::Run(step) => break (now, step),
                }
            };
            // A process that was paused (or cut off) past its heartbeat looks at its lease
            // before it reads again: another consumer may own the name now (a partition's next
            // owner), and a read as that name would take entries from it.
            if self.lease.unconfirmed()
                && let Ok(Held::Refused) = self.lease.hold_state("lease check").await
            {
                self.shared.capacity().release(step.slots());
                self.lease_lost.cancel();
                continue 'steps;
            }
            let taken = step.slots();
            self.health.step_started();
            let result = tokio::select! {
                biased;
                _ = closed.cancelled() => Ok(0),
                _ = lease_lost.cancelled() => Ok(0),
                r = self.run(step, started) => r,
            };
            self.health.step_ended(result.is_ok());
            if self.plan.out_of_reach(started, Instant::now()) {
                // A step that took far longer than its BLOCK: the server was out of reach (or
                // this process paused), maybe for everyone; no one is taken for crashed yet.
                self.shared.hold_back_reclaim(self.lease.ttl());
            }
            match result {
                Ok(used) => {
                    self.shared.capacity().release(taken - used);
                    self.failures = 0;
                    if let Some(wait) = self.poll_wait.take() {
                        tokio::select! {
                            biased;
                            _ = closed.cancelled() => {}
                            _ = lease_lost.cancelled() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Err(e) => {
                    self.shared.capacity().release(taken);
                    if let Some(e) = self.after_error(e).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// What the planner needs of the shared state at `now`, with `budget` slots taken.
    fn facts(&self, budget: usize, now: Instant) -> Facts {
        Facts {
            budget,
            next_retry: self.shared.ledger().next_retry(),
            reclaim_held_until: self.shared.reclaim_held_until(now),
        }
    }

    /// Handles a failed step: reconnects and re-drains after connection trouble, re-creates a
    /// vanished group (when allowed). Every failure waits the connection's backoff, which grows
    /// with the failures in a row (until a step succeeds), so that a fault that persists costs
    /// a few commands a minute, not a busy loop. Returns the error to yield: at once for a group
    /// that is missing or cannot be re-created, else once per spent retry budget.
    async fn after_error(&mut self, e: ReadError) -> Option<Error> {
        SubscriberStats::add(&self.stats.read_errors, 1);
        self.metrics.read_error();
        self.drop_read_conn();
        if self.lanes.is_some()
            && let ReadError::Redis(e) = &e
            && is_cluster_change(e)
        {
            // A lane is found by the slot map, which is wrong now.
            self.shared.conn().forget_slot_map();
        }
        let origin = self.shared.origin().clone();
        if let ReadError::Redis(e) = &e
            && e.code() == Some("NOGROUP")
        {
            if !self.options.create_group {
                self.pause_after_failure().await;
                return Some(Error::GroupNotFound {
                    stream: origin.stream().to_owned(),
                    group: origin.group().to_owned(),
                });
            }
            self.log
                .warn(origin.stream(), "consumer group vanished; re-creating it");
            let recreated = group::create(
                self.shared.conn(),
                self.store.as_deref(),
                origin.stream(),
                origin.group(),
                self.options.start_from,
            )
            .await;
            if let Err(e) = recreated {
                self.log.warn(
                    origin.stream(),
                    &format!("consumer group could not be re-created: {e}"),
                );
                self.pause_after_failure().await;
                return Some(e);
            }
            return None;
        }
        let conn = self.shared.conn().clone();
        self.log.warn(
            origin.stream(),
            &format!("read failed during {}; retrying: {e}", self.sending),
        );
        self.pause_after_failure().await;
        if self.failures.is_multiple_of(conn.max_retries().saturating_add(1)) {
            return Some(match e {
                ReadError::Redis(e) => conn.failure(self.sending, e, conn.max_retries()),
                ReadError::Other(e) => e,
            });
        }
        None
    }

    /// Waits the backoff of the failures so far (or until closed) and counts this one.
    async fn pause_after_failure(&mut self) {
        self.pause().await;
        self.failures = self.failures.saturating_add(1);
    }

    /// Waits the backoff of the current failure count, or until closed.
    async fn pause(&self) {
        let delay = self.shared.conn().backoff(self.failures);
        tokio::select! {
            _ = self.shared.closed().cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// Forgets the read connection; whatever it may have read into this consumer's pending
    /// list meanwhile is found by the drain that follows.
    fn drop_read_conn(&mut self) {
        self.read_conn = None;
        self.lane = None;
        let slots = self.plan.connection_lost();
        self.shared.capacity().release(slots);
    }

    /// Takes `step`, planned at `now`; turns what it got into deliveries and returns how many
    /// slots they use.
    async fn run(&mut self, step: Step, now: Instant) -> std::result::Result<usize, ReadError> {
        let fetched = match step {
            Step::TakeReadAhead { slots } => {
                self.sending = "XREADGROUP";
                let entries = self.receive_new(slots).await?;
                entries.into_iter().map(|e| (e, 1)).collect()
            }
            Step::ClaimDue { budget } => self.claim_due(now, budget).await?,
            Step::Drain { from, page, budget } => self.drain(from, page, budget).await?,
            Step::Reclaim { options, budget } => self.reclaim(options, budget).await?,
            Step::Read { budget, block } => self.read_new(budget, block).await?,
        };
        Ok(self.admit(fetched).await)
    }

    /// Claims back up to `budget` nacked entries due at `now`; those found in no pending list
    /// any more go to [`retries_not_pending`](Self::retries_not_pending).
    async fn claim_due(&mut self, now: Instant, budget: usize) -> std::result::Result<Fetched, ReadError> {
        let due = self.shared.ledger().take_due(now, budget);
        let me = self.shared.origin().consumer().to_owned();
        let ids: Vec<EntryId> = due.iter().map(|(id, _)| *id).collect();
        let fetched = self.claim(&me, &ids, 0).await?;
        let unclaimed = std::mem::take(&mut self.unclaimed);
        if !unclaimed.is_empty() {
            let counts = due
                .iter()
                .filter(|(id, _)| unclaimed.contains(id))
                .copied()
                .collect();
            self.retries_not_pending(counts).await;
        }
        Ok(fetched)
    }

    /// A blocking `XREADGROUP ... >` of up to `budget` new entries, waiting at most `block`;
    /// while it waits, a nack can unblock it through the flusher.
    async fn read_new(&mut self, budget: usize, block: Duration) -> std::result::Result<Fetched, ReadError> {
        self.sending = "XREADGROUP";
        if self.lanes.is_some() {
            // On a shared lane: no BLOCK, which would hold it; the wait is here instead.
            let read = read_group(self.shared.origin(), budget, None);
            let entries = self.read_conn().await?.read_entries(&read).await?;
            self.plan.read_came_back(budget, entries.len());
            if entries.is_empty() {
                self.poll_wait = Some(block.min(LANE_POLL));
            }
            return Ok(entries.into_iter().map(|e| (e, 1)).collect());
        }
        let read = read_group(self.shared.origin(), budget, Some(block));
        // Slots a read that may wait holds are not worth another partition's waiting for.
        let _parked = (block > BACKLOG_BLOCK).then(|| self.shared.capacity().park(budget));
        let conn = self.own_conn().await?;
        conn.send(&read).await?;
        let client_id = self.read_conn.as_ref().map_or(0, |(_, id)| *id);
        self.shared.set_blocked_client(Some(client_id));
        let entries = self.receive_new(budget).await;
        self.shared.set_blocked_client(None);
        Ok(entries?.into_iter().map(|e| (e, 1)).collect())
    }

    /// Where this subscription's commands go: its own connection, or its lane.
    async fn read_conn(&mut self) -> std::result::Result<ReadConn<'_>, ReadError> {
        if let Some(lanes) = &self.lanes {
            if self.lane.is_none() {
                let timeout = self.options.block + BLOCK_REPLY_MARGIN;
                let stream: Arc<str> = self.shared.origin().stream().into();
                let lane = lanes
                    .lane(self.shared.conn(), &stream, timeout)
                    .await
                    .map_err(ReadError::Other)?;
                self.lane = Some(lane);
            }
            return match self.lane.clone() {
                Some(lane) => Ok(ReadConn::Lane(lane)),
                None => unreachable!("just set"),
            };
        }
        Ok(ReadConn::Own(self.own_conn().await?))
    }

    /// This subscription's own connection (connected on first use and after a failure).
    async fn own_conn(&mut self) -> std::result::Result<&mut DedicatedConnection, ReadError> {
        let timeout = self.options.block + BLOCK_REPLY_MARGIN;
        if self.read_conn.is_none() {
            let origin = self.shared.origin().clone();
            let mut conn = self
                .shared
                .conn()
                .dedicated(origin.stream(), timeout)
                .await
                .map_err(ReadError::Other)?;
            // Named as what failed only when it fails: the step's own command comes next.
            let step = std::mem::replace(&mut self.sending, "CLIENT ID");
            let client_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await?;
            self.shared.set_read_node(conn.node());
            self.sending = step;
            self.read_conn = Some((conn, client_id));
        }
        let (conn, _) = self.read_conn.as_mut().expect("just set");
        Ok(conn)
    }

    /// Takes the reply of the oldest `XREADGROUP ... >` under way (`count` entries at most);
    /// when it is full, sends reads ahead up to the planner's limit.
    async fn receive_new(&mut self, count: usize) -> std::result::Result<Vec<ReplyEntry>, ReadError> {
        let conn = self.own_conn().await?;
        let entries = conn.recv_entries().await?;
        self.plan.read_came_back(count, entries.len());
        if entries.len() == count {
            while self.read_ahead().await {}
        }
        Ok(entries)
    }

    /// Sends an `XREADGROUP` without `BLOCK`, when the planner allows another read ahead
    /// and finds no other step due, and enough capacity is free; the slots are taken now and
    /// used by the step that takes the reply. Whether it was sent.
    async fn read_ahead(&mut self) -> bool {
        if self.lanes.is_some() {
            return false;
        }
        let now = Instant::now();
        let next_retry = self.shared.ledger().next_retry();
        let Some(reply_bytes) = self.read_conn.as_ref().map(|(conn, _)| conn.last_reply_len()) else {
            return false;
        };
        let Some(ahead) = self.plan.read_ahead(now, next_retry, reply_bytes) else {
            return false;
        };
        let slots = self.shared.capacity().try_acquire(ahead.want);
        if slots < ahead.at_least || self.shared.closed().is_cancelled() {
            self.shared.capacity().release(slots);
            return false;
        }
        let Some((conn, _)) = self.read_conn.as_mut() else {
            self.shared.capacity().release(slots);
            return false;
        };
        let cmd = read_group(self.shared.origin(), slots, None);
        match conn.send(&cmd).await {
            Ok(()) => {
                self.plan.sent_ahead(slots);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "read ahead failed; reconnecting");
                self.shared.capacity().release(slots);
                self.drop_read_conn();
                false
            }
        }
    }

    /// Claims `ids` for this consumer, each only if `expected_owner` still owns it and it was
    /// idle at least `min_idle_ms` (0: however long).
    async fn claim(
        &mut self,
        expected_owner: &str,
        ids: &[EntryId],
        min_idle_ms: u64,
    ) -> std::result::Result<Fetched, ReadError> {
        self.unclaimed.clear();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let origin = self.shared.origin().clone();
        let mut call = scripts::CLAIM.key(origin.stream());
        call.key(self.lease.key())
            .arg(origin.group())
            .arg(origin.consumer())
            .arg(expected_owner)
            .arg(min_idle_ms)
            .arg(self.lease.token());
        for id in ids {
            call.arg(id.to_string());
        }
        self.sending = "claim script";
        let mut conn = self.read_conn().await?;
        let reply: Value = call.invoke_async(&mut conn).await?;
        let mut fetched = Vec::new();
        for claimed in replies::parse_claimed(reply)? {
            match claimed {
                Claimed::Entry(entry, count) => fetched.push((entry, count)),
                Claimed::NotPending(id) => self.unclaimed.push(id),
            }
        }
        Ok(fetched)
    }

    /// One page of `page` rows of this consumer's own pending list from `from` (left by an
    /// earlier run, or read in a reply that a connection failure lost): claims back up to
    /// `budget` of them, minus what this subscription owns already.
    async fn drain(
        &mut self,
        from: DrainFrom,
        page: usize,
        budget: usize,
    ) -> std::result::Result<Fetched, ReadError> {
        let origin = self.shared.origin().clone();
        let rows: Value = {
            self.sending = "XPENDING";
            let mut conn = self.read_conn().await?;
            redis::cmd("XPENDING")
                .arg(origin.stream())
                .arg(origin.group())
                .arg(from.xpending_start())
                .arg("+")
                .arg(page)
                .arg(origin.consumer())
                .query_async(&mut conn)
                .await?
        };
        let rows: Vec<EntryId> = replies::parse_pending_rows(rows)?.iter().map(|r| r.id).collect();
        let ids = {
            let ledger = self.shared.ledger();
            self.plan.drained(&rows, page, budget, |id| ledger.is_ours(id))
        };
        self.claim(origin.consumer(), &ids, 0).await
    }

    /// Takes over the entries of crashed consumers at once, then entries idle past
    /// `min_idle` (a reclaim held back never gets here: the planner put it off). Before taking
    /// any, it re-asserts its own lease: when that had run out (an outage or a pause cut this
    /// consumer off, and perhaps everyone), reclaim waits one lease TTL, so that live
    /// consumers renew their leases and touch their entries first. And it keeps the checkpoint
    /// below what it is about to take (entries older than it may be).
    async fn reclaim(
        &mut self,
        reclaim: ReclaimOptions,
        budget: usize,
    ) -> std::result::Result<Fetched, ReadError> {
        let origin = self.shared.origin().clone();
        let (stream, group, me) = (origin.stream(), origin.group(), origin.consumer());
        let mut fetched = Vec::new();
        let now = Instant::now();
        match self.lease.hold_state("lease renewal").await {
            Ok(Held::Extended) => {}
            Ok(Held::Retaken) => {
                tracing::warn!(
                    stream,
                    group,
                    consumer = me,
                    "this consumer's lease had run out; reclaim waits one lease TTL"
                );
                self.shared.hold_back_reclaim(self.lease.ttl());
                self.plan.hold_back_reclaim(now + self.lease.ttl());
                return Ok(fetched);
            }
            // Lost to another: stop now rather than at the heartbeat's next look.
            Ok(Held::Refused) => {
                self.lease_lost.cancel();
                return Ok(fetched);
            }
            Err(e) => return Err(ReadError::Other(e)),
        }

        let crashed: std::result::Result<Vec<(String, i64)>, redis::RedisError> = {
            self.sending = "crashed consumers script";
            let (lease_key, token) = (self.lease.key().to_owned(), self.lease.token().to_owned());
            let mut conn = self.read_conn().await?;
            scripts::CRASHED_CONSUMERS
                .key(stream)
                .key(keys::leased_consumers(stream, group))
                .key(lease_key)
                .arg(group)
                .arg(me)
                .arg(keys::lease(stream, group, ""))
                .arg(token)
                .invoke_async(&mut conn)
                .await
        };
        let crashed = match crashed {
            Err(e) if is_cut_off(&e) => return Ok(self.cut_off(fetched)),
            // The answer came so late that an outage may lie in between: look again later.
            Ok(_) if self.plan.out_of_reach(now, Instant::now()) => return Ok(self.cut_off(fetched)),
            other => other?,
        };
        for (name, pending) in crashed {
            SubscriberStats::add(&self.stats.crashed_consumers, 1);
            tracing::warn!(stream, group, consumer = %name, pending = pending.max(0),
                "taking over the entries of a crashed consumer");
            let want = budget.saturating_sub(fetched.len());
            if want == 0 {
                break;
            }
            let rows = self.pending_rows(Some(&name), None, want).await?;
            let ids: Vec<EntryId> = rows.iter().map(|r| r.id).collect();
            self.keep_checkpoint_below(&ids).await?;
            let claimed = self.claim(&name, &ids, 0).await;
            self.claims_done();
            match claimed {
                Err(ReadError::Redis(e)) if is_cut_off(&e) => return Ok(self.cut_off(fetched)),
                claimed => fetched.extend(claimed?),
            }
        }

        let want = budget.saturating_sub(fetched.len());
        if want > 0 {
            let min_idle = u64::try_from(reclaim.min_idle.as_millis()).unwrap_or(u64::MAX);
            let rows = self.pending_rows(None, Some(min_idle), want).await?;
            // Entries this subscription owns already stay where they are.
            let mut by_owner: Vec<(String, Vec<EntryId>)> = Vec::new();
            {
                let ledger = self.shared.ledger();
                for row in rows.into_iter().filter(|r| !ledger.is_ours(&r.id)) {
                    match by_owner.iter_mut().find(|(owner, _)| *owner == row.consumer) {
                        Some((_, ids)) => ids.push(row.id),
                        None => by_owner.push((row.consumer, vec![row.id])),
                    }
                }
            }
            let all: Vec<EntryId> = by_owner.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
            self.keep_checkpoint_below(&all).await?;
            for (owner, ids) in by_owner {
                // Idle checked again at the claim: a heartbeat in between keeps the entry.
                let claimed = self.claim(&owner, &ids, min_idle).await;
                match claimed {
                    Err(ReadError::Redis(e)) if is_cut_off(&e) => {
                        self.claims_done();
                        return Ok(self.cut_off(fetched));
                    }
                    claimed => fetched.extend(claimed?),
                }
            }
            self.claims_done();
        }
        let reclaimed = fetched
            .iter()
            .filter(|(e, _)| matches!(e, ReplyEntry::Present(_)))
            .count();
        SubscriberStats::add(&self.stats.reclaimed, reclaimed as u64);
        self.metrics.reclaimed(reclaimed as u64);
        Ok(fetched)
    }

    /// The server found this consumer's lease run out in the middle of a reclaim (an outage
    /// or a pause began after the lease was re-asserted): nothing more is taken, and reclaim
    /// waits one lease TTL. Returns what was taken before.
    fn cut_off(&mut self, fetched: Fetched) -> Fetched {
        let origin = self.shared.origin();
        tracing::warn!(
            stream = origin.stream(),
            consumer = origin.consumer(),
            "this consumer's lease ran out during a reclaim; reclaim waits one lease TTL"
        );
        self.shared.hold_back_reclaim(self.lease.ttl());
        self.plan.hold_back_reclaim(Instant::now() + self.lease.ttl());
        fetched
    }

    /// One page of the group's pending list: of `consumer` only, or idle at least `idle_ms`.
    async fn pending_rows(
        &mut self,
        consumer: Option<&str>,
        idle_ms: Option<u64>,
        count: usize,
    ) -> std::result::Result<Vec<replies::PendingRow>, ReadError> {
        let origin = self.shared.origin().clone();
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(origin.stream()).arg(origin.group());
        if let Some(idle) = idle_ms {
            cmd.arg("IDLE").arg(idle);
        }
        cmd.arg("-").arg("+").arg(count);
        if let Some(consumer) = consumer {
            cmd.arg(consumer);
        }
        self.sending = "XPENDING";
        let mut conn = self.read_conn().await?;
        let rows: Value = cmd.query_async(&mut conn).await?;
        Ok(replies::parse_pending_rows(rows)?)
    }

    /// The claims that [`keep_checkpoint_below`](Self::keep_checkpoint_below) prepared are
    /// done: what they took is in this consumer's pending list now, where the flusher's next
    /// save sees it, so the floor it kept can go.
    fn claims_done(&self) {
        let _ = self.shared.send_to_flusher(Op::ClaimsDone);
    }

    /// Keeps this consumer's checkpoint below the oldest of `ids` before they are taken
    /// over (they may be older than it), through the flusher, which alone saves it.
    async fn keep_checkpoint_below(&mut self, ids: &[EntryId]) -> std::result::Result<(), ReadError> {
        let Some(oldest) = ids.iter().min().copied() else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.shared.send_to_flusher(Op::Lower(oldest, tx)).is_err() {
            return Err(ReadError::Other(Error::Closed("subscriber")));
        }
        match rx.await {
            Ok(saved) => saved.map_err(ReadError::Other),
            Err(_) => Err(ReadError::Other(Error::Closed("subscriber"))),
        }
    }

    /// Turns fetched entries into deliveries. First dead-letters the undecodable, the trimmed
    /// and those past `max_deliveries` (an entry whose record cannot be written stays pending
    /// and comes back on the next drain), then hands out the rest; never fails once
    /// deliveries exist, so the capacity they use stays accounted for.
    async fn admit(&mut self, fetched: Fetched) -> usize {
        let max = self.options.max_deliveries;
        let origin = self.shared.origin().clone();
        // Counted in the metrics once written (the flusher), not here: a write refused or
        // left for later would count twice.
        let mut dead: Vec<(EntryId, Message, DeadLetterReason)> = Vec::new();
        let mut ready: Vec<(EntryId, u64, Message)> = Vec::new();
        for (entry, count) in fetched {
            let id = entry.id();
            if self.shared.ledger().is_ours(&id) {
                continue;
            }
            let record = |reason, delivered| dead_letter_of(&origin, id, reason, delivered);
            match entry {
                ReplyEntry::Trimmed(_) => {
                    SubscriberStats::add(&self.stats.trimmed_pending, 1);
                    tracing::warn!(stream = origin.stream(), group = origin.group(), %id,
                        "pending entry was trimmed from the stream before it was acknowledged");
                    let r = record(&GaveUp::Trimmed.to_string(), count.saturating_sub(1)).for_trimmed();
                    dead.push((id, r, DeadLetterReason::Trimmed));
                }
                ReplyEntry::Present(raw) => {
                    let size = raw.size();
                    match crate::codec::decode_entry(&*self.codec, raw) {
                        Err((e, raw)) => {
                            SubscriberStats::add(&self.stats.undecodable, 1);
                            let r = record(&e.to_string(), count).for_undecodable(&raw.fields);
                            dead.push((id, r, DeadLetterReason::Decode));
                        }
                        Ok(message) if size > self.max_entry_size => {
                            SubscriberStats::add(&self.stats.oversized, 1);
                            let reason = GaveUp::TooLarge {
                                size,
                                limit: self.max_entry_size,
                            }
                            .to_string();
                            dead.push((
                                id,
                                record(&reason, count).for_message(&message),
                                DeadLetterReason::Oversize,
                            ));
                        }
                        Ok(message) if count > max => {
                            let reason = GaveUp::TooManyDeliveries {
                                delivered: count - 1,
                                limit: max,
                            }
                            .to_string();
                            let r = record(&reason, count - 1).for_message(&message);
                            dead.push((id, r, DeadLetterReason::MaxDeliveries));
                        }
                        Ok(message) => ready.push((id, count, message)),
                    }
                }
            }
        }
        for (id, record, reason) in dead {
            // Kept this subscription's (never handed out) until the flusher wrote it.
            if self.shared.dead_letter(id, record, Some(reason)).is_err() {
                tracing::debug!(stream = origin.stream(), %id, "closed before dead-lettering; the entry stays pending");
            }
        }
        let used = ready.len();
        let mut ledger = self.shared.ledger();
        let now = Instant::now();
        for (id, count, message) in ready {
            ledger.held.insert(id, now);
            let info = DeliveryInfo::new(id, count, origin.clone());
            self.buffer
                .push_back(Delivery::new(message, info, self.settler.clone()));
        }
        used
    }

    /// Nacked entries this consumer owned that are in no pending list any more when their
    /// retry is due: mostly because the group was destroyed and re-created meanwhile (or,
    /// rarer, another consumer took one over while this one was cut off past its lease, and
    /// settled it). Those the group will read again (past its last-delivered id) come back
    /// that way; the others could be lost, so they are dead-lettered with the reason, and
    /// counted: never dropped silently, at the price of a record for one settled elsewhere.
    async fn retries_not_pending(&mut self, entries: Vec<(EntryId, u64)>) {
        let origin = self.shared.origin().clone();
        let info = admin::group_info(self.shared.conn(), origin.stream(), origin.group()).await;
        let last_delivered = match info {
            Ok(info) => info.last_delivered_id,
            Err(e) => {
                // The group may be gone for good; look again after a while.
                tracing::warn!(stream = origin.stream(), error = %e, "cannot tell whether retries are lost; looking again later");
                let mut ledger = self.shared.ledger();
                let later = Instant::now() + self.shared.conn().backoff(self.failures);
                for (id, count) in entries {
                    ledger.add_retry(id, later, count);
                }
                return;
            }
        };
        for (id, count) in entries {
            if id > last_delivered {
                tracing::info!(stream = origin.stream(), %id, "a retried entry left the pending list; the group reads it again");
                continue;
            }
            SubscriberStats::add(&self.stats.unclaimable, 1);
            // Most often its group was re-created past it; it may also have been taken over
            // and settled by another consumer while this one was cut off past its lease.
            let reason = GaveUp::NoLongerPending {
                group: origin.group(),
            }
            .to_string();
            let stored = admin::read_entry(self.shared.conn(), origin.stream(), id).await;
            let why = dead_letter_of(&origin, id, &reason, count);
            let record = match stored {
                Ok(Some(raw)) => match crate::codec::decode_entry(&*self.codec, raw) {
                    Ok(message) => why.for_message(&message),
                    Err((_, raw)) => why.for_undecodable(&raw.fields),
                },
                Ok(None) => why.for_trimmed(),
                Err(e) => {
                    tracing::warn!(stream = origin.stream(), %id, error = %e, "entry not read; looking again later");
                    let later = Instant::now() + self.shared.conn().backoff(self.failures);
                    self.shared.ledger().add_retry(id, later, count);
                    continue;
                }
            };
            tracing::error!(stream = origin.stream(), group = origin.group(), %id, "{reason}; dead-lettering it");
            if self.shared.dead_letter(id, record, None).is_err() {
                tracing::debug!(stream = origin.stream(), %id, "closed before dead-lettering");
            }
        }
    }
}

/// The scripts' refusal to take others' entries for a claimer whose own lease ran out
/// ([`scripts::CLAIM`], [`scripts::CRASHED_CONSUMERS`]).
fn is_cut_off(e: &redis::RedisError) -> bool {
    e.code() == Some("CUTOFF")
}

/// `XREADGROUP GROUP g c COUNT n [BLOCK t] STREAMS s >`: entries never delivered to the group.
fn read_group(origin: &Origin, count: usize, block: Option<Duration>) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(origin.group())
        .arg(origin.consumer())
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    cmd.arg("STREAMS").arg(origin.stream()).arg(">");
    cmd
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

/// Why a reader step failed.
#[derive(Debug)]
pub(super) enum ReadError {
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
            ReadError::Redis(e) if is_transient(e) || is_cluster_change(e) => {
                write!(f, "connection trouble: {e}")
            }
            ReadError::Redis(e) => e.fmt(f),
            ReadError::Other(e) => e.fmt(f),
        }
    }
}

/// Where a subscription's commands go: its own connection, or its lane.
enum ReadConn<'a> {
    Own(&'a mut DedicatedConnection),
    Lane(Lane),
}

impl ReadConn<'_> {
    /// Sends a stream read and parses its reply into entries.
    async fn read_entries(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Vec<ReplyEntry>> {
        match self {
            ReadConn::Own(c) => c.read_entries(cmd).await,
            ReadConn::Lane(lane) => lane.read_entries(cmd).await,
        }
    }
}

impl redis::aio::ConnectionLike for ReadConn<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            ReadConn::Own(c) => c.req_packed_command(cmd),
            ReadConn::Lane(lane) => lane.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            ReadConn::Own(c) => c.req_packed_commands(pipeline, offset, count),
            ReadConn::Lane(lane) => lane.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ReadConn::Own(c) => c.get_db(),
            ReadConn::Lane(lane) => lane.get_db(),
        }
    }
}
