//! Inspection and housekeeping of streams and groups: reply parsing for `XINFO`, pending
//! counts, stream creation with its settings hash.

use redis::Value;

use super::connection::RedisConnection;
use crate::error::{Error, Result};

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
