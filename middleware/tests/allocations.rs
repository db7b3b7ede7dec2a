//! Heap allocations per delivery that each middleware adds to the service it wraps.
//!
//! The thin layers return named futures, so they add none; the layers that box say why in
//! their source (dedup awaits its store around the call; `from_fn`'s `Next` is type-erased).
//! Run with `--nocapture` to see every layer's count.
#![cfg(feature = "full")]

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use streamwise::checkpoint::MemoryCheckpointStore;
use streamwise::router::{Incoming, Outcome};
use streamwise::{BoxError, Message};
use streamwise_middleware::{
    catch_panic, checkpoint, circuit_breaker, correlation, dead_letter, dedup, delivery_limit, from_fn,
    retry, throttle, trace,
};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// dhat counts every block allocated (the workspace forbids the unsafe code of a hand-written
// counting allocator).
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// Acks without allocating. Not zero-sized, so that boxing a clone of it allocates, as with
/// a real handler.
#[derive(Clone)]
struct Ack(#[allow(dead_code)] u32);

impl Service<Incoming> for Ack {
    type Response = Outcome;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Outcome, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Incoming) -> Self::Future {
        std::future::ready(Ok(Outcome::ack()))
    }
}

/// What the router hands a layer: a boxed service (whose clones and futures allocate).
fn boxed() -> BoxCloneSyncService<Incoming, Outcome, BoxError> {
    BoxCloneSyncService::new(Ack(0))
}

const CALLS: u64 = 100;

/// Blocks allocated by `CALLS` deliveries through `svc` (the fewest of three runs), after a warm-up (which registers
/// `tracing` call sites and the like once). The (paused) clock moves on by `spacing` before
/// each call.
async fn allocations<S>(mut svc: S, incoming: &Incoming, spacing: Duration) -> u64
where
    S: Service<Incoming, Response = Outcome>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..10 {
        tokio::time::advance(spacing).await;
        svc.ready().await.unwrap().call(incoming.clone()).await.unwrap();
    }
    // dhat counts the whole process: the fewest of three windows leaves out a block that
    // another thread happened to allocate meanwhile (a layer that allocates per delivery
    // shows in every window).
    let mut fewest = u64::MAX;
    for _ in 0..3 {
        let before = dhat::HeapStats::get().total_blocks;
        for _ in 0..CALLS {
            tokio::time::advance(spacing).await;
            svc.ready().await.unwrap().call(incoming.clone()).await.unwrap();
        }
        fewest = fewest.min(dhat::HeapStats::get().total_blocks - before);
    }
    fewest
}

/// Allocations per delivery that `layer` adds around a plain and around a boxed service.
async fn added<L>(layer: L, incoming: &Incoming) -> (f64, f64)
where
    L: Layer<Ack> + Layer<BoxCloneSyncService<Incoming, Outcome, BoxError>>,
    <L as Layer<Ack>>::Service: Service<Incoming, Response = Outcome, Error = BoxError>,
    <L as Layer<BoxCloneSyncService<Incoming, Outcome, BoxError>>>::Service:
        Service<Incoming, Response = Outcome, Error = BoxError>,
{
    spaced(layer, incoming, Duration::ZERO).await
}

/// [`added`], with the clock moving on by `spacing` before each call.
async fn spaced<L>(layer: L, incoming: &Incoming, spacing: Duration) -> (f64, f64)
where
    L: Layer<Ack> + Layer<BoxCloneSyncService<Incoming, Outcome, BoxError>>,
    <L as Layer<Ack>>::Service: Service<Incoming, Response = Outcome, Error = BoxError>,
    <L as Layer<BoxCloneSyncService<Incoming, Outcome, BoxError>>>::Service:
        Service<Incoming, Response = Outcome, Error = BoxError>,
{
    let plain = allocations(layer.layer(Ack(0)), incoming, spacing).await
        - allocations(Ack(0), incoming, spacing).await;
    let around_boxed = allocations(layer.layer(boxed()), incoming, spacing).await
        - allocations(boxed(), incoming, spacing).await;
    (plain as f64 / CALLS as f64, around_boxed as f64 / CALLS as f64)
}

#[test]
fn thin_layers_add_no_allocation_per_delivery() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        // tokio's timer allocates once, when first used.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let incoming = Incoming::for_test(Message::new("t", &1).unwrap());
        let seconds = Duration::from_secs;
        let mut thin = vec![
            ("trace", added(trace::TraceLayer::new(), &incoming).await),
            (
                "catch_panic",
                added(catch_panic::CatchPanicLayer::new(), &incoming).await,
            ),
            (
                "dead_letter",
                added(dead_letter::DeadLetterLayer::new(3).unwrap(), &incoming).await,
            ),
            (
                "correlation (no messages out)",
                added(correlation::CorrelationLayer::new(), &incoming).await,
            ),
            (
                "delivery_limit",
                added(delivery_limit::DeliveryLimitLayer::new(5).unwrap(), &incoming).await,
            ),
            (
                "delivery_limit with warn_after",
                added(
                    delivery_limit::DeliveryLimitLayer::new(5)
                        .unwrap()
                        .warn_after(seconds(10))
                        .unwrap(),
                    &incoming,
                )
                .await,
            ),
            (
                "circuit_breaker",
                added(
                    circuit_breaker::CircuitBreakerLayer::new(5, seconds(30)).unwrap(),
                    &incoming,
                )
                .await,
            ),
            (
                "throttle (no wait)",
                spaced(
                    throttle::ThrottleLayer::new(10, seconds(1)).unwrap(),
                    &incoming,
                    Duration::from_millis(250),
                )
                .await,
            ),
            (
                "checkpoint (no write due)",
                added(
                    checkpoint::CheckpointLayer::new(Arc::new(MemoryCheckpointStore::new()))
                        .min_interval(seconds(3600)),
                    &incoming,
                )
                .await,
            ),
            (
                "tower::timeout",
                added(tower::timeout::TimeoutLayer::new(seconds(10)), &incoming).await,
            ),
        ];
        // tower's retry keeps a clone of the service in each call's future (to call it
        // again), and so does a throttled call (to call it once its slot has come); a boxed
        // service's clone is an allocation.
        let retry = added(retry::RetryLayer::new(3).unwrap(), &incoming).await;
        let throttled = added(throttle::ThrottleLayer::new(10, seconds(1)).unwrap(), &incoming).await;
        let boxing = [
            (
                "dedup (memory store)",
                added(
                    dedup::DedupLayer::new(Arc::new(dedup::MemoryDedupStore::new()), seconds(3600)).unwrap(),
                    &incoming,
                )
                .await,
            ),
            (
                "from_fn",
                added(
                    from_fn::from_fn(|incoming: Incoming, next: from_fn::Next| next.run(incoming)),
                    &incoming,
                )
                .await,
            ),
        ];
        let stack = ServiceBuilder::new()
            .layer(trace::TraceLayer::new())
            .layer(dead_letter::DeadLetterLayer::new(3).unwrap())
            .layer(retry::RetryLayer::new(3).unwrap())
            .layer(tower::timeout::TimeoutLayer::new(seconds(10)))
            .layer(catch_panic::CatchPanicLayer::new())
            .layer(correlation::CorrelationLayer::new())
            .service(Ack(0));
        let stack = allocations(stack, &incoming, Duration::ZERO).await as f64 / CALLS as f64;

        println!("allocations per delivery added (around a plain service, around a boxed one):");
        thin.push(("retry", retry));
        thin.push(("throttle (every call waits)", throttled));
        for (name, (plain, around_boxed)) in thin.iter().chain(&boxing) {
            println!("  {name}: {plain}, {around_boxed}");
        }
        println!("  trace, dead_letter, retry, timeout, catch_panic, correlation stacked: {stack}");

        for (name, (plain, around_boxed)) in &thin {
            assert_eq!(*plain, 0.0, "{name} allocates per delivery");
            let keeps_a_clone = name.starts_with("retry") || name.starts_with("throttle (every");
            let expected = if keeps_a_clone { 1.0 } else { 0.0 };
            assert_eq!(*around_boxed, expected, "{name} around a boxed service");
        }
        assert_eq!(stack, 0.0, "a stack of thin layers allocates per delivery");
    });
}
