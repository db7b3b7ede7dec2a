//! The outbox and the inbox end to end: placing an order writes the order row and its
//! `OrderPlaced` event in one PostgreSQL transaction (a failed placement writes neither); the
//! relay sends committed events to the broker; a consumer behind the inbox updates a read
//! model in PostgreSQL exactly once per event, even when an event arrives twice.
//!
//! On a private PostgreSQL it starts itself (Debian's `postgresql` package), or on the one
//! `DATABASE_URL` names; in memory, or on the backend `STREAMWISE_URL` (or `REDIS_URL`) names:
//! `redis://...`, `redis-cluster://...`, `nats://...`.
//!
//! ```sh
//! cargo run -p streamwise-outbox --example outbox
//! DATABASE_URL=postgresql://postgres@127.0.0.1:5433/demo STREAMWISE_URL=redis://127.0.0.1:6379 \
//!     cargo run -p streamwise-outbox --example outbox
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use streamwise::router::{Handler, Json, Router, Routes};
use streamwise::{Message, Publisher, SubscribeOptions};
use streamwise_outbox::deadpool_postgres::{Manager, Pool};
use streamwise_outbox::testing::PostgresServer;
use streamwise_outbox::tokio_postgres::{self, NoTls};
use streamwise_outbox::{InboxLayer, InboxTx, Outbox, Relay, migrate};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    id: i64,
    total_cents: i64,
}

/// Places an order: the row and its event commit together, or neither does.
async fn place_order(
    client: &mut tokio_postgres::Client,
    outbox: &Outbox,
    id: i64,
    total_cents: i64,
) -> Result<Message, streamwise_outbox::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO orders (id, total_cents) VALUES ($1, $2)",
        &[&id, &total_cents],
    )
    .await?;
    let event = Message::new("order.placed", &OrderPlaced { id, total_cents })?;
    outbox.publish(&tx, "outbox-orders", &event).await?;
    tx.commit().await?;
    Ok(event)
}

/// The read model's handler: its update and the inbox record commit together.
async fn on_order_placed(
    Json(order): Json<OrderPlaced>,
    tx: InboxTx,
) -> Result<(), streamwise_outbox::Error> {
    tx.execute(
        "UPDATE order_stats SET orders = orders + 1, revenue_cents = revenue_cents + $1",
        &[&order.total_cents],
    )
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // PostgreSQL: the one DATABASE_URL names, or a private server for the demo.
    let mut _private = None;
    let config: tokio_postgres::Config = match std::env::var("DATABASE_URL") {
        Ok(url) => url.parse()?,
        Err(_) => {
            let server = PostgresServer::start()?;
            println!("Using a private PostgreSQL on port {}", server.port());
            let config = server.config();
            _private = Some(server);
            config
        }
    };
    let (mut client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    migrate(&mut client).await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS orders, order_stats;
             CREATE TABLE orders (id bigint PRIMARY KEY, total_cents bigint NOT NULL);
             CREATE TABLE order_stats (orders bigint NOT NULL, revenue_cents bigint NOT NULL);
             INSERT INTO order_stats VALUES (0, 0);
             TRUNCATE streamwise_outbox, streamwise_inbox;",
        )
        .await?;

    let url = streamwise::url_from_env().unwrap_or_else(|| "memory://".to_owned());
    let backend = streamwise::connect(&url).await?;
    println!("Using {} at {}", backend.kind(), backend.location()); // a password shown as ***
    let (publisher, subscriber) = (backend.publisher(), backend.subscriber());

    // The relay: committed events to the broker.
    let relay = Relay::new(config.clone(), NoTls, publisher.clone()).start()?;

    // The consumer: the read model behind the inbox.
    let pool = Pool::builder(Manager::new(config.clone(), NoTls))
        .max_size(8)
        .build()?;
    // Counts the deliveries the consumer finished, skipped duplicates included.
    let finished = Arc::new(AtomicU64::new(0));
    let count = finished.clone();
    let routes = Routes::new()
        .route("order.placed", on_order_placed.layer(InboxLayer::new(pool)))
        .layer(tower::util::MapResponseLayer::new(move |outcome| {
            count.fetch_add(1, Ordering::SeqCst);
            outcome
        }));
    let router = Router::new().subscribe(
        "outbox-orders",
        SubscribeOptions::new("read-model", "worker-1"),
        routes,
    );
    let running = router.start(subscriber, publisher.clone()).await?;

    let outbox = Outbox::new();
    let first = place_order(&mut client, &outbox, 1, 1999).await?;
    place_order(&mut client, &outbox, 2, 4441).await?;
    // Order 1 again: the insert fails, the transaction rolls back, and no event is sent.
    match place_order(&mut client, &outbox, 1, 500).await {
        Ok(_) => return Err("a duplicate order was accepted".into()),
        Err(e) => println!("Order 1 refused the second time ({e}); no event sent"),
    }
    // The broker delivers order 1's event a second time (as after a relay crash).
    publisher.publish("outbox-orders", first).await?;

    // Three deliveries: orders 1 and 2 from the relay, and order 1's again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished.load(Ordering::SeqCst) < 3 {
        if Instant::now() > deadline {
            return Err("the consumer did not finish three deliveries in 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await?;
    let stats = relay.stop().await;
    let row = client
        .query_one("SELECT orders, revenue_cents FROM order_stats", &[])
        .await?;
    let (orders, revenue): (i64, i64) = (row.get(0), row.get(1));
    println!("Relay sent {} events; the consumer took 3 deliveries", stats.sent);
    println!("Read model: {orders} orders, {revenue} cents");
    Ok(())
}
