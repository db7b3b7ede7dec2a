//! Heap allocations per delivery that each middleware adds (scratch: before).
#![cfg(feature = "full")]

use std::sync::Arc;
use std::time::Duration;

use streamwise::router::{Incoming, Outcome};
use streamwise::{BoxError, Message};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

#[derive(Clone)]
/// Not zero-sized, so that boxing a clone of it allocates as a real handler does.
struct Ack(#[allow(dead_code)] u32);

impl Service<Incoming> for Ack {
    type Response = Outcome;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Outcome, BoxError>>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Incoming) -> Self::Future {
        std::future::ready(Ok(Outcome::ack()))
    }
}

const CALLS: u64 = 200;

async fn per_call<S>(mut svc: S, incoming: &Incoming) -> f64
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..10 {
        svc.ready().await.unwrap().call(incoming.clone()).await.unwrap();
    }
    let before = dhat::HeapStats::get().total_blocks;
    for _ in 0..CALLS {
        svc.ready().await.unwrap().call(incoming.clone()).await.unwrap();
    }
    (dhat::HeapStats::get().total_blocks - before) as f64 / CALLS as f64
}

#[test]
fn allocations_per_delivery() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use streamwise_middleware::*;
        let incoming = Incoming::for_test(Message::new("t", &1).unwrap());
        let bare = per_call(Ack(0), &incoming).await;
        let boxed = || tower::util::BoxCloneSyncService::new(Ack(0));
        let bare_boxed = per_call(boxed(), &incoming).await;
        let mut rows = Vec::new();
        macro_rules! row {
            ($name:expr, $layer:expr) => {{
                let n = per_call($layer.layer(Ack(0)), &incoming).await - bare;
                let b = per_call($layer.layer(boxed()), &incoming).await - bare_boxed;
                rows.push(($name, n, b));
            }};
        }
        row!("trace", trace::TraceLayer::new());
        row!(
            "timeout",
            timeout::TimeoutLayer::new(Duration::from_secs(10)).unwrap()
        );
        row!("catch_panic", catch_panic::CatchPanicLayer::new());
        row!("dead_letter", dead_letter::DeadLetterLayer::new(3).unwrap());
        row!("correlation", correlation::CorrelationLayer::new());
        row!("delivery_limit", delivery_limit::DeliveryLimitLayer::new(5).unwrap());
        row!(
            "delivery_limit+warn_after",
            delivery_limit::DeliveryLimitLayer::new(5)
                .unwrap()
                .warn_after(Duration::from_secs(10))
                .unwrap()
        );
        row!(
            "circuit_breaker",
            circuit_breaker::CircuitBreakerLayer::new(5, Duration::from_secs(30)).unwrap()
        );
        row!(
            "throttle",
            throttle::ThrottleLayer::new(u32::MAX, Duration::from_secs(1)).unwrap()
        );
        row!("retry", retry::RetryLayer::new(3).unwrap());
        row!(
            "checkpoint",
            checkpoint::CheckpointLayer::new(Arc::new(streamwise::checkpoint::MemoryCheckpointStore::new()))
                .min_interval(Duration::from_secs(3600))
        );
        row!(
            "dedup",
            dedup::DedupLayer::new(
                Arc::new(dedup::MemoryDedupStore::new()),
                Duration::from_secs(3600)
            )
            .unwrap()
        );
        row!(
            "from_fn",
            from_fn::from_fn(|i: Incoming, next: from_fn::Next| next.run(i))
        );
        let stack = tower::ServiceBuilder::new()
            .layer(trace::TraceLayer::new())
            .layer(dead_letter::DeadLetterLayer::new(3).unwrap())
            .layer(retry::RetryLayer::new(3).unwrap())
            .layer(timeout::TimeoutLayer::new(Duration::from_secs(10)).unwrap())
            .layer(catch_panic::CatchPanicLayer::new())
            .layer(correlation::CorrelationLayer::new())
            .service(Ack(0));
        rows.push((
            "stack: trace, dead_letter, retry, timeout, catch_panic, correlation",
            per_call(stack, &incoming).await - bare,
            f64::NAN,
        ));
        println!("bare service: {bare} allocations per call");
        println!("bare boxed service: {bare_boxed} allocations per call");
        for (name, n, b) in rows {
            println!("{name}: +{n} (around a boxed service: +{b})");
        }
    });
}
