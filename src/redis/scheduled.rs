//! Delayed messages on Redis ([`Publisher::publish_at`](crate::Publisher::publish_at)): a
//! topic's schedule is a sorted set in the topic's slot ([`keys::scheduled`]), scored by due
//! time in milliseconds since the epoch. Each member is one entry, encoded by [`member`]. Every
//! subscription of the topic runs [`move_due`], which moves the due ones into the stream with
//! one script step each ([`scripts::MOVE_DUE`]): several movers never append one twice, and
//! the schedule outlives any of them (and a server restart, with AOF or RDB persistence).

use std::time::Duration;

use super::connection::RedisConnection;
use super::{keys, scripts};
use crate::signal::Signal;

/// The most a subscription's mover waits between looks at its schedule. A message due sooner
/// than that after it is scheduled is moved by a one-off task of its publisher
/// ([`move_when_due`]), so no message waits for the next look.
pub(crate) const MOVER_POLL: Duration = Duration::from_secs(1);

/// The most entries one script step moves.
const MOVE_BATCH: u64 = 100;

/// The schedule member of an entry: a token that keeps equal messages apart (a UUIDv7), then
/// each field name and value as `<length>:<bytes>`; `fields` hands them over in order.
pub(crate) fn member(fields: impl FnOnce(&mut dyn FnMut(&str, &[u8]))) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(uuid::Uuid::now_v7().as_bytes());
    fields(&mut |name, value| {
        for part in [name.as_bytes(), value] {
            out.extend_from_slice(part.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(part);
        }
    });
    out
}

/// Moves `topic`'s due messages once `due` has come, once (a task of the publisher of a
/// message due before the subscriptions' movers would look again). Another mover may have
/// moved it already: the script moves each message once whoever runs it.
pub(crate) fn move_when_due(conn: RedisConnection, topic: String, due: std::time::SystemTime) {
    let wait = due
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if let Err(e) = move_once(&conn, &keys::scheduled(&topic), &topic).await {
            tracing::debug!(topic = %topic, error = %e, "a delayed message's own move failed; the subscriptions' movers take it");
        }
    });
}

/// Moves the due messages of `topic`'s schedule into it until `stop` or `gone`: at once while
/// there are more due than one step moves, else when the next is due, looking again at least
/// every [`MOVER_POLL`] (a message scheduled meanwhile may be due sooner).
pub(crate) async fn move_due(conn: RedisConnection, topic: String, stop: Signal, gone: Signal) {
    let schedule = keys::scheduled(&topic);
    let mut failures: u32 = 0;
    loop {
        if stop.is_cancelled() || gone.is_cancelled() {
            return;
        }
        let wait = match move_once(&conn, &schedule, &topic).await {
            Ok((moved, next_due, now)) => {
                failures = 0;
                if moved >= MOVE_BATCH as i64 {
                    continue;
                }
                match u64::try_from(next_due - now) {
                    Ok(ms) if next_due >= 0 => Duration::from_millis(ms).min(MOVER_POLL),
                    // Due already (it came in meanwhile), or nothing scheduled.
                    _ if next_due >= 0 => Duration::ZERO,
                    _ => MOVER_POLL,
                }
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(topic = %topic, error = %e, "delayed messages not moved; retrying");
                }
                failures = failures.saturating_add(1);
                conn.backoff(failures)
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = gone.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One step of [`scripts::MOVE_DUE`]: `{moved, next due ms or -1, now ms}`.
async fn move_once(conn: &RedisConnection, schedule: &str, topic: &str) -> crate::Result<(i64, i64, i64)> {
    conn.run_mapped("moving due delayed messages", |mut c| {
        let mut call = scripts::MOVE_DUE.key(schedule);
        call.key(topic).arg(MOVE_BATCH);
        async move { call.invoke_async(&mut c).await }
    })
    .await
}
