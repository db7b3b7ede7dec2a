//! The seed contract: `StreamProducer`, `StreamManager`, `StreamConsumer`,
//! `ConsumerGroupManager`, `RedisConnection`, `EventMessage`, `PendingMessage` and the named
//! errors, as a thin facade over the Redis backend ([`crate::redis`]).
//!
//! | seed (Python) | Rust |
//! |---|---|
//! | `StreamProducer(redis_url, stream_name, max_length=10000)` | [`StreamProducer::new`], [`StreamProducer::with_options`] + [`ProducerOptions`] |
//! | `producer.publish(event_type, payload, metadata=None) -> id` | [`StreamProducer::publish`] |
//! | `StreamManager(redis_url)`: `create_stream`, `delete_stream`, `get_stream_info` | [`StreamManager`] |
//! | `retention_ms`, `max_length` kept while a stream is quiet, never cutting what a group needs | [`StreamManager::start_retention`], [`StreamManager::apply_retention`] + [`RetentionOptions`]; `retention:` in [`Config`] |
//! | `StreamConsumer(redis_url, stream, group, consumer, ...)` | [`StreamConsumer::new`], [`StreamConsumer::with_options`] + [`ConsumerOptions`] |
//! | `consumer.subscribe(callback, event_types=None)` | [`StreamConsumer::subscribe`] (async callback returning `bool`) |
//! | `acknowledge`, `get_pending`, `close`, `lag` | [`StreamConsumer`] methods |
//! | `ConsumerGroupManager(redis_url)`: `create_group`, `delete_group`, `list_groups`, `get_group_info` | [`ConsumerGroupManager`] |
//! | `RedisConnection(url, max_retries=5, retry_base_delay=0.1, retry_max_delay=30.0)` | [`RedisConnection::builder`] |
//! | `StreamNotFoundError`, `GroupNotFoundError`, `PayloadTooLargeError`, `RedisConnectionError`, `ConsumerCrashedError` | [`Error::StreamNotFound`](crate::Error::StreamNotFound), [`Error::GroupNotFound`](crate::Error::GroupNotFound), [`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge), [`Error::Connection`](crate::Error::Connection), [`Error::ConsumerCrashed`](crate::Error::ConsumerCrashed) |
//! | YAML config + `REDIS_URL`, `STREAM_NAME`, `CONSUMER_GROUP`, `CONSUMER_NAME` | [`Config`] (module [`config`]) |

pub mod config;
mod consumer;
mod groups;
mod manager;
mod producer;

pub use crate::redis::retention::{RetentionHandle, RetentionStats, Trimmed};
pub use config::{Binding, Config};
pub use consumer::{ConsumerOptions, EventMessage, PendingMessage, StreamConsumer};
pub use groups::ConsumerGroupManager;
pub use manager::{RetentionOptions, StreamManager, StreamOptions};
pub use producer::{Backpressure, BackpressureMode, MAX_COUNTED_LAG, ProducerOptions, StreamProducer};

pub use crate::redis::RedisConnection;
pub use crate::redis::admin::{ConsumerInfo, ConsumerStatus, GroupInfo, StoredEntry, StreamInfo};
