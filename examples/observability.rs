//! Observability: a router whose metrics a Prometheus exporter serves on `/metrics`, beside
//! `/healthz` (alive: not failed or stopped) and `/readyz` (ready: every subscription reads),
//! on `METRICS_ADDR` (default `127.0.0.1:9464`). In memory by default; on Redis when
//! `STREAMWISE_URL` (or `REDIS_URL`) names a Redis server, with a group monitor for the lag
//! and pending gauges.
//!
//! ```sh
//! cargo run --features metrics --example observability
//! OBS_DEMO_MESSAGES=100 cargo run --features metrics --example observability
//! curl -s 127.0.0.1:9464/metrics | grep streamwise_
//! ```
//!
//! With `OBS_DEMO_MESSAGES=N` it publishes N orders (every tenth fails once and is retried)
//! and prints a line once all are handled; it serves until SIGINT (ctrl-c), then shuts the
//! router down. `docs/grafana-dashboard.json` charts these metrics.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use streamwise::memory::MemoryBackend;
use streamwise::redis::{GroupMonitor, RedisBackend};
use streamwise::router::{DeliveryInfo, Json, RetryBackoff, Router, RouterHealth};
use streamwise::{BoxError, Message, Publisher, SubscribeOptions, Subscriber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPIC: &str = "obs-orders";
const GROUP: &str = "fulfilment";

/// Handles an order; every tenth fails on its first delivery, to show retries in the metrics.
async fn fulfil(Json(order): Json<u64>, info: DeliveryInfo) -> Result<(), BoxError> {
    if order % 10 == 0 && info.delivery_count() == 1 {
        return Err(format!("order {order}: warehouse busy, try again").into());
    }
    Ok(())
}

/// Answers one HTTP request: `/metrics`, `/healthz`, `/readyz`, else 404.
async fn answer(mut stream: tokio::net::TcpStream, metrics: PrometheusHandle, health: RouterHealth) {
    let mut request = [0u8; 1024];
    let Ok(n) = stream.read(&mut request).await else {
        return;
    };
    let line = String::from_utf8_lossy(&request[..n]);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let overall = health.overall();
    let (status, body) = match path {
        "/metrics" => ("200 OK", metrics.render()),
        "/healthz" => match overall {
            streamwise::router::Health::Failed { .. } | streamwise::router::Health::Stopped => {
                ("503 Service Unavailable", format!("{overall:?}\n"))
            }
            _ => ("200 OK", format!("{overall:?}\n")),
        },
        "/readyz" if overall.is_ready() => ("200 OK", "Ready\n".to_owned()),
        "/readyz" => ("503 Service Unavailable", format!("{overall:?}\n")),
        _ => ("404 Not Found", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    // The recorder first: publishers and routers take their handles when they start.
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])?
        .install_recorder()?;

    let mut monitor = None;
    let (publisher, subscriber): (Arc<dyn Publisher>, Arc<dyn Subscriber>) = match streamwise::url_from_env()
    {
        // A Redis URL: the group monitor reads the Redis group's figures.
        Some(url) => {
            let redis = RedisBackend::new(&url)?;
            println!("Using Redis at {}", redis.connection().url());
            monitor = Some(
                GroupMonitor::new(redis.connection().clone())
                    .watch(TOPIC, GROUP)?
                    .interval(Duration::from_secs(1))?
                    .spawn(),
            );
            (Arc::new(redis.publisher()), Arc::new(redis.subscriber()?))
        }
        None => {
            println!("Using the in-memory backend (set STREAMWISE_URL to use Redis)");
            let memory = MemoryBackend::new();
            (Arc::new(memory.publisher()), Arc::new(memory.subscriber()))
        }
    };

    let router = Router::new().retry_backoff(RetryBackoff::exponential(
        Duration::from_millis(50),
        Duration::from_secs(1),
    ));
    let routes = router.routes().route("order.placed", fulfil);
    let router = router.subscribe(TOPIC, SubscribeOptions::new(GROUP, "worker-1"), routes);
    let health = router.health();

    let addr = std::env::var("METRICS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("Serving /metrics, /healthz and /readyz on http://{addr}");
    let (serve_metrics, serve_health) = (metrics.clone(), health.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, serve_metrics.clone(), serve_health.clone()));
        }
    });
    // Histograms are summarised on upkeep.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let running = router.start(subscriber, publisher.clone()).await?;
    if let Some(n) = std::env::var("OBS_DEMO_MESSAGES")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        for order in 1..=n {
            publisher
                .publish(TOPIC, Message::new("order.placed", &order)?)
                .await?;
        }
        // Each order once, and every tenth once more (its retry).
        let deliveries = n + n / 10;
        while running.handled() < deliveries {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("Handled {n} orders ({deliveries} deliveries)");
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        e = running.failed() => eprintln!("the router stopped: {e}"),
    }
    let report = running.shutdown().await?;
    drop(monitor);
    println!(
        "Router stopped: {} handled, {} abandoned",
        report.handled, report.abandoned
    );
    Ok(())
}
