//! Repairs of a topic's groups and entries that refuse while consumers are live: moving a
//! group's position ([`reset_group`]) and trimming a stream without cutting what a group
//! still has to handle ([`trim`], guarded by [`TrimGuard`]).
//!
//! Each reads first, for its report and to refuse the whole topic at once; then, executing,
//! it checks again and writes in one script step per stream (`scripts::GUARDED_SETID`,
//! `scripts::GUARDED_TRIM`: the stream, its lease keys and registries share a slot), so that
//! a consumer that starts after the first look cannot slip in before the write.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use redis::Value;

use super::{
    LiveConsumer, Mode, count_before, first_after, id_at, last_id, live_consumers, millis, next_id, now_ms,
    streams_of,
};
use crate::checkpoint::CheckpointStore;
use crate::error::{Error, Result, validate_name};
use crate::message::{EntryId, saturating_ms};
use crate::redis::checkpoint::RedisCheckpointStore;
use crate::redis::connection::RedisConnection;
use crate::redis::protocol::replies;
use crate::redis::retention::DEFAULT_IDLE_GROUP_AGE;
use crate::redis::{admin, keys, scripts};

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
    /// The group was moved here (executed, and not refused).
    pub applied: bool,
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
    /// forced. Nothing was changed, unless a consumer started while the reset went from stream
    /// to stream of a partitioned topic: the rows say which streams were reset (`applied`)
    /// before it stopped.
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
/// ([`ResetReport::refused`]) unless `force`; the check and the move are one script step per
/// stream. [`Error::GroupNotFound`] when no stream of the
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
            applied: false,
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
        for row in report.streams.iter_mut().filter(|r| r.from != r.to) {
            let live = guarded_setid(conn, &row.stream, group, row.to, force).await?;
            if !live.is_empty() {
                // A consumer started since the first look: this stream and the next stay.
                report.refused = true;
                report.live = live;
                break;
            }
            row.applied = true;
        }
    }
    Ok(report)
}

/// Sets `group`'s last delivered id on `stream` to `to`, unless (not `force`) a consumer of
/// the group holds a live lease, checked in the same script step; the live consumers when
/// refused (nothing changed), else none.
async fn guarded_setid(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    to: EntryId,
    force: bool,
) -> Result<Vec<LiveConsumer>> {
    let found: Vec<Value> = conn
        .run_mapped("reset group", |mut c| {
            let mut call = scripts::GUARDED_SETID.key(stream);
            call.key(keys::leased_consumers(stream, group))
                .arg(group)
                .arg(to.to_string())
                .arg(keys::lease(stream, group, ""))
                .arg(if force { "1" } else { "0" });
            async move { call.invoke_async(&mut c).await }
        })
        .await?;
    LiveConsumer::from_script(stream, group, &found)
}

/// How much [`trim`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimTo {
    /// The newest this many entries (of each partition).
    MaxLen(u64),
    /// The entries added within this long.
    OlderThan(Duration),
}

/// What holds a [`trim`] back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrimGuard {
    /// Nothing a group still needs goes: its oldest pending entry and, while it has live
    /// consumers, the first entry it has not been delivered (the rule of
    /// [`TrimPolicy::safe`](crate::redis::retention::TrimPolicy)). A group without live
    /// consumers whose consumers have all been idle longer than `idle_group_age` no longer
    /// holds back ([`TrimRow::idle_groups`]); one with a live consumer always does.
    Safe {
        /// How long a group's consumers may all idle before it stops holding back.
        idle_group_age: Duration,
    },
    /// Whatever groups need, the trim goes as far as asked.
    Force,
}

impl Default for TrimGuard {
    /// Safe, with groups idle for [`DEFAULT_IDLE_GROUP_AGE`] (7 days) no longer holding back.
    fn default() -> Self {
        TrimGuard::Safe {
            idle_group_age: DEFAULT_IDLE_GROUP_AGE,
        }
    }
}

impl TrimGuard {
    fn forced(self) -> bool {
        self == TrimGuard::Force
    }

    fn idle_ms(self) -> u64 {
        match self {
            TrimGuard::Safe { idle_group_age } => {
                u64::try_from(idle_group_age.as_millis()).unwrap_or(u64::MAX)
            }
            TrimGuard::Force => u64::MAX,
        }
    }
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
    /// The first entry a group still needs (its oldest pending entry, or, with live
    /// consumers, the first it has not been delivered): a trim never goes past it unless
    /// forced.
    pub protected_from: Option<EntryId>,
    /// The groups that need it.
    pub protected_for: Vec<String>,
    /// Groups whose consumers have all idled past the guard's age: they do not hold the trim
    /// back, whatever they have pending.
    pub idle_groups: Vec<String>,
    /// The trim asked for would cut into what those groups need.
    pub would_cut: bool,
    /// The stream was trimmed (executed, and not refused); `removes` is then what went.
    pub applied: bool,
}

/// What [`trim`] did, or would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TrimReport {
    /// The topic.
    pub topic: String,
    /// Dry run or executed.
    pub mode: Mode,
    /// Refused: the trim would cut entries that a group has pending, or, with live consumers,
    /// not yet delivered (see the rows' `would_cut`), and it was not forced. Nothing was
    /// changed, unless a consumer started while the trim went from stream to stream of a
    /// partitioned topic: the rows say which streams were trimmed (`applied`) before it
    /// stopped.
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
/// With [`TrimGuard::Safe`] it never removes an entry a group has pending, nor one a group
/// with live consumers has not been delivered yet, unless all the group's consumers idled
/// past the guard's age: such a trim is refused whole ([`TrimReport::refused`]); the check
/// and the trim are one script step per stream. With [`TrimGuard::Force`] it trims as asked
/// (pending entries that go are dead-lettered as trimmed when next claimed).
/// `TrimTo::MaxLen` finds where to cut in pages from the nearer end of the stream, never
/// holding more than a page of entries.
pub async fn trim(
    conn: &RedisConnection,
    topic: &str,
    to: TrimTo,
    mode: Mode,
    guard: TrimGuard,
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
            TrimTo::MaxLen(keep) => first_kept(conn, &stream, length, keep).await?,
            TrimTo::OlderThan(age) => Some(id_at(now_ms().saturating_sub(saturating_ms(age)))),
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
            idle_groups: Vec::new(),
            would_cut: false,
            applied: false,
        };
        let infos = match admin::groups(conn, &stream).await {
            Ok(infos) => infos,
            Err(Error::StreamNotFound { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        for info in infos {
            // The rule of `needed_by` in the guard's script, which checks it again: a group
            // with a live consumer always holds back; one without, until all its consumers
            // idled past the age.
            let live = live_consumers(conn, &stream, &info.name).await?;
            if live.is_empty() {
                let consumers = match admin::consumers(conn, &stream, &info.name, Duration::MAX).await {
                    Ok(consumers) => consumers,
                    // Deleted since the list of groups: it needs nothing.
                    Err(Error::GroupNotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                let least_idle = consumers.iter().map(|c| c.idle_ms).min();
                if least_idle.is_some_and(|idle| idle > guard.idle_ms()) {
                    row.idle_groups.push(info.name.clone());
                    continue;
                }
            }
            let oldest = admin::pending_page(conn, &stream, &info.name, "-", 1, None, 0).await?;
            let undelivered = if live.is_empty() {
                None
            } else {
                first_after(conn, &stream, info.last_delivered_id).await?
            };
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
    report.refused = !guard.forced() && report.streams.iter().any(|r| r.would_cut);
    if mode == Mode::Execute && !report.refused {
        for row in &mut report.streams {
            let Some(before) = row.before else { continue };
            match guarded_trim(conn, &row.stream, before, guard).await? {
                Trimmed::Removed(removed) => {
                    row.removes = removed;
                    row.applied = true;
                }
                Trimmed::Refused { needed, groups, live } => {
                    // A consumer started (or a live group fell behind) since the first look:
                    // this stream and the next stay.
                    row.would_cut = true;
                    row.protected_from = Some(needed);
                    row.protected_for = groups;
                    report.refused = true;
                    report.live = live;
                    break;
                }
            }
        }
    }
    Ok(report)
}

/// The id of the first entry a trim to the newest `keep` of `length` entries keeps (`keep`
/// below `length`, above 0), found by skipping entries in pages from the nearer end: the
/// `length - keep` oldest, or the `keep - 1` newest.
async fn first_kept(conn: &RedisConnection, stream: &str, length: u64, keep: u64) -> Result<Option<EntryId>> {
    let removes = length - keep;
    if removes <= keep {
        nth_entry(conn, stream, removes, false).await
    } else {
        nth_entry(conn, stream, keep - 1, true).await
    }
}

/// The id of the entry after the first `skip` entries of `stream`, oldest first (newest first
/// with `reverse`), read in pages.
async fn nth_entry(
    conn: &RedisConnection,
    stream: &str,
    mut skip: u64,
    reverse: bool,
) -> Result<Option<EntryId>> {
    const PAGE: u64 = 1000;
    let (mut from, to) = if reverse {
        ("+".to_owned(), "-")
    } else {
        ("-".to_owned(), "+")
    };
    loop {
        let want = skip.saturating_add(1).min(PAGE);
        let page = admin::range(conn, stream, &from, to, want as usize, reverse).await?;
        if let Some(entry) = usize::try_from(skip).ok().and_then(|n| page.get(n)) {
            return Ok(Some(entry.id));
        }
        match page.last() {
            Some(last) if page.len() as u64 == want => {
                skip -= want;
                from = format!("({}", last.id);
            }
            // The stream ended first (entries went meanwhile).
            _ => return Ok(None),
        }
    }
}

/// What [`guarded_trim`] did.
enum Trimmed {
    Removed(u64),
    Refused {
        needed: EntryId,
        groups: Vec<String>,
        live: Vec<LiveConsumer>,
    },
}

/// Trims `stream` below `before`, unless (`guard` safe) a group still needs an entry below
/// it, checked in the same script step.
async fn guarded_trim(
    conn: &RedisConnection,
    stream: &str,
    before: EntryId,
    guard: TrimGuard,
) -> Result<Trimmed> {
    let reply: Vec<Value> = conn
        .run_mapped("trim", |mut c| {
            let mut call = scripts::GUARDED_TRIM.key(stream);
            call.arg(before.to_string())
                .arg(if guard.forced() { "1" } else { "0" })
                .arg(keys::registries_of(stream))
                .arg(keys::leases_of(stream))
                .arg(guard.idle_ms());
            async move { call.invoke_async(&mut c).await }
        })
        .await?;
    let parse_error = |e: redis::RedisError| replies::refusal("trim", e);
    match reply.as_slice() {
        [Value::Int(removed)] => Ok(Trimmed::Removed(u64::try_from(*removed).unwrap_or(0))),
        [Value::Int(-1), needed, Value::Array(groups), Value::Array(lives)] => {
            let needed: String =
                redis::from_redis_value(needed.clone()).map_err(|e| parse_error(e.into()))?;
            let groups: Vec<String> = groups
                .iter()
                .map(|g| redis::from_redis_value(g.clone()).map_err(|e| parse_error(e.into())))
                .collect::<Result<_>>()?;
            let mut live = Vec::new();
            for (group, found) in groups.iter().zip(lives) {
                let Value::Array(found) = found else {
                    return Err(replies::unexpected("trim"));
                };
                live.extend(LiveConsumer::from_script(stream, group, found)?);
            }
            Ok(Trimmed::Refused {
                needed: needed.parse()?,
                groups,
                live,
            })
        }
        _ => Err(replies::unexpected("trim")),
    }
}

async fn exists(conn: &RedisConnection, key: &str) -> Result<bool> {
    conn.command(redis::cmd("EXISTS").arg(key)).await
}
