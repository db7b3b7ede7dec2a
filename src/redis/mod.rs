//! The Redis Streams backend: [`RedisPublisher`] and [`RedisSubscriber`] behind the
//! [`Publisher`](crate::Publisher) and [`Subscriber`](crate::Subscriber) traits, sharing a
//! [`RedisConnection`].
//!
//! ```no_run
//! # async fn demo() -> streamwise::Result<()> {
//! use futures::StreamExt;
//! use streamwise::prelude::*;
//! use streamwise::redis::RedisBackend;
//!
//! let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
//! let publisher = redis.publisher();
//! let subscriber = redis.subscriber()?;
//! let mut orders = subscriber.subscribe("orders", SubscribeOptions::new("billing", "worker-1")).await?;
//! publisher.publish("orders", Message::new("order.placed", &7)?).await?;
//! let delivery = orders.next().await.expect("open")?;
//! delivery.ack().await?;
//! subscriber.close().await?;
//! # Ok(()) }
//! ```

pub mod admin;
mod checkpoint;
mod connection;
pub(crate) mod coordinator;
mod dedicated;
mod keys;
mod monitor;
pub mod ops;
mod protocol;
mod publisher;
mod reader;
pub mod retention;
mod scheduled;
mod scripts;
mod subscriber;

/// The `redis` crate this backend is built on, for [`RedisConnection::command`].
pub use ::redis as client;
pub use checkpoint::RedisCheckpointStore;
pub use connection::{MAX_CONNECTION_DURATION, RedisConnection, RedisConnectionBuilder, redact_url};
pub use coordinator::RedisCoordinator;
pub use monitor::{GroupFigures, GroupMonitor, LAG_COUNT_CAP, MIN_MONITOR_INTERVAL, MonitorHandle};
pub use publisher::{MAX_REPLICA_WAIT, PublisherOptions, RedisPublisher, WaitReplicas};
pub use reader::StreamReader;
pub use subscriber::{
    Checkpoints, MAX_ACK_FLUSH_INTERVAL, MAX_LEASE_TTL, RedisSubscriber, RedisSubscriberOptions,
    StatsSnapshot, SubscriberStats,
};

/// This backend's name in traces (`messaging.system`).
pub(crate) const SYSTEM: &str = "redis";

/// A [`RedisConnection`] with shortcuts to make publishers and subscribers on it.
#[derive(Clone, Debug)]
pub struct RedisBackend {
    conn: RedisConnection,
}

impl RedisBackend {
    /// A backend on `url` with the default retry policy.
    pub fn new(url: &str) -> crate::Result<Self> {
        Ok(RedisBackend {
            conn: RedisConnection::new(url)?,
        })
    }

    /// The keeper of partitioned topics' counts and group members on this connection, for
    /// [`PartitionedPublisher`](crate::partition::PartitionedPublisher) and
    /// [`PartitionedSubscriber`](crate::partition::PartitionedSubscriber).
    pub fn coordinator(&self) -> RedisCoordinator {
        RedisCoordinator::new(self.conn.clone())
    }

    /// A backend on an existing connection.
    pub fn with_connection(conn: RedisConnection) -> Self {
        RedisBackend { conn }
    }

    /// The connection.
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// A publisher with default options.
    pub fn publisher(&self) -> RedisPublisher {
        RedisPublisher::new(self.conn.clone(), PublisherOptions::default())
    }

    /// A subscriber with default options.
    pub fn subscriber(&self) -> crate::Result<RedisSubscriber> {
        RedisSubscriber::new(self.conn.clone(), RedisSubscriberOptions::default())
    }

    /// How many entries of `stream` are pending in `group`.
    pub async fn pending_count(&self, stream: &str, group: &str) -> crate::Result<u64> {
        admin::pending_count(&self.conn, stream, group).await
    }
}
