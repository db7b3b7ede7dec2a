//! The quickstart: a producer publishes a few price updates to the `data-updates` stream and
//! a consumer in group `processors` receives, prints and acknowledges them.
//!
//! In memory by default; on Redis or NATS when `STREAMWISE_URL` (or `REDIS_URL`) is set.
//!
//! ```sh
//! cargo run --example quickstart
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart
//! STREAMWISE_URL=nats://127.0.0.1:4222 cargo run --features nats --example quickstart
//! ```

use std::collections::HashSet;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use streamwise::prelude::*;

#[derive(Debug, Serialize, Deserialize)]
struct PriceUpdate {
    symbol: String,
    price: f64,
}

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    // STREAMWISE_URL (or REDIS_URL): redis://..., redis-cluster://..., nats://... (feature
    // `nats`); in memory without one.
    let url = streamwise::url_from_env().unwrap_or_else(|| "memory://".to_owned());
    let backend = streamwise::connect(&url).await?;
    println!("Using {} at {}", backend.kind(), backend.location()); // a password shown as ***
    let (publisher, subscriber) = (backend.publisher(), backend.subscriber());

    // A group created now starts with what is published from now on; reruns on Redis do not
    // replay earlier runs.
    let options = SubscribeOptions::new("processors", "worker-1").start_from(StartFrom::Latest);
    let mut updates = subscriber.subscribe("data-updates", options).await?;

    let mut published = HashSet::new();
    for (symbol, price) in [("AAPL", 150.25), ("MSFT", 410.10), ("GOOG", 172.50)] {
        let update = PriceUpdate {
            symbol: symbol.into(),
            price,
        };
        let message = Message::new("price.update", &update)?.with_metadata("source", "market-feed");
        let id = publisher.publish("data-updates", message).await?;
        println!("Published message: {id}");
        published.insert(id);
    }

    while !published.is_empty() {
        let delivery = updates.next().await.expect("the subscription is open")?;
        let update: PriceUpdate = delivery.message().decode()?;
        println!(
            "Received: {} - {} at {} (id {}, delivery {}, source {})",
            delivery.message().event_type(),
            update.symbol,
            update.price,
            delivery.id(),
            delivery.delivery_count(),
            delivery.message().metadata().get("source").unwrap_or("-"),
        );
        published.remove(&delivery.id());
        delivery.ack().await?;
    }

    subscriber.close().await?;
    publisher.close().await?;
    println!("Consumer stopped");
    Ok(())
}
