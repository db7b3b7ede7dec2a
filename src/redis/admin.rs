//! Inspection and housekeeping of streams, groups and consumers: creation and deletion with
//! the keys streamwise keeps beside a stream, `XINFO` figures (length, groups, pending, lag),
//! consumer status from leases, pending lists and direct acknowledgement; the one-time
//! migration of release 0.1's key names ([`migrate_key_names`]).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use redis::Value;

use super::connection::RedisConnection;
use super::protocol::replies::{self, Record, ReplyEntry};
use super::{keys, scripts};
use crate::codec::{Codec, JsonCodec, RawEntry};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{EntryId, Message, format_timestamp, parse_timestamp, saturating_ms};
use crate::pubsub::{MAX_CAP, StartFrom};

/// A stream's settings, kept in the hash `streamwise:meta:{<stream>}` beside it. Publishers
/// apply them: `max_length` as `XADD MAXLEN ~`, `retention_ms` as `XTRIM MINID ~` at most once
/// a second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSettings {
    /// Entries older than this many milliseconds are trimmed.
    pub retention_ms: Option<u64>,
    /// The stream is trimmed to about this many entries.
    pub max_length: Option<u64>,
}

/// Creates `stream` empty, with `settings` and `created_at` in its settings hash. `false`
/// when the stream existed (its settings are then left as they are).
pub async fn create_stream(conn: &RedisConnection, stream: &str, settings: StreamSettings) -> Result<bool> {
    validate_stream_name("stream", stream)?;
    // Redis takes both as signed 64-bit numbers.
    let limit = MAX_CAP;
    if settings.max_length.is_some_and(|n| n == 0 || n > limit) {
        return Err(Error::invalid(
            "max_length",
            format_args!("must be between 1 and {limit}"),
        ));
    }
    if settings.retention_ms.is_some_and(|ms| ms == 0 || ms > limit) {
        return Err(Error::invalid(
            "retention_ms",
            format_args!("must be between 1 and {limit}"),
        ));
    }
    let created_at = format_timestamp(SystemTime::now());
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let (retention, max_length) = (opt(settings.retention_ms), opt(settings.max_length));
    let created: i64 = conn
        .run_mapped("create stream", |mut c| {
            let mut call = scripts::CREATE_STREAM.key(stream);
            call.key(keys::meta(stream))
                .arg(&created_at)
                .arg(&retention)
                .arg(&max_length);
            async move { call.invoke_async(&mut c).await }
        })
        .await?;
    Ok(created == 1)
}

/// The settings of `stream` and when it was created (both absent for a stream that was not
/// made by [`create_stream`]).
pub async fn stream_settings(
    conn: &RedisConnection,
    stream: &str,
) -> Result<(StreamSettings, Option<SystemTime>)> {
    validate_stream_name("stream", stream)?;
    let key = keys::meta(stream);
    let (created_at, retention_ms, max_length): (Option<String>, Option<u64>, Option<u64>) = conn
        .run_mapped("read stream settings", |mut c| {
            let cmd = redis::cmd("HMGET")
                .arg(&key)
                .arg("created_at")
                .arg("retention_ms")
                .arg("max_length")
                .clone();
            async move { cmd.query_async(&mut c).await }
        })
        .await?;
    let created_at = created_at.as_deref().map(parse_timestamp).transpose()?;
    Ok((
        StreamSettings {
            retention_ms,
            max_length,
        },
        created_at,
    ))
}

/// How many entries `stream` holds (`XLEN`; 0 when it does not exist).
pub async fn stream_length(conn: &RedisConnection, stream: &str) -> Result<u64> {
    validate_stream_name("stream", stream)?;
    conn.command(redis::cmd("XLEN").arg(stream)).await
}

/// How many entries of `stream` are pending in `group` (`XPENDING` summary).
pub async fn pending_count(conn: &RedisConnection, stream: &str, group: &str) -> Result<u64> {
    let reply = conn
        .run("XPENDING", |mut c| {
            let cmd = redis::cmd("XPENDING").arg(stream).arg(group).clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    match reply {
        Ok(summary) => replies::parse_pending_count(summary),
        Err(e) if e.code() == Some("NOGROUP") => Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        }),
        Err(e) => Err(e.into_error()),
    }
}

fn stream_not_found(stream: &str) -> Error {
    Error::StreamNotFound {
        stream: stream.to_owned(),
    }
}

fn group_not_found(stream: &str, group: &str) -> Error {
    Error::GroupNotFound {
        stream: stream.to_owned(),
        group: group.to_owned(),
    }
}

/// The raw entry `id` of `stream`, if it is still there (`XRANGE id id`).
pub(crate) async fn read_entry(
    conn: &RedisConnection,
    stream: &str,
    id: EntryId,
) -> Result<Option<RawEntry>> {
    let id_text = id.to_string();
    first_entry(conn, stream, &id_text, &id_text).await
}

/// The first raw entry of `stream` between `from` and `to` (`XRANGE from to COUNT 1`).
async fn first_entry(conn: &RedisConnection, stream: &str, from: &str, to: &str) -> Result<Option<RawEntry>> {
    Ok(range(conn, stream, from, to, 1, false).await?.into_iter().next())
}

/// Up to `count` raw entries of `stream` between `from` and `to`, in the syntax of `XRANGE`
/// (`-`, `+`, an id, `(id` for exclusive): oldest first, or with `reverse` newest first
/// (`XREVRANGE`, where `from` is the upper end). Empty when the stream does not exist. The
/// entries come in one reply: keep `count` to a page.
pub async fn range(
    conn: &RedisConnection,
    stream: &str,
    from: &str,
    to: &str,
    count: usize,
    reverse: bool,
) -> Result<Vec<RawEntry>> {
    validate_stream_name("stream", stream)?;
    let command = if reverse { "XREVRANGE" } else { "XRANGE" };
    let reply = conn
        .run_mapped(command, |mut c| {
            let cmd = redis::cmd(command)
                .arg(stream)
                .arg(from)
                .arg(to)
                .arg("COUNT")
                .arg(count)
                .clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await?;
    Ok(replies::parse_entries(reply)?
        .into_iter()
        .filter_map(|e| match e {
            ReplyEntry::Present(raw) => Some(raw),
            ReplyEntry::Trimmed(_) => None,
        })
        .collect())
}

/// One entry as stored in a stream: its id and its fields (as text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// The entry id.
    pub id: EntryId,
    /// The fields, values as text (invalid UTF-8 replaced).
    pub fields: BTreeMap<String, String>,
}

impl StoredEntry {
    /// The message in the entry, if it is in the standard wire format.
    pub fn message(&self) -> Result<Message> {
        let raw = RawEntry {
            id: self.id,
            fields: self
                .fields
                .iter()
                .map(|(k, v)| {
                    (
                        bytes::Bytes::copy_from_slice(k.as_bytes()),
                        bytes::Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
        };
        JsonCodec.decode(raw)
    }

    fn from_value(v: Value) -> Result<Option<StoredEntry>> {
        Ok(replies::parse_optional_entry(v)?.and_then(|e| match e {
            ReplyEntry::Present(raw) => Some(StoredEntry {
                id: raw.id,
                fields: raw
                    .fields
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(&k).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect(),
            }),
            ReplyEntry::Trimmed(_) => None,
        }))
    }
}

/// What `XINFO STREAM` and the settings hash tell about a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamInfo {
    /// Number of entries.
    pub length: u64,
    /// The first entry, if any.
    pub first_entry: Option<StoredEntry>,
    /// The last entry, if any.
    pub last_entry: Option<StoredEntry>,
    /// Keys of the stream's radix tree (internal storage).
    pub radix_tree_keys: u64,
    /// Number of consumer groups.
    pub groups: u64,
    /// The id of the last entry ever added.
    pub last_generated_id: Option<EntryId>,
    /// The stream's settings (see [`create_stream`]).
    pub settings: StreamSettings,
    /// When [`create_stream`] made it, if it did.
    pub created_at: Option<SystemTime>,
    /// How old the first entry is (from its id), if there is one.
    pub oldest_entry_age: Option<std::time::Duration>,
    /// Delayed messages waiting for their time ([`crate::Publisher::publish_at`]).
    pub scheduled: u64,
}

/// Everything about `stream`: length, first and last entry, storage, groups and settings.
/// [`Error::StreamNotFound`] when it does not exist and has no delayed messages waiting (a
/// topic with only those is reported with length 0).
pub async fn stream_info(conn: &RedisConnection, stream: &str) -> Result<StreamInfo> {
    validate_stream_name("stream", stream)?;
    let reply = conn
        .run("XINFO STREAM", |mut c| {
            let cmd = redis::cmd("XINFO").arg("STREAM").arg(stream).clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    let mut zcard = redis::cmd("ZCARD");
    zcard.arg(keys::scheduled(stream));
    let scheduled = || conn.command::<u64>(&zcard);
    let mut info = match reply {
        Ok(v) => {
            let mut record = Record::parse(v)?;
            StreamInfo {
                length: record.int("length").unwrap_or(0),
                first_entry: StoredEntry::from_value(record.take("first-entry"))?,
                last_entry: StoredEntry::from_value(record.take("last-entry"))?,
                radix_tree_keys: record.int("radix-tree-keys").unwrap_or(0),
                groups: record.int("groups").unwrap_or(0),
                last_generated_id: record.entry_id("last-generated-id"),
                settings: StreamSettings::default(),
                created_at: None,
                oldest_entry_age: None,
                scheduled: 0,
            }
        }
        Err(e) if e.is_no_such_key() => {
            // A topic whose messages are all still scheduled has no stream yet, but it is
            // there: its first message will create it.
            let waiting = scheduled().await?;
            if waiting == 0 {
                return Err(stream_not_found(stream));
            }
            let (settings, created_at) = stream_settings(conn, stream).await?;
            return Ok(StreamInfo {
                length: 0,
                first_entry: None,
                last_entry: None,
                radix_tree_keys: 0,
                groups: 0,
                last_generated_id: None,
                settings,
                created_at,
                oldest_entry_age: None,
                scheduled: waiting,
            });
        }
        Err(e) => return Err(e.into_error()),
    };
    (info.settings, info.created_at) = stream_settings(conn, stream).await?;
    info.oldest_entry_age = info.first_entry.as_ref().map(|e| {
        let written = std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.id.ms());
        SystemTime::now().duration_since(written).unwrap_or_default()
    });
    info.scheduled = scheduled().await?;
    Ok(info)
}

/// Deletes `stream` with everything streamwise keeps beside it (settings, checkpoints,
/// leases, consumer registries; for a dead-letter stream, where an interrupted replay of it
/// stopped) and returns how many keys were deleted.
pub async fn delete_stream(conn: &RedisConnection, stream: &str) -> Result<u64> {
    validate_stream_name("stream", stream)?;
    let mut doomed = vec![
        stream.to_owned(),
        keys::meta(stream),
        keys::checkpoints(stream),
        keys::replay(stream),
        keys::scheduled(stream),
    ];
    for pattern in [keys::lease(stream, "*", "*"), keys::leased_consumers(stream, "*")] {
        // On a cluster, the keys of a stream are on the master of its slot.
        doomed.extend(scan_with(conn, &pattern, None, Some(stream)).await?);
    }
    conn.run_mapped("delete stream", |mut c| {
        let cmd = redis::cmd("DEL").arg(&doomed).clone();
        async move { cmd.query_async::<u64>(&mut c).await }
    })
    .await
}

/// The keys matching `pattern`, of type `kind` when given (`SCAN .. TYPE`); on a cluster, on
/// the master of `near`'s slot, or on every master without `near`.
pub(crate) async fn scan_with(
    conn: &RedisConnection,
    pattern: &str,
    kind: Option<&str>,
    near: Option<&str>,
) -> Result<Vec<String>> {
    let nodes = match near {
        Some(_) => vec![None],
        None => conn.key_nodes().await?,
    };
    let mut found = Vec::new();
    for node in &nodes {
        let mut cursor = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
            if let Some(kind) = kind {
                cmd.arg("TYPE").arg(kind);
            }
            let reply = match near {
                Some(key) => conn.run_for_key("SCAN", key, &cmd).await?,
                None => conn.run_on_node("SCAN", node.as_ref(), &cmd).await?,
            };
            let (next, keys): (u64, Vec<String>) = redis::FromRedisValue::from_redis_value(reply)
                .map_err(|e| replies::refusal("SCAN", e.into()))?;
            found.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(found)
}

/// Creates consumer group `group` on `stream`, starting at `start`. `false` when it existed.
/// With `mkstream` false, a missing stream is [`Error::StreamNotFound`].
pub async fn create_group(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    start: StartFrom,
    mkstream: bool,
) -> Result<bool> {
    validate_stream_name("stream", stream)?;
    validate_name("group", group)?;
    let start = start.to_string();
    let created = conn
        .run("XGROUP CREATE", |mut c| {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE").arg(stream).arg(group).arg(&start);
            if mkstream {
                cmd.arg("MKSTREAM");
            }
            async move { cmd.query_async::<()>(&mut c).await }
        })
        .await;
    match created {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) if e.is_no_such_key() => Err(stream_not_found(stream)),
        Err(e) => Err(e.into_error()),
    }
}

/// Deletes consumer group `group` with its pending list. `false` when there was no such group.
pub async fn delete_group(conn: &RedisConnection, stream: &str, group: &str) -> Result<bool> {
    validate_stream_name("stream", stream)?;
    validate_name("group", group)?;
    let destroyed = conn
        .run("XGROUP DESTROY", |mut c| {
            let cmd = redis::cmd("XGROUP").arg("DESTROY").arg(stream).arg(group).clone();
            async move { cmd.query_async::<u64>(&mut c).await }
        })
        .await;
    match destroyed {
        Ok(n) => Ok(n > 0),
        Err(e) if e.is_no_such_key() => Ok(false),
        Err(e) => Err(e.into_error()),
    }
}

/// Statistics of one consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group name.
    pub name: String,
    /// Number of consumers known to the group.
    pub consumers: u64,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// The last entry delivered to the group.
    pub last_delivered_id: EntryId,
    /// Entries in the stream the group has not read yet (Redis 7 `lag`; `None` when Redis
    /// cannot tell, for example after deletions in the unread range).
    pub lag: Option<u64>,
}

/// Statistics of every consumer group of `stream` (`XINFO GROUPS`); [`Error::StreamNotFound`]
/// when it does not exist.
pub async fn groups(conn: &RedisConnection, stream: &str) -> Result<Vec<GroupInfo>> {
    validate_stream_name("stream", stream)?;
    let reply = conn
        .run("XINFO GROUPS", |mut c| {
            let cmd = redis::cmd("XINFO").arg("GROUPS").arg(stream).clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    let groups = match reply {
        Ok(v) => replies::parse_records(v, "XINFO GROUPS")?,
        Err(e) if e.is_no_such_key() => return Err(stream_not_found(stream)),
        Err(e) => return Err(e.into_error()),
    };
    Ok(groups
        .into_iter()
        .map(|g| GroupInfo {
            name: g.text("name").unwrap_or_default(),
            consumers: g.int("consumers").unwrap_or(0),
            pending: g.int("pending").unwrap_or(0),
            last_delivered_id: g.entry_id("last-delivered-id").unwrap_or(EntryId::ZERO),
            lag: g.int("lag"),
        })
        .collect())
}

/// How many entries of `stream` come after `after`, counting at most `cap` (read in pages from
/// just after `after`): a group's lag where Redis cannot tell it
/// ([`GroupInfo::lag`] is `None` after deletions in the unread range, and on Redis 7.0 on a
/// replica promoted by a failover). It reads up to `cap` entries, so keep `cap` small.
pub async fn entries_after(conn: &RedisConnection, stream: &str, after: EntryId, cap: u64) -> Result<u64> {
    count_range(conn, stream, &format!("({after}"), "+", cap).await
}

/// How many entries of `stream` lie between `from` and `to` (in the syntax of `XRANGE`),
/// counting at most `cap`: read in pages, so that no reply holds more than a page of entries.
pub(crate) async fn count_range(
    conn: &RedisConnection,
    stream: &str,
    from: &str,
    to: &str,
    cap: u64,
) -> Result<u64> {
    const PAGE: u64 = 1000;
    let (mut counted, mut from) = (0u64, from.to_owned());
    while counted < cap {
        let want = PAGE.min(cap - counted);
        let page = range(conn, stream, &from, to, want as usize, false).await?;
        counted += page.len() as u64;
        match page.last() {
            Some(entry) if page.len() as u64 == want => from = format!("({}", entry.id),
            _ => break,
        }
    }
    Ok(counted)
}

/// The names of the consumer groups of `stream`; [`Error::StreamNotFound`] when it does not
/// exist.
pub async fn list_groups(conn: &RedisConnection, stream: &str) -> Result<Vec<String>> {
    Ok(groups(conn, stream).await?.into_iter().map(|g| g.name).collect())
}

/// Statistics of `group`; [`Error::GroupNotFound`] when the stream or the group is missing.
pub async fn group_info(conn: &RedisConnection, stream: &str, group: &str) -> Result<GroupInfo> {
    validate_name("group", group)?;
    match groups(conn, stream).await {
        Ok(all) => all
            .into_iter()
            .find(|g| g.name == group)
            .ok_or_else(|| group_not_found(stream, group)),
        Err(Error::StreamNotFound { .. }) => Err(group_not_found(stream, group)),
        Err(e) => Err(e),
    }
}

/// Where a consumer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConsumerStatus {
    /// Holds its lease and read or acknowledged within the idle threshold.
    Active,
    /// Holds its lease but has done nothing for longer than the idle threshold.
    Idle,
    /// Holds no lease: closed, crashed, or a client that does not use leases.
    Disconnected,
}

/// One consumer of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The consumer name.
    pub name: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Milliseconds since it last read or claimed.
    pub idle_ms: u64,
    /// Active, idle or disconnected, from its lease and idle time.
    pub status: ConsumerStatus,
    /// It used a lease that lapsed while it still held entries: it crashed (see
    /// [`Error::ConsumerCrashed`]); reclaim takes its entries at once.
    pub crashed: bool,
    /// The lease: who holds it and for how long yet, `None` when it holds none.
    pub lease: Option<LeaseHolder>,
    /// It uses leases (it is in the group's lease registry): with no lease now, it was cut
    /// off or crashed rather than closed.
    pub uses_leases: bool,
}

/// The holder of a consumer's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseHolder {
    /// The lease's value: a token unique to the subscription, `<member>/<uuid>` when it
    /// reads a partition for a group member.
    pub token: String,
    /// Milliseconds before it runs out unless renewed (`None` without an expiry).
    pub ttl_ms: Option<u64>,
}

impl LeaseHolder {
    pub(crate) fn new(token: String, ttl_ms: Option<u64>) -> Self {
        LeaseHolder { token, ttl_ms }
    }

    /// The group member named in the token (a partition's owner), if any.
    pub fn member(&self) -> Option<&str> {
        self.token.split_once('/').map(|(member, _)| member)
    }
}

/// The consumers of `group`, with a status from their leases: those idle longer than
/// `idle_after` are [`ConsumerStatus::Idle`].
pub async fn consumers(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    idle_after: Duration,
) -> Result<Vec<ConsumerInfo>> {
    validate_stream_name("stream", stream)?;
    validate_name("group", group)?;
    let reply = conn
        .run("XINFO CONSUMERS", |mut c| {
            let cmd = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(group)
                .clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    let records = match reply {
        Ok(v) => replies::parse_records(v, "XINFO CONSUMERS")?,
        Err(e) if e.is_no_such_key() || e.code() == Some("NOGROUP") => {
            return Err(group_not_found(stream, group));
        }
        Err(e) => return Err(e.into_error()),
    };
    let found: Vec<(String, u64, u64)> = records
        .iter()
        .map(|r| {
            let name = r.text("name").unwrap_or_default();
            (name, r.int("pending").unwrap_or(0), r.int("idle").unwrap_or(0))
        })
        .collect();
    // One round trip for all: each consumer's lease value, its time left and its registration.
    let mut pipe = redis::pipe();
    for (name, _, _) in &found {
        let lease = keys::lease(stream, group, name);
        pipe.cmd("GET").arg(&lease);
        pipe.cmd("PTTL").arg(&lease);
        pipe.cmd("SISMEMBER")
            .arg(keys::leased_consumers(stream, group))
            .arg(name);
    }
    let replies: Vec<(Option<String>, i64, bool)> = if found.is_empty() {
        Vec::new()
    } else {
        let flat: Vec<Value> = conn
            .run_mapped("consumer leases", |mut c| {
                let pipe = pipe.clone();
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        flat.chunks(3)
            .map(|r| match r {
                [token, ttl, registered] => Ok((
                    redis::from_redis_value(token.clone()).map_err(|e| replies::refusal("GET", e.into()))?,
                    redis::from_redis_value(ttl.clone()).map_err(|e| replies::refusal("PTTL", e.into()))?,
                    redis::from_redis_value(registered.clone())
                        .map_err(|e| replies::refusal("SISMEMBER", e.into()))?,
                )),
                _ => Err(replies::unexpected("consumer leases")),
            })
            .collect::<Result<_>>()?
    };
    let leases = replies.into_iter().map(|(token, ttl_ms, registered)| {
        let holder = token.map(|token| LeaseHolder::new(token, u64::try_from(ttl_ms).ok()));
        (holder, registered)
    });
    let idle_after_ms = saturating_ms(idle_after);
    Ok(found
        .into_iter()
        .zip(leases)
        .map(|((name, pending, idle_ms), (lease, registered))| {
            let leased = lease.is_some();
            let status = match (leased, idle_ms >= idle_after_ms) {
                (false, _) => ConsumerStatus::Disconnected,
                (true, false) => ConsumerStatus::Active,
                (true, true) => ConsumerStatus::Idle,
            };
            ConsumerInfo {
                crashed: !leased && registered && pending > 0,
                name,
                pending,
                idle_ms,
                status,
                lease,
                uses_leases: registered,
            }
        })
        .collect())
}

/// One entry of a pending list.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The entry id.
    pub id: EntryId,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How many times it was delivered.
    pub delivery_count: u64,
}

/// The pending entries of `group`, of one consumer or of all, oldest first.
pub async fn pending_entries(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    consumer: Option<&str>,
) -> Result<Vec<PendingEntry>> {
    validate_stream_name("stream", stream)?;
    validate_name("group", group)?;
    if let Some(c) = consumer {
        validate_name("consumer", c)?;
    }
    const PAGE: usize = 1000;
    let mut all = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let rows = pending_page(conn, stream, group, &start, PAGE, consumer, 0).await?;
        let full = rows.len() == PAGE;
        if let Some(last) = rows.last() {
            start = format!("({}", last.id);
        }
        all.extend(rows);
        if !full {
            return Ok(all);
        }
    }
}

/// Up to `count` pending entries of `group` from `start` on (`-`, an id, or `(id` for after
/// it), oldest first, of one consumer or of all, idle at least `min_idle_ms` (`XPENDING ..
/// IDLE`).
pub(crate) async fn pending_page(
    conn: &RedisConnection,
    stream: &str,
    group: &str,
    start: &str,
    count: usize,
    consumer: Option<&str>,
    min_idle_ms: u64,
) -> Result<Vec<PendingEntry>> {
    let reply = conn
        .run("XPENDING", |mut c| {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(stream).arg(group);
            if min_idle_ms > 0 {
                cmd.arg("IDLE").arg(min_idle_ms);
            }
            cmd.arg(start).arg("+").arg(count);
            if let Some(consumer) = consumer {
                cmd.arg(consumer);
            }
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    let rows = match reply {
        Ok(v) => replies::parse_pending_rows(v)?,
        Err(e) if e.is_no_such_key() || e.code() == Some("NOGROUP") => {
            return Err(group_not_found(stream, group));
        }
        Err(e) => return Err(e.into_error()),
    };
    Ok(rows
        .into_iter()
        .map(|r| PendingEntry {
            id: r.id,
            consumer: r.consumer,
            idle_ms: r.idle_ms,
            delivery_count: r.delivery_count,
        })
        .collect())
}

/// Acknowledges `ids` in `group` at once (no batching) and returns how many were pending.
pub async fn ack(conn: &RedisConnection, stream: &str, group: &str, ids: &[EntryId]) -> Result<u64> {
    validate_stream_name("stream", stream)?;
    validate_name("group", group)?;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    conn.run_mapped("XACK", |mut c| {
        let cmd = redis::cmd("XACK").arg(stream).arg(group).arg(&ids).clone();
        async move { cmd.query_async::<u64>(&mut c).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stream_settings_are_bounded_before_they_reach_redis() {
        // Nothing listens there: a refusal must come from the check, before any command.
        let conn = RedisConnection::new("redis://127.0.0.1:1").unwrap();
        for (settings, field) in [
            (
                StreamSettings {
                    max_length: Some(0),
                    retention_ms: None,
                },
                "max_length",
            ),
            (
                StreamSettings {
                    max_length: Some(u64::MAX),
                    retention_ms: None,
                },
                "max_length",
            ),
            (
                StreamSettings {
                    max_length: None,
                    retention_ms: Some(0),
                },
                "retention_ms",
            ),
            (
                StreamSettings {
                    max_length: None,
                    retention_ms: Some(u64::MAX),
                },
                "retention_ms",
            ),
        ] {
            let err = create_stream(&conn, "s", settings).await.unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{err}");
        }
    }
}

/// What [`migrate_key_names`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyMigration {
    /// `(old, new)`: the keys renamed, or merged into a key of the new name.
    pub moved: Vec<(String, String)>,
    /// `(old, new)`: dead-letter streams left under their old name because a stream of the
    /// new name exists already (records were dead-lettered by both releases); read both, or
    /// move the old records by hand.
    pub left: Vec<(String, String)>,
}

/// Renames the keys written by release 0.1 to the names of this release, once, on a single
/// Redis: the settings, checkpoints, leases and consumer registries of every stream
/// (`streamwise:meta:orders` becomes `streamwise:meta:{orders}`) and the dead-letter streams
/// (`orders-dead` becomes `{orders}-dead`). Run it with the consumers stopped, before the new
/// release starts, for example with `cargo run --example migrate_keys`; it is safe to run
/// again (what was moved is not found a second time).
///
/// Why: every key of a stream now carries the stream's hash tag, so that it lives in the
/// stream's hash slot on a Redis Cluster. Without the migration, the new release does not see
/// the old keys: streams and groups (and their pending entries) work as before, but stream
/// settings are not applied, checkpoints and the crashed-consumer registry start empty, and
/// the old dead letters stay readable only under their old names.
///
/// A stream `X-dead` counts as a dead-letter stream when its first record says it came from
/// `X` (`dead_letter.stream` in the default codec's metadata); an empty one, or one written
/// with another codec, is left for the operator to rename.
///
/// # Errors
///
/// [`Error::Invalid`] (`connection`) on a Redis Cluster (release 0.1 could not run there, so
/// there is nothing to migrate), and the errors of the commands.
pub async fn migrate_key_names(conn: &RedisConnection) -> Result<KeyMigration> {
    if conn.is_cluster() {
        return Err(Error::invalid(
            "connection",
            "key names are migrated on a single Redis: release 0.1 did not run on a Redis Cluster",
        ));
    }
    // First the dead-letter streams of 0.1 (`orders-dead`, and `orders-dead-dead`), by the
    // stream their records came from: their new names, and those of their own keys, follow
    // from the new name of that stream.
    let mut dead_letters = BTreeMap::new();
    let pattern = format!("*{}", crate::dead_letter::SUFFIX);
    for old in scan_with(conn, &pattern, Some("stream"), None).await? {
        if let Some(source) = old.strip_suffix(crate::dead_letter::SUFFIX)
            && validate_name("stream", source).is_ok()
            && dead_letters_of(conn, &old).await?.as_deref() == Some(source)
        {
            let source = source.to_owned();
            dead_letters.insert(old, source);
        }
    }
    let mut moves = Vec::new();
    for prefix in keys::prefix::ALL {
        for old in scan_with(conn, &format!("{prefix}*"), None, None).await? {
            if let Some(new) = new_key_name(prefix, &old, &dead_letters) {
                moves.push((old, new));
            }
        }
    }
    for old in dead_letters.keys() {
        moves.push((old.clone(), renamed_stream(old, &dead_letters)));
    }
    let mut done = KeyMigration::default();
    for (old, new) in moves {
        let outcome: i64 = conn
            .run_mapped("move key", |mut c| {
                let mut call = scripts::MOVE_KEY.prepare_invoke();
                call.key(&old).key(&new);
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        match outcome {
            1 => done.moved.push((old, new)),
            -1 => done.left.push((old, new)),
            _ => {}
        }
    }
    Ok(done)
}

/// The new name of a release-0.1 key under `prefix`, or `None` when `key` has the new form.
fn new_key_name(prefix: &str, key: &str, dead_letters: &BTreeMap<String, String>) -> Option<String> {
    let rest = key.strip_prefix(prefix)?;
    if rest.contains(['{', '}']) {
        return None;
    }
    // Stream names have no ':', so the stream is everything up to the first one.
    let (stream, tail) = rest.split_at(rest.find(':').unwrap_or(rest.len()));
    validate_name("stream", stream).ok()?;
    let stream = renamed_stream(stream, dead_letters);
    Some(format!("{prefix}{}{tail}", keys::in_slot(&stream)))
}

/// The name this release gives the 0.1 stream `stream`: a dead-letter stream of 0.1 (in
/// `dead_letters`, by the stream its records came from) becomes the dead-letter stream of
/// that stream's new name; any other stream keeps its name.
fn renamed_stream(stream: &str, dead_letters: &BTreeMap<String, String>) -> String {
    match dead_letters.get(stream) {
        Some(source) => crate::dead_letter::stream_for(&renamed_stream(source, dead_letters)),
        None => stream.to_owned(),
    }
}

/// The source stream named by the first record of `stream`, if it is a dead-letter record.
async fn dead_letters_of(conn: &RedisConnection, stream: &str) -> Result<Option<String>> {
    let first = first_entry(conn, stream, "-", "+").await?;
    Ok(first.and_then(|raw| JsonCodec.decode(raw).ok()).and_then(|m| {
        m.metadata()
            .get(crate::dead_letter::keys::STREAM)
            .map(str::to_owned)
    }))
}
