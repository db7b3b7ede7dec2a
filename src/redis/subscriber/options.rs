//! [`RedisSubscriberOptions`]: the options of a [`RedisSubscriber`](super::RedisSubscriber)
//! shared by all its subscriptions, their limits and their validation.

use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::CheckpointStore;
use crate::codec::{Codec, DEFAULT_MAX_ENTRY_SIZE, JsonCodec};
use crate::error::{Error, Result};
use crate::redis::checkpoint::RedisCheckpointStore;
use crate::redis::connection::RedisConnection;

/// The longest [`RedisSubscriberOptions::lease_ttl`]: one hour.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// The longest [`RedisSubscriberOptions::ack_flush_interval`]: 10 s.
pub const MAX_ACK_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// Options of a [`RedisSubscriber`](super::RedisSubscriber) (per-subscription knobs are in
/// [`SubscribeOptions`](crate::SubscribeOptions)): set with the chained methods, read from
/// the public fields, checked by [`validate`](Self::validate) when the subscriber is made.
///
/// ```
/// use std::time::Duration;
/// use streamwise::redis::RedisSubscriberOptions;
///
/// let options = RedisSubscriberOptions::default().lease_ttl(Duration::from_secs(30));
/// assert_eq!(options.lease_ttl, Duration::from_secs(30));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisSubscriberOptions {
    /// The wire layout. Default [`JsonCodec`].
    pub codec: Arc<dyn Codec>,
    /// Where checkpoints go. Default [`Checkpoints::Redis`].
    pub checkpoints: Checkpoints,
    /// How long a consumer's lease lives without renewal. Default 10 s; at least 30 ms, at
    /// most [`MAX_LEASE_TTL`].
    pub lease_ttl: Duration,
    /// How long acks gather before one `XACK` sends them. Default zero; at most
    /// [`MAX_ACK_FLUSH_INTERVAL`].
    pub ack_flush_interval: Duration,
    /// The largest entry handed to the application. Default 1 MiB; at least 1.
    pub max_entry_size: usize,
}

/// Where a [`RedisSubscriber`](super::RedisSubscriber) records checkpoints.
#[derive(Clone)]
#[non_exhaustive]
pub enum Checkpoints {
    /// In a hash beside the stream ([`RedisCheckpointStore`]).
    Redis,
    /// In this store.
    Store(Arc<dyn CheckpointStore>),
    /// Nowhere.
    Off,
}

impl Default for RedisSubscriberOptions {
    /// JSON wire format, checkpoints in Redis, 10 s leases, acks sent as soon as the previous
    /// `XACK` returned, entries up to 1 MiB.
    fn default() -> Self {
        RedisSubscriberOptions {
            codec: Arc::new(JsonCodec),
            checkpoints: Checkpoints::Redis,
            lease_ttl: Duration::from_secs(10),
            ack_flush_interval: Duration::ZERO,
            max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
        }
    }
}

impl std::fmt::Debug for RedisSubscriberOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checkpoints = match self.checkpoints {
            Checkpoints::Redis => "redis",
            Checkpoints::Store(_) => "custom",
            Checkpoints::Off => "off",
        };
        f.debug_struct("RedisSubscriberOptions")
            .field("checkpoints", &checkpoints)
            .field("lease_ttl", &self.lease_ttl)
            .field("ack_flush_interval", &self.ack_flush_interval)
            .field("max_entry_size", &self.max_entry_size)
            .finish_non_exhaustive()
    }
}

impl RedisSubscriberOptions {
    /// Another wire layout.
    #[must_use]
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = Arc::new(codec);
        self
    }

    /// Keep checkpoints in `store` instead of Redis (for example a
    /// [`MemoryCheckpointStore`](crate::checkpoint::MemoryCheckpointStore)).
    #[must_use]
    pub fn checkpoint_store(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.checkpoints = Checkpoints::Store(store);
        self
    }

    /// Record no checkpoints.
    #[must_use]
    pub fn without_checkpoints(mut self) -> Self {
        self.checkpoints = Checkpoints::Off;
        self
    }

    /// How long a consumer's lease lives without renewal. It is renewed (and held entries are
    /// heartbeated) every third of it, so keep reclaim `min_idle` above two thirds of it.
    /// Default 10 s; at least 30 ms, at most [`MAX_LEASE_TTL`].
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long acks gather before one `XACK` sends them. Default zero: an `XACK` goes out as
    /// soon as the previous one returned, carrying every ack that queued meanwhile (batches
    /// grow with the load by themselves). A longer interval means fewer, bigger `XACK`s, and
    /// more acknowledged entries redelivered after a crash. At most [`MAX_ACK_FLUSH_INTERVAL`].
    #[must_use]
    pub fn ack_flush_interval(mut self, interval: Duration) -> Self {
        self.ack_flush_interval = interval;
        self
    }

    /// The largest entry (field names and values, in bytes) handed to the application.
    /// Larger entries are dead-lettered whole, with the sizes in the reason, and the
    /// subscription goes on. Default [`DEFAULT_MAX_ENTRY_SIZE`] (1 MiB), the publisher's
    /// default: raise both together. At least 1; `usize::MAX` means no limit. Dead-letter streams (`{<stream>}-dead`) are read without
    /// the limit, since their records are as large as the entries they keep.
    #[must_use]
    pub fn max_entry_size(mut self, bytes: usize) -> Self {
        self.max_entry_size = bytes;
        self
    }

    /// Checks every option ([`RedisSubscriber::new`](super::RedisSubscriber::new) does);
    /// [`Error::Invalid`] names the one at fault. The limits keep each value within what the
    /// scripts and commands take.
    pub fn validate(&self) -> Result<()> {
        if self.max_entry_size == 0 {
            return Err(Error::invalid("max_entry_size", "must be at least 1 byte"));
        }
        if self.lease_ttl < Duration::from_millis(30) || self.lease_ttl > MAX_LEASE_TTL {
            return Err(Error::invalid(
                "lease_ttl",
                format_args!(
                    "{:?} must be at least 30 ms and at most {MAX_LEASE_TTL:?}",
                    self.lease_ttl
                ),
            ));
        }
        if self.ack_flush_interval > MAX_ACK_FLUSH_INTERVAL {
            return Err(Error::invalid(
                "ack_flush_interval",
                format_args!(
                    "{:?} must be at most {MAX_ACK_FLUSH_INTERVAL:?}",
                    self.ack_flush_interval
                ),
            ));
        }
        Ok(())
    }

    /// Where the subscriptions keep their checkpoints: in Redis on `conn`, in the store
    /// given, or nowhere.
    pub(super) fn open_store(&self, conn: &RedisConnection) -> Option<Arc<dyn CheckpointStore>> {
        match &self.checkpoints {
            Checkpoints::Redis => Some(Arc::new(RedisCheckpointStore::new(conn.clone()))),
            Checkpoints::Store(store) => Some(store.clone()),
            Checkpoints::Off => None,
        }
    }

    /// The largest entry handed out of `stream`: dead-letter streams are read without the
    /// limit, since their records are as large as the entries they keep.
    pub(super) fn max_entry_size_of(&self, stream: &str) -> usize {
        if stream.ends_with(crate::dead_letter::SUFFIX) {
            usize::MAX
        } else {
            self.max_entry_size
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_bounded_before_it_reaches_redis() {
        let o = RedisSubscriberOptions::default;
        let refused = [
            (o().lease_ttl(Duration::MAX), "lease_ttl"),
            (
                o().lease_ttl(MAX_LEASE_TTL + Duration::from_millis(1)),
                "lease_ttl",
            ),
            (o().lease_ttl(Duration::from_millis(29)), "lease_ttl"),
            (o().ack_flush_interval(Duration::MAX), "ack_flush_interval"),
            (o().max_entry_size(0), "max_entry_size"),
        ];
        for (options, field) in refused {
            let err = options.validate().unwrap_err();
            assert_eq!(err.invalid_field(), Some(field), "{err}");
        }
        let limits = o()
            .lease_ttl(MAX_LEASE_TTL)
            .ack_flush_interval(MAX_ACK_FLUSH_INTERVAL)
            .max_entry_size(usize::MAX);
        limits.validate().unwrap();
        // The longest lease fits the scripts' millisecond argument (a Redis integer).
        assert!(MAX_LEASE_TTL.as_millis() < i64::MAX as u128);
    }
}
