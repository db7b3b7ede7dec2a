//! Backends chosen by URL (`streamwise::connect`): the same router (a handler that publishes
//! what it handles before its delivery is acked, and a malformed message dead-lettered) runs
//! unchanged on memory://, redis://, redis+unix:// and nats://, each on a private server.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use streamwise::router::{Json, Outcome, Router};
use streamwise::testing::{RedisServer, wait_until_handled};
use streamwise::{Backend, BackendKind, Message, SubscribeOptions, dead_letter};

const WAIT: Duration = Duration::from_secs(20);

async fn the_router_runs_on(backend: Backend) {
    let publisher = backend.publisher();
    let subscriber = backend.subscriber();
    async fn handle(Json(n): Json<u32>) -> streamwise::Result<Outcome> {
        Ok(Outcome::ack().publish("doubled", Message::new("doubled", &(n * 2))?))
    }
    let router = Router::new();
    let routes = router.routes().route("n", handle);
    let options = SubscribeOptions::new("workers", "w1").block(Duration::from_millis(200));
    let running = router
        .subscribe("numbers", options, routes)
        .start(subscriber.clone(), publisher.clone())
        .await
        .expect("router");
    for n in 1..=3u32 {
        publisher
            .publish("numbers", Message::new("n", &n).unwrap())
            .await
            .unwrap();
    }
    publisher
        .publish("numbers", Message::new("n", &"not a number").unwrap())
        .await
        .unwrap();
    wait_until_handled(&running, 4).await;

    let mut doubled = subscriber
        .subscribe(
            "doubled",
            SubscribeOptions::new("check", "c").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(WAIT, doubled.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(d.message().decode::<u32>().unwrap());
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, [2, 4, 6], "on {}", backend.location());
    let mut dead = subscriber
        .subscribe(
            &dead_letter::stream_for("numbers"),
            SubscribeOptions::new("check", "c").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let record = tokio::time::timeout(WAIT, dead.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(record.message().decode::<String>().unwrap(), "not a number");
    record.ack().await.unwrap();
    drop((doubled, dead));
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.abandoned, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_by_url() {
    let backend = streamwise::connect("memory://").await.unwrap();
    assert_eq!(backend.kind(), BackendKind::Memory);
    assert!(backend.coordinator().is_some());
    the_router_runs_on(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_by_url() {
    let server = RedisServer::start_with(&["--requirepass", "hunter2-pw"]);
    let url = format!("redis://:hunter2-pw@127.0.0.1:{}", server.port());
    let backend = streamwise::connect(&url).await.unwrap();
    assert_eq!(backend.kind(), BackendKind::Redis);
    assert!(
        !backend.location().contains("hunter2-pw"),
        "{}",
        backend.location()
    );
    assert!(!format!("{backend:?}").contains("hunter2-pw"));
    the_router_runs_on(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_on_a_unix_socket_by_url() {
    let dir = std::env::temp_dir().join(format!("streamwise-by-url-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("redis.sock");
    let server = RedisServer::start_with(&["--unixsocket", socket.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + WAIT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let backend = streamwise::connect(&format!("redis+unix://{}", socket.display()))
        .await
        .unwrap();
    assert_eq!(backend.kind(), BackendKind::Redis);
    the_router_runs_on(backend).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_by_url() {
    let server = streamwise::testing::NatsServer::start_with(&["--user", "alice", "--pass", "hunter2-pw"]);
    let url = format!("nats://alice:hunter2-pw@127.0.0.1:{}", server.port());
    let backend = streamwise::connect(&url).await.unwrap();
    assert_eq!(backend.kind(), BackendKind::Nats);
    assert_eq!(
        backend.location(),
        format!("nats://alice:***@127.0.0.1:{}", server.port())
    );
    assert!(backend.coordinator().is_none());
    the_router_runs_on(backend).await;
}

#[cfg(not(feature = "nats"))]
#[tokio::test]
async fn nats_urls_need_the_feature() {
    let err = streamwise::connect("nats://u:hunter2-pw@127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.invalid_field(), Some("url"));
    assert!(err.to_string().contains("`nats` feature") && !err.to_string().contains("hunter2-pw"));
}

/// The subscriber a `Backend` gives is shared: closing it is for all its users, as with any
/// `Arc<dyn Subscriber>`.
#[tokio::test]
async fn publisher_and_subscriber_are_shared_handles() {
    let backend = streamwise::connect("memory://").await.unwrap();
    assert!(Arc::ptr_eq(&backend.subscriber(), &backend.subscriber()));
    assert!(Arc::ptr_eq(&backend.publisher(), &backend.publisher()));
}
