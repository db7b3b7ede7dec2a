//! The router: handlers for two event types of the `orders` stream behind a middleware stack
//! (tracing, timeout, retry, dead-letter, panic recovery; one handler with a layer of its
//! own), and a clean shutdown on ctrl-c or SIGTERM.
//!
//! In memory by default; on Redis or NATS when `STREAMWISE_URL` (or `REDIS_URL`) is set. A
//! small producer publishes a few demo orders, one of them malformed (it ends in
//! `{orders}-dead`) and one that fails once (it is retried in-process). With
//! `ROUTER_DEMO_ONCE=1` the example stops by itself once the demo orders are handled.
//!
//! ```sh
//! cargo run --example router
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example router
//! STREAMWISE_URL=nats://127.0.0.1:4222 cargo run --features nats --example router
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamwise::router::{Handler, Json, Outcome, Router, State, shutdown_signal};
use streamwise::{Message, Publisher, StartFrom, SubscribeOptions};
use streamwise_middleware::catch_panic::CatchPanicLayer;
use streamwise_middleware::dead_letter::DeadLetterLayer;
use streamwise_middleware::retry::RetryLayer;
use streamwise_middleware::trace::TraceLayer;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    id: u32,
    customer: String,
    total_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderCancelled {
    id: u32,
}

/// Shared with the handlers: whether the flaky order already failed once.
#[derive(Clone, Default)]
struct App {
    flaked: Arc<AtomicBool>,
}

async fn on_placed(Json(order): Json<OrderPlaced>, State(app): State<App>) -> Result<Outcome, String> {
    if order.customer == "flaky" && !app.flaked.swap(true, Ordering::SeqCst) {
        return Err("the invoicing service is busy".into());
    }
    println!(
        "Order {} placed by {}: {} cents",
        order.id, order.customer, order.total_cents
    );
    let invoice = Message::new(
        "invoice.requested",
        &serde_json::json!({"order": order.id, "cents": order.total_cents}),
    )
    .map_err(|e| e.to_string())?;
    Ok(Outcome::ack().publish("invoices", invoice))
}

async fn on_cancelled(Json(order): Json<OrderCancelled>) {
    println!("Order {} cancelled", order.id);
}

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    // Colour only on a terminal: piped into a file or a log collector, plain text.
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    // STREAMWISE_URL (or REDIS_URL): redis://..., redis-cluster://..., nats://... (feature
    // `nats`); in memory without one.
    let url = streamwise::url_from_env().unwrap_or_else(|| "memory://".to_owned());
    let backend = streamwise::connect(&url).await?;
    println!("Using {} at {}", backend.kind(), backend.location()); // a password shown as ***
    let (publisher, subscriber) = (backend.publisher(), backend.subscriber());

    let router = Router::with_state(App::default());
    let routes = router
        .routes()
        .route("order.placed", on_placed)
        // A route-level layer: only cancellations have half a second.
        .route(
            "order.cancelled",
            on_cancelled.layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(500))),
        )
        // Innermost first: panics become errors, slow handlers time out, errors are retried
        // twice in-process, and the third failed delivery goes to {orders}-dead.
        .layer(CatchPanicLayer::new())
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(2)))
        .layer(RetryLayer::new(2)?.backoff(Duration::from_millis(50), Duration::from_secs(1))?)
        .layer(DeadLetterLayer::new(3)?);
    let options = SubscribeOptions::new("billing", "worker-1")
        .max_in_flight(8)
        .start_from(StartFrom::Latest);
    let router = router
        .layer(TraceLayer::new())
        .subscribe("orders", options, routes)
        .shutdown_deadline(Duration::from_secs(10));
    let running = router.start(subscriber, publisher.clone()).await?;

    let demo = [
        Message::new(
            "order.placed",
            &OrderPlaced {
                id: 1,
                customer: "ada".into(),
                total_cents: 1250,
            },
        )?,
        Message::new(
            "order.placed",
            &OrderPlaced {
                id: 2,
                customer: "flaky".into(),
                total_cents: 990,
            },
        )?,
        Message::new("order.cancelled", &OrderCancelled { id: 1 })?,
        Message::from_json_bytes("order.placed", r#"{"id": "not a number"}"#)?,
    ];
    let expected = demo.len() as u64;
    for message in demo {
        publisher.publish("orders", message).await?;
    }

    if std::env::var_os("ROUTER_DEMO_ONCE").is_some() {
        while running.handled() < expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        println!("Handling orders; press ctrl-c to stop");
        shutdown_signal().await;
    }
    let report = running.shutdown().await?;
    println!(
        "Router stopped: {} handled, {} abandoned",
        report.handled, report.abandoned
    );
    Ok(())
}
