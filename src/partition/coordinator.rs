//! [`PartitionCoordinator`]: what a backend keeps for partitioned topics.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::error::Result;

/// What a heartbeat of a group member found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// The member is live; these are all the live members of the group, sorted, itself
    /// included.
    Live(Vec<String>),
    /// Another process holds this member name (its record is live under another token).
    Taken,
}

/// The state a backend keeps for partitioned topics: each topic's partition count and each
/// group's live members. The Redis backend keeps both in the topic's hash slot
/// (`streamwise:meta:{<topic>}` field `partitions`, and the members of a group in
/// `streamwise:members:{<topic>}:<group>`), the in-memory backend in its broker.
///
/// Object-safe, so that [`PartitionedPublisher`](super::PartitionedPublisher) and
/// [`PartitionedSubscriber`](super::PartitionedSubscriber) work on any backend.
pub trait PartitionCoordinator: Send + Sync {
    /// The partition count stored with `topic`; `None` when the topic is not partitioned.
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Option<u32>>>;

    /// Stores `partitions` as `topic`'s count unless it has one, and returns the count it has
    /// now (another than `partitions` when one was stored before: the caller decides whether
    /// that is an error).
    fn create_partitions<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<u32>>;

    /// Forgets `topic`'s partition count (its partition streams are deleted apart, by
    /// [`PartitionedSubscriber::delete_topic`](super::PartitionedSubscriber)).
    fn delete_partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Records `member` of `group` on `topic` as live for `ttl` under `token` (which tells
    /// this process's member from another one with the same name), forgets members whose
    /// time ran out, and returns the live ones.
    fn heartbeat<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Membership>>;

    /// Removes `member`'s record, if it still holds `token`, so that the others rebalance at
    /// once instead of after its TTL.
    fn leave<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
}
