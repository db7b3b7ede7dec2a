//! The read loop's decisions: which step a subscription takes next, how long a blocking read
//! may wait, whether to send a read ahead, where the drain of its own pending list goes on.
//! Pure and clock-free (callers pass `now` and what the shared state says), so each decision
//! and their order are tested here; the [`read_loop`](super::read_loop) only sends commands.
//!
//! The order, once slots are taken: reads sent ahead are taken first, oldest first (their
//! replies are on the wire already); then nacked entries that are due; then the drain of
//! this consumer's own pending list (on start and after every connection loss); then
//! reclaim, when its interval is up and it is not held back; else a blocking read of new
//! entries, bounded by the next retry and the next reclaim.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::message::EntryId;
use crate::pubsub::{ReclaimOptions, SubscribeOptions};

/// The smallest page of the drain's `XPENDING`: entries this subscription owns already are
/// skipped, so a page larger than the budget still finds entries to hand out.
const MIN_DRAIN_PAGE: usize = 16;

/// The `BLOCK` of a read that follows a full one on a shared limit: it may hold more than
/// the share, so it hardly waits (`BLOCK 0` would wait for ever).
pub(super) const BACKLOG_BLOCK: Duration = Duration::from_millis(1);

/// How many reads may be sent ahead at once: with two, the server has the next read queued
/// while it answers one, instead of waiting for the client to ask once it has handled a
/// batch.
pub(super) const MAX_READS_AHEAD: usize = 2;

/// Replies larger than this keep one read ahead only: the server takes more than one turn of
/// its event loop to write such a reply (64 KiB a turn), so a second read queued behind it
/// only piles another reply into its output buffer (measured: more server CPU per entry of
/// 16 KiB, not less).
pub(super) const LARGE_REPLY: usize = 64 * 1024;

/// The state of a subscription's read loop that its decisions rest on.
#[derive(Debug)]
pub(super) struct Planner {
    batch_size: usize,
    block: Duration,
    reclaim: Option<ReclaimOptions>,
    lease_ttl: Duration,
    /// The slots taken for each read sent ahead, oldest first: the next steps take their
    /// replies, in that order.
    read_ahead: VecDeque<usize>,
    /// Where the drain of this consumer's own pending list has got to; `None` once done.
    drain: Option<DrainFrom>,
    next_reclaim: Instant,
    /// The in-flight limit is shared with other subscriptions (a member's partitions).
    shared_limit: bool,
    /// The last read of new entries came back full, on a shared limit: the next one waits
    /// for a batch of slots and does not block.
    backlog: bool,
}

/// What the planner asks of the subscription's shared state for one decision.
#[derive(Clone, Copy, Debug)]
pub(super) struct Facts {
    /// Slots taken for this step; 0 while none are.
    pub(super) budget: usize,
    /// When the earliest nacked entry is due to be retried, if one waits.
    pub(super) next_retry: Option<Instant>,
    /// Until when reclaim is held back (after this consumer's lease lapsed, or a step took
    /// far longer than its `BLOCK`), if it still is.
    pub(super) reclaim_held_until: Option<Instant>,
}

/// What the read loop does next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// No slots are taken yet: wait until at least one is free (`at_least` of a shared
    /// limit, for a partition with a backlog: see [`Planner::read_came_back`]), take up to
    /// `batch`, and ask again with them.
    WaitForCapacity { batch: usize, at_least: usize },
    /// Take this step with the slots taken.
    Run(Step),
}

/// One step of the read loop, with the slots it may fill.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Take the reply of the `XREADGROUP` sent ahead, whose `slots` were taken when it was sent.
    TakeReadAhead { slots: usize },
    /// Claim back the nacked entries that are due, up to `budget`.
    ClaimDue { budget: usize },
    /// Read `page` rows of this consumer's own pending list from `from`, and claim back up to
    /// `budget` of those this subscription does not own already.
    Drain {
        from: DrainFrom,
        page: usize,
        budget: usize,
    },
    /// Take over the entries of crashed consumers, then entries idle past `min_idle`.
    Reclaim { options: ReclaimOptions, budget: usize },
    /// Read up to `budget` new entries, waiting at most `block` for them.
    Read { budget: usize, block: Duration },
}

impl Step {
    /// The slots this step holds: what it does not fill is given back after it.
    pub(super) fn slots(&self) -> usize {
        match *self {
            Step::TakeReadAhead { slots } => slots,
            Step::ClaimDue { budget }
            | Step::Drain { budget, .. }
            | Step::Reclaim { budget, .. }
            | Step::Read { budget, .. } => budget,
        }
    }
}

/// Where the drain of this consumer's own pending list goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DrainFrom {
    /// From the oldest entry (`-`).
    Start,
    /// After this entry (`(id`).
    After(EntryId),
}

impl DrainFrom {
    /// The start argument of the `XPENDING` that reads the next page.
    pub(super) fn xpending_start(self) -> String {
        match self {
            DrainFrom::Start => "-".to_owned(),
            DrainFrom::After(id) => format!("({id}"),
        }
    }
}

/// A read to send ahead: try to take `want` slots, and send it only with `at_least` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ReadAhead {
    pub(super) want: usize,
    pub(super) at_least: usize,
}

impl Planner {
    /// The planner of a subscription with `options` and a lease of `lease_ttl`, started at
    /// `now`: it drains its own pending list first, and reclaim is due at once.
    pub(super) fn new(options: &SubscribeOptions, lease_ttl: Duration, now: Instant) -> Self {
        Planner {
            batch_size: options.batch_size,
            block: options.block,
            reclaim: options.reclaim,
            lease_ttl,
            read_ahead: VecDeque::with_capacity(MAX_READS_AHEAD),
            drain: Some(DrainFrom::Start),
            next_reclaim: now,
            shared_limit: options.in_flight.is_some(),
            backlog: false,
        }
    }

    /// The next step at `now`. A reclaim that is due but held back is put off until the hold
    /// ends, and the loop reads meanwhile.
    pub(super) fn next(&mut self, now: Instant, facts: Facts) -> Next {
        if let Some(slots) = self.read_ahead.pop_front() {
            return Next::Run(Step::TakeReadAhead { slots });
        }
        let budget = facts.budget;
        if budget == 0 {
            let at_least = if self.backlog { self.batch_size } else { 1 };
            return Next::WaitForCapacity {
                batch: self.batch_size,
                at_least,
            };
        }
        if facts.next_retry.is_some_and(|at| at <= now) {
            return Next::Run(Step::ClaimDue { budget });
        }
        if let Some(from) = self.drain {
            let page = budget.max(MIN_DRAIN_PAGE);
            return Next::Run(Step::Drain { from, page, budget });
        }
        if let Some(options) = self.reclaim.filter(|_| now >= self.next_reclaim) {
            self.next_reclaim = now + options.interval;
            match facts.reclaim_held_until {
                Some(until) if until > now => self.next_reclaim = self.next_reclaim.max(until),
                _ => return Next::Run(Step::Reclaim { options, budget }),
            }
        }
        let block = if self.backlog {
            // Slots beyond the share may be taken: not to be held by a read that waits.
            BACKLOG_BLOCK
        } else {
            self.block_for(now, facts.next_retry)
        };
        Next::Run(Step::Read { budget, block })
    }

    /// A read of new entries for `count` came back with `found`. On a shared limit, a full
    /// one says the stream has a backlog: the next read waits for a batch of slots
    /// rather than read its share of what is free, so that a member's partitions each read
    /// larger batches, in fewer round trips, while `max_in_flight` still bounds them all.
    /// That read does not block (it may hold more than the share); one that comes back
    /// short ends it.
    pub(super) fn read_came_back(&mut self, count: usize, found: usize) {
        self.backlog = self.shared_limit && found == count && count > 0;
    }

    /// How long a blocking read at `now` may wait: `block`, but no longer than until the next
    /// retry or reclaim is due, and at least 1 ms (`BLOCK 0` would wait for ever).
    fn block_for(&self, now: Instant, next_retry: Option<Instant>) -> Duration {
        let mut until = now + self.block;
        if let Some(at) = next_retry {
            until = until.min(at);
        }
        if self.reclaim.is_some() {
            until = until.min(self.next_reclaim);
        }
        until.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    /// Whether to send another `XREADGROUP` ahead, after a read came back full at `now` in a
    /// reply of `reply_bytes`: only while fewer than [`MAX_READS_AHEAD`] are under way (one
    /// after a reply over [`LARGE_REPLY`]) and no other step is due (a retry, the drain, a
    /// reclaim), and then only with at least half a batch of free slots, so whatever falls
    /// due waits for those reads' batches at most.
    pub(super) fn read_ahead(
        &self,
        now: Instant,
        next_retry: Option<Instant>,
        reply_bytes: usize,
    ) -> Option<ReadAhead> {
        let retry_due = next_retry.is_some_and(|at| at <= now);
        let reclaim_due = self.reclaim.is_some() && now >= self.next_reclaim;
        let limit = if reply_bytes > LARGE_REPLY {
            1
        } else {
            MAX_READS_AHEAD
        };
        let full = self.read_ahead.len() >= limit;
        if full || retry_due || reclaim_due || self.drain.is_some() {
            return None;
        }
        Some(ReadAhead {
            want: self.batch_size,
            at_least: self.batch_size.div_ceil(2),
        })
    }

    /// A read was sent ahead with `slots` taken: a later step takes its reply, after those
    /// of the reads sent before it.
    pub(super) fn sent_ahead(&mut self, slots: usize) {
        self.read_ahead.push_back(slots);
    }

    /// The read connection is gone: whatever it read into this consumer's pending list is
    /// found by a drain from the start. Returns the slots of the reads sent ahead on it, to
    /// give back.
    pub(super) fn connection_lost(&mut self) -> usize {
        self.drain = Some(DrainFrom::Start);
        self.read_ahead.drain(..).sum()
    }

    /// A drain step read `rows` (the ids of one page of `page` rows, in order): returns those
    /// to claim back, up to `budget`, skipping the entries `is_ours` (owned already), and
    /// moves the drain on. A full page means more may follow; what did not fit the budget is
    /// read on the next page.
    pub(super) fn drained(
        &mut self,
        rows: &[EntryId],
        page: usize,
        budget: usize,
        is_ours: impl Fn(&EntryId) -> bool,
    ) -> Vec<EntryId> {
        self.drain = match rows.last() {
            Some(last) if rows.len() == page => Some(DrainFrom::After(*last)),
            _ => None,
        };
        let ids: Vec<EntryId> = rows
            .iter()
            .copied()
            .filter(|id| !is_ours(id))
            .take(budget)
            .collect();
        if let Some(last) = ids.last()
            && ids.len() == budget
            && rows.iter().any(|id| id > last)
        {
            self.drain = Some(DrainFrom::After(*last));
        }
        ids
    }

    /// No reclaim before `until` (this consumer's lease lapsed, or a reclaim was cut off).
    pub(super) fn hold_back_reclaim(&mut self, until: Instant) {
        self.next_reclaim = self.next_reclaim.max(until);
    }

    /// Whether a step begun at `started` and ended at `now` took so much longer than a
    /// blocking read may that the server (or this process) was out of reach meanwhile: more
    /// than `block` plus a third of the lease TTL, the heartbeat's interval.
    pub(super) fn out_of_reach(&self, started: Instant, now: Instant) -> bool {
        now.saturating_duration_since(started) > self.block + self.lease_ttl / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: usize = 10;
    const BLOCK: Duration = Duration::from_secs(5);
    const TTL: Duration = Duration::from_secs(3);
    const RECLAIM: ReclaimOptions = ReclaimOptions {
        interval: Duration::from_secs(30),
        min_idle: Duration::from_secs(20),
    };

    fn options(reclaim: Option<ReclaimOptions>) -> SubscribeOptions {
        SubscribeOptions::new("g", "c")
            .batch_size(BATCH)
            .block(BLOCK)
            .reclaim(reclaim)
    }

    fn facts(budget: usize) -> Facts {
        Facts {
            budget,
            next_retry: None,
            reclaim_held_until: None,
        }
    }

    fn id(ms: u64) -> EntryId {
        EntryId::new(ms, 0)
    }

    /// A planner whose drain is done (a first, empty page).
    fn drained(reclaim: Option<ReclaimOptions>, now: Instant) -> Planner {
        let mut plan = Planner::new(&options(reclaim), TTL, now);
        assert!(plan.drained(&[], 16, BATCH, |_| false).is_empty());
        plan
    }

    /// The planner's answer while no slots are taken: a batch, waiting for `at_least`.
    fn wait_for_capacity(at_least: usize) -> Next {
        Next::WaitForCapacity {
            batch: BATCH,
            at_least,
        }
    }

    fn run(plan: &mut Planner, now: Instant, facts: Facts) -> Step {
        match plan.next(now, facts) {
            Next::Run(step) => step,
            other => panic!("expected a step, got {other:?}"),
        }
    }

    #[test]
    fn on_a_shared_limit_a_full_read_makes_the_next_wait_for_a_batch_and_not_block() {
        let now = Instant::now();
        let shared = crate::pubsub::InFlight::new(100).share(Default::default());
        let mut options = options(None);
        options.in_flight = Some(shared);
        let mut plan = Planner::new(&options, TTL, now);
        assert!(plan.drained(&[], 16, BATCH, |_| false).is_empty());
        plan.read_came_back(4, 4);
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(BATCH));
        assert_eq!(
            run(&mut plan, now, facts(BATCH)),
            Step::Read {
                budget: BATCH,
                block: BACKLOG_BLOCK
            }
        );
        // A short read: the backlog is gone, the next read waits as any.
        plan.read_came_back(BATCH, 3);
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(1));
        assert_eq!(
            run(&mut plan, now, facts(2)),
            Step::Read {
                budget: 2,
                block: BLOCK
            }
        );
    }

    #[test]
    fn on_an_own_limit_a_full_read_changes_nothing() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        plan.read_came_back(BATCH, BATCH);
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(1));
        assert_eq!(
            run(&mut plan, now, facts(BATCH)),
            Step::Read {
                budget: BATCH,
                block: BLOCK
            }
        );
    }

    #[test]
    fn a_step_waits_for_capacity_first_then_drains_from_the_start() {
        let now = Instant::now();
        let mut plan = Planner::new(&options(Some(RECLAIM)), TTL, now);
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(1));
        let step = run(&mut plan, now, facts(4));
        assert_eq!(
            step,
            Step::Drain {
                from: DrainFrom::Start,
                page: 16,
                budget: 4
            }
        );
        assert_eq!(step.slots(), 4);
        // A budget above the smallest page reads a page as large as the budget.
        let step = run(&mut plan, now, facts(100));
        assert!(matches!(step, Step::Drain { page: 100, .. }), "{step:?}");
    }

    #[test]
    fn a_read_sent_ahead_is_taken_before_anything_else() {
        let now = Instant::now();
        let mut plan = drained(Some(RECLAIM), now);
        plan.sent_ahead(7);
        let due = Facts {
            budget: 0,
            next_retry: Some(now),
            reclaim_held_until: None,
        };
        assert_eq!(plan.next(now, due), Next::Run(Step::TakeReadAhead { slots: 7 }));
        // Taken once: the next step waits for capacity again.
        assert_eq!(plan.next(now, due), wait_for_capacity(1));
    }

    #[test]
    fn two_reads_go_ahead_at_most_and_their_replies_are_taken_oldest_first() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        assert!(plan.read_ahead(now, None, 0).is_some());
        plan.sent_ahead(10);
        assert!(
            plan.read_ahead(now, None, 0).is_some(),
            "a second may follow the first"
        );
        plan.sent_ahead(5);
        assert_eq!(plan.read_ahead(now, None, 0), None, "two are under way");
        assert_eq!(
            plan.next(now, facts(0)),
            Next::Run(Step::TakeReadAhead { slots: 10 })
        );
        assert!(plan.read_ahead(now, None, 0).is_some(), "one is under way");
        assert_eq!(
            plan.next(now, facts(0)),
            Next::Run(Step::TakeReadAhead { slots: 5 })
        );
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(1));
    }

    #[test]
    fn after_a_large_reply_one_read_goes_ahead() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        assert!(plan.read_ahead(now, None, LARGE_REPLY + 1).is_some());
        plan.sent_ahead(10);
        assert_eq!(
            plan.read_ahead(now, None, LARGE_REPLY + 1),
            None,
            "one is under way"
        );
        assert!(
            plan.read_ahead(now, None, LARGE_REPLY).is_some(),
            "a small reply allows a second"
        );
    }

    #[test]
    fn retries_due_come_before_the_drain_and_not_before_they_are_due() {
        let now = Instant::now();
        let mut plan = Planner::new(&options(Some(RECLAIM)), TTL, now);
        let later = now + Duration::from_secs(1);
        let waiting = Facts {
            next_retry: Some(later),
            ..facts(3)
        };
        assert!(matches!(run(&mut plan, now, waiting), Step::Drain { .. }));
        assert_eq!(run(&mut plan, later, waiting), Step::ClaimDue { budget: 3 });
    }

    #[test]
    fn the_drain_comes_before_reclaim_and_reclaim_before_reads() {
        let now = Instant::now();
        let mut plan = Planner::new(&options(Some(RECLAIM)), TTL, now);
        assert!(matches!(run(&mut plan, now, facts(BATCH)), Step::Drain { .. }));
        assert!(plan.drained(&[id(1)], 16, BATCH, |_| false) == [id(1)]);
        // Reclaim is due at once on start, once the drain is done.
        assert_eq!(
            run(&mut plan, now, facts(BATCH)),
            Step::Reclaim {
                options: RECLAIM,
                budget: BATCH
            }
        );
        // Then not before its interval is up: reads wait until then at most.
        let soon = now + Duration::from_secs(29);
        assert_eq!(
            run(&mut plan, soon, facts(BATCH)),
            Step::Read {
                budget: BATCH,
                block: Duration::from_secs(1)
            }
        );
        let due = now + RECLAIM.interval;
        assert!(matches!(run(&mut plan, due, facts(BATCH)), Step::Reclaim { .. }));
    }

    #[test]
    fn without_reclaim_reads_wait_their_whole_block() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        assert_eq!(
            run(&mut plan, now, facts(2)),
            Step::Read {
                budget: 2,
                block: BLOCK
            }
        );
    }

    #[test]
    fn a_held_back_reclaim_waits_until_the_hold_ends_and_the_loop_reads_meanwhile() {
        let now = Instant::now();
        let mut plan = drained(Some(RECLAIM), now);
        let until = now + Duration::from_secs(40);
        let held = Facts {
            reclaim_held_until: Some(until),
            ..facts(BATCH)
        };
        // Held past the interval: the next reclaim is at the hold's end.
        assert_eq!(
            run(&mut plan, now, held),
            Step::Read {
                budget: BATCH,
                block: BLOCK
            }
        );
        let step = run(&mut plan, now + Duration::from_secs(39), facts(BATCH));
        assert_eq!(
            step,
            Step::Read {
                budget: BATCH,
                block: Duration::from_secs(1)
            }
        );
        assert!(matches!(
            run(&mut plan, until, facts(BATCH)),
            Step::Reclaim { .. }
        ));
        // A hold shorter than the interval puts it off by the interval.
        let mut plan = drained(Some(RECLAIM), now);
        let short = Facts {
            reclaim_held_until: Some(now + Duration::from_secs(1)),
            ..facts(BATCH)
        };
        assert!(matches!(run(&mut plan, now, short), Step::Read { .. }));
        let early = now + Duration::from_secs(2);
        assert!(matches!(run(&mut plan, early, facts(BATCH)), Step::Read { .. }));
        let due = now + RECLAIM.interval;
        assert!(matches!(run(&mut plan, due, facts(BATCH)), Step::Reclaim { .. }));
        // A hold that has ended holds nothing back.
        let mut plan = drained(Some(RECLAIM), now);
        let ended = Facts {
            reclaim_held_until: Some(now),
            ..facts(BATCH)
        };
        assert!(matches!(run(&mut plan, now, ended), Step::Reclaim { .. }));
    }

    #[test]
    fn holding_reclaim_back_only_ever_puts_it_later() {
        let now = Instant::now();
        let mut plan = drained(Some(RECLAIM), now);
        plan.hold_back_reclaim(now + Duration::from_secs(10));
        plan.hold_back_reclaim(now + Duration::from_secs(5));
        let before = now + Duration::from_secs(9);
        let step = run(&mut plan, before, facts(BATCH));
        assert_eq!(
            step,
            Step::Read {
                budget: BATCH,
                block: Duration::from_secs(1)
            }
        );
        let after = now + Duration::from_secs(10);
        assert!(matches!(
            run(&mut plan, after, facts(BATCH)),
            Step::Reclaim { .. }
        ));
    }

    #[test]
    fn a_read_waits_no_longer_than_the_next_retry_nor_less_than_a_millisecond() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        let retry = Facts {
            next_retry: Some(now + Duration::from_millis(250)),
            ..facts(BATCH)
        };
        let step = run(&mut plan, now, retry);
        assert_eq!(
            step,
            Step::Read {
                budget: BATCH,
                block: Duration::from_millis(250)
            }
        );
        let mut plan = drained(Some(RECLAIM), now);
        plan.next(now, facts(BATCH)); // the first reclaim
        let at_reclaim = now + RECLAIM.interval - Duration::from_micros(10);
        let step = run(&mut plan, at_reclaim, facts(BATCH));
        assert_eq!(
            step,
            Step::Read {
                budget: BATCH,
                block: Duration::from_millis(1)
            }
        );
    }

    #[test]
    fn a_read_is_sent_ahead_only_when_nothing_else_is_due() {
        let now = Instant::now();
        let plan = Planner::new(&options(None), TTL, now);
        assert_eq!(plan.read_ahead(now, None, 0), None, "the drain is due");
        let plan = drained(None, now);
        let ahead = ReadAhead {
            want: BATCH,
            at_least: 5,
        };
        assert_eq!(plan.read_ahead(now, None, 0), Some(ahead));
        assert_eq!(plan.read_ahead(now, Some(now + BLOCK), 0), Some(ahead));
        assert_eq!(plan.read_ahead(now, Some(now), 0), None, "a retry is due");
        let mut plan = drained(Some(RECLAIM), now);
        assert_eq!(plan.read_ahead(now, None, 0), None, "a reclaim is due");
        plan.next(now, facts(BATCH));
        assert_eq!(plan.read_ahead(now, None, 0), Some(ahead));
        // Half a batch, rounded up.
        let odd = SubscribeOptions::new("g", "c").batch_size(7);
        let mut plan = Planner::new(&odd, TTL, now);
        plan.drained(&[], 16, 7, |_| false);
        assert_eq!(plan.read_ahead(now, None, 0).map(|a| a.at_least), Some(4));
        let one = SubscribeOptions::new("g", "c").batch_size(1);
        let mut plan = Planner::new(&one, TTL, now);
        plan.drained(&[], 16, 1, |_| false);
        assert_eq!(plan.read_ahead(now, None, 0).map(|a| a.at_least), Some(1));
    }

    #[test]
    fn a_lost_connection_restarts_the_drain_and_gives_back_a_read_sent_ahead() {
        let now = Instant::now();
        let mut plan = drained(None, now);
        assert_eq!(plan.connection_lost(), 0);
        assert!(matches!(
            run(&mut plan, now, facts(1)),
            Step::Drain {
                from: DrainFrom::Start,
                ..
            }
        ));
        plan.drained(&[], 16, 1, |_| false);
        plan.sent_ahead(6);
        plan.sent_ahead(4);
        assert_eq!(plan.connection_lost(), 10, "both reads' slots");
        assert_eq!(plan.next(now, facts(0)), wait_for_capacity(1));
    }

    #[test]
    fn the_drain_pages_through_the_pending_list_skipping_what_is_owned() {
        let now = Instant::now();
        let mut plan = Planner::new(&options(None), TTL, now);
        let next_from = |plan: &mut Planner| match run(plan, now, facts(2)) {
            Step::Drain { from, .. } => Some(from),
            _ => None,
        };
        // A full page: more may follow, after its last row.
        let page: Vec<EntryId> = (1..=4).map(id).collect();
        let owned = id(2);
        assert_eq!(plan.drained(&page, 4, 8, |i| *i == owned), [id(1), id(3), id(4)]);
        assert_eq!(next_from(&mut plan), Some(DrainFrom::After(id(4))));
        // The budget cut a page short: the next page starts after the last one taken.
        assert_eq!(plan.drained(&page, 16, 2, |_| false), [id(1), id(2)]);
        assert_eq!(next_from(&mut plan), Some(DrainFrom::After(id(2))));
        // A budget filled by the page's last rows leaves nothing behind: done.
        assert_eq!(plan.drained(&page, 16, 3, |i| *i == id(1)), [id(2), id(3), id(4)]);
        assert_eq!(next_from(&mut plan), None);
        // A short page ends the drain.
        let mut plan = Planner::new(&options(None), TTL, now);
        assert_eq!(plan.drained(&page[..1], 16, 8, |_| false), [id(1)]);
        assert_eq!(next_from(&mut plan), None);
        // A full page of owned entries still moves on.
        let mut plan = Planner::new(&options(None), TTL, now);
        assert!(plan.drained(&page, 4, 8, |_| true).is_empty());
        assert_eq!(next_from(&mut plan), Some(DrainFrom::After(id(4))));
        assert_eq!(DrainFrom::Start.xpending_start(), "-");
        assert_eq!(DrainFrom::After(EntryId::new(5, 1)).xpending_start(), "(5-1");
    }

    #[test]
    fn a_step_is_out_of_reach_past_its_block_and_a_heartbeat() {
        let now = Instant::now();
        let plan = Planner::new(&options(None), TTL, now);
        assert!(!plan.out_of_reach(now, now + BLOCK + TTL / 3));
        assert!(plan.out_of_reach(now, now + BLOCK + TTL / 3 + Duration::from_millis(1)));
        // A clock read before the start counts as no time.
        assert!(!plan.out_of_reach(now + BLOCK, now));
    }
}
