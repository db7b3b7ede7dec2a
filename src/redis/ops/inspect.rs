//! The read-only overviews: streams, a topic's groups, a group's consumers and its pending
//! entries, each with what only streamwise's keys tell (leases, checkpoints, partition owners).

use std::time::Duration;

use futures::future::try_join_all;
use serde::Serialize;

use super::{first_after, id_time, live_consumers, now_ms, streams_of};
use crate::checkpoint::CheckpointStore;
use crate::codec::{Codec, JsonCodec};
use crate::dead_letter;
use crate::error::{Error, Result, validate_name};
use crate::message::{EntryId, saturating_ms};
use crate::partition::parse_partition_stream;
use crate::redis::admin;
use crate::redis::checkpoint::RedisCheckpointStore;
use crate::redis::connection::RedisConnection;
use crate::redis::coordinator::RedisCoordinator;

/// What a stream is to streamwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// An ordinary stream (a topic).
    Stream,
    /// A partition of a partitioned topic (`orders~p3`).
    Partition,
    /// The dead letters of a stream (`{orders}-dead`).
    DeadLetters,
}

/// One stream, as [`list_streams`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream's name.
    pub stream: String,
    /// What it is.
    pub kind: StreamKind,
    /// For a partition, its topic; for dead letters, the stream they came from.
    pub topic: Option<String>,
    /// For a partition, its number.
    pub partition: Option<u32>,
    /// Number of entries.
    pub length: u64,
    /// The first entry's id and time.
    pub first_id: Option<EntryId>,
    /// The time of the first entry (ISO 8601, UTC).
    pub first_time: Option<String>,
    /// The last entry's id.
    pub last_id: Option<EntryId>,
    /// The time of the last entry (ISO 8601, UTC).
    pub last_time: Option<String>,
    /// Number of consumer groups.
    pub groups: u64,
    /// Retention: trimmed to about this many entries (by publishers and retention tasks).
    pub max_length: Option<u64>,
    /// Retention: entries older than this many milliseconds are trimmed (by publishers and
    /// retention tasks).
    pub retention_ms: Option<u64>,
}

/// The streams whose names match `pattern` (a Redis glob, `*` for all), on every master of a
/// cluster, sorted by name: length, first and last entry, groups and retention settings.
pub async fn list_streams(conn: &RedisConnection, pattern: &str) -> Result<Vec<StreamSummary>> {
    let mut names = admin::scan_with(conn, pattern, Some("stream"), None).await?;
    names.sort();
    names.dedup();
    let mut streams = Vec::with_capacity(names.len());
    for name in names {
        // Keys that are not stream names a user could give (another tool's) are left out.
        if crate::error::validate_stream_name("stream", &name).is_err() {
            continue;
        }
        let info = match admin::stream_info(conn, &name).await {
            Ok(info) => info,
            // Deleted since the scan.
            Err(Error::StreamNotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let (kind, topic, partition) = if let Some(source) = dead_letter::source_of(&name) {
            (StreamKind::DeadLetters, Some(source.to_owned()), None)
        } else if let Some((topic, p)) = parse_partition_stream(&name) {
            (StreamKind::Partition, Some(topic.to_owned()), Some(p))
        } else {
            (StreamKind::Stream, None, None)
        };
        let first_id = info.first_entry.as_ref().map(|e| e.id);
        let last_id = info.last_entry.as_ref().map(|e| e.id);
        streams.push(StreamSummary {
            kind,
            topic,
            partition,
            length: info.length,
            first_time: first_id.map(id_time),
            first_id,
            last_time: last_id.map(id_time),
            last_id,
            groups: info.groups,
            max_length: info.settings.max_length,
            retention_ms: info.settings.retention_ms,
            stream: name,
        });
    }
    Ok(streams)
}

/// One consumer group on one stream, as [`groups`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupOverview {
    /// The stream (the topic, or one of its partitions).
    pub stream: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// The group's name.
    pub group: String,
    /// Consumers the group knows (`XINFO GROUPS`).
    pub consumers: u64,
    /// Of those, the ones holding a live lease now.
    pub live_consumers: u64,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// Entries not delivered to the group yet: Redis's figure, or counted (up to
    /// [`LAG_COUNT_CAP`]) where Redis cannot tell (after deletions in the unread range).
    pub lag: Option<u64>,
    /// How long the oldest entry not delivered yet has waited, in milliseconds (0 when there
    /// is none).
    pub lag_ms: u64,
    /// The oldest pending entry.
    pub oldest_pending_id: Option<EntryId>,
    /// Milliseconds since the oldest pending entry was last delivered.
    pub oldest_pending_idle_ms: Option<u64>,
    /// The last entry delivered to the group.
    pub last_delivered_id: EntryId,
    /// The lowest checkpoint of the group's consumers: everything up to it was acknowledged.
    pub checkpoint: Option<EntryId>,
    /// On a partitioned topic, the member that owns the partition (from its lease).
    pub owner: Option<String>,
}

/// The most entries [`groups`] counts for a group's lag where Redis cannot tell it.
pub const LAG_COUNT_CAP: u64 = 10_000;

/// The groups of a topic, by stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopicGroups {
    /// The topic.
    pub topic: String,
    /// Its partition count, when it is partitioned.
    pub partitions: Option<u32>,
    /// Every group of every stream of the topic (partition by partition).
    pub groups: Vec<GroupOverview>,
}

/// Every consumer group of `topic`, per partition on a partitioned topic: consumers (and how
/// many are live), pending, lag in entries and in time, the oldest pending entry, the last
/// delivered entry, the checkpoint and the partition's owner. [`Error::StreamNotFound`] for
/// a plain topic that does not exist.
pub async fn groups(conn: &RedisConnection, topic: &str) -> Result<TopicGroups> {
    let (partitions, streams) = streams_of(conn, topic).await?;
    let checkpoints = RedisCheckpointStore::new(conn.clone());
    let coordinator = RedisCoordinator::new(conn.clone());
    let mut found = Vec::new();
    for (partition, stream) in streams {
        let infos = match admin::groups(conn, &stream).await {
            Ok(infos) => infos,
            // A partition nothing was published to and no group read yet.
            Err(Error::StreamNotFound { .. }) if partition.is_some() => continue,
            Err(e) => return Err(e),
        };
        let owners = match partition {
            Some(_) => Some(coordinator_owners(&coordinator, topic, &infos).await?),
            None => None,
        };
        for info in infos {
            let lag = match info.lag {
                Some(lag) => Some(lag),
                None => {
                    Some(admin::entries_after(conn, &stream, info.last_delivered_id, LAG_COUNT_CAP).await?)
                }
            };
            let lag_ms = first_after(conn, &stream, info.last_delivered_id)
                .await?
                .map_or(0, |next| now_ms().saturating_sub(next.ms()));
            let oldest = admin::pending_page(conn, &stream, &info.name, "-", 1, None, 0).await?;
            let oldest = oldest.first();
            let checkpoint = checkpoints.load_group(&stream, &info.name).await?;
            let live = live_consumers(conn, &stream, &info.name).await?.len() as u64;
            let owner = owners.as_ref().and_then(|owners| {
                let p = partition? as usize;
                owners
                    .iter()
                    .find(|(group, _)| *group == info.name)
                    .and_then(|(_, by_partition)| by_partition.get(p).cloned().flatten())
            });
            found.push(GroupOverview {
                stream: stream.clone(),
                partition,
                consumers: info.consumers,
                live_consumers: live,
                pending: info.pending,
                lag,
                lag_ms,
                oldest_pending_id: oldest.map(|p| p.id),
                oldest_pending_idle_ms: oldest.map(|p| p.idle_ms),
                last_delivered_id: info.last_delivered_id,
                checkpoint: checkpoint.map(|c| c.message_id),
                owner,
                group: info.name,
            });
        }
    }
    found.sort_by(|a, b| (&a.group, a.partition).cmp(&(&b.group, b.partition)));
    Ok(TopicGroups {
        topic: topic.to_owned(),
        partitions,
        groups: found,
    })
}

/// The owners of every partition for each group in `infos`.
async fn coordinator_owners(
    coordinator: &RedisCoordinator,
    topic: &str,
    infos: &[admin::GroupInfo],
) -> Result<Vec<(String, Vec<Option<String>>)>> {
    let mut owners = Vec::with_capacity(infos.len());
    for info in infos {
        owners.push((info.name.clone(), coordinator.owners(topic, &info.name).await?));
    }
    Ok(owners)
}

/// A consumer's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Held and not run out: the consumer is live.
    Alive,
    /// The consumer used a lease that ran out or was taken: it crashed or was cut off.
    Expired,
    /// No lease: it closed cleanly, or is a client that does not use leases.
    None,
}

/// One consumer on one stream, as [`consumers`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConsumerOverview {
    /// The stream (the topic, or one of its partitions).
    pub stream: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// The consumer's name (`owner` on a partition: see
    /// [`PARTITION_CONSUMER`](crate::partition::PARTITION_CONSUMER)).
    pub consumer: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Milliseconds since it last read or claimed.
    pub idle_ms: u64,
    /// Its lease.
    pub lease: LeaseState,
    /// Milliseconds its lease has left unless renewed.
    pub lease_ttl_ms: Option<u64>,
    /// The group member named in its lease (the partition's owner).
    pub member: Option<String>,
    /// Its lease lapsed while it held entries: reclaim takes them at once.
    pub crashed: bool,
}

/// A member of a group on a partitioned topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemberOverview {
    /// The member's name (the consumer name its process subscribed with).
    pub member: String,
    /// Its membership record was live at the group's last heartbeat.
    pub live: bool,
    /// The partitions whose leases it holds.
    pub partitions: Vec<u32>,
}

/// The consumers of a group on a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopicConsumers {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Its partition count, when it is partitioned.
    pub partitions: Option<u32>,
    /// On a partitioned topic, the group's members and the partitions each owns.
    pub members: Vec<MemberOverview>,
    /// Every consumer of every stream of the topic.
    pub consumers: Vec<ConsumerOverview>,
}

/// The consumers of `group` on `topic` (per partition on a partitioned topic, where the
/// consumer is `owner` and the member that owns the partition is named in its lease): pending,
/// idle, lease alive or expired, and the members with the partitions they own.
/// [`Error::GroupNotFound`] when no stream of the topic has the group.
pub async fn consumers(conn: &RedisConnection, topic: &str, group: &str) -> Result<TopicConsumers> {
    validate_name("group", group)?;
    let (partitions, streams) = streams_of(conn, topic).await?;
    let mut found = Vec::new();
    let mut any_group = false;
    for (partition, stream) in streams {
        let infos = match admin::consumers(conn, &stream, group, Duration::from_secs(60)).await {
            Ok(infos) => infos,
            Err(Error::GroupNotFound { .. }) if partition.is_some() => continue,
            Err(e) => return Err(e),
        };
        any_group = true;
        found.extend(infos.into_iter().map(|c| {
            let lease = match (&c.lease, c.uses_leases) {
                (Some(_), _) => LeaseState::Alive,
                (None, true) => LeaseState::Expired,
                (None, false) => LeaseState::None,
            };
            ConsumerOverview {
                stream: stream.clone(),
                partition,
                lease_ttl_ms: c.lease.as_ref().and_then(|l| l.ttl_ms),
                member: c.lease.as_ref().and_then(|l| l.member()).map(str::to_owned),
                consumer: c.name,
                pending: c.pending,
                idle_ms: c.idle_ms,
                lease,
                crashed: c.crashed,
            }
        }));
    }
    if !any_group {
        return Err(Error::GroupNotFound {
            stream: topic.to_owned(),
            group: group.to_owned(),
        });
    }
    let mut members: Vec<MemberOverview> = Vec::new();
    if partitions.is_some() {
        let live = RedisCoordinator::new(conn.clone()).members(topic, group).await?;
        for name in &live {
            members.push(MemberOverview {
                member: name.clone(),
                live: true,
                partitions: Vec::new(),
            });
        }
        for c in &found {
            let (Some(member), Some(p), LeaseState::Alive) = (&c.member, c.partition, c.lease) else {
                continue;
            };
            match members.iter_mut().find(|m| &m.member == member) {
                Some(m) => m.partitions.push(p),
                None => members.push(MemberOverview {
                    member: member.clone(),
                    live: false,
                    partitions: vec![p],
                }),
            }
        }
        members.sort_by(|a, b| a.member.cmp(&b.member));
    }
    Ok(TopicConsumers {
        topic: topic.to_owned(),
        group: group.to_owned(),
        partitions,
        members,
        consumers: found,
    })
}

/// Which pending entries [`pending`] lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingQuery {
    consumer: Option<String>,
    min_idle: Duration,
    limit: usize,
}

impl Default for PendingQuery {
    /// [`PendingQuery::new`]: a query [`pending`] takes as it is.
    fn default() -> Self {
        PendingQuery::new()
    }
}

impl PendingQuery {
    /// The oldest 100 pending entries of every consumer.
    pub fn new() -> Self {
        PendingQuery {
            consumer: None,
            min_idle: Duration::ZERO,
            limit: 100,
        }
    }

    /// Only the entries of `consumer`.
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = Some(consumer.into());
        self
    }

    /// Only entries idle at least `min_idle` (since their last delivery).
    pub fn min_idle(mut self, min_idle: Duration) -> Self {
        self.min_idle = min_idle;
        self
    }

    /// At most `limit` entries in all (1 to 10,000).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// One pending entry, as [`pending`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingOverview {
    /// The stream (the topic, or one of its partitions).
    pub stream: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// The entry id.
    pub id: EntryId,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// Its event type; `None` when the entry was trimmed from the stream (it is dead-lettered
    /// when next claimed) or is not in the wire format.
    pub event_type: Option<String>,
}

/// The pending entries of `group` on `topic`, oldest first (partition by partition on a
/// partitioned topic), with their event types.
pub async fn pending(
    conn: &RedisConnection,
    topic: &str,
    group: &str,
    query: &PendingQuery,
) -> Result<Vec<PendingOverview>> {
    validate_name("group", group)?;
    if let Some(consumer) = &query.consumer {
        validate_name("consumer", consumer)?;
    }
    if query.limit == 0 || query.limit > 10_000 {
        return Err(Error::invalid(
            "limit",
            format_args!("{} is not between 1 and 10000", query.limit),
        ));
    }
    let min_idle_ms = saturating_ms(query.min_idle);
    let (_, streams) = streams_of(conn, topic).await?;
    let mut found = Vec::new();
    let mut any_group = false;
    for (partition, stream) in streams {
        let left = query.limit - found.len();
        if left == 0 {
            break;
        }
        let rows = admin::pending_page(
            conn,
            &stream,
            group,
            "-",
            left,
            query.consumer.as_deref(),
            min_idle_ms,
        )
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(Error::GroupNotFound { .. }) if partition.is_some() => continue,
            Err(e) => return Err(e),
        };
        any_group = true;
        let entries = try_join_all(rows.iter().map(|row| admin::read_entry(conn, &stream, row.id))).await?;
        for (row, entry) in rows.into_iter().zip(entries) {
            let event_type = entry
                .and_then(|raw| JsonCodec.decode(raw).ok())
                .map(|m| m.event_type().to_owned());
            found.push(PendingOverview {
                stream: stream.clone(),
                partition,
                id: row.id,
                consumer: row.consumer,
                idle_ms: row.idle_ms,
                deliveries: row.delivery_count,
                event_type,
            });
        }
    }
    if !any_group {
        return Err(Error::GroupNotFound {
            stream: topic.to_owned(),
            group: group.to_owned(),
        });
    }
    Ok(found)
}
