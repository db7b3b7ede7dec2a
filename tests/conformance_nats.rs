//! The conformance suite against the NATS JetStream backend, each test on its own
//! `nats-server -js` (a free loopback port, its own store, stopped on drop).
//!
//! The suite runs unchanged. The backend declares (`Features`) that it keeps no per-consumer
//! checkpoints and has no partition coordinator; those scenarios are skipped for it only
//! (the README's NATS section lists them). It also declares that the server may count a
//! delayed nak's redelivery more than once; that scenario then checks the count only grew.

#![cfg(feature = "nats")]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use streamwise::nats::{NatsBackend, NatsSubscriberOptions};
use streamwise::testing::{Features, NatsServer, TestBackend};
use streamwise::{Publisher, Result, Subscriber};

/// Short enough that the scenarios of a consumer that went away (its deliveries come back to
/// another after `ack_wait`) finish well within the suite's waits, and longer than their
/// `min_idle` (800 ms).
const ACK_WAIT: Duration = Duration::from_secs(2);

struct Nats {
    server: NatsServer,
    /// Publishers and the pending counts share one connection; each subscriber has its own,
    /// as a process of its own would.
    shared: NatsBackend,
}

async fn nats() -> Nats {
    let server = NatsServer::start();
    let shared = NatsBackend::connect(&server.url()).await.expect("connect");
    Nats { server, shared }
}

impl TestBackend for Nats {
    fn features(&self) -> Features {
        // nats-server 2.9 at times counts a delayed nak's redelivery twice (about 1 run of
        // nack_after_waits_for_the_delay in 12, with no second delivery reaching the client).
        Features::ALL
            .checkpoints(false)
            .partitions(false)
            .exact_delayed_redelivery_count(false)
    }
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async { Ok(Arc::new(self.shared.publisher()) as Arc<dyn Publisher>) })
    }
    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        Box::pin(async {
            let own = NatsBackend::connect(&self.server.url()).await?;
            let subscriber = own.subscriber_with(NatsSubscriberOptions::default().ack_wait(ACK_WAIT))?;
            Ok(Arc::new(subscriber) as Arc<dyn Subscriber>)
        })
    }
    fn pending<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.shared.pending_count(topic, group))
    }
}

streamwise::conformance_tests!(nats().await);
