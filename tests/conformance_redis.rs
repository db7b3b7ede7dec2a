//! The conformance suite against the Redis backend, each test on its own redis-server.

mod common;

use std::sync::Arc;

use futures::future::BoxFuture;
use streamwise::checkpoint::CheckpointStore;
use streamwise::redis::{RedisBackend, RedisCheckpointStore, admin};
use streamwise::testing::TestBackend;
use streamwise::{EntryId, Publisher, Result, Subscriber};

use common::RedisServer;

struct Redis {
    server: RedisServer,
    shared: RedisBackend,
}

impl Redis {
    fn start() -> Self {
        let server = RedisServer::start();
        let shared = RedisBackend::new(&server.url()).expect("redis url");
        Redis { server, shared }
    }
}

impl TestBackend for Redis {
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async { Ok(Arc::new(self.shared.publisher()) as Arc<dyn Publisher>) })
    }
    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        // Like a new process: a connection of its own.
        Box::pin(async {
            let backend = RedisBackend::new(&self.server.url())?;
            Ok(Arc::new(backend.subscriber()?) as Arc<dyn Subscriber>)
        })
    }
    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.shared.pending_count(topic, group))
    }
    fn position<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Option<EntryId>>> {
        Box::pin(async move {
            let store = RedisCheckpointStore::new(self.shared.connection().clone());
            Ok(store.load(topic, group, consumer).await?.map(|cp| cp.message_id))
        })
    }
    fn pending_of<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(async move {
            let rows = admin::pending_entries(self.shared.connection(), topic, group, Some(consumer)).await?;
            Ok(rows.into_iter().map(|row| row.id).collect())
        })
    }
}

streamwise::conformance_tests!(Redis::start());
