//! [`PartitionedPublisher`]: publishes to partitioned topics by key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, try_join_all};
use tokio::time::Instant;

use super::{KEY_METADATA, PartitionCoordinator, partition_for_key, partition_stream};
use crate::error::{Error, Result};
use crate::message::{EntryId, Message};
use crate::pubsub::Publisher;

/// How long a topic's partition count is trusted before it is read again.
const COUNT_TTL: Duration = Duration::from_secs(5);

/// A [`Publisher`] that sends messages for a partitioned topic to its partitions: by the
/// message's key ([`KEY_METADATA`], set by [`publish_keyed`](Self::publish_keyed)) when it has
/// one, round-robin when not. Topics that are not partitioned pass through to the publisher it
/// wraps, so it can stand wherever a publisher goes (a router's, a CQRS bus's).
///
/// ```
/// # async fn demo() -> streamwise::Result<()> {
/// use std::sync::Arc;
/// use streamwise::memory::MemoryBackend;
/// use streamwise::partition::PartitionedPublisher;
/// use streamwise::Message;
///
/// let backend = MemoryBackend::new();
/// let publisher = PartitionedPublisher::new(Arc::new(backend.publisher()), Arc::new(backend.coordinator()))
///     .topic("orders", 8);
/// let order = serde_json::json!({"id": 7, "customer": "c-42"});
/// publisher.publish_keyed("orders", "c-42", Message::new("OrderPlaced", &order)?).await?;
/// # Ok(()) }
/// ```
pub struct PartitionedPublisher {
    inner: Arc<dyn Publisher>,
    coordinator: Arc<dyn PartitionCoordinator>,
    /// Topics whose count this publisher was told: created with it, or checked against it.
    declared: HashMap<String, u32>,
    known: Mutex<HashMap<String, (Option<u32>, Instant)>>,
    round_robin: AtomicU32,
}

impl std::fmt::Debug for PartitionedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedPublisher")
            .field("declared", &self.declared)
            .finish_non_exhaustive()
    }
}

impl PartitionedPublisher {
    /// Publishes through `inner`, with the partition counts `coordinator` keeps (the same
    /// backend's: `MemoryBackend::coordinator`, `RedisBackend::coordinator`).
    pub fn new(inner: Arc<dyn Publisher>, coordinator: Arc<dyn PartitionCoordinator>) -> Self {
        PartitionedPublisher {
            inner,
            coordinator,
            declared: HashMap::new(),
            known: Mutex::new(HashMap::new()),
            round_robin: AtomicU32::new(0),
        }
    }

    /// Declares `topic` with `partitions`: created so on first use when it has no count yet,
    /// and [`Error::PartitionMismatch`] on every publish when it has another.
    /// An invalid topic or count is reported by the first publish to it.
    #[must_use]
    pub fn topic(mut self, topic: &str, partitions: u32) -> Self {
        self.declared.insert(topic.to_owned(), partitions);
        self
    }

    /// The partition count of `topic` (`None`: not partitioned), read again every 5 s.
    pub async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        if let Some((count, at)) = self.lock().get(topic)
            && at.elapsed() < COUNT_TTL
        {
            return Ok(*count);
        }
        let declared = self.declared.get(topic).copied();
        let count = super::resolve_count(&*self.coordinator, topic, declared).await?;
        self.lock().insert(topic.to_owned(), (count, Instant::now()));
        Ok(count)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<u32>, Instant)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `message` to the partition of `key` ([`partition_for_key`]), with the key in
    /// its metadata ([`KEY_METADATA`]) so that consumers keep the key's messages in order.
    /// [`Error::Invalid`] when `topic` is not partitioned or the key is empty.
    pub async fn publish_keyed(&self, topic: &str, key: &str, message: Message) -> Result<EntryId> {
        if key.is_empty() {
            return Err(Error::invalid("key", "must not be empty"));
        }
        let partitions = self.require(topic).await?;
        let stream = partition_stream(topic, partition_for_key(key, partitions));
        self.inner
            .publish(&stream, message.with_metadata(KEY_METADATA, key))
            .await
    }

    async fn require(&self, topic: &str) -> Result<u32> {
        self.partitions(topic).await?.ok_or_else(|| {
            Error::invalid(
                "topic",
                format_args!("{topic:?} is not a partitioned topic (no partition count is stored with it)"),
            )
        })
    }

    /// The partition `message` goes to: its key's, else the next in turn.
    fn partition_of(&self, message: &Message, partitions: u32) -> u32 {
        match message.metadata().get(KEY_METADATA) {
            Some(key) => partition_for_key(key, partitions),
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % partitions,
        }
    }
}

impl Publisher for PartitionedPublisher {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            match self.partitions(topic).await? {
                None => self.inner.publish(topic, message).await,
                Some(partitions) => {
                    let stream = partition_stream(topic, self.partition_of(&message, partitions));
                    self.inner.publish(&stream, message).await
                }
            }
        })
    }

    /// Groups the messages by partition and publishes the groups at once (each a batch of the
    /// wrapped publisher); the ids come back in the messages' order. When a group fails, the
    /// others may have been written.
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(async move {
            let Some(partitions) = self.partitions(topic).await? else {
                return self.inner.publish_batch(topic, messages).await;
            };
            let total = messages.len();
            let mut groups: HashMap<u32, (Vec<usize>, Vec<Message>)> = HashMap::new();
            for (i, message) in messages.into_iter().enumerate() {
                let group = groups.entry(self.partition_of(&message, partitions)).or_default();
                group.0.push(i);
                group.1.push(message);
            }
            let sends = groups
                .into_iter()
                .map(|(partition, (positions, batch))| async move {
                    let stream = partition_stream(topic, partition);
                    let ids = self.inner.publish_batch(&stream, batch).await?;
                    Ok::<_, Error>((positions, ids))
                });
            let mut ids = vec![EntryId::default(); total];
            for (positions, written) in try_join_all(sends).await? {
                for (position, id) in positions.into_iter().zip(written) {
                    ids[position] = id;
                }
            }
            Ok(ids)
        })
    }

    fn publish_capped<'a>(
        &'a self,
        topic: &'a str,
        message: Message,
        max_length: u64,
    ) -> BoxFuture<'a, Result<EntryId>> {
        Box::pin(async move {
            match self.partitions(topic).await? {
                None => self.inner.publish_capped(topic, message, max_length).await,
                Some(partitions) => {
                    let stream = partition_stream(topic, self.partition_of(&message, partitions));
                    self.inner.publish_capped(&stream, message, max_length).await
                }
            }
        })
    }

    /// Schedules the message on its key's partition (or the next in turn), where that
    /// partition's owner moves it in when due.
    fn publish_at<'a>(
        &'a self,
        topic: &'a str,
        at: std::time::SystemTime,
        message: Message,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.partitions(topic).await? {
                None => self.inner.publish_at(topic, at, message).await,
                Some(partitions) => {
                    let stream = partition_stream(topic, self.partition_of(&message, partitions));
                    self.inner.publish_at(&stream, at, message).await
                }
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
}
