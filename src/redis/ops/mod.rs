//! What an operator runs against a live deployment, with streamwise's own keys in view:
//! overviews of streams, groups, consumers and pending entries that know about leases,
//! checkpoints, dead letters and partitioned topics ([`list_streams`], [`groups`],
//! [`consumers`], [`pending`]), and repairs with their safety built in: dead-letter
//! [`peek_dead_letters`], [`replay_dead_letters`] and [`purge_dead_letters`],
//! [`reset_group`] and [`trim`], which refuse while consumers are live.
//!
//! The `streamwise` command line tool (crate `streamwise-cli`) is a front end to this module;
//! everything here works without it. Every report is `serde::Serialize`: its field names are
//! the CLI's JSON schema.
//!
//! A topic is what a user names: a plain stream (`orders`), or a partitioned topic, whose
//! streams are its partitions (`orders~p0` ...). Each function here takes a topic and works on
//! each of its streams, reporting per stream (with the partition, where there is one).
//!
//! Repairs take a [`Mode`]: [`Mode::DryRun`] reads and reports what would change, and
//! writes nothing; [`Mode::Execute`] changes it. Reports say whether anything would change
//! (or did), and whether the repair was refused because consumers hold live leases.

mod dead_letters;
mod inspect;
mod repair;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use self::dead_letters::{
    DeadLetterPeek, DeadLetterRecord, NO_REASON, PurgeReport, PurgeRow, ReasonCount, ReplayBound,
    ReplayOptions, ReplayOutcome, ReplayReport, ReplayedRecord, peek_dead_letters, purge_dead_letters,
    replay_dead_letters,
};
pub use self::inspect::{
    ConsumerOverview, GroupOverview, LAG_COUNT_CAP, LeaseState, MemberOverview, PendingOverview,
    PendingQuery, StreamKind, StreamSummary, TopicConsumers, TopicGroups, consumers, groups, list_streams,
    pending,
};
pub use self::repair::{
    ResetReport, ResetRow, ResetTo, TrimGuard, TrimReport, TrimRow, TrimTo, reset_group, trim,
};

use super::admin::LeaseHolder;
use super::connection::RedisConnection;
use super::protocol::replies;
use super::{admin, coordinator, keys};
use crate::error::{Result, validate_name, validate_stream_name};
use crate::message::{EntryId, format_timestamp, saturating_ms};
use crate::partition::partition_stream;

/// Whether a repair writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Read and report what would change; write nothing.
    DryRun,
    /// Make the change.
    Execute,
}

/// The streams of `topic`: its partitions when it is partitioned (with their numbers), else
/// the topic itself.
async fn streams_of(
    conn: &RedisConnection,
    topic: &str,
) -> Result<(Option<u32>, Vec<(Option<u32>, String)>)> {
    validate_stream_name("topic", topic)?;
    let partitions = coordinator::stored_partitions(conn, topic).await?;
    Ok(match partitions {
        Some(p) => (
            Some(p),
            (0..p).map(|n| (Some(n), partition_stream(topic, n))).collect(),
        ),
        None => (None, vec![(None, topic.to_owned())]),
    })
}

/// A consumer that holds a live lease on a stream, as a repair that refuses finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LiveConsumer {
    /// The stream it reads.
    pub stream: String,
    /// Its group.
    pub group: String,
    /// Its name (`owner` for the owner of a partition).
    pub consumer: String,
    /// The group member named in the lease (a partition's owner), if any.
    pub member: Option<String>,
    /// Milliseconds its lease has left unless renewed (`None` without an expiry).
    pub lease_ttl_ms: Option<u64>,
}

impl LiveConsumer {
    fn new(stream: &str, group: &str, consumer: String, lease: &LeaseHolder) -> Self {
        LiveConsumer {
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer,
            member: lease.member().map(str::to_owned),
            lease_ttl_ms: lease.ttl_ms,
        }
    }

    /// The live consumers a guard script found, as flat `name, token, pttl` triples.
    fn from_script(stream: &str, group: &str, flat: &[redis::Value]) -> Result<Vec<LiveConsumer>> {
        flat.chunks(3)
            .map(|triple| {
                let [name, token, ttl] = triple else {
                    return Err(replies::unexpected("live consumers"));
                };
                let text = |v: &redis::Value| -> Result<String> {
                    redis::from_redis_value(v.clone())
                        .map_err(|e| replies::refusal("live consumers", e.into()))
                };
                let ttl: i64 = redis::from_redis_value(ttl.clone())
                    .map_err(|e| replies::refusal("live consumers", e.into()))?;
                let lease = LeaseHolder::new(text(token)?, u64::try_from(ttl).ok());
                Ok(LiveConsumer::new(stream, group, text(name)?, &lease))
            })
            .collect()
    }
}

/// The consumers of `group` on `stream` that hold a live lease: the members of the group's
/// lease registry (every consumer that takes a lease joins it, before it reads, so one that
/// has not read yet counts too) whose lease key is there, in two round trips.
async fn live_consumers(conn: &RedisConnection, stream: &str, group: &str) -> Result<Vec<LiveConsumer>> {
    validate_name("group", group)?;
    let mut names: Vec<String> = conn
        .command(redis::cmd("SMEMBERS").arg(keys::leased_consumers(stream, group)))
        .await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    names.sort();
    let mut pipe = redis::pipe();
    for name in &names {
        let lease = keys::lease(stream, group, name);
        pipe.cmd("GET").arg(&lease).cmd("PTTL").arg(&lease);
    }
    let leases: Vec<(Option<String>, i64)> = conn
        .run_mapped("read leases", |mut c| {
            let pipe = pipe.clone();
            async move { pipe.query_async(&mut c).await }
        })
        .await?;
    Ok(names
        .into_iter()
        .zip(leases)
        // A registered consumer without its lease key closed or crashed: not live.
        .filter_map(|(name, (token, ttl))| {
            let lease = LeaseHolder::new(token?, u64::try_from(ttl).ok());
            Some(LiveConsumer::new(stream, group, name, &lease))
        })
        .collect())
}

/// The time an entry id was made, as text (ISO 8601, UTC; `<ms> ms after the epoch` for an id
/// beyond what the clock can hold).
pub fn id_time(id: EntryId) -> String {
    match UNIX_EPOCH.checked_add(Duration::from_millis(id.ms())) {
        Some(time) => format_timestamp(time),
        None => format!("{} ms after the epoch", id.ms()),
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    millis(SystemTime::now())
}

/// Milliseconds since the Unix epoch at `time` (0 before it).
fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, saturating_ms)
}

/// The first id at or after `ms`: `ms-0`.
fn id_at(ms: u64) -> EntryId {
    EntryId::new(ms, 0)
}

/// The smallest id after `id`.
fn next_id(id: EntryId) -> EntryId {
    match id.seq().checked_add(1) {
        Some(seq) => EntryId::new(id.ms(), seq),
        None => EntryId::new(id.ms().saturating_add(1), 0),
    }
}

/// How many entries of `stream` have ids below `before` (counted in pages; stops at `cap`).
async fn count_before(conn: &RedisConnection, stream: &str, before: EntryId, cap: u64) -> Result<u64> {
    let Some(last) = before.prev() else { return Ok(0) };
    admin::count_range(conn, stream, "-", &last.to_string(), cap).await
}

/// The id of the last entry of `stream`, if it has any.
async fn last_id(conn: &RedisConnection, stream: &str) -> Result<Option<EntryId>> {
    Ok(admin::range(conn, stream, "+", "-", 1, true)
        .await?
        .first()
        .map(|e| e.id))
}

/// The first entry of `stream` after `id`, if any.
async fn first_after(conn: &RedisConnection, stream: &str, id: EntryId) -> Result<Option<EntryId>> {
    Ok(admin::range(conn, stream, &format!("({id}"), "+", 1, false)
        .await?
        .first()
        .map(|e| e.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_step_and_times_read() {
        assert_eq!(next_id(EntryId::new(5, 1)), EntryId::new(5, 2));
        assert_eq!(next_id(EntryId::new(5, u64::MAX)), EntryId::new(6, 0));
        assert_eq!(
            id_time(EntryId::new(1_795_341_600_123, 4)),
            "2026-11-22T10:00:00.123Z"
        );
        assert_eq!(millis(UNIX_EPOCH + Duration::from_millis(7)), 7);
        // An id as far out as ids go still reads, whatever the platform's clock holds.
        assert!(!id_time(EntryId::new(u64::MAX, 0)).is_empty());
    }
}
