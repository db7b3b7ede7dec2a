//! # streamwise
//!
//! Event-driven services on Redis Streams, the Rust way: a pluggable pub/sub core
//! ([`Publisher`], [`Subscriber`], [`Delivery`]) with an in-memory backend ([`memory`]) that
//! keeps the semantics of Redis Streams, consumer groups, at-least-once delivery with
//! explicit settlement, and a conformance suite that any backend can run
//! (`testing`, behind the `testing` feature).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use futures::StreamExt;
//! use streamwise::prelude::*;
//! use streamwise::memory::MemoryBackend;
//!
//! let backend = MemoryBackend::new();
//! let publisher = backend.publisher();
//! let subscriber = backend.subscriber();
//!
//! let mut updates = subscriber
//!     .subscribe("data-updates", SubscribeOptions::new("processors", "worker-1"))
//!     .await?;
//! let msg = Message::new("price.update", &serde_json::json!({"symbol": "AAPL", "price": 150.25}))?
//!     .with_metadata("source", "market-feed");
//! publisher.publish("data-updates", msg).await?;
//!
//! let delivery = updates.next().await.expect("subscription open")?;
//! assert_eq!(delivery.message().json()?["symbol"], "AAPL");
//! assert_eq!(delivery.delivery_count(), 1);
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! Delivery is at-least-once: an entry leaves its group's pending list only when acked. A
//! [`Delivery`] is settled exactly once; settling again is a [`SettleError::AlreadySettled`] value.

// The README's snippets are compiled (and the quickstart run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

pub mod backend;
pub mod checkpoint;
pub mod codec;
pub mod cqrs;
pub mod dead_letter;
pub mod delivery;
pub mod entry_id;
pub mod error;
#[cfg(feature = "interop")]
pub mod interop;
pub mod memory;
pub mod message;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "opentelemetry")]
pub mod otel;
pub mod partition;
pub mod pubsub;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redis_streams;
pub mod router;
mod signal;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire_format;

pub use backend::{Backend, BackendKind, connect, url_from_env};
pub use delivery::{Delivery, DeliveryInfo, MAX_NACK_DELAY, Origin, SettleError, Settlement, Settler};
pub use entry_id::ParseEntryIdError;
pub use error::{BoxError, Error, Result, validate_event_type, validate_name, validate_stream_name};
pub use message::{EntryId, Message, Metadata, format_timestamp, parse_timestamp};
pub use pubsub::{
    Flush, FlushHandle, HealthHandle, HealthProbe, InFlight, MAX_CAP, Publisher, ReclaimOptions, StartFrom,
    SubscribeOptions, Subscriber, Subscription, SubscriptionHealth, unique_consumer_name,
};
/// The UUID type of message ids (re-exported so that extensions can name it).
pub use uuid::Uuid;
pub use wire_format::WireFormat;

/// Locks `m`, going on past a panic of another holder, as the crate's tasks do everywhere:
/// one panicking handler or task must not stop the others' reads and settlements.
#[cfg_attr(not(any(feature = "redis", feature = "nats")), allow(dead_code))]
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The names most programs need: `use streamwise::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Delivery, EntryId, Error, Message, Publisher, Result, StartFrom, SubscribeOptions, Subscriber,
    };
}
