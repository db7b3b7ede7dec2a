//! The outbox and the relay against a real PostgreSQL (a private server per test) with the
//! in-memory backend downstream: only committed rows are sent, in commit order per topic,
//! once each by several relays, woken by notifications or by polling, with retention.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use streamwise::memory::MemoryBackend;
use streamwise::{EntryId, Message, Publisher, Uuid};
use streamwise_outbox::tokio_postgres::NoTls;
use streamwise_outbox::{Outbox, Relay, RelayOptions, migrate};

use common::{count, database, wait_for};

fn uuids(backend: &MemoryBackend, topic: &str) -> Vec<Uuid> {
    backend
        .messages(topic)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, m)| m.uuid())
        .collect()
}

#[tokio::test]
async fn migrate_creates_the_tables_once_and_refuses_a_newer_schema() {
    let (server, mut client) = database().await;
    assert_eq!(
        migrate(&mut client).await.unwrap(),
        Vec::<i32>::new(),
        "already there"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM streamwise_outbox").await, 0);
    assert_eq!(count(&client, "SELECT count(*) FROM streamwise_inbox").await, 0);
    // Processes starting together take turns.
    let mut others = Vec::new();
    for _ in 0..4 {
        let mut c = server.connect().await.unwrap();
        others.push(tokio::spawn(
            async move { migrate(&mut c).await.map(|v| v.len()) },
        ));
    }
    for other in others {
        assert_eq!(other.await.unwrap().unwrap(), 0);
    }
    client
        .execute("INSERT INTO streamwise_outbox_schema (version) VALUES (99)", &[])
        .await
        .unwrap();
    let err = migrate(&mut client).await.unwrap_err();
    assert!(
        matches!(
            err,
            streamwise_outbox::Error::SchemaTooNew {
                found: 99,
                supported: 1
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_message_is_sent_once_its_transaction_commits_and_never_after_a_rollback() {
    let (server, mut client) = database().await;
    let backend = MemoryBackend::new();
    let relay = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()));
    let outbox = Outbox::new();

    let kept = Message::new("order.placed", &serde_json::json!({"id": 1}))
        .unwrap()
        .with_metadata("tenant", "acme");
    let tx = client.transaction().await.unwrap();
    let id = outbox.publish(&tx, "orders", &kept).await.unwrap();
    assert!(id > 0);
    assert_eq!(
        relay.drain().await.unwrap(),
        0,
        "not committed yet: nothing to send"
    );
    tx.commit().await.unwrap();

    let dropped = Message::new("order.placed", &serde_json::json!({"id": 2})).unwrap();
    let tx = client.transaction().await.unwrap();
    outbox.publish(&tx, "orders", &dropped).await.unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(relay.drain().await.unwrap(), 1);
    let sent = backend.messages("orders").unwrap();
    assert_eq!(sent.len(), 1);
    let got = &sent[0].1;
    assert_eq!(got.uuid(), kept.uuid());
    assert_eq!(got.payload(), kept.payload());
    assert_eq!(got.metadata(), kept.metadata());
    assert_eq!(got.timestamp_rfc3339(), kept.timestamp_rfc3339());
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(relay.drain().await.unwrap(), 0, "a sent row is not sent again");
}

/// The relay takes any backend's publisher: a NATS JetStream server and a Redis Cluster, each
/// named by its URL (`streamwise::connect`), get every committed row once, in order per topic,
/// as the same messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sends_to_nats_and_to_a_redis_cluster() {
    use futures::StreamExt;
    use streamwise::testing::{NatsServer, RedisCluster};
    use streamwise::{SubscribeOptions, Subscriber};

    let (server, mut client) = database().await;
    let nats = NatsServer::start();
    let cluster = RedisCluster::start();
    for url in [nats.url(), cluster.url()] {
        let backend = streamwise::connect(&url).await.unwrap();
        let relay = Relay::new(server.config(), NoTls, backend.publisher());
        let outbox = Outbox::new();
        let mut written: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
        for n in 0..40 {
            let topic = if n % 2 == 0 { "orders" } else { "invoices" };
            let message = Message::new("e", &n).unwrap();
            let tx = client.transaction().await.unwrap();
            outbox.publish(&tx, topic, &message).await.unwrap();
            tx.commit().await.unwrap();
            written.entry(topic).or_default().push(message.uuid());
        }
        assert_eq!(relay.drain().await.unwrap(), 40, "{url}");
        let subscriber: Arc<dyn Subscriber> = backend.subscriber();
        for (topic, uuids) in &written {
            let mut subscription = subscriber
                .subscribe(topic, SubscribeOptions::new("check", "c1"))
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < uuids.len() {
                let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
                    .await
                    .unwrap_or_else(|_| panic!("{url} {topic}: only {} of {}", got.len(), uuids.len()))
                    .expect("the subscription ended")
                    .unwrap();
                got.push(delivery.message().uuid());
                delivery.ack().await.unwrap();
            }
            assert_eq!(&got, uuids, "{url} {topic}: each row once, in commit order");
        }
        subscriber.close().await.unwrap();
        // The rows are sent: the next backend gets only its own.
        client
            .batch_execute("DELETE FROM streamwise_outbox")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn bad_messages_and_topics_are_refused_before_anything_is_written() {
    let (_server, client) = database().await;
    let outbox = Outbox::new().max_entry_size(200).unwrap();
    let not_json = Message::from_json_bytes("t", &b"{nope"[..]).unwrap();
    let err = outbox.publish(&client, "orders", &not_json).await.unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
    let big = Message::new("t", &"x".repeat(300)).unwrap();
    let err = outbox.publish(&client, "orders", &big).await.unwrap_err();
    assert!(
        matches!(
            err,
            streamwise_outbox::Error::Message(streamwise::Error::PayloadTooLarge { limit: 200, .. })
        ),
        "{err}"
    );
    let fine = Message::new("t", &1).unwrap();
    for topic in ["", "a b", "a.b", "{orders}"] {
        let err = outbox.publish(&client, topic, &fine).await.unwrap_err();
        assert!(err.to_string().contains("topic"), "{topic:?}: {err}");
    }
    assert_eq!(count(&client, "SELECT count(*) FROM streamwise_outbox").await, 0);
}

/// The first test: 10,000 transactions from 8 writers at once, a third rolled back,
/// with a relay sending meanwhile: exactly the committed messages arrive, once each, and
/// each writer's in its commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_transactions_a_third_rolled_back_exactly_the_committed_are_sent() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 1250;
    let (server, client) = database().await;
    client
        .batch_execute("CREATE TABLE orders (writer int, n int, PRIMARY KEY (writer, n))")
        .await
        .unwrap();
    let backend = MemoryBackend::new();
    let relay = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()))
        .options(RelayOptions::default().poll_interval(Duration::from_millis(50)))
        .start()
        .unwrap();
    let pool = server.pool(WRITERS);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut committed = Vec::new();
            let mut client = pool.get().await.unwrap();
            for n in 0..PER_WRITER {
                let tx = client.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO orders (writer, n) VALUES ($1, $2)",
                    &[&(writer as i32), &(n as i32)],
                )
                .await
                .unwrap();
                let message = Message::new("order.placed", &(writer, n)).unwrap();
                outbox.publish(&*tx, "orders", &message).await.unwrap();
                if (writer + n) % 3 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed.push(message.uuid());
                }
            }
            committed
        }));
    }
    let mut committed = Vec::new();
    for writer in writers {
        committed.push(writer.await.unwrap());
    }
    let total: usize = committed.iter().map(Vec::len).sum();
    assert_eq!(
        count(&client, "SELECT count(*) FROM orders").await as usize,
        total,
        "the business rows"
    );
    wait_for("every committed row sent", Duration::from_secs(60), || async {
        backend.stream_len("orders").unwrap_or(0) >= total
            && count(
                &client,
                "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NULL",
            )
            .await
                == 0
    })
    .await;
    let stats = relay.stop().await;
    let sent = uuids(&backend, "orders");
    assert_eq!(sent.len(), total, "each committed message once, nothing else");
    assert_eq!(stats.sent as usize, total);
    let position: BTreeMap<Uuid, usize> = sent.iter().enumerate().map(|(i, u)| (*u, i)).collect();
    assert_eq!(position.len(), total, "no duplicates");
    for (writer, uuids) in committed.iter().enumerate() {
        let at: Vec<usize> = uuids
            .iter()
            .map(|u| {
                *position
                    .get(u)
                    .unwrap_or_else(|| panic!("writer {writer}: a committed message is missing"))
            })
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "writer {writer}'s messages out of commit order"
        );
    }
}

/// The lock that makes `id` order commit order: a second transaction's publish to the same
/// topic waits for the first one to end, so it cannot take an earlier place.
#[tokio::test]
async fn publishes_to_one_topic_wait_for_the_earlier_transaction_to_end() {
    let (server, mut client) = database().await;
    let mut other = server.connect().await.unwrap();
    let watcher = server.connect().await.unwrap();
    let outbox = Outbox::new();
    let tx = client.transaction().await.unwrap();
    let first = outbox
        .publish(&tx, "orders", &Message::new("a", &1).unwrap())
        .await
        .unwrap();
    let waiting = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let tx = other.transaction().await.unwrap();
            let id = outbox
                .publish(&tx, "orders", &Message::new("b", &2).unwrap())
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        })
    };
    // The second publish is blocked on the lock: PostgreSQL says so.
    wait_for(
        "the second publish to wait for the lock",
        Duration::from_secs(10),
        || async {
            count(
                &watcher,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .await
                == 1
        },
    )
    .await;
    assert!(!waiting.is_finished());
    // Another topic is not held up.
    let mut third = server.connect().await.unwrap();
    let tx3 = third.transaction().await.unwrap();
    outbox
        .publish(&tx3, "payments", &Message::new("c", &3).unwrap())
        .await
        .unwrap();
    tx3.commit().await.unwrap();
    tx.commit().await.unwrap();
    let second = waiting.await.unwrap();
    assert!(second > first, "the later commit has the later id");
}

/// Two relays on one outbox while writers fill it: every row is sent exactly once (their
/// counts add up to the rows; the normal case, nobody crashes), each topic in `id` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_send_every_row_once_in_id_order_per_topic() {
    const TOPICS: [&str; 4] = ["t0", "t1", "t2", "t3"];
    const ROWS: usize = 4000;
    let (server, client) = database().await;
    let backend = MemoryBackend::new();
    let options = RelayOptions::default()
        .batch_size(7)
        .batches_per_turn(1)
        .poll_interval(Duration::from_millis(20));
    let relays: Vec<_> = (0..2)
        .map(|_| {
            Relay::new(server.config(), NoTls, Arc::new(backend.publisher()))
                .options(options.clone())
                .start()
                .unwrap()
        })
        .collect();
    let pool = server.pool(4);
    let mut writers = Vec::new();
    for w in 0..4 {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let outbox = Outbox::new();
            let mut client = pool.get().await.unwrap();
            for n in 0..ROWS / 4 {
                let tx = client.transaction().await.unwrap();
                let topic = TOPICS[(w + n) % TOPICS.len()];
                outbox
                    .publish(&*tx, topic, &Message::new("e", &(w, n)).unwrap())
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    wait_for("every row sent", Duration::from_secs(60), || async {
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NULL",
        )
        .await
            == 0
    })
    .await;
    let mut sent_by_relays = 0;
    for (i, relay) in relays.into_iter().enumerate() {
        let sent = relay.stop().await.sent;
        // Both took part: this is a test of two relays at once, not of one.
        assert!(sent > 0, "relay {i} sent nothing");
        sent_by_relays += sent;
    }
    assert_eq!(sent_by_relays as usize, ROWS, "no row sent twice, none missed");
    for topic in TOPICS {
        let in_db: Vec<Uuid> = client
            .query(
                "SELECT message_uuid FROM streamwise_outbox WHERE topic = $1 ORDER BY id",
                &[&topic],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            uuids(&backend, topic),
            in_db,
            "topic {topic}: sent once each, in id order"
        );
    }
}

#[tokio::test]
async fn a_notification_wakes_the_relay_and_without_one_it_polls() {
    let (server, client) = database().await;
    let backend = MemoryBackend::new();
    // Polling only once a minute: what arrives sooner came through the notification.
    let relay = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()))
        .options(RelayOptions::default().poll_interval(Duration::from_secs(60)))
        .start()
        .unwrap();
    // The relay looks once when it starts listening; wait for that to be over.
    wait_for("the relay to listen", Duration::from_secs(10), || async {
        count(
            &client,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .await
            == 1
    })
    .await;
    for n in 0..3 {
        Outbox::new()
            .publish(&client, "orders", &Message::new("n", &n).unwrap())
            .await
            .unwrap();
        wait_for("the notified send", Duration::from_secs(10), || async {
            backend.stream_len("orders").unwrap_or(0) == n + 1
        })
        .await;
    }
    relay.stop().await;

    let quiet = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()))
        .options(RelayOptions::default().poll_interval(Duration::from_millis(100)))
        .start()
        .unwrap();
    Outbox::new()
        .notify(false)
        .publish(&client, "quiet", &Message::new("n", &1).unwrap())
        .await
        .unwrap();
    wait_for("the polled send", Duration::from_secs(10), || async {
        backend.stream_len("quiet").unwrap_or(0) == 1
    })
    .await;
    quiet.stop().await;
}

#[tokio::test]
async fn sent_rows_are_deleted_after_the_retention_and_unsent_ones_never() {
    let (server, client) = database().await;
    for n in 0..50 {
        Outbox::new()
            .publish(&client, "orders", &Message::new("n", &n).unwrap())
            .await
            .unwrap();
    }
    // A row of a topic whose publish always fails stays, whatever its age.
    Outbox::new()
        .publish(&client, "refused", &Message::new("n", &0).unwrap())
        .await
        .unwrap();
    let backend = MemoryBackend::new();
    let publisher = Refusing {
        inner: backend.publisher(),
        topic: "refused",
        calls: AtomicUsize::new(0),
    };
    let relay = Relay::new(server.config(), NoTls, Arc::new(publisher))
        .options(
            RelayOptions::default()
                .retention(Some(Duration::from_millis(1)))
                .cleanup_interval(Duration::from_millis(20))
                .poll_interval(Duration::from_millis(20))
                .max_backoff(Duration::from_millis(50)),
        )
        .start()
        .unwrap();
    wait_for("the sent rows deleted", Duration::from_secs(20), || async {
        count(&client, "SELECT count(*) FROM streamwise_outbox").await == 1
    })
    .await;
    let stats = relay.stop().await;
    assert_eq!(stats.sent, 50);
    assert_eq!(stats.deleted, 50);
    assert!(stats.errors >= 1, "the refused topic counts its failures");
    assert_eq!(
        backend.stream_len("orders").unwrap(),
        50,
        "the other topic went on"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE topic = 'refused' AND sent_at IS NULL"
        )
        .await,
        1
    );
}

/// A publisher that refuses one topic, and passes the others on.
struct Refusing {
    inner: streamwise::memory::MemoryPublisher,
    topic: &'static str,
    calls: AtomicUsize,
}

impl Publisher for Refusing {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, streamwise::Result<EntryId>> {
        Box::pin(async move {
            let mut ids = self.publish_batch(topic, vec![message]).await?;
            Ok(ids.remove(0))
        })
    }
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, streamwise::Result<Vec<EntryId>>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if topic == self.topic {
            return Box::pin(async { Err(streamwise::Error::Closed("refused by the test")) });
        }
        self.inner.publish_batch(topic, messages)
    }
    fn close(&self) -> BoxFuture<'_, streamwise::Result<()>> {
        self.inner.close()
    }
}

/// A publish that fails for a while holds its topic back, in order, and loses nothing.
#[tokio::test]
async fn a_failing_publish_is_retried_in_order_without_loss() {
    let (server, client) = database().await;
    let mut expected = Vec::new();
    for n in 0..30 {
        let m = Message::new("n", &n).unwrap();
        expected.push(m.uuid());
        Outbox::new().publish(&client, "orders", &m).await.unwrap();
    }
    let backend = MemoryBackend::new();
    let flaky = Flaky {
        inner: backend.publisher(),
        failures_left: AtomicUsize::new(5),
    };
    let relay = Relay::new(server.config(), NoTls, Arc::new(flaky))
        .options(
            RelayOptions::default()
                .batch_size(4)
                .poll_interval(Duration::from_millis(20))
                .max_backoff(Duration::from_millis(40)),
        )
        .start()
        .unwrap();
    wait_for("every row sent", Duration::from_secs(20), || async {
        backend.stream_len("orders").unwrap_or(0) == 30
    })
    .await;
    let stats = relay.stop().await;
    assert_eq!(stats.errors, 5);
    assert_eq!(uuids(&backend, "orders"), expected);
    let unique: HashSet<_> = expected.iter().collect();
    assert_eq!(unique.len(), 30);
}

struct Flaky {
    inner: streamwise::memory::MemoryPublisher,
    failures_left: AtomicUsize,
}

impl Publisher for Flaky {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> BoxFuture<'a, streamwise::Result<EntryId>> {
        self.inner.publish(topic, message)
    }
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        messages: Vec<Message>,
    ) -> BoxFuture<'a, streamwise::Result<Vec<EntryId>>> {
        let fail = self
            .failures_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(streamwise::Error::Closed("flaky by the test")) });
        }
        self.inner.publish_batch(topic, messages)
    }
    fn close(&self) -> BoxFuture<'_, streamwise::Result<()>> {
        self.inner.close()
    }
}

/// What a relay that died between its publish and its mark leaves: the rows go out again,
/// and each carries the UUID (and the whole message) of its first send, so an inbox
/// downstream can tell it is a duplicate.
#[tokio::test]
async fn a_row_sent_again_after_a_lost_mark_is_the_same_message() {
    let (server, client) = database().await;
    for n in 0..5 {
        Outbox::new()
            .publish(
                &client,
                "orders",
                &Message::new("n", &n).unwrap().with_metadata("k", "v"),
            )
            .await
            .unwrap();
    }
    let backend = MemoryBackend::new();
    let relay = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()));
    assert_eq!(relay.drain().await.unwrap(), 5);
    // The mark is lost, as when the relay is killed right after the publish.
    client
        .execute("UPDATE streamwise_outbox SET sent_at = NULL", &[])
        .await
        .unwrap();
    assert_eq!(relay.drain().await.unwrap(), 5);
    let sent = backend.messages("orders").unwrap();
    assert_eq!(sent.len(), 10);
    for (first, again) in sent[..5].iter().zip(&sent[5..]) {
        assert_eq!(first.1, again.1, "the same message, UUID and timestamp included");
    }
}

/// A topic another relay holds is left to it (and the other topics go on); once it lets go,
/// this relay takes the topic over.
#[tokio::test]
async fn a_topic_held_by_another_relay_is_left_to_it_until_released() {
    let (server, client) = database().await;
    let holder = server.connect().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_lock($1, hashtext('held'))",
            &[&streamwise_outbox::RELAY_LOCK],
        )
        .await
        .unwrap();
    let backend = MemoryBackend::new();
    let relay = Relay::new(server.config(), NoTls, Arc::new(backend.publisher()))
        .options(RelayOptions::default().poll_interval(Duration::from_millis(20)))
        .start()
        .unwrap();
    for topic in ["held", "free"] {
        Outbox::new()
            .publish(&client, topic, &Message::new("n", &1).unwrap())
            .await
            .unwrap();
    }
    wait_for("the free topic sent", Duration::from_secs(10), || async {
        backend.stream_len("free").unwrap_or(0) == 1
    })
    .await;
    // One more pass (which comes after the first one tried the held topic) for certain.
    Outbox::new()
        .publish(&client, "free", &Message::new("n", &2).unwrap())
        .await
        .unwrap();
    wait_for("the next pass", Duration::from_secs(10), || async {
        backend.stream_len("free").unwrap_or(0) == 2
    })
    .await;
    assert_eq!(
        backend.stream_len("held").unwrap_or(0),
        0,
        "the held topic is left alone"
    );
    holder
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext('held'))",
            &[&streamwise_outbox::RELAY_LOCK],
        )
        .await
        .unwrap();
    wait_for("the released topic sent", Duration::from_secs(10), || async {
        backend.stream_len("held").unwrap_or(0) == 1
    })
    .await;
    let stats = relay.stop().await;
    assert_eq!((stats.sent, stats.errors), (3, 0));
}

/// A relay whose server takes connections but never answers stops at once when asked (its
/// connection attempts are given up), and it sent nothing.
#[tokio::test]
async fn a_relay_stops_at_once_while_its_server_does_not_answer() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (accepted, first) = tokio::sync::mpsc::unbounded_channel();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket); // accepted, never answered
            let _ = accepted.send(());
        }
    });
    let mut config = streamwise_outbox::tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user("postgres");
    let relay = Relay::new(config, NoTls, Arc::new(MemoryBackend::new().publisher()))
        .start()
        .unwrap();
    // It is stuck in its first connection attempt once the server took the connection.
    let mut first = first;
    tokio::time::timeout(Duration::from_secs(10), first.recv())
        .await
        .expect("the relay connects")
        .expect("the listener runs");
    let stats = tokio::time::timeout(Duration::from_secs(5), relay.stop())
        .await
        .expect("stop returns while the connection attempt hangs");
    assert_eq!(stats.sent, 0);
    held.abort();
}

/// A publisher that never answers holds a batch in flight: the stop abandons it at the
/// deadline, and its row stays unsent for the next relay.
#[tokio::test]
async fn a_batch_stuck_in_its_publish_is_abandoned_at_the_stop_deadline() {
    let (server, client) = database().await;
    Outbox::new()
        .publish(&client, "orders", &Message::new("n", &1).unwrap())
        .await
        .unwrap();
    let (calls, mut called) = tokio::sync::mpsc::unbounded_channel();
    let relay = Relay::new(server.config(), NoTls, Arc::new(Stuck { calls }))
        .options(RelayOptions::default().stop_deadline(Duration::from_millis(300)))
        .start()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), called.recv())
        .await
        .expect("the relay publishes")
        .expect("the publisher lives");
    let asked = std::time::Instant::now();
    let stats = tokio::time::timeout(Duration::from_secs(5), relay.stop())
        .await
        .expect("stop returns by its deadline");
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "it waited for the batch first"
    );
    assert_eq!(stats.sent, 0);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM streamwise_outbox WHERE sent_at IS NULL"
        )
        .await,
        1
    );
}

/// A publisher whose publishes never return.
struct Stuck {
    calls: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Publisher for Stuck {
    fn publish<'a>(&'a self, _: &'a str, _: Message) -> BoxFuture<'a, streamwise::Result<EntryId>> {
        let _ = self.calls.send(());
        Box::pin(std::future::pending())
    }
    fn publish_batch<'a>(
        &'a self,
        _: &'a str,
        _: Vec<Message>,
    ) -> BoxFuture<'a, streamwise::Result<Vec<EntryId>>> {
        let _ = self.calls.send(());
        Box::pin(std::future::pending())
    }
    fn close(&self) -> BoxFuture<'_, streamwise::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The test harness: a private server answers on its own loopback port (never 5432), and is
/// stopped and deleted when its handle drops.
#[tokio::test]
async fn the_private_server_is_stopped_and_deleted_on_drop() {
    let server = streamwise_outbox::testing::PostgresServer::start().unwrap();
    assert_ne!(server.port(), 5432);
    let client = server.connect().await.unwrap();
    let port: String = client.query_one("SHOW port", &[]).await.unwrap().get(0);
    assert_eq!(port, server.port().to_string());
    drop(client);
    let (config, dir) = (server.config(), server.dir().to_owned());
    drop(server);
    assert!(config.connect(NoTls).await.is_err(), "nothing answers any more");
    assert!(!dir.exists(), "its files are gone");
}
