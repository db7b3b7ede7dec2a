//! [`SubscriberStats`]: what a subscriber's subscriptions had to deal with, counted for
//! metrics, and [`StatsSnapshot`], the counters at one moment.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what a subscriber had to deal with, for metrics.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    pub(super) acked: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) undecodable: AtomicU64,
    pub(super) oversized: AtomicU64,
    pub(super) trimmed_pending: AtomicU64,
    pub(super) reclaimed: AtomicU64,
    pub(super) crashed_consumers: AtomicU64,
    pub(super) read_errors: AtomicU64,
    pub(super) dead_letter_failures: AtomicU64,
    pub(super) unclaimable: AtomicU64,
    pub(super) fenced: AtomicU64,
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
    /// Acks refused because the consumer's lease had gone to another holder (a partition
    /// handed on while this member was cut off): those entries are the new holder's.
    pub fenced: u64,
}

impl SubscriberStats {
    /// Adds `n` to `counter`, one of this struct's.
    pub(super) fn add(counter: &AtomicU64, n: u64) {
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
            fenced: get(&self.fenced),
        }
    }
}
