//! Logs: what a failed or dead-lettered delivery logs. A binary of its own, with one test:
//! a subscriber set for one thread misses events whose callsites other threads of the same
//! process register meanwhile (tracing caches a callsite's interest process-wide).

use std::sync::Arc;
use std::time::Duration;

use streamwise::memory::MemoryBackend;
use streamwise::router::Router;
use streamwise::testing::wait_until_handled;
use streamwise::{Message, Publisher, SubscribeOptions};

/// One log line per failed delivery, not one from the router and another from the trace
/// layer; a dead-lettered delivery is logged as dead-lettered, not also as "not acknowledged".
#[tokio::test]
async fn a_failed_or_dead_lettered_delivery_is_logged_once() {
    use streamwise::router::{DeliveryInfo, Permanent, RetryBackoff};
    use streamwise_middleware::trace::TraceLayer;
    let captured = streamwise::testing::CapturedLogs::new();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.make_writer())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    async fn flaky(info: DeliveryInfo) -> std::result::Result<(), streamwise::BoxError> {
        if info.delivery_count() == 1 {
            return Err("flaky-failure".into());
        }
        Ok(())
    }
    async fn poison() -> std::result::Result<(), streamwise::BoxError> {
        Err(Permanent::new("poison-refused").into())
    }
    let backend = MemoryBackend::new();
    let router = Router::new().retry_backoff(RetryBackoff::exponential(
        Duration::from_millis(5),
        Duration::from_millis(5),
    ));
    let routes = router
        .routes()
        .layer(TraceLayer::new())
        .route("flaky", flaky)
        .route("poison", poison);
    let running = router
        .subscribe("logged", SubscribeOptions::new("svc", "w1"), routes)
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    let publisher = backend.publisher();
    publisher
        .publish("logged", Message::new("flaky", &1).unwrap())
        .await
        .unwrap();
    publisher
        .publish("logged", Message::new("poison", &2).unwrap())
        .await
        .unwrap();
    wait_until_handled(&running, 3).await;
    running.shutdown().await.unwrap();

    let text = captured.text();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    let about = |needle: &str| warnings.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(about("flaky-failure"), 1, "the failure, once: {warnings:#?}");
    assert_eq!(about("not acknowledged"), 0, "{warnings:#?}");
    assert!(
        warnings.iter().any(|l| l.contains("dead-lettered")),
        "the dead letter itself is logged: {warnings:#?}"
    );
}
