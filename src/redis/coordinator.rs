//! The Redis backend's [`PartitionCoordinator`]: a partitioned topic's count in its settings
//! hash, a group's members in a sorted set by expiry beside it (all in the topic's slot), both
//! written by scripts on the server's clock.

use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::connection::RedisConnection;
use super::{keys, scripts};
use crate::error::{Error, Result, validate_name};
use crate::message::format_timestamp;
use crate::partition::{
    Membership, PARTITION_CONSUMER, PartitionCoordinator, partition_stream, validate_partitions,
    validate_topic,
};

/// Keeps partition counts and group members for partitioned topics on Redis
/// ([`RedisBackend::coordinator`](super::RedisBackend::coordinator)).
#[derive(Clone, Debug)]
pub struct RedisCoordinator {
    conn: RedisConnection,
}

impl RedisCoordinator {
    /// The coordinator on `conn`.
    pub fn new(conn: RedisConnection) -> Self {
        RedisCoordinator { conn }
    }
}

impl RedisCoordinator {
    /// Who owns each partition of `topic` in `group`, by partition: the member named in the
    /// partition's lease, `None` while no one holds it. Empty when `topic` is not partitioned.
    pub async fn owners(&self, topic: &str, group: &str) -> Result<Vec<Option<String>>> {
        validate_topic(topic)?;
        validate_name("group", group)?;
        let partitions = stored_partitions(&self.conn, topic).await?.unwrap_or(0);
        let mut owners = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let key = keys::lease(&partition_stream(topic, p), group, PARTITION_CONSUMER);
            let holder: Option<String> = self
                .conn
                .run_mapped("read partition lease", |mut c| {
                    let cmd = redis::cmd("GET").arg(&key).clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            owners.push(holder.map(|h| {
                h.split_once('/')
                    .map_or(h.as_str(), |(member, _)| member)
                    .to_owned()
            }));
        }
        Ok(owners)
    }

    /// The members of `group` on `topic` whose records were live at the last heartbeat of any
    /// member (a record past its time lingers until the next one), sorted.
    pub async fn members(&self, topic: &str, group: &str) -> Result<Vec<String>> {
        validate_topic(topic)?;
        validate_name("group", group)?;
        let key = keys::members(topic, group);
        let mut members: Vec<String> = self
            .conn
            .run_mapped("read group members", |mut c| {
                let cmd = redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).clone();
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        members.sort_unstable();
        Ok(members)
    }
}

fn check_member(topic: &str, group: &str, member: &str) -> Result<()> {
    validate_topic(topic)?;
    validate_name("group", group)?;
    validate_name("consumer", member)
}

/// The partition count stored in `topic`'s settings hash.
pub(crate) async fn stored_partitions(conn: &RedisConnection, topic: &str) -> Result<Option<u32>> {
    let key = keys::meta(topic);
    conn.run_mapped("read partition count", |mut c| {
        let cmd = redis::cmd("HGET").arg(&key).arg("partitions").clone();
        async move { cmd.query_async(&mut c).await }
    })
    .await
}

impl PartitionCoordinator for RedisCoordinator {
    fn partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Option<u32>>> {
        Box::pin(async move {
            validate_topic(topic)?;
            stored_partitions(&self.conn, topic).await
        })
    }

    fn create_partitions<'a>(&'a self, topic: &'a str, partitions: u32) -> BoxFuture<'a, Result<u32>> {
        Box::pin(async move {
            validate_topic(topic)?;
            validate_partitions(partitions)?;
            let created_at = format_timestamp(SystemTime::now());
            let key = keys::meta(topic);
            let stored: i64 = self
                .conn
                .run_mapped("create partitions", |mut c| {
                    let mut call = scripts::CREATE_PARTITIONS.key(&key);
                    call.key(topic).arg(partitions).arg(&created_at);
                    async move { call.invoke_async(&mut c).await }
                })
                .await?;
            u32::try_from(stored).map_err(|_| crate::partition::stream_in_the_way(topic))
        })
    }

    fn delete_partitions<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            validate_topic(topic)?;
            let key = keys::meta(topic);
            let _: i64 = self
                .conn
                .run_mapped("delete partition count", |mut c| {
                    let cmd = redis::cmd("HDEL").arg(&key).arg("partitions").clone();
                    async move { cmd.query_async(&mut c).await }
                })
                .await?;
            Ok(())
        })
    }

    fn heartbeat<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Membership>> {
        Box::pin(async move {
            check_member(topic, group, member)?;
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let (members, tokens) = (keys::members(topic, group), keys::member_tokens(topic, group));
            let live: Result<Vec<String>> = self
                .conn
                .run_mapped("group member heartbeat", |mut c| {
                    let mut call = scripts::MEMBER_HEARTBEAT.key(&members);
                    call.key(&tokens).arg(member).arg(token).arg(ttl_ms);
                    async move { call.invoke_async(&mut c).await }
                })
                .await;
            match live {
                Ok(mut live) => {
                    live.sort_unstable();
                    Ok(Membership::Live(live))
                }
                Err(e) if e.server_code() == Some("TAKEN") => Ok(Membership::Taken),
                Err(e) => Err(e),
            }
        })
    }

    fn leave<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        member: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            check_member(topic, group, member)?;
            let (members, tokens) = (keys::members(topic, group), keys::member_tokens(topic, group));
            let _: i64 = self
                .conn
                .run_mapped("group member leave", |mut c| {
                    let mut call = scripts::MEMBER_LEAVE.key(&members);
                    call.key(&tokens).arg(member).arg(token);
                    async move { call.invoke_async(&mut c).await }
                })
                .await?;
            Ok(())
        })
    }
}

/// [`Error::Partitioned`] when `topic` is partitioned.
pub(crate) async fn refuse_partitioned(conn: &RedisConnection, topic: &str) -> Result<()> {
    match stored_partitions(conn, topic).await? {
        Some(partitions) => Err(Error::Partitioned {
            topic: topic.to_owned(),
            partitions,
        }),
        None => Ok(()),
    }
}
