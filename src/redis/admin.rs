//! Inspection and housekeeping of streams and groups: reply parsing for `XINFO`, pending
//! counts, stream creation with its settings hash.

use std::time::SystemTime;

use redis::Value;

use super::connection::RedisConnection;
use super::{keys, scripts};
use crate::error::{Error, Result, validate_name};
use crate::message::{format_timestamp, parse_timestamp};

/// A stream's settings, kept in the hash `streamwise:meta:<stream>` beside it. Publishers
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
    validate_name("stream", stream)?;
    if settings.max_length == Some(0) {
        return Err(Error::invalid("max_length", "must be at least 1"));
    }
    if settings.retention_ms == Some(0) {
        return Err(Error::invalid("retention_ms", "must be at least 1"));
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
    validate_name("stream", stream)?;
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

fn protocol(what: &str) -> Error {
    Error::Decode {
        what: "redis reply".into(),
        reason: format!("unexpected shape: {what}"),
    }
}

/// The fields of one `XINFO` record (a RESP2 flat array or a RESP3 map) as name/value pairs.
pub(crate) fn record_fields(record: Value) -> Result<Vec<(String, Value)>> {
    let pairs: Vec<(Value, Value)> = match record {
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        other => return Err(protocol(&format!("expected a record, got {other:?}"))),
    };
    pairs
        .into_iter()
        .map(|(k, v)| match k {
            Value::BulkString(b) => Ok((String::from_utf8_lossy(&b).into_owned(), v)),
            Value::SimpleString(s) => Ok((s, v)),
            other => Err(protocol(&format!("record key {other:?}"))),
        })
        .collect()
}

/// The group names in an `XINFO GROUPS` reply.
pub(crate) fn group_names(reply: Value) -> Result<Vec<String>> {
    let Value::Array(groups) = reply else {
        return Err(protocol("XINFO GROUPS is not an array"));
    };
    groups
        .into_iter()
        .map(|g| {
            record_fields(g)?
                .into_iter()
                .find(|(k, _)| k == "name")
                .and_then(|(_, v)| match v {
                    Value::BulkString(b) => String::from_utf8(b).ok(),
                    Value::SimpleString(s) => Some(s),
                    _ => None,
                })
                .ok_or_else(|| protocol("group without name"))
        })
        .collect()
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
        Ok(Value::Array(summary)) => match summary.into_iter().next() {
            Some(Value::Int(n)) => Ok(u64::try_from(n).unwrap_or(0)),
            _ => Err(protocol("XPENDING summary")),
        },
        Ok(other) => Err(protocol(&format!("XPENDING summary {other:?}"))),
        Err(e) if e.code() == Some("NOGROUP") => Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        }),
        Err(e) => Err(e.into_error()),
    }
}
