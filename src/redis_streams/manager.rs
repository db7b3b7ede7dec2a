//! [`StreamManager`]: creates, deletes and describes streams (the seed's manager contract).

use crate::error::Result;
use crate::redis::RedisConnection;
use crate::redis::admin::{self, StreamInfo, StreamSettings};

/// How to create a stream, with the seed's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Entries older than this are trimmed. Default 86,400,000 (24 h); `None` keeps them.
    pub retention_ms: Option<u64>,
    /// The stream is trimmed to about this many entries. Default none.
    pub max_length: Option<u64>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            retention_ms: Some(86_400_000),
            max_length: None,
        }
    }
}

/// Creates, deletes and describes streams.
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use streamwise::redis_streams::{StreamManager, StreamOptions};
///
/// let manager = StreamManager::new("redis://localhost:6379")?;
/// let options = StreamOptions { max_length: Some(10_000), ..StreamOptions::default() };
/// let created = manager.create_stream("data-updates", options).await?;
/// let info = manager.get_stream_info("data-updates").await?;
/// println!("created: {created}, length {}, groups {}", info.length, info.groups);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StreamManager {
    conn: RedisConnection,
}

impl StreamManager {
    /// A manager on `redis_url` with the default retry policy.
    pub fn new(redis_url: &str) -> Result<Self> {
        Ok(Self::with_connection(RedisConnection::new(redis_url)?))
    }

    /// A manager on a shared connection.
    pub fn with_connection(conn: RedisConnection) -> Self {
        StreamManager { conn }
    }

    /// Creates stream `name`, empty, with its settings; `true` if created, `false` if it
    /// already existed (its settings are left alone). Names match `[A-Za-z0-9_-]+`.
    pub async fn create_stream(&self, name: &str, options: StreamOptions) -> Result<bool> {
        let settings = StreamSettings {
            retention_ms: options.retention_ms,
            max_length: options.max_length,
        };
        admin::create_stream(&self.conn, name, settings).await
    }

    /// Deletes stream `name` and everything streamwise keeps beside it; returns the number of
    /// keys deleted (0 when there was nothing).
    pub async fn delete_stream(&self, name: &str) -> Result<u64> {
        admin::delete_stream(&self.conn, name).await
    }

    /// Length, first and last entry, radix tree keys, groups and settings of stream `name`;
    /// [`Error::StreamNotFound`](crate::Error::StreamNotFound) when it does not exist.
    pub async fn get_stream_info(&self, name: &str) -> Result<StreamInfo> {
        admin::stream_info(&self.conn, name).await
    }
}
