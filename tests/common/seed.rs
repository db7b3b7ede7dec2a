//! Helpers of the seed facade's tests (`tests/seed_api.rs`, `tests/cluster_api.rs`).

use std::sync::Arc;
use std::time::Duration;

use streamwise::redis_streams::{ConsumerOptions, EventMessage, StreamConsumer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a helper waits for an event or for a consumer to end.
const WAIT: Duration = Duration::from_secs(20);

/// Consumer options that notice a close within 100 ms.
pub fn fast_consumer() -> ConsumerOptions {
    ConsumerOptions {
        block_ms: 100,
        ..ConsumerOptions::default()
    }
}

/// Runs `consumer.subscribe` in a task, forwarding each event; the callback acknowledges when
/// `ack` says so.
pub fn run_consumer(
    consumer: Arc<StreamConsumer>,
    event_types: Option<Vec<&'static str>>,
    ack: fn(&EventMessage) -> bool,
) -> (
    mpsc::UnboundedReceiver<EventMessage>,
    JoinHandle<streamwise::Result<()>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let result = consumer
            .subscribe(
                move |msg| {
                    let decision = ack(&msg);
                    let _ = tx.send(msg);
                    async move { decision }
                },
                event_types.as_deref(),
            )
            .await;
        // A test waiting for an event sees only that the consumer stopped: this says why.
        if let Err(e) = &result {
            eprintln!("consumer.subscribe returned an error: {e:?}");
        }
        result
    });
    (rx, task)
}

/// The next event the consumer forwarded, within the wait.
pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<EventMessage>) -> EventMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event in time")
        .expect("the consumer is running")
}

/// Closes `consumer` and waits for its `subscribe` task, which must end without an error.
pub async fn close_and_join(consumer: &StreamConsumer, task: JoinHandle<streamwise::Result<()>>) {
    consumer.close().await.unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("subscribe ends in time")
        .unwrap()
        .unwrap();
}
