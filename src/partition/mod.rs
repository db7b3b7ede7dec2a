//! Partitioned topics: one topic spread over `P` streams, with order kept per key across a
//! whole consumer group.
//!
//! This module owns what is the same on every backend: the names of the partition streams,
//! the hash of a key to its partition, the assignment of partitions to the live members of a
//! group, the publisher that routes by key ([`PartitionedPublisher`]) and the subscriber that
//! owns, reads and hands off partitions ([`PartitionedSubscriber`]). A backend gives it the
//! few things only it can keep, through [`PartitionCoordinator`]: the topic's partition count
//! and the group's membership.
//!
//! # The layout
//!
//! A topic `orders` with 4 partitions is the streams `orders~p0` ... `orders~p3`
//! ([`partition_stream`]). A `~` is not allowed in a topic a user names, so these streams can
//! never clash with another topic; each is an ordinary stream (with its own group, pending
//! list and dead-letter stream `{orders~p0}-dead`) that the admin API and the CLI can read
//! like any other. On a Redis Cluster the names hash to different slots, so the partitions
//! spread over the masters. The partition count is stored with the topic
//! ([`PartitionCoordinator::create_partitions`]) and never changes; asking for another count
//! is [`Error::PartitionMismatch`].
//!
//! # The hashes, for other languages
//!
//! - **Key to partition:** the 64-bit FNV-1a hash of the key's UTF-8 bytes (offset basis
//!   `0xcbf29ce484222325`, prime `0x100000001b3`), modulo the partition count
//!   ([`partition_for_key`]).
//! - **Partition to member** (rendezvous, or highest-random-weight, hashing): each live member
//!   scores `fmix64(fnv1a64(member) ^ fmix64(partition + 1))`, with `fmix64` the finalizer of
//!   MurmurHash3 (x64); the highest score owns the partition, the smaller name on a tie
//!   ([`owner_of`]). A member joining or leaving moves only the partitions it wins or held:
//!   about `P / N` of them.
//!
//! # Ownership and hand-off
//!
//! Every member of a group heartbeats a membership record with a TTL
//! ([`PartitionCoordinator::heartbeat`]), computes from the live members which partitions are
//! its own, and subscribes to each of them under the one consumer name
//! [`PARTITION_CONSUMER`]. The backend's consumer lease on that name is the partition's
//! ownership: only one live holder at a time, taken over when its holder stops renewing it,
//! and (on Redis) every ack of a partition is fenced on it in the same script step, so a
//! member that lost a partition cannot ack into it. Because every owner uses the same consumer
//! name, a new owner starts, as any consumer does, by draining that name's pending list: the
//! entries the previous owner had not acknowledged come first, in order, then new ones.
//!
//! A member that loses a partition in a rebalance stops reading it at once; the deliveries it
//! handed out are still handled and settled, their acks are flushed, and only then is the
//! lease released and the next owner can start. This waits at most
//! [`PartitionOptions::handoff_deadline`] (30 s): past it the member lets the partition go
//! whatever its handlers are doing, their late settlements are refused, and the next owner
//! handles their entries again (so a handler stuck that long may run beside the next owner's
//! handling of its key). A member that crashed holds its lease until it runs out (the
//! backend's lease TTL), and the next owner takes over the same way.
//!
//! # Reading
//!
//! A member reads its first [`PartitionOptions::dedicated_readers`] partitions (16) on
//! connections of their own, with blocking reads (Redis); the partitions it takes past those
//! read without blocking on one connection per server node that the subscriber shares, and are
//! polled every 100 ms while they have nothing new. `max_in_flight` bounds the deliveries out
//! across all of them.

mod coordinator;
mod publisher;
mod subscriber;

pub use self::coordinator::{Membership, PartitionCoordinator};
pub use self::publisher::PartitionedPublisher;
pub use self::subscriber::{PartitionOptions, PartitionedSubscriber};

use crate::error::{Error, Result, validate_name};

/// The most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The metadata field that carries a message's partition key
/// ([`PartitionedPublisher::publish_keyed`] sets it). The router keeps deliveries with the same
/// value in order.
pub const KEY_METADATA: &str = "partition_key";

/// The consumer name every owner of a partition reads it under, so that the next owner takes
/// over the previous one's pending list by draining its own.
pub const PARTITION_CONSUMER: &str = "owner";

/// The separator between a topic and its partition number in a partition stream's name.
const SEPARATOR: &str = "~p";

/// The stream that holds partition `partition` of `topic`: `orders~p3`.
///
/// ```
/// assert_eq!(streamwise::partition::partition_stream("orders", 3), "orders~p3");
/// ```
pub fn partition_stream(topic: &str, partition: u32) -> String {
    format!("{topic}{SEPARATOR}{partition}")
}

/// The topic and partition of a partition stream's name, when it is one (`orders~p3`).
pub fn parse_partition_stream(stream: &str) -> Option<(&str, u32)> {
    crate::error::split_partition_stream(stream)
}

/// Checks a partition count: 1 to [`MAX_PARTITIONS`].
pub fn validate_partitions(partitions: u32) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Error::invalid(
            "partitions",
            format_args!("{partitions} is not between 1 and {MAX_PARTITIONS}"),
        ));
    }
    Ok(())
}

/// Checks the name of a partitioned topic: a plain name ([`validate_name`]), without a hash tag
/// (its partitions must hash apart).
pub fn validate_topic(topic: &str) -> Result<()> {
    validate_name("topic", topic)
}

/// The partition count of `topic` for a publisher or subscriber that was told `declared`:
/// created so when the topic has none, [`Error::PartitionMismatch`] when it has another;
/// without a declaration, whatever is stored (`None`: not partitioned).
pub(crate) async fn resolve_count(
    coordinator: &dyn PartitionCoordinator,
    topic: &str,
    declared: Option<u32>,
) -> Result<Option<u32>> {
    let Some(requested) = declared else {
        return coordinator.partitions(topic).await;
    };
    validate_topic(topic)?;
    validate_partitions(requested)?;
    let stored = coordinator.create_partitions(topic, requested).await?;
    if stored != requested {
        return Err(Error::PartitionMismatch {
            topic: topic.to_owned(),
            stored,
            requested,
        });
    }
    Ok(Some(stored))
}

/// The error of making `topic` partitioned while a stream of that name exists.
pub(crate) fn stream_in_the_way(topic: &str) -> Error {
    Error::invalid(
        "topic",
        format_args!(
            "a stream named {topic:?} exists: its entries and groups would be hidden behind the partitions; \
             partition a new topic (or delete this stream first)"
        ),
    )
}

/// The 64-bit FNV-1a hash of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer: spreads every input bit over the whole output.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The partition of `key` among `partitions`: `fnv1a64(key) % partitions`.
///
/// ```
/// use streamwise::partition::partition_for_key;
/// assert_eq!(partition_for_key("customer-42", 8), partition_for_key("customer-42", 8));
/// assert!(partition_for_key("customer-42", 8) < 8);
/// ```
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let partitions = u64::from(partitions.max(1));
    // The remainder is below `partitions`, a u32.
    (fnv1a64(key.as_bytes()) % partitions) as u32
}

/// The rendezvous score of `member` for `partition`; the highest wins.
fn score(member: &str, partition: u32) -> u64 {
    fmix64(fnv1a64(member.as_bytes()) ^ fmix64(u64::from(partition) + 1))
}

/// The member that owns `partition` among `members` (rendezvous hashing), `None` when there
/// is none.
pub fn owner_of<S: AsRef<str>>(partition: u32, members: &[S]) -> Option<&str> {
    members.iter().map(AsRef::as_ref).max_by(|a, b| {
        score(a, partition)
            .cmp(&score(b, partition))
            .then_with(|| b.cmp(a))
    })
}

/// The partitions among `0..partitions` that `member` owns when `members` are the live ones.
pub fn assigned_to<S: AsRef<str>>(member: &str, members: &[S], partitions: u32) -> Vec<u32> {
    (0..partitions)
        .filter(|p| owner_of(*p, members) == Some(member))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partition_stream_names_round_trip_and_are_legal_stream_names() {
        for (topic, p) in [("orders", 0), ("a-b_c", 1023)] {
            let stream = partition_stream(topic, p);
            assert_eq!(parse_partition_stream(&stream), Some((topic, p)));
            crate::validate_stream_name("stream", &stream).unwrap();
            crate::validate_stream_name("stream", &crate::dead_letter::stream_for(&stream)).unwrap();
        }
        for bad in [
            "orders",
            "orders~p",
            "orders~p03",
            "orders~p+3",
            "~p3",
            "a.b~p3",
            "orders~px",
        ] {
            assert_eq!(parse_partition_stream(bad), None, "{bad}");
        }
        assert!(validate_topic("orders~p3").is_err(), "a partition is not a topic");
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[partition_for_key(&format!("customer-{i}"), 8) as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn rendezvous_balances_and_moves_only_what_the_change_needs() {
        let members: Vec<String> = (0..4).map(|i| format!("worker-{i}")).collect();
        let partitions = 256;
        let mut owned = std::collections::HashMap::new();
        for p in 0..partitions {
            *owned.entry(owner_of(p, &members).unwrap()).or_insert(0) += 1;
        }
        for (member, n) in &owned {
            assert!((40..=88).contains(n), "{member} owns {n} of 256");
        }
        // A fifth member joins: only partitions it wins move, about P/5 of them.
        let mut joined = members.clone();
        joined.push("worker-4".into());
        let mut moved = 0;
        for p in 0..partitions {
            let (before, after) = (owner_of(p, &members).unwrap(), owner_of(p, &joined).unwrap());
            if before != after {
                assert_eq!(after, "worker-4", "partition {p} moved between old members");
                moved += 1;
            }
        }
        assert!((30..=80).contains(&moved), "{moved} of 256 moved");
        // One leaves: only its own partitions move.
        let left: Vec<&String> = members.iter().filter(|m| *m != "worker-2").collect();
        for p in 0..partitions {
            let before = owner_of(p, &members).unwrap();
            if before != "worker-2" {
                assert_eq!(owner_of(p, &left), Some(before));
            }
        }
        assert_eq!(owner_of(0, &Vec::<String>::new()), None);
    }

    #[test]
    fn assignment_covers_every_partition_exactly_once() {
        let members = ["a", "b", "c"];
        let mut all: Vec<u32> = members
            .iter()
            .flat_map(|m| assigned_to(m, &members, 16))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
    }
}
