//! [`StreamManager`]: creates, deletes and describes streams (the seed's manager contract).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::redis::RedisConnection;
use crate::redis::admin::{self, StreamInfo, StreamSettings};
use crate::redis::retention::{self, Retention, RetentionHandle, TrimPolicy, Trimmed};

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

/// How streams' `retention_ms` and `max_length` are applied beyond publishing
/// ([`StreamManager::start_retention`], [`StreamManager::apply_retention`]; `retention:` in
/// the configuration file). What each setting deletes and when is in
/// [`streamwise::redis::retention`](crate::redis::retention).
///
/// ```
/// use streamwise::redis_streams::RetentionOptions;
/// let options = RetentionOptions::default();
/// assert_eq!(options.interval_ms, 1_000);
/// assert!(options.safe);
/// assert_eq!(options.idle_group_age_ms, 7 * 24 * 3600 * 1000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionOptions {
    /// Each stream is trimmed at most once per this many milliseconds, jittered. Default
    /// 1,000; at least 100.
    pub interval_ms: u64,
    /// Never trim below an entry a group still needs: its oldest pending entry, or (a group
    /// with live consumers) the first entry not yet delivered to it. Default `true`.
    pub safe: bool,
    /// A group whose consumers have all been idle this many milliseconds no longer holds a
    /// safe trim back (logged, and counted in the task's stats). Default 7 days.
    pub idle_group_age_ms: u64,
}

impl Default for RetentionOptions {
    fn default() -> Self {
        RetentionOptions {
            interval_ms: 1_000,
            safe: true,
            idle_group_age_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl RetentionOptions {
    /// [`Error::Invalid`] naming the field that is out of range.
    pub fn validate(&self) -> Result<()> {
        if self.interval_ms < 100 {
            return Err(Error::invalid("interval_ms", "must be at least 100"));
        }
        if self.idle_group_age_ms == 0 {
            return Err(Error::invalid("idle_group_age_ms", "must be at least 1"));
        }
        Ok(())
    }

    fn policy(&self, settings: StreamSettings) -> TrimPolicy {
        let mut policy = TrimPolicy::default()
            .safe(self.safe)
            .idle_group_age(Duration::from_millis(self.idle_group_age_ms));
        policy.retention = settings.retention_ms.map(Duration::from_millis);
        policy.max_length = settings.max_length;
        policy
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

    /// Applies stream `name`'s `retention_ms` and `max_length` now, as `options` say (safely
    /// by default), whether or not anyone publishes. A stream without settings is left alone.
    pub async fn apply_retention(&self, name: &str, options: RetentionOptions) -> Result<Trimmed> {
        options.validate()?;
        let (settings, _) = admin::stream_settings(&self.conn, name).await?;
        if settings.retention_ms.is_none() && settings.max_length.is_none() {
            return Ok(Trimmed::default());
        }
        retention::trim(&self.conn, name, &options.policy(settings)).await
    }

    /// Starts a background task that applies every stream's settings while it runs, each
    /// stream at most once per `interval_ms` and, with several processes running one, by one
    /// of them at a time. Stop it with [`RetentionHandle::stop`]; its
    /// [`stats`](RetentionHandle::stats) count trims, removed entries and groups that held
    /// trims back or were passed over as idle. Must be called within a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> streamwise::Result<()> {
    /// use streamwise::redis_streams::{RetentionOptions, StreamManager};
    ///
    /// let manager = StreamManager::new("redis://localhost:6379")?;
    /// let retention = manager.start_retention(RetentionOptions::default())?;
    /// // ... the service runs
    /// retention.stop().await;
    /// # Ok(()) }
    /// ```
    pub fn start_retention(&self, options: RetentionOptions) -> Result<RetentionHandle> {
        options.validate()?;
        Ok(Retention::new(self.conn.clone())
            .interval(Duration::from_millis(options.interval_ms))
            .safe(options.safe)
            .idle_group_age(Duration::from_millis(options.idle_group_age_ms))
            .spawn())
    }
}
