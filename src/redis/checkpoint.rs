//! [`RedisCheckpointStore`]: checkpoints in one hash per stream,
//! `streamwise:checkpoint:{<stream>}`, field `<group>:<consumer>`, value
//! `{"message_id": "<id>", "timestamp": "<ISO 8601>"}`.

use futures::future::BoxFuture;

use super::connection::RedisConnection;
use super::keys;
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::error::{Error, Result};
use crate::message::{format_timestamp, parse_timestamp};

/// Checkpoints kept in Redis, next to the stream (the default of the Redis subscriber).
#[derive(Clone, Debug)]
pub struct RedisCheckpointStore {
    conn: RedisConnection,
}

impl RedisCheckpointStore {
    /// A store on `conn`.
    pub fn new(conn: RedisConnection) -> Self {
        RedisCheckpointStore { conn }
    }
}

fn encode(cp: &Checkpoint) -> String {
    serde_json::json!({
        "message_id": cp.message_id.to_string(),
        "timestamp": format_timestamp(cp.timestamp),
    })
    .to_string()
}

fn decode(raw: &str) -> Result<Checkpoint> {
    let bad = |reason: String| Error::Decode {
        what: "checkpoint".into(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(format!("{raw:?} has no {name}")))
    };
    Ok(Checkpoint {
        message_id: field("message_id")?.parse()?,
        timestamp: parse_timestamp(field("timestamp")?)?,
    })
}

impl CheckpointStore for RedisCheckpointStore {
    fn save<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        checkpoint: Checkpoint,
    ) -> BoxFuture<'a, Result<()>> {
        let (key, field, value) = (
            keys::checkpoints(stream),
            keys::checkpoint_field(group, consumer),
            encode(&checkpoint),
        );
        Box::pin(async move {
            self.conn
                .run_mapped("save checkpoint", |mut c| {
                    let mut call = super::scripts::SAVE_CHECKPOINT.key(stream);
                    call.key(&key).arg(&field).arg(&value);
                    async move { call.invoke_async::<i64>(&mut c).await.map(drop) }
                })
                .await
        })
    }

    fn load<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
        let (key, field) = (keys::checkpoints(stream), keys::checkpoint_field(group, consumer));
        Box::pin(async move {
            let raw: Option<String> = self
                .conn
                .run_mapped("load checkpoint", |mut c| {
                    let cmd = redis::cmd("HGET").arg(&key).arg(&field).clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            raw.as_deref().map(decode).transpose()
        })
    }

    fn load_group<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
        let key = keys::checkpoints(stream);
        let prefix = format!("{group}:");
        Box::pin(async move {
            let all: Vec<(String, String)> = self
                .conn
                .run_mapped("load checkpoints", |mut c| {
                    let cmd = redis::cmd("HGETALL").arg(&key).clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            let mut lowest: Option<Checkpoint> = None;
            for (field, raw) in all {
                // Consumer names cannot contain ':', so the prefix names the group exactly.
                if field.strip_prefix(&prefix).is_some_and(|c| !c.contains(':')) {
                    let cp = decode(&raw)?;
                    if lowest.is_none_or(|l| cp.message_id < l.message_id) {
                        lowest = Some(cp);
                    }
                }
            }
            Ok(lowest)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::EntryId;

    #[test]
    fn checkpoints_encode_as_readable_json_and_back() {
        let cp = Checkpoint {
            message_id: EntryId::new(7, 1),
            timestamp: UNIX_EPOCH + Duration::from_millis(1_795_341_600_123),
        };
        let raw = encode(&cp);
        assert_eq!(
            raw,
            r#"{"message_id":"7-1","timestamp":"2026-11-22T10:00:00.123Z"}"#
        );
        assert_eq!(decode(&raw).unwrap(), cp);
        assert!(decode("{}").is_err());
        assert!(decode("nope").is_err());
    }
}
