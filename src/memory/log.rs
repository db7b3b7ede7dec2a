//! The stream log of the in-memory backend: entries, consumer groups and their pending lists,
//! as Redis keeps them. Synchronous and clock-free (callers pass `now`), so it is easy to test.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::pending::PendingList;
use crate::message::{EntryId, Message};
use crate::pubsub::StartFrom;

/// One stream: entries in id order, and its groups.
#[derive(Debug, Default)]
pub(crate) struct StreamLog {
    entries: VecDeque<Stored>,
    last_id: EntryId,
    groups: Vec<Group>,
    /// Entries that were trimmed away while still pending in some group.
    pub(crate) trimmed_pending: u64,
}

/// An entry, and whether its payload is JSON (checked once, when it was appended).
#[derive(Debug)]
struct Stored {
    id: EntryId,
    message: Message,
    json: bool,
}

#[derive(Debug)]
struct Group {
    name: Arc<str>,
    last_delivered: EntryId,
    pending: PendingList<Pending>,
    /// Nacked entries by the time they may be delivered again (to their owner).
    retry: RetryQueue,
    live_consumers: HashSet<Arc<str>>,
    /// The highest id each consumer acknowledged, for its checkpoint.
    acked_up_to: AckedUpTo,
}

type RetryQueue = BTreeSet<(Instant, EntryId)>;

/// The highest id each consumer of a group acknowledged. An ack names its consumer by the same
/// `Arc` its pending entry holds, and a group's acks come mostly from the consumer that acked
/// last: a list kept most recent first, searched by pointer, is cheaper per ack than hashing
/// the name.
#[derive(Debug, Default)]
struct AckedUpTo(Vec<(Arc<str>, EntryId)>);

impl AckedUpTo {
    /// `consumer` acknowledged `id`.
    fn raise(&mut self, consumer: Arc<str>, id: EntryId) {
        let found = match self.0.iter().position(|(c, _)| Arc::ptr_eq(c, &consumer)) {
            Some(i) => Some(i),
            None => self.0.iter().position(|(c, _)| *c == consumer),
        };
        match found {
            Some(i) => {
                let acked = &mut self.0[i].1;
                *acked = (*acked).max(id);
                if i > 0 {
                    self.0.swap(0, i);
                }
            }
            None => {
                self.0.push((consumer, id));
                let last = self.0.len() - 1;
                self.0.swap(0, last);
            }
        }
    }

    fn get(&self, consumer: &str) -> Option<EntryId> {
        self.0.iter().find(|(c, _)| &**c == consumer).map(|(_, id)| *id)
    }
}

#[derive(Debug)]
struct Pending {
    consumer: Arc<str>,
    delivery_count: u64,
    delivered_at: Instant,
    /// Held by a live, unsettled delivery: not to be handed out again.
    in_flight: bool,
    /// Nacked: waiting in `retry` until this time.
    retry_at: Option<Instant>,
}

/// An entry handed to a consumer by [`StreamLog::fetch`].
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) id: EntryId,
    pub(crate) message: Message,
    pub(crate) delivery_count: u64,
}

/// An entry a fetch gave up on, to be written to the dead-letter stream.
#[derive(Debug)]
pub(crate) struct GivenUp {
    pub(crate) id: EntryId,
    /// `None` when the entry was trimmed from the stream while pending.
    pub(crate) message: Option<Message>,
    pub(crate) delivery_count: u64,
    pub(crate) why: GiveUp,
}

/// Why a fetch gave up on an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Delivered `max_deliveries` times.
    Exceeded,
    /// Trimmed from the stream while pending.
    Trimmed,
    /// Its payload is not JSON: never handed out (a Redis subscriber dead-letters such an
    /// entry on its first read, too).
    NotJson,
}

/// What a fetch may do besides reading new entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FetchPlan {
    /// Redeliver the consumer's own pending entries left by an earlier subscription (as a
    /// Redis consumer does when it reads its history from id `0` on start).
    pub(crate) drain_own: bool,
    /// Take over entries idle at least this long.
    pub(crate) reclaim_min_idle: Option<Duration>,
    /// Entries delivered this many times are given up instead of delivered again.
    pub(crate) max_deliveries: u64,
}

/// What a fetch produced.
#[derive(Debug, Default)]
pub(crate) struct FetchOut {
    pub(crate) fetched: Vec<Fetched>,
    pub(crate) given_up: Vec<GivenUp>,
    /// Some of the consumer's own leftovers did not fit the budget: drain again.
    pub(crate) own_left: bool,
    /// The reclaim of the plan ran (it is skipped when the budget was used up before it).
    pub(crate) reclaim_ran: bool,
    /// When the earliest of this consumer's nacked entries becomes due.
    pub(crate) next_retry: Option<Instant>,
}

impl StreamLog {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends `message`, trimming the oldest entries beyond `max_length`.
    #[cfg(test)]
    pub(crate) fn append(&mut self, message: Message, now_ms: u64, max_length: Option<usize>) -> EntryId {
        let json = crate::message::check_json(message.payload()).is_ok();
        self.append_checked(message, json, now_ms, max_length)
    }

    /// Appends `message`, whose payload is JSON or not as `json` says (checked by the caller,
    /// outside the lock), trimming the oldest entries beyond `max_length`.
    pub(crate) fn append_checked(
        &mut self,
        message: Message,
        json: bool,
        now_ms: u64,
        max_length: Option<usize>,
    ) -> EntryId {
        let id = self.last_id.next_at(now_ms);
        self.last_id = id;
        self.entries.push_back(Stored { id, message, json });
        if let Some(max) = max_length {
            while self.entries.len() > max {
                self.entries.pop_front();
            }
        }
        id
    }

    fn group_index(&self, group: &str) -> Option<usize> {
        self.groups.iter().position(|g| &*g.name == group)
    }

    pub(crate) fn has_group(&self, group: &str) -> bool {
        self.group_index(group).is_some()
    }

    /// Creates `group` starting at `start`; `false` when it already existed.
    pub(crate) fn create_group(&mut self, group: &str, start: StartFrom) -> bool {
        if self.has_group(group) {
            return false;
        }
        let last_delivered = match start {
            StartFrom::Beginning => EntryId::ZERO,
            StartFrom::Latest => self.last_id,
            StartFrom::After(id) => id,
        };
        self.groups.push(Group {
            name: group.into(),
            last_delivered,
            pending: PendingList::default(),
            retry: BTreeSet::new(),
            live_consumers: HashSet::new(),
            acked_up_to: AckedUpTo::default(),
        });
        true
    }

    /// Marks `consumer` live in `group`; `false` when another live one has the name.
    pub(crate) fn register_consumer(&mut self, group: &str, consumer: &Arc<str>) -> bool {
        match self.group_index(group) {
            Some(i) => self.groups[i].live_consumers.insert(consumer.clone()),
            None => false,
        }
    }

    pub(crate) fn unregister_consumer(&mut self, group: &str, consumer: &str) {
        if let Some(i) = self.group_index(group) {
            self.groups[i].live_consumers.remove(consumer);
        }
    }

    pub(crate) fn entries(&self) -> Vec<(EntryId, Message)> {
        self.entries.iter().map(|e| (e.id, e.message.clone())).collect()
    }

    /// Every group has read up to the last entry and has nothing pending.
    pub(crate) fn is_idle(&self) -> bool {
        let last = self.entries.back().map(|e| e.id);
        self.groups
            .iter()
            .all(|g| g.pending.is_empty() && last.is_none_or(|last| g.last_delivered >= last))
    }

    pub(crate) fn pending_count(&self, group: &str) -> Option<usize> {
        self.group_index(group).map(|i| self.groups[i].pending.len())
    }

    fn message(&self, id: EntryId) -> Option<&Message> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.entries[i].message)
    }

    /// Hands up to `budget` entries to `consumer`, in this order: its nacked entries that are
    /// due; per `plan`, its own leftovers and entries idle past `min_idle` (any owner, as
    /// `XAUTOCLAIM`); then new entries. Entries past `max_deliveries` or trimmed away leave
    /// the pending list into `out.given_up`.
    pub(crate) fn fetch(
        &mut self,
        group: &str,
        consumer: &Arc<str>,
        budget: usize,
        now: Instant,
        plan: FetchPlan,
        out: &mut FetchOut,
    ) {
        let Some(gi) = self.group_index(group) else {
            return;
        };
        let g = &mut self.groups[gi];
        let mut redeliver: Vec<EntryId> = Vec::new();

        // This consumer's nacked entries whose delay is over (a nack redelivers to the
        // consumer that nacked, as the Redis backend does).
        let due: Vec<(Instant, EntryId)> = g
            .retry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter(|(_, id)| g.pending.get(id).is_some_and(|p| p.consumer == *consumer))
            .take(budget)
            .copied()
            .collect();
        for key in &due {
            g.retry.remove(key);
            redeliver.push(key.1);
        }

        let idle_owned = |p: &Pending| !p.in_flight;
        if plan.drain_own && redeliver.len() < budget {
            let mut own = g
                .pending
                .iter()
                .filter(|(_, p)| idle_owned(p) && p.consumer == *consumer)
                .map(|(id, _)| *id);
            redeliver.extend(own.by_ref().take(budget - redeliver.len()));
            out.own_left = own.next().is_some();
        }
        if let Some(min_idle) = plan.reclaim_min_idle
            && redeliver.len() < budget
        {
            out.reclaim_ran = true;
            let idle: Vec<EntryId> = g
                .pending
                .iter()
                .filter(|(id, p)| {
                    idle_owned(p)
                        && now.saturating_duration_since(p.delivered_at) >= min_idle
                        && !redeliver.contains(id)
                })
                .map(|(id, _)| *id)
                .take(budget - redeliver.len())
                .collect();
            redeliver.extend(idle);
        }

        for id in redeliver {
            let message = self.message(id).cloned();
            let g = &mut self.groups[gi];
            let Some(p) = g.pending.get_mut(&id) else {
                continue;
            };
            if let Some(at) = p.retry_at.take() {
                g.retry.remove(&(at, id));
            }
            match message {
                Some(message) if p.delivery_count < plan.max_deliveries => {
                    p.consumer = consumer.clone();
                    p.delivery_count += 1;
                    p.delivered_at = now;
                    p.in_flight = true;
                    out.fetched.push(Fetched {
                        id,
                        message,
                        delivery_count: p.delivery_count,
                    });
                }
                message => {
                    let why = if message.is_some() {
                        GiveUp::Exceeded
                    } else {
                        GiveUp::Trimmed
                    };
                    if message.is_none() {
                        self.trimmed_pending += 1;
                        tracing::warn!(
                            group = %g.name,
                            id = %id,
                            "pending entry was trimmed from the stream before it was acknowledged"
                        );
                    }
                    out.given_up.push(GivenUp {
                        id,
                        message,
                        delivery_count: p.delivery_count,
                        why,
                    });
                    g.pending.remove(&id);
                }
            }
        }

        // New entries. Given-up entries hold no slot, so they leave the budget untouched.
        let taken = out.fetched.len();
        let g = &mut self.groups[gi];
        if taken < budget {
            let from = self.entries.partition_point(|e| e.id <= g.last_delivered);
            let mut room = budget - taken;
            for Stored { id, message, json } in self.entries.range(from..) {
                if room == 0 {
                    break;
                }
                g.last_delivered = *id;
                if !json {
                    out.given_up.push(GivenUp {
                        id: *id,
                        message: Some(message.clone()),
                        delivery_count: 1,
                        why: GiveUp::NotJson,
                    });
                    continue;
                }
                room -= 1;
                g.pending.insert(
                    *id,
                    Pending {
                        consumer: consumer.clone(),
                        delivery_count: 1,
                        delivered_at: now,
                        in_flight: true,
                        retry_at: None,
                    },
                );
                out.fetched.push(Fetched {
                    id: *id,
                    message: message.clone(),
                    delivery_count: 1,
                });
            }
        }
        out.next_retry = g
            .retry
            .iter()
            .find(|(_, id)| g.pending.get(id).is_some_and(|p| p.consumer == *consumer))
            .map(|(at, _)| *at);
    }

    /// Removes `id` from the group's pending list; `true` when it was pending.
    pub(crate) fn ack(&mut self, group: &str, id: EntryId) -> bool {
        let Some(gi) = self.group_index(group) else {
            return false;
        };
        let g = &mut self.groups[gi];
        match g.pending.remove(&id) {
            Some(p) => {
                if let Some(at) = p.retry_at {
                    g.retry.remove(&(at, id));
                }
                g.acked_up_to.raise(p.consumer, id);
                true
            }
            None => false,
        }
    }

    /// The checkpoint of `consumer`, as the Redis backend keeps it: the highest id it
    /// acknowledged, or just below the oldest entry still pending for it when that is older.
    /// `None` before its first acknowledgement.
    pub(crate) fn position(&self, group: &str, consumer: &str) -> Option<EntryId> {
        let g = &self.groups[self.group_index(group)?];
        let acked = g.acked_up_to.get(consumer)?;
        let oldest = g
            .pending
            .iter()
            .find(|(_, p)| &*p.consumer == consumer)
            .map(|(id, _)| *id);
        match oldest {
            Some(oldest) if oldest <= acked => oldest.prev(),
            _ => Some(acked),
        }
    }

    /// The entries pending for `consumer`, oldest first.
    pub(crate) fn pending_of(&self, group: &str, consumer: &str) -> Option<Vec<EntryId>> {
        let g = &self.groups[self.group_index(group)?];
        Some(
            g.pending
                .iter()
                .filter(|(_, p)| &*p.consumer == consumer)
                .map(|(id, _)| *id)
                .collect(),
        )
    }

    /// The pending entry `id`, if the live subscription of `consumer` holds it, and the
    /// group's retry queue.
    fn held_by(
        &mut self,
        group: &str,
        id: EntryId,
        consumer: &str,
    ) -> Option<(&mut Pending, &mut RetryQueue)> {
        let gi = self.group_index(group)?;
        let Group { pending, retry, .. } = &mut self.groups[gi];
        let p = pending
            .get_mut(&id)
            .filter(|p| p.in_flight && &*p.consumer == consumer)?;
        Some((p, retry))
    }

    /// Makes `id`, held by `consumer`, deliverable again from `ready_at` on.
    pub(crate) fn nack(&mut self, group: &str, id: EntryId, consumer: &str, ready_at: Instant) {
        if let Some((p, retry)) = self.held_by(group, id, consumer) {
            p.in_flight = false;
            p.retry_at = Some(ready_at);
            retry.insert((ready_at, id));
        }
    }

    /// Nothing is held by `consumer`'s subscription any more (it was abandoned): its entries
    /// stay pending, owned by it, for the next holder of the name to drain.
    pub(crate) fn release_all(&mut self, group: &str, consumer: &str) {
        if let Some(gi) = self.group_index(group) {
            for p in self.groups[gi].pending.values_mut() {
                if &*p.consumer == consumer {
                    p.in_flight = false;
                }
            }
        }
    }

    /// `id` is no longer held by `consumer`'s subscription but stays pending, owned by it.
    pub(crate) fn release(&mut self, group: &str, id: EntryId, consumer: &str) {
        if let Some((p, _)) = self.held_by(group, id, consumer) {
            p.in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_up_to_keeps_each_consumers_highest_id_by_name() {
        let mut acked = AckedUpTo::default();
        let (a, b) = (Arc::<str>::from("a"), Arc::<str>::from("b"));
        acked.raise(a.clone(), EntryId::new(1, 0));
        acked.raise(b.clone(), EntryId::new(5, 0));
        acked.raise(a.clone(), EntryId::new(3, 0));
        // A lower id does not move it back; another `Arc` of the same name is the same consumer.
        acked.raise(Arc::from("a"), EntryId::new(2, 0));
        acked.raise(b, EntryId::new(4, 0));
        assert_eq!(acked.get("a"), Some(EntryId::new(3, 0)));
        assert_eq!(acked.get("b"), Some(EntryId::new(5, 0)));
        assert_eq!(acked.get("c"), None);
        assert_eq!(acked.0.len(), 2);
    }

    const PLAN: FetchPlan = FetchPlan {
        drain_own: false,
        reclaim_min_idle: None,
        max_deliveries: 10,
    };

    /// Fetches up to 10 entries into `out`, asserting that nothing was given up; returns the
    /// next retry time.
    fn fetch(
        log: &mut StreamLog,
        group: &str,
        c: &Arc<str>,
        now: Instant,
        plan: FetchPlan,
        out: &mut Vec<Fetched>,
    ) -> Option<Instant> {
        let mut o = FetchOut::default();
        log.fetch(group, c, 10, now, plan, &mut o);
        assert!(o.given_up.is_empty(), "gave up {:?}", o.given_up);
        out.extend(o.fetched);
        o.next_retry
    }

    fn msg(n: u32) -> Message {
        Message::new("t", &n).unwrap()
    }

    /// A log with one entry, `1-0`, and group `g`, which has not read it yet.
    fn one_entry_for_group_g() -> StreamLog {
        let mut log = StreamLog::default();
        log.create_group("g", StartFrom::Beginning);
        log.append(msg(0), 1, None);
        log
    }

    fn ids(out: &[Fetched]) -> Vec<String> {
        out.iter()
            .map(|f| format!("{}#{}", f.id, f.delivery_count))
            .collect()
    }

    #[test]
    fn ids_increase_within_and_across_milliseconds() {
        let mut log = StreamLog::default();
        assert_eq!(log.append(msg(0), 10, None), EntryId::new(10, 0));
        assert_eq!(log.append(msg(1), 10, None), EntryId::new(10, 1));
        // A clock that goes back never makes ids go back.
        assert_eq!(log.append(msg(2), 5, None), EntryId::new(10, 2));
        assert_eq!(log.append(msg(3), 11, None), EntryId::new(11, 0));
    }

    #[test]
    fn max_length_trims_the_oldest() {
        let mut log = StreamLog::default();
        for n in 0..10 {
            log.append(msg(n), 1, Some(3));
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.entries.front().unwrap().id, EntryId::new(1, 7));
    }

    #[test]
    fn groups_start_where_told_and_share_nothing() {
        let mut log = StreamLog::default();
        log.append(msg(0), 1, None);
        assert!(log.create_group("all", StartFrom::Beginning));
        assert!(!log.create_group("all", StartFrom::Latest));
        assert!(log.create_group("new", StartFrom::Latest));
        log.append(msg(1), 2, None);
        let now = Instant::now();
        let c: Arc<str> = "c".into();
        let mut out = Vec::new();
        fetch(&mut log, "all", &c, now, PLAN, &mut out);
        assert_eq!(ids(&out), ["1-0#1", "2-0#1"]);
        out.clear();
        fetch(&mut log, "new", &c, now, PLAN, &mut out);
        assert_eq!(ids(&out), ["2-0#1"]);
    }

    #[test]
    fn nack_redelivers_after_the_delay_with_a_higher_count() {
        let mut log = one_entry_for_group_g();
        let c: Arc<str> = "c".into();
        let now = Instant::now();
        let mut out = Vec::new();
        fetch(&mut log, "g", &c, now, PLAN, &mut out);
        let later = now + Duration::from_secs(5);
        log.nack("g", EntryId::new(1, 0), "c", later);
        out.clear();
        let due = fetch(&mut log, "g", &c, now + Duration::from_secs(4), PLAN, &mut out);
        assert!(out.is_empty());
        assert_eq!(due, Some(later));
        fetch(&mut log, "g", &c, later, PLAN, &mut out);
        assert_eq!(ids(&out), ["1-0#2"]);
        assert!(log.ack("g", EntryId::new(1, 0)));
        assert_eq!(log.pending_count("g"), Some(0));
    }

    #[test]
    fn released_entries_come_back_only_by_drain_or_reclaim() {
        let mut log = one_entry_for_group_g();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let now = Instant::now();
        let mut out = Vec::new();
        fetch(&mut log, "g", &a, now, PLAN, &mut out);
        log.release("g", EntryId::new(1, 0), "a");
        out.clear();
        fetch(&mut log, "g", &a, now, PLAN, &mut out);
        assert!(out.is_empty(), "a released entry is not re-read by a plain fetch");
        let reclaim = FetchPlan {
            reclaim_min_idle: Some(Duration::from_secs(1)),
            ..PLAN
        };
        fetch(&mut log, "g", &b, now, reclaim, &mut out);
        assert!(out.is_empty(), "not idle long enough yet");
        fetch(&mut log, "g", &b, now + Duration::from_secs(1), reclaim, &mut out);
        assert_eq!(ids(&out), ["1-0#2"]);
        log.release("g", EntryId::new(1, 0), "b");
        out.clear();
        let drain = FetchPlan {
            drain_own: true,
            ..PLAN
        };
        fetch(&mut log, "g", &a, now, drain, &mut out);
        assert!(out.is_empty(), "the entry now belongs to b");
        fetch(&mut log, "g", &b, now, drain, &mut out);
        assert_eq!(ids(&out), ["1-0#3"]);
    }

    #[test]
    fn a_pending_entry_trimmed_away_is_counted_not_redelivered() {
        let mut log = StreamLog::default();
        log.create_group("g", StartFrom::Beginning);
        log.append(msg(0), 1, Some(1));
        let c: Arc<str> = "c".into();
        let now = Instant::now();
        let mut o = FetchOut::default();
        log.fetch("g", &c, 1, now, PLAN, &mut o);
        log.nack("g", EntryId::new(1, 0), "c", now);
        log.append(msg(1), 2, Some(1));
        let mut o = FetchOut::default();
        log.fetch("g", &c, 10, now, PLAN, &mut o);
        assert_eq!(ids(&o.fetched), ["2-0#1"]);
        assert_eq!(log.trimmed_pending, 1);
        assert_eq!(log.pending_count("g"), Some(1));
        assert_eq!(o.given_up.len(), 1);
        assert!(o.given_up[0].message.is_none());
        assert_eq!(
            (o.given_up[0].id, o.given_up[0].delivery_count),
            (EntryId::new(1, 0), 1)
        );
    }

    #[test]
    fn an_entry_is_given_up_after_max_deliveries() {
        let mut log = one_entry_for_group_g();
        let c: Arc<str> = "c".into();
        let now = Instant::now();
        let plan = FetchPlan {
            max_deliveries: 2,
            ..PLAN
        };
        for expected in ["1-0#1", "1-0#2"] {
            let mut o = FetchOut::default();
            log.fetch("g", &c, 10, now, plan, &mut o);
            assert_eq!(ids(&o.fetched), [expected]);
            log.nack("g", EntryId::new(1, 0), "c", now);
        }
        let mut o = FetchOut::default();
        log.fetch("g", &c, 10, now, plan, &mut o);
        assert!(o.fetched.is_empty());
        assert_eq!(o.given_up.len(), 1);
        assert_eq!(o.given_up[0].delivery_count, 2);
        assert!(o.given_up[0].message.is_some());
        assert_eq!(log.pending_count("g"), Some(0));
    }

    #[test]
    fn a_nack_redelivers_to_the_consumer_that_nacked_unless_reclaimed() {
        let mut log = one_entry_for_group_g();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let now = Instant::now();
        let mut out = Vec::new();
        fetch(&mut log, "g", &a, now, PLAN, &mut out);
        log.nack("g", EntryId::new(1, 0), "a", now);
        out.clear();
        fetch(&mut log, "g", &b, now, PLAN, &mut out);
        assert!(out.is_empty(), "another consumer must not get a's nacked entry");
        let later = now + Duration::from_secs(2);
        let reclaim = FetchPlan {
            reclaim_min_idle: Some(Duration::from_secs(1)),
            ..PLAN
        };
        fetch(&mut log, "g", &b, later, reclaim, &mut out);
        assert_eq!(ids(&out), ["1-0#2"], "idle past min_idle: reclaimable");
        out.clear();
        assert_eq!(fetch(&mut log, "g", &a, later, PLAN, &mut out), None);
        assert!(out.is_empty(), "a's retry went with the entry");
    }

    #[test]
    fn draining_reports_leftovers_beyond_the_budget() {
        let mut log = StreamLog::default();
        log.create_group("g", StartFrom::Beginning);
        let c: Arc<str> = "c".into();
        let now = Instant::now();
        for n in 0..5 {
            log.append(msg(n), 1, None);
        }
        let mut o = FetchOut::default();
        log.fetch("g", &c, 5, now, PLAN, &mut o);
        for f in &o.fetched {
            log.release("g", f.id, "c");
        }
        let drain = FetchPlan {
            drain_own: true,
            ..PLAN
        };
        let mut o = FetchOut::default();
        log.fetch("g", &c, 2, now, drain, &mut o);
        assert_eq!((o.fetched.len(), o.own_left), (2, true));
        let mut o = FetchOut::default();
        log.fetch("g", &c, 3, now, drain, &mut o);
        assert_eq!((o.fetched.len(), o.own_left), (3, false));
    }

    #[test]
    fn a_consumer_name_is_live_once() {
        let mut log = StreamLog::default();
        log.create_group("g", StartFrom::Beginning);
        let c: Arc<str> = "c".into();
        assert!(log.register_consumer("g", &c));
        assert!(!log.register_consumer("g", &c));
        log.unregister_consumer("g", "c");
        assert!(log.register_consumer("g", &c));
    }
}
