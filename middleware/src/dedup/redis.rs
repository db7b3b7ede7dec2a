//! [`RedisDedupStore`]: marks as Redis keys with a time to live, shared by every consumer.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use streamwise::redis::RedisConnection;
use streamwise::redis::client::cmd;
use streamwise::{Error, Result};

use super::store::{DedupStore, Marked, check_ttl};

/// The key prefix of [`RedisDedupStore::new`].
pub const DEFAULT_PREFIX: &str = "streamwise:dedup:";

/// Marks kept in Redis, one key per mark (`<prefix><key>`, the holder as its value), set with
/// `SET <key> <holder> NX PX <ttl> GET` (Redis 7.0 or later) and removed with `DEL`, so that
/// every consumer of a group sees the same marks and they expire by themselves.
///
/// Commands go through the [`RedisConnection`] and its retry policy; when Redis stays away
/// the store returns the error, and [`DedupLayer`](super::DedupLayer) calls the handler
/// anyway (a possible duplicate rather than a lost message).
///
/// ```no_run
/// # fn demo() -> streamwise::Result<()> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use streamwise::redis::RedisConnection;
/// use streamwise_middleware::dedup::{DedupLayer, RedisDedupStore};
///
/// let conn = RedisConnection::new("redis://127.0.0.1:6379")?;
/// let store = RedisDedupStore::with_prefix(conn, "billing:dedup:")?;
/// let layer = DedupLayer::new(Arc::new(store), Duration::from_secs(3600))?;
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisDedupStore {
    conn: RedisConnection,
    prefix: String,
}

impl fmt::Debug for RedisDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupStore")
            .field("url", &self.conn.url())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisDedupStore {
    /// Marks on `conn` under [`DEFAULT_PREFIX`].
    pub fn new(conn: RedisConnection) -> Self {
        RedisDedupStore {
            conn,
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// Marks on `conn` under `prefix`. An empty prefix is refused ([`Error::Invalid`],
    /// `prefix`): bare keys could collide with the application's own.
    pub fn with_prefix(conn: RedisConnection, prefix: impl Into<String>) -> Result<Self> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Err(Error::invalid("prefix", "must not be empty"));
        }
        Ok(RedisDedupStore { conn, prefix })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key of mark `key`.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl DedupStore for RedisDedupStore {
    fn mark<'a>(&'a self, key: &'a str, holder: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Marked>> {
        Box::pin(async move {
            check_ttl(ttl)?;
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let mut set = cmd("SET");
            set.arg(self.redis_key(key))
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(millis)
                .arg("GET");
            // NX with GET: nil when the key was set now, the old value when it existed.
            let previous: Option<String> = self.conn.command(&set).await?;
            Ok(match previous {
                None => Marked::New,
                Some(holder) => Marked::Seen { holder },
            })
        })
    }

    fn forget<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let _deleted: u64 = self.conn.command(cmd("DEL").arg(self.redis_key(key))).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use streamwise::router::{DeliveryInfo, Incoming, Outcome, State, handler_service};
    use streamwise::testing::RedisServer;
    use streamwise::{EntryId, Message, Origin};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::dedup::DedupLayer;

    #[tokio::test]
    async fn redis_store_sets_expiring_prefixed_keys_and_deduplicates() {
        let server = RedisServer::start();
        let conn = RedisConnection::new(&server.url()).unwrap();
        let store = RedisDedupStore::with_prefix(conn.clone(), "test:dd:").unwrap();
        let minute = Duration::from_secs(60);

        assert_eq!(store.mark("k", "1-0", minute).await.unwrap(), Marked::New);
        assert_eq!(
            store.mark("k", "2-0", minute).await.unwrap(),
            Marked::Seen { holder: "1-0".into() }
        );
        // The key carries the prefix, the first holder and a time to live.
        let value: Option<String> = conn.command(cmd("GET").arg("test:dd:k")).await.unwrap();
        assert_eq!(value.as_deref(), Some("1-0"));
        let pttl: i64 = conn.command(cmd("PTTL").arg("test:dd:k")).await.unwrap();
        assert!(pttl > 0 && pttl <= 60_000, "{pttl}");

        store.forget("k").await.unwrap();
        let exists: u64 = conn.command(cmd("EXISTS").arg("test:dd:k")).await.unwrap();
        assert_eq!(exists, 0);
        assert_eq!(store.mark("k", "3-0", minute).await.unwrap(), Marked::New);

        // Marks expire by themselves.
        let short = Duration::from_millis(50);
        assert_eq!(store.mark("short", "1-0", short).await.unwrap(), Marked::New);
        tokio::time::sleep(short * 3).await;
        assert_eq!(store.mark("short", "2-0", short).await.unwrap(), Marked::New);

        // Bad ttls are refused before any command.
        let err = store.mark("k", "h", Duration::ZERO).await.unwrap_err();
        assert_eq!(err.invalid_field(), Some("ttl"));

        // Behind the layer: a second message with the same UUID skips the handler.
        let calls = Arc::new(AtomicUsize::new(0));
        async fn count(State(calls): State<Arc<AtomicUsize>>) {
            calls.fetch_add(1, Ordering::SeqCst);
        }
        let layer = DedupLayer::new(Arc::new(RedisDedupStore::new(conn.clone())), minute).unwrap();
        let svc = layer.layer(handler_service(count, calls.clone()));
        let message = Message::new("t", &1).unwrap();
        let origin = Arc::new(Origin::new("orders", "svc", "w1"));
        for seq in 1..=2 {
            let info = DeliveryInfo::new(EntryId::new(5, seq), 1, origin.clone());
            let outcome = svc
                .clone()
                .oneshot(Incoming::for_test_with(message.clone(), info))
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::ack());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let key = format!("{DEFAULT_PREFIX}orders:svc:{}", message.uuid());
        let holder: Option<String> = conn.command(cmd("GET").arg(&key)).await.unwrap();
        assert_eq!(holder.as_deref(), Some("5-1"), "{key}");
    }

    #[test]
    fn an_empty_prefix_is_refused() {
        let conn = RedisConnection::new("redis://127.0.0.1:1").unwrap();
        let err = RedisDedupStore::with_prefix(conn.clone(), "").unwrap_err();
        assert_eq!(err.invalid_field(), Some("prefix"));
        let store = RedisDedupStore::new(conn);
        assert_eq!(store.redis_key("a"), "streamwise:dedup:a");
    }
}
