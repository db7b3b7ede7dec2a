//! The quickstart: a producer publishes a few price updates to the `data-updates` stream and
//! a consumer in group `processors` receives, prints and acknowledges them.
//!
//! Runs on the in-memory backend. `REDIS_URL` selects Redis once the Redis backend lands.
//!
//! ```sh
//! cargo run --example quickstart
//! ```

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use streamwise::memory::MemoryBackend;
use streamwise::prelude::*;

#[derive(Debug, Serialize, Deserialize)]
struct PriceUpdate {
    symbol: String,
    price: f64,
}

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    if std::env::var_os("REDIS_URL").is_some() {
        println!("REDIS_URL is set, but this version has no Redis backend yet: using the in-memory backend.");
    }
    let backend = MemoryBackend::new();
    let publisher = backend.publisher();
    let subscriber = backend.subscriber();

    let mut updates = subscriber
        .subscribe("data-updates", SubscribeOptions::new("processors", "worker-1"))
        .await?;

    let prices = [("AAPL", 150.25), ("MSFT", 410.10), ("GOOG", 172.50)];
    for (symbol, price) in prices {
        let update = PriceUpdate {
            symbol: symbol.into(),
            price,
        };
        let message = Message::new("price.update", &update)?.with_metadata("source", "market-feed");
        let id = publisher.publish("data-updates", message).await?;
        println!("Published message: {id}");
    }

    for _ in prices {
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
        delivery.ack().await?;
    }

    subscriber.close().await?;
    publisher.close().await?;
    println!(
        "Consumer stopped; {} entries pending in group processors",
        backend.pending_count("data-updates", "processors")?
    );
    Ok(())
}
