//! [`StreamProducer`]: publishes events to one stream (the seed's producer contract).

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{Message, Metadata};
use crate::pubsub::Publisher;
use crate::redis::admin::{self, GroupInfo};
use crate::redis::{PublisherOptions, RedisConnection, RedisPublisher};

/// The most unread entries a producer counts where Redis cannot tell a group's lag: a
/// [`Backpressure::max_lag`] above it is not enforced then (the count reads whole entries).
pub const MAX_COUNTED_LAG: u64 = 10_000;

/// What a producer does while the consumers lag behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackpressureMode {
    /// Wait (re-checking with backoff) until the lag is back under the limit, for at most
    /// `max_wait`; then fail with [`Error::Backpressure`].
    Wait {
        /// The longest a publish waits.
        max_wait: Duration,
    },
    /// Fail with [`Error::Backpressure`] at once.
    FailFast,
}

/// Slow a producer down while consumer group `group` lags more than `max_lag` entries behind
/// (the seed's "producer should monitor and slow down if lag > threshold").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backpressure {
    /// The consumer group whose lag is watched.
    pub group: String,
    /// The most entries the group may lag behind.
    pub max_lag: u64,
    /// Wait or fail fast.
    pub mode: BackpressureMode,
    /// How long a lag reading is trusted before it is read again (default 100 ms).
    pub check_every: Duration,
}

impl Backpressure {
    /// Watch `group`; above `max_lag`, act as `mode` says.
    pub fn new(group: impl Into<String>, max_lag: u64, mode: BackpressureMode) -> Self {
        Backpressure {
            group: group.into(),
            max_lag,
            mode,
            check_every: Duration::from_millis(100),
        }
    }
}

/// Options of a [`StreamProducer`], with the seed's defaults.
///
/// ```
/// use streamwise::redis_streams::ProducerOptions;
/// let options = ProducerOptions::default();
/// assert_eq!(options.max_length, 10_000);
/// assert!(options.auto_create_stream);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerOptions {
    /// The stream is trimmed to about this many entries (`XADD MAXLEN ~`). Default 10,000.
    pub max_length: u64,
    /// Publishing to a missing stream creates it (default) or fails with
    /// [`Error::StreamNotFound`].
    pub auto_create_stream: bool,
    /// The limit on an encoded event. Default 1 MiB.
    pub max_entry_size: usize,
    /// Slow down while consumers lag. Default off.
    pub backpressure: Option<Backpressure>,
    /// The layout of the entries written (`codec` in the configuration file). Default
    /// streamwise's own; natricine's and Watermill's need the `interop` feature.
    pub wire_format: crate::wire_format::WireFormat,
    /// The peer layout's settings beyond its defaults (`codec:` as a mapping in the
    /// configuration file): event type key, fallback or fixed type, field names.
    pub wire_settings: crate::wire_format::WireSettings,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            max_length: 10_000,
            auto_create_stream: true,
            max_entry_size: crate::codec::DEFAULT_MAX_ENTRY_SIZE,
            backpressure: None,
            wire_format: crate::wire_format::WireFormat::default(),
            wire_settings: crate::wire_format::WireSettings::default(),
        }
    }
}

/// Publishes events to one stream.
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use streamwise::redis_streams::StreamProducer;
///
/// let producer = StreamProducer::new("redis://localhost:6379", "data-updates")?;
/// let message_id = producer
///     .publish(
///         "price.update",
///         &serde_json::json!({"symbol": "AAPL", "price": 150.25}),
///         Some([("source", "market-feed")].into()),
///     )
///     .await?;
/// println!("Published message: {message_id}");
/// producer.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StreamProducer {
    conn: RedisConnection,
    stream: String,
    publisher: RedisPublisher,
    backpressure: Option<Backpressure>,
    /// The last lag reading of the backpressure group, and when it was taken.
    lag_seen: Mutex<Option<(Instant, Option<u64>)>>,
}

impl StreamProducer {
    /// A producer for `stream_name` on `redis_url`, with the default options.
    pub fn new(redis_url: &str, stream_name: &str) -> Result<Self> {
        Self::with_options(
            RedisConnection::new(redis_url)?,
            stream_name,
            ProducerOptions::default(),
        )
    }

    /// A producer on a shared connection, with `options`.
    pub fn with_options(conn: RedisConnection, stream_name: &str, options: ProducerOptions) -> Result<Self> {
        validate_stream_name("stream_name", stream_name)?;
        if options.max_length == 0 {
            return Err(Error::invalid("max_length", "must be at least 1"));
        }
        if options.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1"));
        }
        if let Some(bp) = &options.backpressure {
            validate_name("backpressure.group", &bp.group)?;
            if bp.check_every.is_zero() {
                return Err(Error::invalid(
                    "backpressure.check_every",
                    "must be longer than zero",
                ));
            }
        }
        let mut publisher_options = PublisherOptions::default()
            .max_length(options.max_length)
            .auto_create(options.auto_create_stream)
            .max_entry_size(options.max_entry_size);
        publisher_options.codec = options.wire_format.codec_with(&options.wire_settings)?;
        // Refused here rather than on the first send (`max_length` above `MAX_LENGTH`).
        publisher_options.validate()?;
        let publisher = RedisPublisher::new(conn.clone(), publisher_options);
        Ok(StreamProducer {
            conn,
            stream: stream_name.to_owned(),
            publisher,
            backpressure: options.backpressure,
            lag_seen: Mutex::new(None),
        })
    }

    /// The stream published to.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// Publishes an event and returns its message id (`<ms>-<seq>`).
    ///
    /// `event_type` must not be empty; `payload` is serialized as JSON; the encoded event must
    /// fit the size limit ([`Error::PayloadTooLarge`], nothing written). Without auto-create, a
    /// missing stream is [`Error::StreamNotFound`]. Connection failures surface as
    /// [`Error::Connection`] after the connection's retries.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        event_type: &str,
        payload: &T,
        metadata: Option<Metadata>,
    ) -> Result<String> {
        let mut message = Message::new(event_type, payload)?;
        if let Some(metadata) = metadata {
            message = message.with_metadata_map(metadata);
        }
        self.wait_for_consumers().await?;
        let id = self.publisher.publish(&self.stream, message).await?;
        Ok(id.to_string())
    }

    /// Closes the producer; later publishes fail with [`Error::Closed`]. Idempotent.
    pub async fn close(&self) -> Result<()> {
        self.publisher.close().await
    }

    /// Applies backpressure, if configured.
    async fn wait_for_consumers(&self) -> Result<()> {
        let Some(bp) = &self.backpressure else {
            return Ok(());
        };
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let lag = self.lag(bp).await?;
            let Some(lag) = lag.filter(|lag| *lag > bp.max_lag) else {
                return Ok(());
            };
            let over = || Error::Backpressure {
                stream: self.stream.clone(),
                group: bp.group.clone(),
                lag,
                limit: bp.max_lag,
            };
            let max_wait = match bp.mode {
                BackpressureMode::FailFast => return Err(over()),
                BackpressureMode::Wait { max_wait } => max_wait,
            };
            let waited = started.elapsed();
            if waited >= max_wait {
                return Err(over());
            }
            let pause = self
                .conn
                .backoff(attempt)
                .min(max_wait - waited)
                .max(bp.check_every);
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// The group's lag, read again once the last reading is older than `check_every`. A group
    /// that does not exist yet does not hold publishing back. Where Redis cannot tell the lag
    /// (deletions in the unread range; reportedly on a Redis 7.0 replica promoted by a
    /// failover; Redis before 7), the entries after the group's last delivered one are
    /// counted, up to one past `max_lag` and at most [`MAX_COUNTED_LAG`].
    async fn lag(&self, bp: &Backpressure) -> Result<Option<u64>> {
        let cached = *self.lag_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, lag)) = cached
            && at.elapsed() < bp.check_every
        {
            return Ok(lag);
        }
        let lag = match admin::group_info(&self.conn, &self.stream, &bp.group).await {
            Ok(GroupInfo { lag: Some(lag), .. }) => Some(lag),
            Ok(info) => {
                // The stream's length bounds the lag: a stream no longer than the limit is not
                // read at all. Else the unread entries are counted, up to one past the limit
                // and at most MAX_COUNTED_LAG (each is read whole).
                let len: u64 = self.conn.command(redis::cmd("XLEN").arg(&self.stream)).await?;
                if len <= bp.max_lag {
                    Some(len)
                } else {
                    let cap = bp.max_lag.saturating_add(1).min(MAX_COUNTED_LAG);
                    let after = info.last_delivered_id;
                    Some(admin::entries_after(&self.conn, &self.stream, after, cap).await?)
                }
            }
            Err(Error::GroupNotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        *self.lag_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), lag));
        Ok(lag)
    }
}
