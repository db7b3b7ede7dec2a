//! The Redis Streams backend.

pub mod codec;
mod connection;

pub use codec::{Codec, JsonCodec, RawEntry};
pub use connection::{RedisConnection, RedisConnectionBuilder, redact_url};
