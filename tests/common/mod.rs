//! What the Redis tests share beyond the harness: the harness itself is
//! [`streamwise::testing::RedisServer`] (a private `redis-server` per test, on a free loopback
//! port, gone on drop), re-exported here so that each test file names it as before.

#![allow(dead_code, unused_imports, unreachable_pub)] // each test binary uses part of this module

pub mod certs;
pub mod proxy;
pub mod seed;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

pub use streamwise::testing::{RedisServer, free_port};

/// Publishes one message on `stream`, receives it as consumer `c` of group `g` (created at the
/// beginning of the stream), acks it and checks that nothing stays pending: the smallest proof
/// that a connection works end to end.
pub async fn round_trip(redis: &streamwise::redis::RedisBackend, stream: &str) -> streamwise::Result<()> {
    use futures::StreamExt;
    use streamwise::{Message, Publisher, StartFrom, SubscribeOptions, Subscriber};
    let id = redis.publisher().publish(stream, Message::new("t", &1)?).await?;
    let subscriber = redis.subscriber()?;
    let options = SubscribeOptions::new("g", "c")
        .start_from(StartFrom::Beginning)
        .block(Duration::from_millis(200));
    let mut deliveries = subscriber.subscribe(stream, options).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(20), deliveries.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")?;
    assert_eq!(delivery.id(), id);
    assert_eq!(delivery.message().decode::<i32>()?, 1);
    delivery.ack().await?;
    subscriber.close().await?;
    assert_eq!(redis.pending_count(stream, "g").await?, 0);
    Ok(())
}

/// The error of publishing one message on `stream` through `conn`, a connection that must fail
/// (wrong credentials, an untrusted certificate).
pub async fn publish_error(conn: streamwise::redis::RedisConnection, stream: &str) -> streamwise::Error {
    use streamwise::{Message, Publisher};
    streamwise::redis::RedisBackend::with_connection(conn)
        .publisher()
        .publish(stream, Message::new("t", &1).unwrap())
        .await
        .unwrap_err()
}

/// The conformance suite's view of a Redis backend at `url` (one server or a cluster), keeping
/// `server` alive as long as it is used.
pub struct RedisTestBackend<S> {
    pub server: S,
    pub url: String,
    pub shared: streamwise::redis::RedisBackend,
}

impl<S> RedisTestBackend<S> {
    pub fn new(server: S, url: String) -> Self {
        let shared = streamwise::redis::RedisBackend::new(&url).expect("redis url");
        RedisTestBackend { server, url, shared }
    }
}

impl<S: Send + Sync> streamwise::testing::TestBackend for RedisTestBackend<S> {
    fn publisher(&self) -> BoxFuture<'_, streamwise::Result<Arc<dyn streamwise::Publisher>>> {
        Box::pin(async { Ok(Arc::new(self.shared.publisher()) as Arc<dyn streamwise::Publisher>) })
    }
    fn subscriber(&self) -> BoxFuture<'_, streamwise::Result<Arc<dyn streamwise::Subscriber>>> {
        // Like a new process: a connection of its own.
        Box::pin(async {
            let backend = streamwise::redis::RedisBackend::new(&self.url)?;
            Ok(Arc::new(backend.subscriber()?) as Arc<dyn streamwise::Subscriber>)
        })
    }
    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, streamwise::Result<u64>> {
        Box::pin(self.shared.pending_count(topic, group))
    }
    fn position<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, streamwise::Result<Option<streamwise::EntryId>>> {
        use streamwise::checkpoint::CheckpointStore;
        Box::pin(async move {
            let store = streamwise::redis::RedisCheckpointStore::new(self.shared.connection().clone());
            Ok(store.load(topic, group, consumer).await?.map(|cp| cp.message_id))
        })
    }
    fn coordinator(
        &self,
    ) -> BoxFuture<'_, streamwise::Result<Arc<dyn streamwise::partition::PartitionCoordinator>>> {
        Box::pin(async {
            Ok(Arc::new(self.shared.coordinator()) as Arc<dyn streamwise::partition::PartitionCoordinator>)
        })
    }
    fn pending_of<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, streamwise::Result<Vec<streamwise::EntryId>>> {
        Box::pin(async move {
            let rows = streamwise::redis::admin::pending_entries(
                self.shared.connection(),
                topic,
                group,
                Some(consumer),
            )
            .await?;
            Ok(rows.into_iter().map(|row| row.id).collect())
        })
    }
}

/// Group `holding` of `stream`, created at its start, holds its first three entries pending
/// for consumer `x`, a client without a lease (so never live): what a crashed or stopped
/// service leaves behind.
pub async fn hold_three(conn: &streamwise::redis::RedisConnection, stream: &str) {
    use streamwise::redis::client::cmd;
    let _: redis::Value = conn
        .command(cmd("XGROUP").arg("CREATE").arg(stream).arg("holding").arg("0"))
        .await
        .unwrap();
    let _: redis::Value = conn
        .command(
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("holding")
                .arg("x")
                .arg("COUNT")
                .arg(3)
                .arg("STREAMS")
                .arg(stream)
                .arg(">"),
        )
        .await
        .unwrap();
}
