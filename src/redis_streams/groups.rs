//! [`ConsumerGroupManager`]: creates, deletes and describes consumer groups (the seed's group
//! contract), with each consumer's status.

use std::time::Duration;

use crate::error::{Error, Result, validate_name};
use crate::pubsub::StartFrom;
use crate::redis::RedisConnection;
use crate::redis::admin::{self, ConsumerInfo, GroupInfo};

/// Creates, deletes and describes consumer groups.
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use streamwise::redis_streams::ConsumerGroupManager;
///
/// let groups = ConsumerGroupManager::new("redis://localhost:6379")?;
/// groups.create_group("data-updates", "processors", "0").await?; // run once; idempotent
/// let info = groups.get_group_info("data-updates", "processors").await?;
/// println!("{} consumers, {} pending, lag {:?}", info.consumers, info.pending, info.lag);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ConsumerGroupManager {
    conn: RedisConnection,
    idle_after: Duration,
}

impl ConsumerGroupManager {
    /// A manager on `redis_url` with the default retry policy.
    pub fn new(redis_url: &str) -> Result<Self> {
        Ok(Self::with_connection(RedisConnection::new(redis_url)?))
    }

    /// A manager on a shared connection.
    pub fn with_connection(conn: RedisConnection) -> Self {
        ConsumerGroupManager {
            conn,
            idle_after: Duration::from_secs(60),
        }
    }

    /// Consumers that hold their lease but did nothing for longer than this are reported
    /// [`Idle`](admin::ConsumerStatus::Idle). Default 60 s.
    #[must_use]
    pub fn idle_after(mut self, idle_after: Duration) -> Self {
        self.idle_after = idle_after;
        self
    }

    /// Creates `group` on `stream`, reading from `start_id` (`"0"` all, `"$"` new only, or an
    /// id), and the stream if missing. Idempotent: `false` when the group existed.
    ///
    /// On a partitioned topic ([`crate::partition`]) the group is created on every partition;
    /// `true` if it was created on any.
    pub async fn create_group(&self, stream: &str, group: &str, start_id: &str) -> Result<bool> {
        let start = StartFrom::parse(start_id)?;
        let partitions = match crate::partition::validate_topic(stream) {
            Ok(()) => crate::redis::coordinator::stored_partitions(&self.conn, stream).await?,
            // A name with a hash tag is never a partitioned topic.
            Err(_) => None,
        };
        let Some(partitions) = partitions else {
            return admin::create_group(&self.conn, stream, group, start, true).await;
        };
        let mut created = false;
        for p in 0..partitions {
            let partition = crate::partition::partition_stream(stream, p);
            created |= admin::create_group(&self.conn, &partition, group, start, true).await?;
        }
        Ok(created)
    }

    /// Like [`create_group`](Self::create_group), but a missing stream is
    /// [`Error::StreamNotFound`](crate::Error::StreamNotFound) (`mkstream = false`).
    pub async fn create_group_on_existing_stream(
        &self,
        stream: &str,
        group: &str,
        start_id: &str,
    ) -> Result<bool> {
        admin::create_group(&self.conn, stream, group, StartFrom::parse(start_id)?, false).await
    }

    /// Deletes `group` and its pending list; `true` if it was deleted.
    pub async fn delete_group(&self, stream: &str, group: &str) -> Result<bool> {
        admin::delete_group(&self.conn, stream, group).await
    }

    /// The group names of `stream`; [`Error::StreamNotFound`](crate::Error::StreamNotFound)
    /// when it does not exist.
    pub async fn list_groups(&self, stream: &str) -> Result<Vec<String>> {
        admin::list_groups(&self.conn, stream).await
    }

    /// `name`, `consumers`, `pending`, `last_delivered_id` and `lag` of `group`;
    /// [`Error::GroupNotFound`](crate::Error::GroupNotFound) when it does not exist.
    pub async fn get_group_info(&self, stream: &str, group: &str) -> Result<GroupInfo> {
        admin::group_info(&self.conn, stream, group).await
    }

    /// One consumer's status; [`Error::ConsumerCrashed`](crate::Error::ConsumerCrashed) when
    /// its lease lapsed while it still held entries (no heartbeat: run reclaim), and
    /// [`Error::Invalid`](crate::Error::Invalid) (`consumer`) when the group has no such
    /// consumer.
    pub async fn check_consumer(&self, stream: &str, group: &str, consumer: &str) -> Result<ConsumerInfo> {
        validate_name("consumer", consumer)?;
        let info = self
            .consumers(stream, group)
            .await?
            .into_iter()
            .find(|c| c.name == consumer)
            .ok_or_else(|| {
                Error::invalid(
                    "consumer",
                    format_args!("{consumer:?} is not a consumer of group {group:?}"),
                )
            })?;
        if info.crashed {
            return Err(Error::ConsumerCrashed {
                stream: stream.to_owned(),
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                pending: info.pending,
            });
        }
        Ok(info)
    }

    /// The consumers of `group` with their status: active, idle or disconnected (from their
    /// lease and idle time), and whether they crashed holding entries.
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        admin::consumers(&self.conn, stream, group, self.idle_after).await
    }
}
