//! Security: password authentication and an ACL user restricted to its keys work end to end;
//! wrong credentials give a clear error at once; passwords never appear in `Debug`, `Display`,
//! error messages or log output.

mod common;

use std::time::Duration;

use futures::StreamExt;
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::testing::CapturedLogs;
use streamwise::{Error, Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;

const PASSWORD: &str = "s3cret-Pa55";

fn url_with(server: &RedisServer, userinfo: &str) -> String {
    format!("redis://{userinfo}@127.0.0.1:{}", server.port())
}

async fn round_trip(url: &str, stream: &str) -> streamwise::Result<()> {
    common::round_trip(&RedisBackend::new(url)?, stream).await
}

#[tokio::test]
async fn a_password_protected_server_works_end_to_end() {
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    round_trip(&url_with(&server, &format!(":{PASSWORD}")), "orders")
        .await
        .unwrap();
    // Without the password: a clear error, not retried for long.
    let started = tokio::time::Instant::now();
    let conn = RedisConnection::builder(&format!("redis://127.0.0.1:{}", server.port()))
        .max_retries(5)
        .retry_base_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let err = common::publish_error(conn, "orders").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "authentication errors are not retried"
    );
    assert!(
        matches!(err, Error::Connection { .. } | Error::Server { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("NOAUTH") || err.to_string().contains("authentication"),
        "{err}"
    );
}

#[tokio::test]
async fn an_acl_user_limited_to_its_keys_works_and_is_refused_elsewhere() {
    // The default user is off; alice may touch her streams and streamwise's keys, and may not
    // run dangerous commands (CLIENT UNBLOCK among them: the subscriber copes without it).
    let server = RedisServer::start_with(&[
        "--user",
        "default",
        "off",
        "--user",
        "alice",
        "on",
        &format!(">{PASSWORD}"),
        "~orders*",
        "~streamwise:*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    let url = url_with(&server, &format!("alice:{PASSWORD}"));
    round_trip(&url, "orders").await.unwrap();

    // A nack is still redelivered (the reader wakes at the end of its block, not by UNBLOCK).
    let redis = RedisBackend::new(&url).unwrap();
    let subscriber = redis.subscriber().unwrap();
    let mut sub = subscriber
        .subscribe(
            "orders-2",
            SubscribeOptions::new("g", "c").block(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    redis
        .publisher()
        .publish("orders-2", Message::new("t", &2).unwrap())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first.nack().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((again.id(), again.delivery_count()), (first.id(), 2));
    again.ack().await.unwrap();
    subscriber.close().await.unwrap();

    // Outside her key patterns: NOPERM, at once, naming the refusal.
    let err = redis
        .publisher()
        .publish("payments", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.server_code(), Some("NOPERM"), "{err:?}");
    assert!(
        matches!(&err, Error::Server { command, message, .. } if command == "publish" && !message.is_empty()),
        "{err:?}"
    );
    assert!(err.to_string().contains("NOPERM"), "{err}");
    assert!(!err.to_string().contains(PASSWORD), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_connection_error() {
    let server = RedisServer::start_with(&["--user", "alice", "on", ">right", "~*", "&*", "+@all"]);
    let conn = RedisConnection::builder(&url_with(&server, "alice:wrong-password"))
        .max_retries(5)
        .retry_base_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = common::publish_error(conn, "s").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not retried: {:?}",
        started.elapsed()
    );
    match &err {
        Error::Connection { message, .. } => {
            assert!(message.contains("authentication"), "{message}");
            assert!(message.contains("alice:***@"), "{message}");
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
    let mut everything = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        everything.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    assert!(!everything.contains("wrong-password"), "{everything}");
    // The subscriber says the same.
    let conn = RedisConnection::new(&url_with(&server, "alice:wrong-password")).unwrap();
    let subscriber = RedisBackend::with_connection(conn).subscriber().unwrap();
    let err = subscriber
        .subscribe("s", SubscribeOptions::new("g", "c"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-password"));
}

/// Captures every log line (down to `TRACE`) of this thread until the guard drops.
fn capture_logs() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
    let captured = CapturedLogs::new();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.make_writer())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn passwords_never_reach_debug_display_errors_or_logs() {
    let (captured, _guard) = capture_logs();

    // A server that goes away: retries are logged, then the error surfaces.
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let url = url_with(&server, &format!(":{PASSWORD}"));
    let conn = RedisConnection::builder(&url)
        .max_retries(2)
        .retry_base_delay(Duration::from_millis(5))
        .retry_max_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let redis = RedisBackend::with_connection(conn.clone());
    let publisher = redis.publisher();
    publisher
        .publish("s", Message::new("t", &1).unwrap())
        .await
        .unwrap();
    drop(server);
    let err = publisher
        .publish("s", Message::new("t", &2).unwrap())
        .await
        .unwrap_err();

    let mut everything = format!("{err} {err:?} {conn:?} {redis:?} {publisher:?} {}", conn.url());
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        everything.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    let logs = captured.text();
    assert!(logs.contains("retrying"), "the retries were logged:\n{logs}");
    assert!(!everything.contains(PASSWORD), "{everything}");
    assert!(!logs.contains(PASSWORD), "{logs}");
    assert!(everything.contains(":***@"), "{everything}");
}

/// A running client rides out a password rotation. While its user's password is changed and
/// its connections are cut, commands fail after their retries with the authentication error
/// (logged, but rate-limited); once the password works again, publishing, deliveries, acks,
/// lease renewals and checkpoints recover by themselves.
#[tokio::test]
async fn a_running_client_recovers_once_a_rotated_password_works_again() {
    use streamwise::redis::{RedisSubscriber, RedisSubscriberOptions};
    const NEXT: &str = "n3xt-Pa55";
    let (captured, _guard) = capture_logs();

    // The default user stays open for the harness's own commands; the client is alice.
    let server = RedisServer::start_with(&[
        "--user",
        "alice",
        "on",
        &format!(">{PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]);
    let conn = RedisConnection::builder(&url_with(&server, &format!("alice:{PASSWORD}")))
        .max_retries(2)
        .retry_base_delay(Duration::from_millis(20))
        .retry_max_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let redis = RedisBackend::with_connection(conn.clone());
    let publisher = redis.publisher();
    // Renewed every 300 ms: it lapses during the rotation and must be taken again after.
    let subscriber = RedisSubscriber::new(
        conn,
        RedisSubscriberOptions::default().lease_ttl(Duration::from_millis(900)),
    )
    .unwrap();
    let mut sub = subscriber
        .subscribe(
            "orders",
            SubscribeOptions::new("g", "c").block(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let message = |n: u32| Message::new("t", &n).unwrap();
    publisher.publish("orders", message(1)).await.unwrap();
    next_ok(&mut sub).await.ack().await.unwrap();
    let lease = "streamwise:lease:{orders}:g:c";
    assert_eq!(server.command(&format!("EXISTS {lease}")), ":1");

    // The rotation: the old password stops working and every connection of alice is cut.
    assert_eq!(
        server.command(&format!("ACL SETUSER alice resetpass >{NEXT}")),
        "+OK"
    );
    server.command("CLIENT KILL USER alice");
    let err = publisher.publish("orders", message(2)).await.unwrap_err();
    match &err {
        Error::Connection { message, .. } => {
            assert!(message.contains("authentication"), "{message}");
            assert!(message.contains("alice:***@"), "{message}");
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
    // The lease lapses, since no renewal gets through.
    wait_for("the lease to lapse", || {
        server.command(&format!("EXISTS {lease}")) == ":0"
    })
    .await;

    // The old password works again: everything recovers without a new client.
    assert_eq!(
        server.command(&format!("ACL SETUSER alice resetpass >{PASSWORD}")),
        "+OK"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        match publisher.publish("orders", message(3)).await {
            Ok(id) => break id,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("authentication"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the publisher never recovered: {e}"),
        }
    };
    let delivery = loop {
        let d = next_ok(&mut sub).await;
        if d.id() == id {
            break d;
        }
        d.ack().await.unwrap();
    };
    delivery.ack().await.unwrap();
    wait_for("the ack to land", || {
        // The summary's first element: how many entries are pending.
        server.command_lines("XPENDING orders g", 2)[1] == ":0"
    })
    .await;
    wait_for("the lease to be taken again", || {
        server.command(&format!("EXISTS {lease}")) == ":1"
    })
    .await;
    wait_for("the checkpoint to be saved", || {
        let saved = server.command_lines("HGET streamwise:checkpoint:{orders} g:c", 2);
        saved.get(1).is_some_and(|v| v.contains(&id.to_string()))
    })
    .await;
    subscriber.close().await.unwrap();

    let logs = captured.text();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("authentication refused on reconnect"))
        .count();
    assert!(warnings >= 1, "the refusal was not reported:\n{logs}");
    // One per 10 s at most, though every retry of every task met the refusal.
    assert!(warnings <= 2, "{warnings} warnings: not rate-limited:\n{logs}");
    assert!(!logs.contains(PASSWORD) && !logs.contains(NEXT), "{logs}");
}

/// The next delivery, skipping the error items of the outage (each one is logged), within 10 s.
async fn next_ok(sub: &mut streamwise::Subscription) -> streamwise::Delivery {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(d))) => return d,
            Ok(Some(Err(e))) => eprintln!("error item: {e}"),
            other => panic!("no delivery: {other:?}"),
        }
    }
}

/// Polls `condition` every 20 ms until it holds, for at most 10 s.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
