//! A small order service with CQRS: `PlaceOrder` commands are handled once (competing
//! consumers), each produces an `OrderPlaced` event, and two event handlers (a mailer and a
//! sales counter) each get every event. A `GetOrderCount` query shows request/reply.
//!
//! In memory by default; on Redis or NATS when `STREAMWISE_URL` (or `REDIS_URL`) is set.
//! Stops by itself once the demo orders have gone through.
//!
//! ```sh
//! cargo run --example cqrs
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example cqrs
//! STREAMWISE_URL=nats://127.0.0.1:4222 cargo run --features nats --example cqrs
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamwise::cqrs::{Command, Cqrs, Event, Replies};
use streamwise::router::Router;
use streamwise_middleware::retry::RetryLayer;
use streamwise_middleware::trace::TraceLayer;

#[derive(Debug, Serialize, Deserialize)]
struct PlaceOrder {
    id: u32,
    customer: String,
    total_cents: u64,
}
impl Command for PlaceOrder {}

#[derive(Debug, Serialize, Deserialize)]
struct GetOrderCount;
impl Command for GetOrderCount {}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    id: u32,
    customer: String,
    total_cents: u64,
}
impl Event for OrderPlaced {}

#[derive(Default)]
struct Counters {
    orders: AtomicU64,
    mails: AtomicU64,
    revenue_cents: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // STREAMWISE_URL (or REDIS_URL): redis://..., redis-cluster://..., nats://... (feature
    // `nats`); in memory without one.
    let url = streamwise::url_from_env().unwrap_or_else(|| "memory://".to_owned());
    let backend = streamwise::connect(&url).await?;
    println!("Using {} at {}", backend.kind(), backend.location()); // a password shown as ***
    let (publisher, subscriber) = (backend.publisher(), backend.subscriber());
    let cqrs = Cqrs::new();
    let counters = Arc::new(Counters::default());

    let c = counters.clone();
    let commands = cqrs
        .command_processor("order-service")
        .handle(move |cmd: PlaceOrder| {
            let c = c.clone();
            async move {
                c.orders.fetch_add(1, Ordering::SeqCst);
                println!("Placing order {} for {}", cmd.id, cmd.customer);
                Ok::<_, Infallible>(OrderPlaced {
                    id: cmd.id,
                    customer: cmd.customer,
                    total_cents: cmd.total_cents,
                })
            }
        })
        .handle_with_reply({
            let c = counters.clone();
            move |_: GetOrderCount| {
                let c = c.clone();
                async move { Ok::<_, Infallible>(c.orders.load(Ordering::SeqCst)) }
            }
        })
        .layer(RetryLayer::new(2)?);
    let (mailer, sales) = (counters.clone(), counters.clone());
    let events = cqrs
        .event_processor()
        .handle("mailer", move |e: OrderPlaced| {
            let c = mailer.clone();
            async move {
                println!("Mailing {} about order {}", e.customer, e.id);
                c.mails.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        })
        .handle("sales", move |e: OrderPlaced| {
            let c = sales.clone();
            async move {
                c.revenue_cents.fetch_add(e.total_cents, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            }
        });
    let router = Router::new().layer(TraceLayer::new());
    let router = commands.register(router, "worker-1")?;
    let router = events.register(router, "worker-1")?;
    let running = router.start(subscriber.clone(), publisher.clone()).await?;

    let bus = cqrs
        .command_bus(publisher.clone())
        .with_replies(Replies::listen(subscriber.clone()).await?);
    let orders = [("ada", 1250), ("bob", 990), ("cy", 4200)];
    let (mails_before, revenue_before) = (
        counters.mails.load(Ordering::SeqCst),
        counters.revenue_cents.load(Ordering::SeqCst),
    );
    for (i, (customer, total_cents)) in orders.iter().enumerate() {
        let cmd = PlaceOrder {
            id: i as u32 + 1,
            customer: (*customer).into(),
            total_cents: *total_cents,
        };
        bus.send(&cmd).await?;
    }
    let expected_revenue: u64 = orders.iter().map(|(_, cents)| cents).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while counters.mails.load(Ordering::SeqCst) < mails_before + orders.len() as u64
        || counters.revenue_cents.load(Ordering::SeqCst) < revenue_before + expected_revenue
    {
        if tokio::time::Instant::now() > deadline {
            eprintln!("the demo orders did not go through in time");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let count: u64 = bus.send_and_wait(&GetOrderCount, Duration::from_secs(10)).await?;
    println!("Orders handled by this service: {count}");
    println!(
        "Mails sent: {}, revenue: {} cents",
        counters.mails.load(Ordering::SeqCst),
        counters.revenue_cents.load(Ordering::SeqCst)
    );
    let report = running.shutdown().await?;
    println!("Service stopped after {} deliveries", report.handled);
    Ok(())
}
