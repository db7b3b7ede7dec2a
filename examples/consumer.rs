//! The quickstart's consumer: group `processors`, consumer `worker-1`, prints each
//! `price.update` event it receives and stops cleanly on ctrl-c.
//!
//! Reads `REDIS_URL`, `STREAM_NAME` (default `data-updates`), `CONSUMER_GROUP` (default
//! `processors`) and `CONSUMER_NAME` (default `worker-1`), or a YAML file given as the first
//! argument. `STOP_AFTER=n` stops after n events (for scripts).
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example consumer
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use streamwise::redis_streams::ConsumerGroupManager;
use streamwise::redis_streams::{Binding, Config};

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    let mut config = Config::load(std::env::args().nth(1).as_deref().map(std::path::Path::new))?;
    // The quickstart's names wherever neither YAML nor the environment set one.
    let first = config.consumer.bindings.first().cloned().unwrap_or_default();
    let binding = Binding {
        stream: first
            .stream
            .or_else(|| config.producer.stream.clone())
            .or_else(|| Some("data-updates".into())),
        group: first.group.or_else(|| Some("processors".into())),
        consumer: first.consumer.or_else(|| Some("worker-1".into())),
    };
    match config.consumer.bindings.first_mut() {
        Some(b) => *b = binding,
        None => config.consumer.bindings.push(binding),
    }
    let names = config.consumer_binding(0)?;

    // Create the consumer group (run once; idempotent).
    let groups = ConsumerGroupManager::new(&config.redis_url)?;
    groups.create_group(&names.stream, &names.group, "0").await?;

    let consumer = Arc::new(config.stream_consumer(0)?);
    let stop_after: Option<u64> = std::env::var("STOP_AFTER").ok().and_then(|n| n.parse().ok());
    let received = Arc::new(AtomicU64::new(0));
    {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = consumer.close().await;
            }
        });
    }
    let (closer, counter) = (consumer.clone(), received.clone());
    consumer
        .subscribe(
            move |msg| {
                println!("Received: {} - {}", msg.event_type, msg.payload);
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                let closer = closer.clone();
                async move {
                    if stop_after.is_some_and(|stop| n >= stop) {
                        // Close from another task: subscribe returns once this event is acked.
                        tokio::spawn(async move { closer.close().await });
                    }
                    true // acknowledge
                }
            },
            Some(&["price.update"]),
        )
        .await?;
    println!("Consumer stopped");
    Ok(())
}
