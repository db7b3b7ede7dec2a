//! A group's pending list in the in-memory backend: entries by id, oldest first.
//!
//! A group's entries become pending in id order (a new entry is always past every entry the
//! group was handed before) and mostly leave it in that order too, so the list is a sorted
//! deque: an entry that becomes pending is appended, one that leaves is marked gone and the
//! gone ones are dropped from the front, and lookups are binary searches. Per delivery this
//! costs a fraction of a `BTreeMap`'s insert and remove, which rebalance nodes. An entry that
//! stays pending while later ones leave keeps the gone ones behind it until they outnumber
//! the live ones, when the list is compacted (amortised constant time per removal).

use std::collections::VecDeque;

use crate::message::EntryId;

/// Entries by id, oldest first, each with a value (see the module docs).
#[derive(Debug)]
pub(crate) struct PendingList<T> {
    /// Sorted by id; `None` for an entry that left and was not dropped yet.
    slots: VecDeque<(EntryId, Option<T>)>,
    live: usize,
}

impl<T> Default for PendingList<T> {
    fn default() -> Self {
        PendingList {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

/// Gone slots kept at most, beyond as many as there are live ones, before a compaction.
const SLACK: usize = 32;

impl<T> PendingList<T> {
    /// How many entries are pending.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn slot(&self, id: &EntryId) -> Result<usize, usize> {
        // Acks come mostly in id order, and the front is never a gone slot: try it first.
        match self.slots.front() {
            Some((first, _)) if first == id => Ok(0),
            _ => self.slots.binary_search_by(|(slot, _)| slot.cmp(id)),
        }
    }

    pub(crate) fn get(&self, id: &EntryId) -> Option<&T> {
        let i = self.slot(id).ok()?;
        self.slots[i].1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &EntryId) -> Option<&mut T> {
        let i = self.slot(id).ok()?;
        self.slots[i].1.as_mut()
    }

    /// Makes `id` pending with `value` (replacing the value it had, if it was pending).
    pub(crate) fn insert(&mut self, id: EntryId, value: T) {
        match self.slots.back() {
            // The usual case: past every entry in the list.
            Some((last, _)) if *last < id => self.slots.push_back((id, Some(value))),
            None => self.slots.push_back((id, Some(value))),
            _ => match self.slot(&id) {
                Ok(i) => {
                    if self.slots[i].1.replace(value).is_some() {
                        return;
                    }
                }
                Err(i) => self.slots.insert(i, (id, Some(value))),
            },
        }
        self.live += 1;
    }

    /// Takes `id` off the list; its value, when it was pending.
    pub(crate) fn remove(&mut self, id: &EntryId) -> Option<T> {
        let i = self.slot(id).ok()?;
        let value = self.slots[i].1.take()?;
        self.live -= 1;
        while self.slots.front().is_some_and(|(_, v)| v.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() > 2 * self.live + SLACK {
            self.slots.retain(|(_, v)| v.is_some());
        }
        Some(value)
    }

    /// The pending entries, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&EntryId, &T)> {
        self.slots
            .iter()
            .filter_map(|(id, value)| value.as_ref().map(|v| (id, v)))
    }

    /// The pending entries' values, oldest first.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().filter_map(|(_, value)| value.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn id(n: u64) -> EntryId {
        EntryId::new(n, 0)
    }

    #[test]
    fn entries_come_back_in_id_order_whatever_the_order_they_came_and_left_in() {
        let mut list = PendingList::default();
        for n in [5, 1, 9, 3, 7] {
            list.insert(id(n), n);
        }
        list.insert(id(3), 30);
        assert_eq!(list.len(), 5);
        assert_eq!(list.remove(&id(9)), Some(9));
        assert_eq!(list.remove(&id(9)), None);
        assert_eq!(list.remove(&id(4)), None);
        let left: Vec<_> = list.iter().map(|(id, v)| (id.ms(), *v)).collect();
        assert_eq!(left, [(1, 1), (3, 30), (5, 5), (7, 7)]);
        assert_eq!(list.get(&id(5)), Some(&5));
        *list.get_mut(&id(5)).unwrap() += 1;
        assert_eq!(list.get(&id(5)), Some(&6));
        for v in list.values_mut() {
            *v = 0;
        }
        assert!(list.iter().all(|(_, v)| *v == 0));
        for n in [1, 3, 5, 7] {
            assert!(list.remove(&id(n)).is_some());
        }
        assert!(list.is_empty());
        assert!(list.slots.is_empty(), "gone slots dropped: {:?}", list.slots);
    }

    /// An old entry that stays pending while many later ones come and go does not keep them
    /// all: the list stays within twice the live entries plus the slack.
    #[test]
    fn a_stuck_entry_does_not_make_the_list_grow_without_bound() {
        let mut list = PendingList::default();
        list.insert(id(0), ());
        for n in 1..100_000 {
            list.insert(id(n), ());
            list.remove(&id(n));
            assert!(list.slots.len() <= 2 * list.len() + SLACK + 1);
        }
        assert_eq!(list.len(), 1);
        assert!(list.get(&id(0)).is_some());
    }

    /// Random inserts, updates and removals (deterministic), checked against a `BTreeMap`.
    #[test]
    fn behaves_as_a_sorted_map() {
        let mut list = PendingList::default();
        let mut map = BTreeMap::new();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut newest = 0;
        for step in 0..50_000u64 {
            match next(10) {
                // Mostly new entries past the last, as a group's reads make them.
                0..=4 => {
                    newest += 1 + next(3);
                    list.insert(id(newest), step);
                    map.insert(id(newest), step);
                }
                5 => {
                    let n = next(newest + 1);
                    list.insert(id(n), step);
                    map.insert(id(n), step);
                }
                _ => {
                    // Mostly the oldest leave, sometimes any.
                    let n = match map.keys().next() {
                        Some(first) if next(4) > 0 => first.ms(),
                        _ => next(newest + 1),
                    };
                    assert_eq!(list.remove(&id(n)), map.remove(&id(n)));
                }
            }
            assert_eq!(list.len(), map.len());
        }
        assert!(list.iter().map(|(id, v)| (*id, *v)).eq(map.into_iter()));
    }
}
