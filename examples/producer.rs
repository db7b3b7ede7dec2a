//! The quickstart's producer: creates the `data-updates` stream and publishes a
//! `price.update` event.
//!
//! Reads `REDIS_URL` (default `redis://localhost:6379`) and `STREAM_NAME` (default
//! `data-updates`), or a YAML file given as the first argument.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example producer
//! ```

use streamwise::redis_streams::Config;
use streamwise::redis_streams::{StreamManager, StreamOptions};

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    let mut config = Config::load(std::env::args().nth(1).as_deref().map(std::path::Path::new))?;
    if config.producer.stream.is_none() {
        config.producer.stream = Some("data-updates".into());
    }
    let stream = config.producer.stream.clone().unwrap_or_default();

    let manager = StreamManager::new(&config.redis_url)?;
    let options = StreamOptions {
        max_length: Some(config.producer.options.max_length),
        ..StreamOptions::default()
    };
    manager.create_stream(&stream, options).await?;

    let producer = config.stream_producer()?;
    let message_id = producer
        .publish(
            "price.update",
            &serde_json::json!({"symbol": "AAPL", "price": 150.25}),
            Some([("source", "market-feed")].into()),
        )
        .await?;
    println!("Published message: {message_id}");
    producer.close().await
}
