//! Backends chosen by URL ([`Backend`]): [`connect`] gives a publisher and a subscriber on the backend a
//! URL names, behind the [`Publisher`] and [`Subscriber`] traits, so that a program (the
//! router, CQRS, the middleware) runs on any of them unchanged; [`url_from_env`] reads the
//! URL the way the examples do.
//!
//! | URL | backend | feature |
//! |---|---|---|
//! | `memory://` | a new in-memory backend of its own ([`crate::memory`]) | always |
//! | `redis://`, `rediss://`, `redis+unix://`, `unix://`, `redis-cluster://` | Redis ([`crate::redis`]) | `redis` |
//! | `nats://`, `tls://` | NATS JetStream ([`crate::nats`]) | `nats` |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
//! use streamwise::{BackendKind, Message};
//!
//! let backend = streamwise::connect("memory://").await?;
//! assert_eq!(backend.kind(), BackendKind::Memory);
//! backend.publisher().publish("orders", Message::new("order.placed", &1)?).await?;
//! let err = streamwise::connect("kafka://broker:9092").await.unwrap_err();
//! assert_eq!(err.invalid_field(), Some("url"));
//! # Ok(()) }
//! ```

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::partition::PartitionCoordinator;
use crate::pubsub::{Publisher, Subscriber};

/// Which backend a [`Backend`] is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// In memory, in this process.
    Memory,
    /// Redis Streams (one server or a cluster).
    Redis,
    /// NATS JetStream.
    Nats,
}

impl std::fmt::Display for BackendKind {
    /// `in-memory`, `Redis` or `NATS`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Memory => "in-memory",
            BackendKind::Redis => "Redis",
            BackendKind::Nats => "NATS",
        })
    }
}

/// A publisher and a subscriber on the backend a URL named ([`connect`]).
#[derive(Clone)]
pub struct Backend {
    kind: BackendKind,
    /// Where, with any password hidden.
    location: String,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    coordinator: Option<Arc<dyn PartitionCoordinator>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("kind", &self.kind)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// The backend `url` names, connected. See [`connect`].
    pub async fn from_url(url: &str) -> Result<Backend> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        match scheme {
            Some("memory") => {
                let memory = crate::memory::MemoryBackend::new();
                Ok(Backend {
                    kind: BackendKind::Memory,
                    location: "memory://".to_owned(),
                    publisher: Arc::new(memory.publisher()),
                    subscriber: Arc::new(memory.subscriber()),
                    coordinator: Some(Arc::new(memory.coordinator())),
                })
            }
            Some("redis" | "rediss" | "redis+unix" | "unix" | "redis-cluster") => redis(url),
            Some("nats" | "tls") => nats(url).await,
            _ => Err(Error::invalid(
                "url",
                format_args!(
                    "{}: the scheme must be memory://, redis://, rediss://, redis+unix://, unix://, \
                     redis-cluster://, nats:// or tls://",
                    hide_credentials(url)
                ),
            )),
        }
    }

    /// Which backend it is.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Where it is: the URL with any password or token hidden (`memory://` in memory).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Its publisher (shared by every call).
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    /// Its subscriber (shared by every call; closing it closes it for all).
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        self.subscriber.clone()
    }

    /// Its keeper of partitioned topics, where the backend has one (in memory and Redis;
    /// `None` on NATS).
    pub fn coordinator(&self) -> Option<Arc<dyn PartitionCoordinator>> {
        self.coordinator.clone()
    }
}

/// Connects to the backend `url` names and gives its publisher and subscriber: `memory://`
/// (a new in-memory backend), `redis://`, `rediss://`, `redis+unix://`, `unix://`,
/// `redis-cluster://` (feature `redis`, on by default), `nats://` and `tls://` (feature
/// `nats`). Credentials and TLS go in the URL as each backend takes them.
///
/// Errors: [`Error::Invalid`] (field `url`) for another scheme, or one whose feature is off;
/// the backend's own errors for the rest. None shows a password.
pub async fn connect(url: &str) -> Result<Backend> {
    Backend::from_url(url).await
}

/// The backend URL from the environment: `STREAMWISE_URL`, else `REDIS_URL` (what programs
/// written for the Redis-only releases set), else `None`.
pub fn url_from_env() -> Option<String> {
    ["STREAMWISE_URL", "REDIS_URL"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

#[cfg(feature = "redis")]
fn redis(url: &str) -> Result<Backend> {
    let redis = crate::redis::RedisBackend::new(url)?;
    Ok(Backend {
        kind: BackendKind::Redis,
        location: redis.connection().url().to_owned(),
        publisher: Arc::new(redis.publisher()),
        subscriber: Arc::new(redis.subscriber()?),
        coordinator: Some(Arc::new(redis.coordinator())),
    })
}

#[cfg(not(feature = "redis"))]
fn redis(url: &str) -> Result<Backend> {
    Err(Error::invalid(
        "url",
        format_args!("{}: Redis needs the `redis` feature", hide_credentials(url)),
    ))
}

#[cfg(feature = "nats")]
async fn nats(url: &str) -> Result<Backend> {
    let nats = crate::nats::NatsBackend::connect(url).await?;
    Ok(Backend {
        kind: BackendKind::Nats,
        location: nats.url().to_owned(),
        publisher: Arc::new(nats.publisher()),
        subscriber: Arc::new(nats.subscriber()),
        coordinator: None,
    })
}

#[cfg(not(feature = "nats"))]
async fn nats(url: &str) -> Result<Backend> {
    Err(Error::invalid(
        "url",
        format_args!("{}: NATS needs the `nats` feature", hide_credentials(url)),
    ))
}

/// `url` with anything between `://` and the last `@` hidden.
fn hide_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &url[at + 1..]),
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_schemes_are_refused_without_showing_the_password() {
        for url in ["kafka://u:hunter2@h:1", "u:hunter2@h", "", "memory"] {
            let err = connect(url).await.unwrap_err();
            assert_eq!(err.invalid_field(), Some("url"), "{url}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }
}
