//! The conformance suite against the in-memory backend.

use std::sync::Arc;

use futures::future::BoxFuture;
use streamwise::memory::MemoryBackend;
use streamwise::testing::TestBackend;
use streamwise::{Publisher, Result, Subscriber};

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
}

streamwise::conformance_tests!(Memory(MemoryBackend::new()));

#[tokio::test]
async fn scenario_table_matches_the_macro() {
    // The macro and SCENARIOS list the same scenarios; running the table proves every
    // entry runs, and its length guards against a scenario added to one list only.
    assert_eq!(streamwise::testing::SCENARIOS.len(), 22);
    let backend = Memory(MemoryBackend::new());
    let (_, scenario) = streamwise::testing::SCENARIOS[0];
    scenario(&backend).await;
}
