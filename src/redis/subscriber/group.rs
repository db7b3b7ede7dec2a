//! The consumer group a subscription reads in: made sure of on start, and re-created when it
//! vanished, at the lowest checkpoint of its consumers (so nothing unacked is skipped). The
//! group itself is created by [`admin::create_group`], its one home.

use redis::Value;

use crate::checkpoint::CheckpointStore;
use crate::delivery::Origin;
use crate::error::{Error, Result};
use crate::pubsub::{StartFrom, SubscribeOptions};
use crate::redis::admin;
use crate::redis::connection::RedisConnection;
use crate::redis::protocol::replies;

/// Makes sure the group exists: when it vanished, created at the lowest checkpoint of its
/// consumers (so nothing unacked is skipped), else at the configured start; or
/// `GroupNotFound` when creating is off.
pub(super) async fn ensure(
    conn: &RedisConnection,
    store: Option<&dyn CheckpointStore>,
    origin: &Origin,
    options: &SubscribeOptions,
) -> Result<()> {
    let (stream, group) = (origin.stream(), origin.group());
    let exists = group_exists(conn, stream, group).await?;
    if exists {
        return Ok(());
    }
    if !options.create_group {
        return Err(Error::GroupNotFound {
            stream: stream.to_owned(),
            group: group.to_owned(),
        });
    }
    create(conn, store, stream, group, options.start_from).await
}

async fn group_exists(conn: &RedisConnection, stream: &str, group: &str) -> Result<bool> {
    let reply = conn
        .run("XINFO GROUPS", |mut c| {
            let cmd = redis::cmd("XINFO").arg("GROUPS").arg(stream).clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        })
        .await;
    match reply {
        Ok(groups) => Ok(replies::group_names(groups)?.iter().any(|g| g == group)),
        // No such key: no stream, so no group either.
        Err(e) if e.is_no_such_key() => Ok(false),
        Err(e) => Err(e.into_error()),
    }
}

/// Creates `group` on `stream` (and the stream if missing): at the group's checkpoint in
/// `store` when there is one (the group existed before and vanished), else at `start`.
/// A group that exists meanwhile (created by another consumer) is fine.
pub(super) async fn create(
    conn: &RedisConnection,
    store: Option<&dyn CheckpointStore>,
    stream: &str,
    group: &str,
    start: StartFrom,
) -> Result<()> {
    let checkpoint = match store {
        Some(store) => store.load_group(stream, group).await?,
        None => None,
    };
    let start = match checkpoint {
        Some(cp) => {
            tracing::info!(stream, group, at = %cp.message_id, "re-creating consumer group at its checkpoint");
            StartFrom::After(cp.message_id)
        }
        None => start,
    };
    admin::create_group(conn, stream, group, start, true)
        .await
        .map(drop)
}
