//! The server's refusals (`NOPERM`, `OOM`, `WRONGTYPE`) come back as `Error::Server` with the
//! server's code readable, on every path a command takes: a publish (alone or in a batch
//! pipeline), a subscribe, the read loop of a running subscription, and a command of one's own.

mod common;

use std::time::Duration;

use futures::StreamExt;
use streamwise::redis::client::cmd;
use streamwise::redis::{RedisBackend, RedisConnection};
use streamwise::{Error, Message, Publisher, SubscribeOptions, Subscriber};

use common::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

/// A server where `alice` may touch only `orders*` and streamwise's own keys; the default user
/// (used by the harness) keeps every right.
fn server_with_alice() -> (RedisServer, String) {
    let server = RedisServer::start_with(&[
        "--user",
        "alice",
        "on",
        ">pw",
        "~orders*",
        "~streamwise:*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    let url = format!("redis://alice:pw@127.0.0.1:{}", server.port());
    (server, url)
}

fn assert_code(err: &Error, code: &str) {
    assert_eq!(err.server_code(), Some(code), "{err:?}");
    match err {
        Error::Server { command, .. } => assert!(!command.is_empty(), "{err:?}"),
        other => panic!("expected Error::Server, got {other:?}"),
    }
    assert!(err.to_string().contains(code), "{err}");
}

#[tokio::test]
async fn an_acl_refusal_is_noperm_on_publish_batch_subscribe_and_own_commands() {
    let (_server, url) = server_with_alice();
    let redis = RedisBackend::new(&url).unwrap();
    let publisher = redis.publisher();

    let err = publisher
        .publish("payments", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    assert_code(&err, "NOPERM");

    // A batch goes as one pipeline; the code of its refused XADD still comes through.
    let batch = vec![Message::new("t", &1).unwrap(), Message::new("t", &2).unwrap()];
    let err = publisher.publish_batch("payments", batch).await.unwrap_err();
    assert_code(&err, "NOPERM");

    let subscriber = redis.subscriber().unwrap();
    let err = subscriber
        .subscribe("payments", SubscribeOptions::new("g", "c"))
        .await
        .unwrap_err();
    assert_code(&err, "NOPERM");
    subscriber.close().await.unwrap();

    let err = redis
        .connection()
        .command::<Option<String>>(cmd("GET").arg("payments:total"))
        .await
        .unwrap_err();
    assert_code(&err, "NOPERM");
    assert!(
        matches!(&err, Error::Server { command, .. } if command == "command"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_subscription_whose_rights_are_taken_away_yields_noperm() {
    let (server, url) = server_with_alice();
    // No retries: the read loop yields the first refusal instead of backing off first.
    let conn = RedisConnection::builder(&url).max_retries(0).build().unwrap();
    let redis = RedisBackend::with_connection(conn);
    let subscriber = redis.subscriber().unwrap();
    let mut orders = subscriber
        .subscribe(
            "orders",
            SubscribeOptions::new("g", "c").block(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    assert_eq!(server.command("ACL SETUSER alice resetkeys ~streamwise:*"), "+OK");
    let err = tokio::time::timeout(WAIT, orders.next())
        .await
        .expect("an error in time")
        .expect("the subscription is open")
        .unwrap_err();
    assert_code(&err, "NOPERM");
    subscriber.close().await.unwrap();
}

#[tokio::test]
async fn a_full_server_is_oom_and_a_key_of_another_type_is_wrongtype() {
    let server = RedisServer::start();
    let redis = RedisBackend::new(&server.url()).unwrap();
    let publisher = redis.publisher();

    assert_eq!(server.command("SET orders not-a-stream"), "+OK");
    let err = publisher
        .publish("orders", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    assert_code(&err, "WRONGTYPE");

    assert_eq!(server.command("CONFIG SET maxmemory 1"), "+OK");
    let err = publisher
        .publish("audit", Message::new("t", &1).unwrap())
        .await
        .unwrap_err();
    assert_code(&err, "OOM");
    assert_eq!(server.command("CONFIG SET maxmemory 0"), "+OK");
    publisher
        .publish("audit", Message::new("t", &1).unwrap())
        .await
        .unwrap();
}
