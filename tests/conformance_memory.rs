//! The conformance suite against the in-memory backend.

use std::sync::Arc;

use futures::future::BoxFuture;
use streamwise::memory::MemoryBackend;
use streamwise::testing::TestBackend;
use streamwise::{EntryId, Publisher, Result, Subscriber};

struct Memory(MemoryBackend);

impl TestBackend for Memory {
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async { Ok(Arc::new(self.0.publisher()) as Arc<dyn Publisher>) })
    }
    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        Box::pin(async { Ok(Arc::new(self.0.subscriber()) as Arc<dyn Subscriber>) })
    }
    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(self.0.pending_count(topic, group)? as u64) })
    }
    fn position<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Option<EntryId>>> {
        Box::pin(async move { self.0.position(topic, group, consumer) })
    }
    fn coordinator(&self) -> BoxFuture<'_, Result<Arc<dyn streamwise::partition::PartitionCoordinator>>> {
        Box::pin(async {
            Ok(Arc::new(self.0.coordinator()) as Arc<dyn streamwise::partition::PartitionCoordinator>)
        })
    }
    fn pending_of<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<EntryId>>> {
        Box::pin(async move { self.0.pending_of(topic, group, consumer) })
    }
}

streamwise::conformance_tests!(Memory(MemoryBackend::new()));

#[tokio::test]
async fn scenarios_run_from_the_table_too() {
    // Third-party runners use SCENARIOS directly; one entry proves the table's functions run.
    let backend = Memory(MemoryBackend::new());
    let (name, scenario) = streamwise::testing::SCENARIOS[0];
    assert_eq!(name, "round_trip");
    scenario(&backend).await;
}
