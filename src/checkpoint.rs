//! Checkpoints: the position of a consumer, `{message_id, timestamp}`, recorded after
//! acknowledgements (coalesced per flush, not per message). The position is a low watermark:
//! every entry up to it that this consumer received is acknowledged. It drives resume where
//! the stream alone cannot: a group that was deleted is re-created after the lowest position of
//! its consumers instead of at `0` or `$`, and a group-less reader resumes after its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use futures::future::BoxFuture;

use crate::error::Result;
use crate::message::EntryId;

/// A consumer's position: every entry up to `message_id` that it received is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last acknowledged entry.
    pub message_id: EntryId,
    /// When the checkpoint was saved.
    pub timestamp: SystemTime,
}

/// Where checkpoints live. Implementations: [`MemoryCheckpointStore`] and the Redis hash store
/// of the Redis backend.
pub trait CheckpointStore: Send + Sync + 'static {
    /// Records `checkpoint` for `consumer` of `group` on `stream`.
    fn save<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        checkpoint: Checkpoint,
    ) -> BoxFuture<'a, Result<()>>;

    /// The checkpoint of one consumer.
    fn load<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Option<Checkpoint>>>;

    /// The lowest checkpoint of the consumers of `group`: where the group as a whole got to
    /// without leaving anything unacknowledged behind.
    fn load_group<'a>(&'a self, stream: &'a str, group: &'a str)
    -> BoxFuture<'a, Result<Option<Checkpoint>>>;
}

/// Checkpoints in process memory, for tests and for consumers that need no durable position
/// (the seed's `use_redis_checkpoint=False`).
#[derive(Debug, Default)]
pub struct MemoryCheckpointStore {
    points: Mutex<HashMap<(String, String, String), Checkpoint>>,
}

impl MemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn points(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), Checkpoint>> {
        self.points.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CheckpointStore for MemoryCheckpointStore {
    fn save<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        checkpoint: Checkpoint,
    ) -> BoxFuture<'a, Result<()>> {
        self.points()
            .insert((stream.into(), group.into(), consumer.into()), checkpoint);
        Box::pin(std::future::ready(Ok(())))
    }

    fn load<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
        let key = (stream.to_owned(), group.to_owned(), consumer.to_owned());
        Box::pin(std::future::ready(Ok(self.points().get(&key).copied())))
    }

    fn load_group<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<Checkpoint>>> {
        let lowest = self
            .points()
            .iter()
            .filter(|((s, g, _), _)| s == stream && g == group)
            .map(|(_, cp)| *cp)
            .min_by_key(|cp| cp.message_id);
        Box::pin(std::future::ready(Ok(lowest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_one_position_per_consumer() {
        let store = MemoryCheckpointStore::new();
        let at = |ms| Checkpoint {
            message_id: EntryId::new(ms, 0),
            timestamp: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(store.load("s", "g", "a").await.unwrap(), None);
        store.save("s", "g", "a", at(5)).await.unwrap();
        store.save("s", "g", "a", at(7)).await.unwrap();
        store.save("s", "g", "b", at(6)).await.unwrap();
        store.save("s", "other", "c", at(99)).await.unwrap();
        assert_eq!(store.load("s", "g", "a").await.unwrap(), Some(at(7)));
        assert_eq!(store.load_group("s", "g").await.unwrap(), Some(at(6)));
        assert_eq!(store.load_group("s", "none").await.unwrap(), None);
    }
}
