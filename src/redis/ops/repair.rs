//! Repairs of a topic's groups and entries that refuse while consumers are live: moving a
//! group's position ([`reset_group`]) and trimming a stream without cutting what a live group
//! still has to handle ([`trim`]).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{
    LiveConsumer, Mode, count_before, first_after, id_at, last_id, live_consumers, millis, next_id, now_ms,
    streams_of,
};
use crate::checkpoint::CheckpointStore;
use crate::error::{Error, Result, validate_name};
use crate::message::EntryId;
use crate::redis::admin;
use crate::redis::checkpoint::RedisCheckpointStore;
use crate::redis::connection::RedisConnection;

/// Where [`reset_group`] moves a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// Before the first entry: everything in the stream is delivered again.
    Earliest,
    /// After the last entry: only entries added from now on are delivered.
    Latest,
    /// After this entry.
    Id(EntryId),
    /// Before the first entry added at or after this time.
    Time(SystemTime),
    /// To the lowest checkpoint of the group's consumers: entries after it are delivered
    /// again (some may have been acknowledged already: at-least-once).
    Checkpoint,
}

/// One stream's group, reset or to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ResetRow {
    /// The stream (the topic, or one of its partitions).
    pub stream: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// The last delivered id before.
    pub from: EntryId,
    /// The last delivered id after.
    pub to: EntryId,
    /// Entries pending in the group: a reset keeps them pending (they are delivered again to
    /// their consumers, or reclaimed).
    pub pending: u64,
}

/// What [`reset_group`] did, or would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ResetReport {
    /// The topic.
    pub topic: String,
    /// The group.
    pub group: String,
    /// Dry run or executed.
    pub mode: Mode,
    /// Refused: consumers of the group hold live leases (listed in `live`), and it was not
    /// forced. Nothing was changed.
    pub refused: bool,
    /// Consumers of the group that held live leases.
    pub live: Vec<LiveConsumer>,
    /// Per stream of the topic that has the group.
    pub streams: Vec<ResetRow>,
}

impl ResetReport {
    /// Whether the reset moved a group (executed) or would (dry run).
    pub fn changes(&self) -> bool {
        !self.refused && self.streams.iter().any(|r| r.from != r.to)
    }
}

/// Moves `group`'s position on `topic` (on each partition of a partitioned topic) to `to`
/// (`XGROUP SETID`). Pending entries stay pending. While consumers of the group hold live
/// leases, a consumer would go on from where it stood in its own reads, so it refuses
/// ([`ResetReport::refused`]) unless `force`. [`Error::GroupNotFound`] when no stream of the
/// topic has the group; [`Error::Invalid`] (`to`) for [`ResetTo::Checkpoint`] when the group
/// has no checkpoint on a stream.
pub async fn reset_group(
    conn: &RedisConnection,
    topic: &str,
    group: &str,
    to: ResetTo,
    mode: Mode,
    force: bool,
) -> Result<ResetReport> {
    validate_name("group", group)?;
    let (_, streams) = streams_of(conn, topic).await?;
    let checkpoints = RedisCheckpointStore::new(conn.clone());
    let mut report = ResetReport {
        topic: topic.to_owned(),
        group: group.to_owned(),
        mode,
        refused: false,
        live: Vec::new(),
        streams: Vec::new(),
    };
    for (partition, stream) in streams {
        let info = match admin::group_info(conn, &stream, group).await {
            Ok(info) => info,
            Err(Error::GroupNotFound { .. }) if partition.is_some() => continue,
            Err(e) => return Err(e),
        };
        let target = match to {
            ResetTo::Earliest => EntryId::ZERO,
            ResetTo::Latest => admin::stream_info(conn, &stream)
                .await?
                .last_generated_id
                .unwrap_or(EntryId::ZERO),
            ResetTo::Id(id) => id,
            ResetTo::Time(time) => id_at(millis(time)).prev().unwrap_or(EntryId::ZERO),
            ResetTo::Checkpoint => match checkpoints.load_group(&stream, group).await? {
                Some(checkpoint) => checkpoint.message_id,
                None => {
                    return Err(Error::invalid(
                        "to",
                        format_args!("group {group} has no checkpoint on {stream}"),
                    ));
                }
            },
        };
        report.live.extend(live_consumers(conn, &stream, group).await?);
        report.streams.push(ResetRow {
            stream,
            partition,
            from: info.last_delivered_id,
            to: target,
            pending: info.pending,
        });
    }
    if report.streams.is_empty() {
        return Err(Error::GroupNotFound {
            stream: topic.to_owned(),
            group: group.to_owned(),
        });
    }
    report.refused = !force && !report.live.is_empty();
    if mode == Mode::Execute && !report.refused {
        for row in report.streams.iter().filter(|r| r.from != r.to) {
            let _: () = conn
                .command(
                    redis::cmd("XGROUP")
                        .arg("SETID")
                        .arg(&row.stream)
                        .arg(group)
                        .arg(row.to.to_string()),
                )
                .await?;
        }
    }
    Ok(report)
}

/// How much [`trim`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimTo {
    /// The newest this many entries (of each partition).
    MaxLen(u64),
    /// The entries added within this long.
    OlderThan(Duration),
}

/// One stream, trimmed or to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TrimRow {
    /// The stream (the topic, or one of its partitions).
    pub stream: String,
    /// The partition, on a partitioned topic.
    pub partition: Option<u32>,
    /// Entries before.
    pub length: u64,
    /// Entries with ids below this go (`None`: nothing to trim).
    pub before: Option<EntryId>,
    /// How many entries go.
    pub removes: u64,
    /// The first entry a group with live consumers still needs (its oldest pending entry, or
    /// the first it has not been delivered): a trim never goes past it unless forced.
    pub protected_from: Option<EntryId>,
    /// The groups with live consumers that need it.
    pub protected_for: Vec<String>,
    /// The trim asked for would cut into what those groups need.
    pub would_cut: bool,
}

/// What [`trim`] did, or would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TrimReport {
    /// The topic.
    pub topic: String,
    /// Dry run or executed.
    pub mode: Mode,
    /// Refused: the trim would cut entries that a group with live consumers has pending or
    /// not yet delivered (see the rows' `would_cut`), and it was not forced. Nothing was
    /// changed.
    pub refused: bool,
    /// The live consumers of the groups that protect entries.
    pub live: Vec<LiveConsumer>,
    /// Per stream.
    pub streams: Vec<TrimRow>,
}

impl TrimReport {
    /// Whether the trim removed entries (executed) or would (dry run).
    pub fn changes(&self) -> bool {
        !self.refused && self.streams.iter().any(|r| r.removes > 0)
    }
}

/// Trims `topic` (each partition of a partitioned topic) to `to` (`XTRIM MINID`, exact).
/// It never removes an entry that a group with live consumers has pending or has not been
/// delivered yet: such a trim is refused whole ([`TrimReport::refused`]) unless `force`. The
/// groups without live consumers do not hold it back (their pending entries that go are
/// dead-lettered as trimmed when next claimed).
pub async fn trim(
    conn: &RedisConnection,
    topic: &str,
    to: TrimTo,
    mode: Mode,
    force: bool,
) -> Result<TrimReport> {
    let (partitions, streams) = streams_of(conn, topic).await?;
    let mut report = TrimReport {
        topic: topic.to_owned(),
        mode,
        refused: false,
        live: Vec::new(),
        streams: Vec::new(),
    };
    for (partition, stream) in streams {
        let length: u64 = conn.command(redis::cmd("XLEN").arg(&stream)).await?;
        if length == 0 && partitions.is_none() && !exists(conn, &stream).await? {
            return Err(Error::StreamNotFound { stream });
        }
        let before = match to {
            TrimTo::MaxLen(keep) if keep >= length => None,
            TrimTo::MaxLen(0) => last_id(conn, &stream).await?.map(next_id),
            TrimTo::MaxLen(keep) => {
                let kept = admin::range(
                    conn,
                    &stream,
                    "+",
                    "-",
                    usize::try_from(keep).unwrap_or(usize::MAX),
                    true,
                )
                .await?;
                kept.last().map(|e| e.id)
            }
            TrimTo::OlderThan(age) => {
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                Some(id_at(now_ms().saturating_sub(age_ms)))
            }
        };
        let removes = match (to, before) {
            (_, None) => 0,
            (TrimTo::MaxLen(keep), Some(_)) => length - keep.min(length),
            (TrimTo::OlderThan(_), Some(before)) => count_before(conn, &stream, before, length).await?,
        };
        let before = before.filter(|_| removes > 0);
        let mut row = TrimRow {
            stream: stream.clone(),
            partition,
            length,
            before,
            removes,
            protected_from: None,
            protected_for: Vec::new(),
            would_cut: false,
        };
        let infos = match admin::groups(conn, &stream).await {
            Ok(infos) => infos,
            Err(Error::StreamNotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        for info in infos {
            let live = live_consumers(conn, &stream, &info.name).await?;
            if live.is_empty() {
                continue;
            }
            let oldest = admin::pending_page(conn, &stream, &info.name, "-", 1, None, 0).await?;
            let undelivered = first_after(conn, &stream, info.last_delivered_id).await?;
            let needed = [oldest.first().map(|p| p.id), undelivered]
                .into_iter()
                .flatten()
                .min();
            if let Some(needed) = needed {
                row.protected_from = Some(row.protected_from.map_or(needed, |p| p.min(needed)));
                row.protected_for.push(info.name.clone());
                report.live.extend(live);
            }
        }
        row.would_cut = matches!((row.before, row.protected_from), (Some(b), Some(p)) if b > p);
        report.streams.push(row);
    }
    report.refused = !force && report.streams.iter().any(|r| r.would_cut);
    if mode == Mode::Execute && !report.refused {
        for row in &mut report.streams {
            let Some(before) = row.before else { continue };
            row.removes = conn
                .command(
                    redis::cmd("XTRIM")
                        .arg(&row.stream)
                        .arg("MINID")
                        .arg(before.to_string()),
                )
                .await?;
        }
    }
    Ok(report)
}

async fn exists(conn: &RedisConnection, key: &str) -> Result<bool> {
    conn.command(redis::cmd("EXISTS").arg(key)).await
}
