//! The inbox against a real PostgreSQL: a handler's effects happen once per message however
//! often it is delivered (in turn or at the same moment), and not at all when it nacks,
//! dead-letters, fails or is abandoned; follow-up events go through the outbox in the same
//! transaction.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamwise::memory::MemoryBackend;
use streamwise::router::{Handler, Incoming, Json, Outcome, RetryBackoff, Router, Routes, State};
use streamwise::{Message, Publisher, SubscribeOptions, Uuid};
use streamwise_outbox::{InboxLayer, InboxTx, was_handled};
use tower::{Layer, ServiceExt};

use common::{count, database, wait_for};

#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<u32, u32>>>);

impl Attempts {
    fn next(&self, n: u32) -> u32 {
        let mut map = self.0.lock().unwrap();
        let attempt = map.entry(n).or_default();
        *attempt += 1;
        *attempt
    }
}

/// The effect (a read model row per order, counted) and the follow-up event, in the
/// delivery's transaction. Every fifth order fails on its first attempt after writing, and
/// its writes must not stay.
async fn on_order(
    Json(n): Json<u32>,
    tx: InboxTx,
    State(attempts): State<Attempts>,
) -> Result<(), streamwise_outbox::Error> {
    tx.execute(
        "INSERT INTO order_counts (n, seen) VALUES ($1, 1) ON CONFLICT (n) DO UPDATE SET seen = order_counts.seen + 1",
        &[&(n as i32)],
    )
    .await?;
    tx.publish("emails", &Message::new("email.requested", &n)?)
        .await?;
    if n % 5 == 0 && attempts.next(n) == 1 {
        return Err(streamwise_outbox::Error::Invalid {
            field: "test",
            reason: "the first attempt fails after writing".into(),
        });
    }
    Ok(())
}

/// Each of 200 messages published three times (the same UUID: what a relay resent after a
/// crash looks like), a fifth of them failing once: each effect and each follow-up event
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_delivered_three_times_has_its_effect_and_its_follow_up_once() {
    const ORDERS: u32 = 200;
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE order_counts (n int PRIMARY KEY, seen int NOT NULL)")
        .await
        .unwrap();
    let backend = MemoryBackend::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let done = completed.clone();
    let routes = Routes::with_state(Attempts::default())
        .route("order.placed", on_order.layer(InboxLayer::new(server.pool(16))))
        .retry_backoff(RetryBackoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .layer(tower::util::MapResponseLayer::new(move |outcome: Outcome| {
            done.fetch_add(1, Ordering::SeqCst);
            outcome
        }));
    let router = Router::with_state(Attempts::default()).subscribe(
        "orders",
        SubscribeOptions::new("billing", "worker-1").max_in_flight(16),
        routes,
    );
    let running = router
        .start(Arc::new(backend.subscriber()), Arc::new(backend.publisher()))
        .await
        .unwrap();
    let publisher = backend.publisher();
    let messages: Vec<Message> = (0..ORDERS)
        .map(|n| Message::new("order.placed", &n).unwrap())
        .collect();
    for round in 0..3 {
        for message in &messages {
            publisher.publish("orders", message.clone()).await.unwrap();
        }
        let _ = round;
    }
    let deliveries = 3 * ORDERS as usize;
    wait_for(
        "every delivery handled or skipped",
        Duration::from_secs(60),
        || async {
            completed.load(Ordering::SeqCst) == deliveries
                && backend.pending_count("orders", "billing").unwrap_or(1) == 0
        },
    )
    .await;
    running.shutdown().await.unwrap();

    assert_eq!(
        count(&client, "SELECT count(*) FROM order_counts").await,
        ORDERS as i64
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM order_counts WHERE seen <> 1").await,
        0,
        "every effect exactly once"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_inbox WHERE consumer = 'billing'"
        )
        .await,
        ORDERS as i64
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE topic = 'emails'"
        )
        .await,
        ORDERS as i64,
        "every follow-up exactly once, committed with its effect"
    );
    assert!(was_handled(&client, "billing", messages[7].uuid()).await.unwrap());
    assert!(
        !was_handled(&client, "shipping", messages[7].uuid())
            .await
            .unwrap()
    );
}

async fn write_then(outcome: Outcome, tx: InboxTx) -> Outcome {
    tx.execute("INSERT INTO effects (at) VALUES (now())", &[])
        .await
        .unwrap();
    outcome
}

fn delivery(uuid: Uuid) -> Incoming {
    Incoming::for_test(Message::new("e", &1).unwrap().with_uuid(uuid))
}

/// A nack, a dead letter and an error roll the handler's writes and the record back; an ack
/// commits them, and the next delivery of the message is skipped and acknowledged.
#[tokio::test]
async fn only_an_ack_commits_and_then_redeliveries_are_skipped() {
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (at timestamptz)")
        .await
        .unwrap();
    let layer = InboxLayer::new(server.pool(2)).consumer("effects");
    let uuid = Uuid::now_v7();
    for verdict in [Outcome::nack(), Outcome::dead_letter("no")] {
        let handler = move |tx: InboxTx| write_then(verdict.clone(), tx);
        let svc = layer.layer(handler.with_state(()));
        let outcome = svc.oneshot(delivery(uuid)).await.unwrap();
        assert_ne!(outcome, Outcome::ack());
        assert_eq!(
            count(&client, "SELECT count(*) FROM effects").await,
            0,
            "{outcome:?} rolled back"
        );
    }
    let failing = |tx: InboxTx| async move {
        tx.execute("INSERT INTO effects (at) VALUES (now())", &[]).await?;
        Err::<(), _>(streamwise_outbox::Error::Invalid {
            field: "test",
            reason: "fails".into(),
        })
    };
    let err = layer
        .layer(failing.with_state(()))
        .oneshot(delivery(uuid))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fails"), "{err}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM effects").await,
        0,
        "an error rolled back"
    );
    assert!(!was_handled(&client, "effects", uuid).await.unwrap());

    let ok = |tx: InboxTx| write_then(Outcome::ack(), tx);
    let svc = layer.layer(ok.with_state(()));
    assert_eq!(svc.clone().oneshot(delivery(uuid)).await.unwrap(), Outcome::ack());
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);
    assert!(was_handled(&client, "effects", uuid).await.unwrap());
    assert_eq!(
        svc.oneshot(delivery(uuid)).await.unwrap(),
        Outcome::ack(),
        "skipped and acked"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM effects").await,
        1,
        "not applied twice"
    );
}

/// Two deliveries of one message at the same moment (a reclaim while the first is still
/// running): the second waits for the first's transaction and is then skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_handled_at_the_same_moment_apply_once() {
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (at timestamptz)")
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let slow = move |tx: InboxTx| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tx.execute("INSERT INTO effects (at) VALUES (now())", &[])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let svc = InboxLayer::new(server.pool(4)).layer(slow.with_state(()));
    let uuid = Uuid::now_v7();
    let racing: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(delivery(uuid))))
        .collect();
    for one in racing {
        assert_eq!(one.await.unwrap().unwrap(), Outcome::ack());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);
}

/// A delivery abandoned while its handler runs (a timeout outside the layer) rolls back:
/// its connection is closed, not handed to the next delivery inside an open transaction.
#[tokio::test]
async fn an_abandoned_delivery_rolls_back_and_its_connection_is_not_reused() {
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (at timestamptz)")
        .await
        .unwrap();
    let pool = server.pool(1);
    let stuck = |tx: InboxTx| async move {
        tx.execute("INSERT INTO effects (at) VALUES (now())", &[])
            .await
            .unwrap();
        std::future::pending::<()>().await;
    };
    let svc = tower::timeout::TimeoutLayer::new(Duration::from_millis(200))
        .layer(InboxLayer::new(pool.clone()).layer(stuck.with_state(())));
    let uuid = Uuid::now_v7();
    let err = svc.oneshot(delivery(uuid)).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    wait_for(
        "the abandoned transaction to end",
        Duration::from_secs(10),
        || async {
            count(
                &client,
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            )
            .await
                == 0
        },
    )
    .await;
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 0);
    // The pool of one gives a working connection, outside any transaction, to the next.
    let ok = |tx: InboxTx| write_then(Outcome::ack(), tx);
    let svc = InboxLayer::new(pool).layer(ok.with_state(()));
    assert_eq!(svc.oneshot(delivery(uuid)).await.unwrap(), Outcome::ack());
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 1);
}

#[tokio::test]
async fn a_handler_asking_for_the_transaction_without_the_layer_is_nacked_not_called() {
    let called = Arc::new(AtomicUsize::new(0));
    let seen = called.clone();
    let handler = move |_tx: InboxTx| {
        seen.fetch_add(1, Ordering::SeqCst);
        async {}
    };
    let outcome = handler
        .with_state(())
        .oneshot(delivery(Uuid::now_v7()))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::nack_after(Duration::from_secs(1)));
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert!(InboxTx::current().is_none());
}

/// A handler that swallows the error of one of its statements and acks: the transaction is
/// aborted, and PostgreSQL would answer its COMMIT with a rollback. The delivery is an error
/// (redelivered), not acknowledged with its effects lost.
#[tokio::test]
async fn an_ack_over_a_failed_statement_is_an_error_not_a_silent_rollback() {
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE effects (at timestamptz)")
        .await
        .unwrap();
    let sloppy = |tx: InboxTx| async move {
        tx.execute("INSERT INTO effects (at) VALUES (now())", &[])
            .await
            .unwrap();
        let _ = tx.execute("INSERT INTO no_such_table VALUES (1)", &[]).await;
        Outcome::ack()
    };
    let svc = InboxLayer::new(server.pool(2)).layer(sloppy.with_state(()));
    let uuid = Uuid::now_v7();
    let err = svc.oneshot(delivery(uuid)).await.unwrap_err();
    assert!(err.to_string().contains("aborted"), "{err}");
    assert!(!was_handled(&client, "test", uuid).await.unwrap(), "no record");
    assert_eq!(count(&client, "SELECT count(*) FROM effects").await, 0);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        )
        .await,
        0
    );
}
