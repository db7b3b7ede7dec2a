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
pub use self::repair::{ResetReport, ResetRow, ResetTo, TrimReport, TrimRow, TrimTo, reset_group, trim};

use super::connection::RedisConnection;
use super::{admin, coordinator, keys};
use crate::error::{Result, validate_name, validate_stream_name};
use crate::message::{EntryId, format_timestamp};
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

/// The consumers of `group` on `stream` that hold a live lease (found by their lease keys, so
/// that a consumer that has not read yet counts too).
async fn live_consumers(conn: &RedisConnection, stream: &str, group: &str) -> Result<Vec<LiveConsumer>> {
    validate_name("group", group)?;
    let prefix = keys::lease(stream, group, "");
    let found = admin::scan_with(conn, &format!("{prefix}*"), None, Some(stream)).await?;
    let mut live = Vec::with_capacity(found.len());
    for key in found {
        let Some(consumer) = key.strip_prefix(&prefix) else {
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (token, ttl): (Option<String>, i64) = conn
            .run_mapped("read lease", |mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        // Gone between the scan and the look: no longer live.
        let Some(token) = token else { continue };
        live.push(LiveConsumer {
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            member: token.split_once('/').map(|(member, _)| member.to_owned()),
            lease_ttl_ms: u64::try_from(ttl).ok(),
        });
    }
    live.sort_by(|a, b| a.consumer.cmp(&b.consumer));
    Ok(live)
}

/// The time an entry id was made, as text (ISO 8601, UTC).
fn id_time(id: EntryId) -> String {
    format_timestamp(UNIX_EPOCH + Duration::from_millis(id.ms()))
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    millis(SystemTime::now())
}

/// Milliseconds since the Unix epoch at `time` (0 before it).
fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
    const PAGE: usize = 1000;
    let Some(last) = before.prev() else { return Ok(0) };
    let (mut counted, mut from) = (0u64, "-".to_owned());
    let to = last.to_string();
    while counted < cap {
        let page = admin::range(conn, stream, &from, &to, PAGE, false).await?;
        counted += page.len() as u64;
        match page.last() {
            Some(entry) if page.len() == PAGE => from = format!("({}", entry.id),
            _ => break,
        }
    }
    Ok(counted.min(cap))
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
    }
}
