//! The NATS backend beyond the conformance suite: credentials, entry ids and start
//! positions, in-progress heartbeats of long handlers, leases of crashed consumers, capped
//! publishes, missing streams. Each test starts its own `nats-server -js`.

#![cfg(feature = "nats")]

mod common;

use std::time::Duration;

use futures::StreamExt;
use streamwise::nats::{NatsBackend, NatsPublisherOptions, NatsSubscriberOptions};
use streamwise::testing::NatsServer;
use streamwise::{
    Delivery, EntryId, Error, Message, Publisher, StartFrom, SubscribeOptions, Subscriber, Subscription,
};

const WAIT: Duration = Duration::from_secs(20);

async fn recv(sub: &mut Subscription) -> Delivery {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn quiet(sub: &mut Subscription, for_: Duration, why: &str) {
    if let Ok(item) = tokio::time::timeout(for_, sub.next()).await {
        panic!("{why}: got {item:?}");
    }
}

fn opts(group: &str, consumer: &str) -> SubscribeOptions {
    SubscribeOptions::new(group, consumer).block(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_never_shown() {
    let server = NatsServer::start_with(&["--user", "alice", "--pass", "s3cret-pw"]);
    let wrong = format!("nats://alice:wr0ng-pw@127.0.0.1:{}", server.port());
    let err = NatsBackend::connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("wr0ng-pw"), "{text}");
        assert!(text.contains("alice:***@"), "{text}");
    }
    let right = format!("nats://alice:s3cret-pw@127.0.0.1:{}", server.port());
    let nats = NatsBackend::connect(&right).await.expect("connect");
    assert!(!format!("{nats:?}").contains("s3cret-pw"));
    let id = nats
        .publisher()
        .publish("creds", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    assert_eq!(id, EntryId::new(0, 1));
    let bad = NatsBackend::connect("redis://alice:s3cret-pw@host:1")
        .await
        .unwrap_err();
    assert_eq!(bad.invalid_field(), Some("url"));
    assert!(!bad.to_string().contains("s3cret-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_stream_sequences_and_start_from_after_takes_one() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    let publisher = nats.publisher();
    let ids = publisher
        .publish_batch("seq", (1..=3).map(|n| Message::new("n", &n).unwrap()).collect())
        .await
        .unwrap();
    assert_eq!(ids, [EntryId::new(0, 1), EntryId::new(0, 2), EntryId::new(0, 3)]);
    assert_eq!(nats.stream_len("seq").await.unwrap(), 3);
    let subscriber = nats.subscriber();
    let mut sub = subscriber
        .subscribe("seq", opts("after", "c").start_from(StartFrom::After(ids[1])))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.message().decode::<i32>().unwrap()), (ids[2], 3));
    d.ack().await.unwrap();
    let err = subscriber
        .subscribe(
            "seq",
            opts("other", "c").start_from(StartFrom::After(EntryId::new(5, 1))),
        )
        .await
        .unwrap_err();
    assert_eq!(err.invalid_field(), Some("start_from"));
    subscriber.close().await.unwrap();
    assert_eq!(nats.pending_count("seq", "after").await.unwrap(), 0);
}

/// A second pull goes out once half of the first one's messages were taken, so that the
/// server has the next request before the first is done (no round trip's pause per batch on a
/// backlog), and both are backed by slots: what the server hands out stays within
/// `max_in_flight`. Nothing is lost or handed out twice on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_goes_ahead_of_the_last_within_max_in_flight() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    nats.publisher()
        .publish_batch(
            "ahead",
            (0..1000u64).map(|n| Message::new("n", &n).unwrap()).collect(),
        )
        .await
        .unwrap();
    let subscriber = nats.subscriber();
    let mut sub = subscriber
        .subscribe(
            "ahead",
            opts("g", "c")
                .batch_size(100)
                .max_in_flight(400)
                .start_from(StartFrom::Beginning),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(recv(&mut sub).await);
    }
    // What the server handed out and waits acks for: the first pull's 100, and the 100 of the
    // pull sent when 50 had been taken.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        js.get_consumer_from_stream("g", "ahead").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let out = loop {
        let out = consumer.info().await.unwrap().num_ack_pending;
        if out >= 200 || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        out, 200,
        "messages handed out with 60 taken of a first pull of 100"
    );
    let mut seen: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for d in held {
        assert!(seen.insert(d.message().decode().unwrap()));
        d.ack().await.unwrap();
    }
    while seen.len() < 1000 {
        let d = recv(&mut sub).await;
        assert!(seen.insert(d.message().decode().unwrap()), "{:?} twice", d.id());
        d.ack().await.unwrap();
    }
    assert!(consumer.info().await.unwrap().num_ack_pending <= 400);
    subscriber.close().await.unwrap();
    assert_eq!(nats.pending_count("ahead", "g").await.unwrap(), 0);
}

/// A handler that runs for several `ack_wait`s keeps its delivery: the in-progress
/// heartbeats stop the server from handing it to another consumer of the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_delivery_past_ack_wait() {
    let server = NatsServer::start();
    // Heartbeats every 670 ms; the delivery is watched for three times `ack_wait`.
    let ack_wait = Duration::from_secs(2);
    let options = NatsSubscriberOptions::default().ack_wait(ack_wait);
    let slow = NatsBackend::connect(&server.url()).await.unwrap();
    let other = NatsBackend::connect(&server.url()).await.unwrap();
    slow.publisher()
        .publish("long", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let slow_sub = slow.subscriber_with(options.clone()).unwrap();
    let mut mine = slow_sub.subscribe("long", opts("g", "slow")).await.unwrap();
    let held = recv(&mut mine).await;
    let other_sub = other.subscriber_with(options).unwrap();
    let mut theirs = other_sub.subscribe("long", opts("g", "other")).await.unwrap();
    quiet(
        &mut theirs,
        ack_wait * 4,
        "a held delivery went to another consumer",
    )
    .await;
    assert_eq!(held.delivery_count(), 1);
    held.ack().await.unwrap();
    mine.flush().await.unwrap();
    assert_eq!(slow.pending_count("long", "g").await.unwrap(), 0);
    slow_sub.close().await.unwrap();
    other_sub.close().await.unwrap();
}

/// A process that dies without closing keeps its consumer name for the lease TTL (a second
/// process is refused meanwhile), then the name is free and the group gets back what the
/// dead one held, after `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_consumers_name_and_deliveries_come_back() {
    let server = NatsServer::start();
    let url = server.url();
    let options = NatsSubscriberOptions::default()
        .ack_wait(Duration::from_secs(1))
        .lease_ttl(Duration::from_secs(4));
    let nats = NatsBackend::connect(&url).await.unwrap();
    let id = nats
        .publisher()
        .publish("crash", Message::new("t", &7).unwrap())
        .await
        .unwrap();

    // The "process": a runtime of its own, shut down with its tasks mid-flight.
    let (url2, options2) = (url.clone(), options.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let own = NatsBackend::connect(&url2).await.unwrap();
            let subscriber = own.subscriber_with(options2).unwrap();
            let mut sub = subscriber.subscribe("crash", opts("g", "worker")).await.unwrap();
            let d = recv(&mut sub).await;
            std::mem::forget(d);
            std::mem::forget(sub);
            std::mem::forget(subscriber);
        });
        runtime.shutdown_background();
    })
    .join()
    .unwrap();
    let crashed_at = tokio::time::Instant::now();

    let subscriber = nats.subscriber_with(options).unwrap();
    match subscriber.subscribe("crash", opts("g", "worker")).await {
        Err(Error::ConsumerActive { consumer, .. }) => assert_eq!(consumer, "worker"),
        other => panic!("expected ConsumerActive while the lease lives, got {other:?}"),
    }
    let mut sub = loop {
        match subscriber.subscribe("crash", opts("g", "worker")).await {
            Ok(sub) => break sub,
            Err(Error::ConsumerActive { .. }) => {
                assert!(crashed_at.elapsed() < WAIT, "the dead lease never ran out");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let d = recv(&mut sub).await;
    assert_eq!((d.id(), d.delivery_count()), (id, 2));
    d.ack().await.unwrap();
    subscriber.close().await.unwrap();
    assert_eq!(nats.pending_count("crash", "g").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_publishes_bound_the_stream_and_missing_streams_are_reported() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    let publisher = nats.publisher();
    for n in 0..5 {
        publisher
            .publish_capped("capped", Message::new("n", &n).unwrap(), 3)
            .await
            .unwrap();
    }
    assert_eq!(nats.stream_len("capped").await.unwrap(), 3);

    let strict = nats
        .publisher_with(NatsPublisherOptions::default().auto_create(false))
        .unwrap();
    match strict.publish("absent", Message::new("n", &1).unwrap()).await {
        Err(Error::StreamNotFound { stream }) => assert_eq!(stream, "absent"),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    let small = nats
        .publisher_with(NatsPublisherOptions::default().max_entry_size(100))
        .unwrap();
    assert!(matches!(
        small
            .publish("capped", Message::new("n", &"x".repeat(200)).unwrap())
            .await,
        Err(Error::PayloadTooLarge { limit: 100, .. })
    ));
    // Larger than the server's max_payload (1 MiB) though within the entry limit.
    let big = nats
        .publisher_with(NatsPublisherOptions::default().max_entry_size(4 << 20))
        .unwrap();
    assert!(matches!(
        big.publish("capped", Message::new("n", &"x".repeat(2 << 20)).unwrap())
            .await,
        Err(Error::PayloadTooLarge { .. })
    ));
    let subscriber = nats.subscriber();
    subscriber.delete_topic("capped").await.unwrap();
    assert!(matches!(
        nats.stream_len("capped").await,
        Err(Error::StreamNotFound { .. })
    ));
}

/// TLS from the URL: a `tls://` URL with the test CA in its query talks to a server with a
/// certificate of that CA; without the CA the certificate is refused; a server that verifies
/// clients takes the client certificate named in the query, and refuses a client without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_come_from_the_url() {
    let dir = std::env::temp_dir().join(format!("streamwise-nats-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::certs::make_certificates(&dir, "nats");
    let file = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (
        file("nats-ca.pem"),
        file("nats-server.pem"),
        file("nats-server.key"),
    );
    let server = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key]);
    let port = server.port();

    let trusted = format!("tls://127.0.0.1:{port}?tls_ca={ca}");
    let nats = NatsBackend::connect(&trusted)
        .await
        .expect("TLS with the test CA");
    let id = nats
        .publisher()
        .publish("tls", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    assert_eq!(id, EntryId::new(0, 1));
    let untrusted = NatsBackend::connect(&format!("tls://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(matches!(untrusted, Error::Connection { .. }), "{untrusted:?}");

    let (client_cert, client_key) = (file("nats-client.pem"), file("nats-client.key"));
    let mutual = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--tlsverify",
        "--tlscacert",
        &ca,
    ]);
    let with_cert = format!(
        "nats://127.0.0.1:{}?tls_ca={ca}&tls_cert={client_cert}&tls_key={client_key}",
        mutual.port()
    );
    let nats = NatsBackend::connect(&with_cert).await.expect("mutual TLS");
    nats.publisher()
        .publish("tls", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let without = format!("nats://127.0.0.1:{}?tls_ca={ca}", mutual.port());
    assert!(
        NatsBackend::connect(&without).await.is_err(),
        "a client without a certificate got in"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nothing logged at DEBUG and above, by streamwise or by the NATS client, shows the password:
/// the client is given the servers without credentials (it logs server addresses), and the
/// credentials as options. (async-nats writes its CONNECT message, password included, at
/// TRACE: the README says to keep its target below that.)
#[tokio::test(flavor = "current_thread")]
async fn passwords_are_not_logged() {
    use streamwise::testing::CapturedLogs;
    let logs = CapturedLogs::new();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.make_writer())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = NatsServer::start_with(&["--user", "alice", "--pass", "pw-d0nt-l0g"]);
    let port = server.port();
    let _ = NatsBackend::connect(&format!("nats://alice:wrong-pw-d0nt-l0g@127.0.0.1:{port}")).await;
    let nats = NatsBackend::connect(&format!("nats://alice:pw-d0nt-l0g@127.0.0.1:{port}"))
        .await
        .unwrap();
    nats.publisher()
        .publish("logs", Message::new("t", &"not a number").unwrap())
        .await
        .unwrap();
    nats.publisher()
        .publish("logs", Message::from_json_bytes("t", &b"not json"[..]).unwrap())
        .await
        .unwrap();
    let subscriber = nats.subscriber();
    let mut sub = subscriber.subscribe("logs", opts("g", "c")).await.unwrap();
    let d = recv(&mut sub).await;
    d.dead_letter("logged reason").await.unwrap();
    // Reading on meets the payload that is not JSON: dead-lettered, and logged.
    quiet(
        &mut sub,
        Duration::from_millis(500),
        "a payload that is not JSON was delivered",
    )
    .await;
    sub.flush().await.unwrap();
    subscriber.close().await.unwrap();
    let text = logs.text();
    assert!(text.contains("DEBUG"), "nothing was captured:\n{text}");
    assert!(
        text.contains("dead-lettering"),
        "the dead letter of the non-JSON payload was logged:\n{text}"
    );
    assert!(!text.contains("d0nt-l0g"), "a password was logged:\n{text}");
}

/// A topic deleted under a live subscription (that may create its group) is not the end of
/// it: its pulls fail, it creates the stream and consumer again, and reads what is published
/// after, as on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_outlives_the_deletion_of_its_topic() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    let publisher = nats.publisher();
    let subscriber = nats.subscriber();
    let mut sub = subscriber.subscribe("gone", opts("g", "c")).await.unwrap();
    publisher
        .publish("gone", Message::new("n", &1).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    d.ack().await.unwrap();
    sub.flush().await.unwrap();
    nats.subscriber().delete_topic("gone").await.unwrap();
    publisher
        .publish("gone", Message::new("n", &2).unwrap())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message().decode::<i32>().unwrap(), 2);
    d.ack().await.unwrap();
    subscriber.close().await.unwrap();
    assert_eq!(nats.pending_count("gone", "g").await.unwrap(), 0);
}

/// Health follows the server: `Degraded` while it is frozen (the lease cannot be renewed,
/// pulls go unanswered), `Ready` again once it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_the_server_is_frozen() {
    use streamwise::SubscriptionHealth;
    let server = NatsServer::start();
    let options = streamwise::nats::NatsOptions::default().request_timeout(Duration::from_secs(1));
    let nats = NatsBackend::connect_with(&server.url(), options).await.unwrap();
    let subscriber = nats
        .subscriber_with(NatsSubscriberOptions::default().lease_ttl(Duration::from_secs(1)))
        .unwrap();
    let mut sub = subscriber.subscribe("health", opts("g", "c")).await.unwrap();
    let health = sub.health_handle();
    assert_eq!(health.health(), SubscriptionHealth::Ready);
    // Reads go on in the background, as a router's would.
    let reader = tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            if let Ok(d) = item {
                let _ = d.ack().await;
            }
        }
    });
    server.freeze();
    let frozen_at = std::time::Instant::now();
    let degraded = loop {
        match health.health() {
            SubscriptionHealth::Degraded { reason } => break reason,
            _ => {
                assert!(frozen_at.elapsed() < WAIT, "still ready {WAIT:?} into the freeze");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    println!(
        "degraded {:.1} s into the freeze: {degraded}",
        frozen_at.elapsed().as_secs_f64()
    );
    server.thaw();
    let thawed_at = std::time::Instant::now();
    while health.health() != SubscriptionHealth::Ready {
        assert!(
            thawed_at.elapsed() < WAIT,
            "not ready {WAIT:?} after the thaw: {:?}",
            health.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("ready {:.1} s after the thaw", thawed_at.elapsed().as_secs_f64());
    subscriber.close().await.unwrap();
    reader.await.unwrap();
}

/// A pull the server never answers (frozen) makes the subscription `Degraded` by itself,
/// before its lease would tell (renewed only every 20 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_pull_degrades_health() {
    use streamwise::SubscriptionHealth;
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    let subscriber = nats
        .subscriber_with(NatsSubscriberOptions::default().lease_ttl(Duration::from_secs(60)))
        .unwrap();
    let mut sub = subscriber.subscribe("unanswered", opts("g", "c")).await.unwrap();
    let health = sub.health_handle();
    let reader = tokio::spawn(async move { while sub.next().await.is_some() {} });
    server.freeze();
    let frozen_at = std::time::Instant::now();
    let reason = loop {
        match health.health() {
            SubscriptionHealth::Degraded { reason } => break reason,
            _ => {
                assert!(frozen_at.elapsed() < WAIT, "still ready {WAIT:?} into the freeze");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(reason.contains("not answered"), "{reason}");
    server.thaw();
    subscriber.close().await.unwrap();
    reader.await.unwrap();
}

/// `flush` waits for the settlements made so far, and once the subscription ended (its
/// subscriber closed) it is `Error::Closed`, as the trait says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_close_is_closed() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.unwrap();
    nats.publisher()
        .publish("flush", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    let subscriber = nats.subscriber();
    let mut sub = subscriber.subscribe("flush", opts("g", "c")).await.unwrap();
    let d = recv(&mut sub).await;
    d.ack().await.unwrap();
    sub.flush().await.unwrap();
    assert_eq!(
        nats.pending_count("flush", "g").await.unwrap(),
        0,
        "flushed, so applied"
    );
    subscriber.close().await.unwrap();
    assert!(matches!(sub.flush().await, Err(Error::Closed(_))));
}

/// What JetStream refuses is `Error::Server` with its error code: three replicas of a stream
/// on a server that is not a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_server_are_server_errors() {
    let server = NatsServer::start();
    let options = streamwise::nats::NatsOptions::default().replicas(3);
    let nats = NatsBackend::connect_with(&server.url(), options).await.unwrap();
    let err = nats
        .publisher()
        .publish("replicated", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    match &err {
        Error::Server {
            command,
            code,
            message,
        } => {
            assert_eq!(command, "STREAM.CREATE");
            assert!(code.parse::<u64>().is_ok(), "{err}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Error::Server, got {other:?}"),
    }
    let err = nats
        .subscriber()
        .subscribe("replicated", opts("g", "c"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Server { .. }), "{err:?}");
}

/// Acks sent in bursts (all but the last of a burst without a confirmation of its own) are
/// all recorded once `flush` returns: nothing is pending, and nothing comes back after
/// `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_bursts_are_all_recorded_by_flush() {
    let server = NatsServer::start();
    let nats = NatsBackend::connect(&server.url()).await.expect("connect");
    let publisher = nats.publisher();
    let total = 600u64;
    for chunk in (0..total).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|n| Message::new("n", n).unwrap()).collect();
        publisher.publish_batch("bursts", batch).await.unwrap();
    }
    let subscriber = nats
        .subscriber_with(NatsSubscriberOptions::default().ack_wait(Duration::from_secs(1)))
        .unwrap();
    let mut sub = subscriber
        .subscribe("bursts", opts("g", "c").batch_size(100).max_in_flight(300))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..total {
        held.push(recv(&mut sub).await);
        // Settled many at a time, so that acks queue up behind each other.
        if held.len() == 150 {
            for d in held.drain(..) {
                d.ack().await.unwrap();
            }
        }
    }
    for d in held.drain(..) {
        d.ack().await.unwrap();
    }
    sub.flush().await.expect("flush");
    assert_eq!(nats.pending_count("bursts", "g").await.unwrap(), 0);
    // Past ack_wait: an ack the server did not take would bring its message back.
    quiet(
        &mut sub,
        Duration::from_millis(1500),
        "a message came back after its ack",
    )
    .await;
    subscriber.close().await.unwrap();
}
