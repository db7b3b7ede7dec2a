//! The conformance scenarios of partitioned topics ([`crate::partition`]), for backends whose
//! [`TestBackend::coordinator`] gives one; the others skip them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::{TestBackend, WAIT, expect_quiet, opts, recv, unique_topic};
use crate::partition::{
    KEY_METADATA, PartitionCoordinator, PartitionOptions, PartitionedPublisher, PartitionedSubscriber,
    assigned_to, parse_partition_stream,
};
use crate::{Error, Message, Publisher, Subscriber, Subscription};

/// A member's record lives this long in the scenarios, so that rebalances are quick.
const MEMBER_TTL: Duration = Duration::from_secs(1);

async fn coordinator(backend: &dyn TestBackend, scenario: &str) -> Option<Arc<dyn PartitionCoordinator>> {
    if !backend.features().partitions {
        eprintln!("{scenario}: skipped, the backend declares no partitioned topics");
        return None;
    }
    match backend.coordinator().await {
        Ok(c) => Some(c),
        Err(Error::Unsupported(_)) => {
            eprintln!("{scenario}: skipped, the backend has no partition coordinator");
            None
        }
        Err(e) => panic!("coordinator: {e}"),
    }
}

async fn member(
    backend: &dyn TestBackend,
    coordinator: &Arc<dyn PartitionCoordinator>,
    topic: &str,
    partitions: u32,
) -> Arc<PartitionedSubscriber> {
    member_with(
        backend,
        coordinator,
        topic,
        partitions,
        PartitionOptions::default(),
    )
    .await
}

/// A member whose partitions past the first read on the subscriber's shared connections (a
/// backend without connections reads them as any other).
async fn member_on_shared_reads(
    backend: &dyn TestBackend,
    coordinator: &Arc<dyn PartitionCoordinator>,
    topic: &str,
    partitions: u32,
) -> Arc<PartitionedSubscriber> {
    let options = PartitionOptions::default().dedicated_readers(1);
    member_with(backend, coordinator, topic, partitions, options).await
}

async fn member_with(
    backend: &dyn TestBackend,
    coordinator: &Arc<dyn PartitionCoordinator>,
    topic: &str,
    partitions: u32,
    options: PartitionOptions,
) -> Arc<PartitionedSubscriber> {
    let inner = backend.subscriber().await.expect("subscriber");
    Arc::new(
        PartitionedSubscriber::new(inner, coordinator.clone())
            .options(options.member_ttl(MEMBER_TTL))
            .topic(topic, partitions),
    )
}

fn keyed(key: usize, seq: u64) -> (String, Message) {
    let key = format!("key-{key}");
    let message = Message::new("test.keyed", &seq).expect("encodable");
    (key, message)
}

/// What the members handled, in the order they handled it: (member, key, sequence number).
type Handled = Arc<Mutex<Vec<(String, String, u64)>>>;

/// Handles `sub` one delivery at a time, recording and acknowledging each.
fn consume(name: &str, mut sub: Subscription, handled: Handled) -> tokio::task::JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            let delivery = match item {
                Ok(d) => d,
                Err(e) => panic!("{name}: subscription error {e}"),
            };
            let key = delivery
                .message()
                .metadata()
                .get(KEY_METADATA)
                .expect("keyed messages carry their key")
                .to_owned();
            let seq: u64 = delivery.message().decode().expect("a sequence number");
            handled.lock().unwrap().push((name.clone(), key, seq));
            delivery.ack().await.expect("ack");
        }
    })
}

async fn wait_handled(handled: &Handled, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = handled.lock().unwrap().len();
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {n} handled after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Keyed messages published to a partitioned topic are handled in order per key, and exactly
/// once, by a group whose members change: one member alone, a second joining (its partitions
/// handed over cooperatively), then the second leaving (handed back).
pub async fn partitioned_keys_keep_order_across_members(backend: &dyn TestBackend) {
    let Some(coordinator) = coordinator(backend, "partitioned_keys_keep_order_across_members").await else {
        return;
    };
    let (topic, partitions, keys, per_round) = (unique_topic("partitioned"), 4, 12, 10);
    // The second member must win some partitions, or nothing would be handed over.
    assert!(!assigned_to("member-b", &["member-a", "member-b"], partitions).is_empty());
    let publisher =
        PartitionedPublisher::new(backend.publisher().await.expect("publisher"), coordinator.clone())
            .topic(&topic, partitions);
    let mut seq = 0;
    let mut publish_round = async |publisher: &PartitionedPublisher| {
        for _ in 0..per_round {
            for key in 0..keys {
                let (key, message) = keyed(key, seq);
                publisher
                    .publish_keyed(&topic, &key, message)
                    .await
                    .expect("publish_keyed");
            }
            seq += 1;
        }
    };
    let handled: Handled = Arc::default();
    let a = member(backend, &coordinator, &topic, partitions).await;
    let sub_a = a
        .subscribe(&topic, opts("g", "member-a").max_in_flight(8))
        .await
        .expect("subscribe a");
    let task_a = consume("member-a", sub_a, handled.clone());
    publish_round(&publisher).await;
    wait_handled(&handled, keys * per_round).await;

    // The second member reads all but one of its partitions on a shared connection.
    let b = member_on_shared_reads(backend, &coordinator, &topic, partitions).await;
    let sub_b = b
        .subscribe(&topic, opts("g", "member-b").max_in_flight(8))
        .await
        .expect("subscribe b");
    let task_b = consume("member-b", sub_b, handled.clone());
    // Published while the group rebalances, and after: until the joining member handled
    // some (its partitions are handed over once the first member sees it).
    let mut rounds = 1;
    let deadline = Instant::now() + WAIT;
    while !handled.lock().unwrap().iter().any(|(m, ..)| m == "member-b") {
        assert!(
            Instant::now() < deadline,
            "the joining member was never given a partition"
        );
        publish_round(&publisher).await;
        rounds += 1;
        wait_handled(&handled, rounds * keys * per_round).await;
    }
    publish_round(&publisher).await;
    rounds += 1;
    wait_handled(&handled, rounds * keys * per_round).await;

    b.close().await.expect("close b");
    task_b.await.expect("member b's task");
    publish_round(&publisher).await;
    rounds += 1;
    wait_handled(&handled, rounds * keys * per_round).await;
    a.close().await.expect("close a");
    task_a.await.expect("member a's task");

    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled.len(),
        rounds * keys * per_round,
        "each message handled exactly once"
    );
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (member, key, seq) in &handled {
        if let Some(before) = last.insert(key, *seq) {
            assert!(
                *seq == before + 1,
                "{key}: {seq} handled by {member} after {before}"
            );
        } else {
            assert_eq!(*seq, 0, "{key} started at {seq}");
        }
    }
    for p in 0..partitions {
        let stream = crate::partition::partition_stream(&topic, p);
        assert_eq!(
            backend.pending(&stream, "g").await.expect("pending"),
            0,
            "{stream}"
        );
    }
}

/// A partitioned topic's count is fixed: asking for another is an error on publish and
/// subscribe, and a plain publish or subscribe to it is refused instead of going nowhere.
pub async fn partition_count_mismatch_is_an_error(backend: &dyn TestBackend) {
    let Some(coordinator) = coordinator(backend, "partition_count_mismatch_is_an_error").await else {
        return;
    };
    let topic = unique_topic("fixed-count");
    let plain = backend.publisher().await.expect("publisher");
    let four = PartitionedPublisher::new(plain.clone(), coordinator.clone()).topic(&topic, 4);
    four.publish(&topic, Message::new("t", &1).expect("message"))
        .await
        .expect("publish to the partitioned topic");
    assert_eq!(coordinator.partitions(&topic).await.expect("count"), Some(4));

    let eight = PartitionedPublisher::new(plain.clone(), coordinator.clone()).topic(&topic, 8);
    let err = eight
        .publish(&topic, Message::new("t", &1).expect("message"))
        .await
        .expect_err("another count");
    assert!(
        matches!(
            err,
            Error::PartitionMismatch {
                stored: 4,
                requested: 8,
                ..
            }
        ),
        "{err:?}"
    );
    let subscriber = member(backend, &coordinator, &topic, 8).await;
    let Err(err) = subscriber.subscribe(&topic, opts("g", "m")).await else {
        panic!("subscribe with another count succeeded");
    };
    assert!(matches!(err, Error::PartitionMismatch { .. }), "{err:?}");

    let err = plain
        .publish(&topic, Message::new("t", &1).expect("message"))
        .await
        .expect_err("a plain publish to a partitioned topic");
    assert!(matches!(err, Error::Partitioned { partitions: 4, .. }), "{err:?}");
    let raw = backend.subscriber().await.expect("subscriber");
    let Err(err) = raw.subscribe(&topic, opts("g", "m")).await else {
        panic!("a plain subscribe to a partitioned topic succeeded");
    };
    assert!(matches!(err, Error::Partitioned { partitions: 4, .. }), "{err:?}");
    raw.close().await.expect("close");

    // Without a key, messages go round-robin: every partition gets its share.
    let batch = (0..8).map(|n| Message::new("t", &n).expect("message")).collect();
    four.publish_batch(&topic, batch).await.expect("batch");
    let member = member(backend, &coordinator, &topic, 4).await;
    let mut sub = member
        .subscribe(&topic, opts("g", "m").max_in_flight(20))
        .await
        .expect("subscribe");
    let mut per_partition = HashMap::new();
    for _ in 0..9 {
        let d = recv(&mut sub).await;
        let (_, p) = parse_partition_stream(d.info().origin().stream()).expect("a partition stream");
        *per_partition.entry(p).or_insert(0) += 1;
        d.ack().await.expect("ack");
    }
    assert_eq!(per_partition.len(), 4, "{per_partition:?}");
    assert!(per_partition.values().all(|n| *n >= 2), "{per_partition:?}");
    member.close().await.expect("close");
}

/// `max_in_flight` bounds the deliveries out across all the partitions a member owns.
pub async fn max_in_flight_holds_across_partitions(backend: &dyn TestBackend) {
    let Some(coordinator) = coordinator(backend, "max_in_flight_holds_across_partitions").await else {
        return;
    };
    let topic = unique_topic("partitioned-in-flight");
    let publisher =
        PartitionedPublisher::new(backend.publisher().await.expect("publisher"), coordinator.clone())
            .topic(&topic, 4);
    let batch = (0..40).map(|n| Message::new("t", &n).expect("message")).collect();
    publisher.publish_batch(&topic, batch).await.expect("batch");
    // Three of the four partitions read on a shared connection: no prefetch there either.
    let member = member_on_shared_reads(backend, &coordinator, &topic, 4).await;
    let mut sub = member
        .subscribe(&topic, opts("g", "m").max_in_flight(6).batch_size(4))
        .await
        .expect("subscribe");
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(recv(&mut sub).await);
    }
    expect_quiet(&mut sub, "a delivery beyond max_in_flight across partitions").await;
    let mut pending = 0;
    for p in 0..4 {
        let stream = crate::partition::partition_stream(&topic, p);
        pending += backend.pending(&stream, "g").await.expect("pending");
    }
    assert_eq!(pending, 6, "entries read from the partitions");
    for d in held.drain(..2) {
        d.ack().await.expect("ack");
    }
    held.push(recv(&mut sub).await);
    held.push(recv(&mut sub).await);
    expect_quiet(&mut sub, "a delivery beyond max_in_flight after two acks").await;
    for d in held {
        d.ack().await.expect("ack");
    }
    for _ in 8..40 {
        recv(&mut sub).await.ack().await.expect("ack");
    }
    member.close().await.expect("close");
}

/// A stream of a topic's name, with entries or groups of its own, cannot become a partitioned
/// topic (its entries would be hidden); deleting a partitioned topic through the partitioned
/// subscriber removes its partitions and its count, after which the name is free again.
pub async fn partitioned_topics_are_created_and_deleted_whole(backend: &dyn TestBackend) {
    let Some(coordinator) = coordinator(backend, "partitioned_topics_are_created_and_deleted_whole").await
    else {
        return;
    };
    let plain = backend.publisher().await.expect("publisher");
    let taken = unique_topic("plain-first");
    plain
        .publish(&taken, Message::new("t", &1).expect("message"))
        .await
        .expect("plain publish");
    let err = coordinator
        .create_partitions(&taken, 4)
        .await
        .expect_err("a plain stream made partitioned");
    assert_eq!(err.invalid_field(), Some("topic"), "{err:?}");
    assert_eq!(coordinator.partitions(&taken).await.expect("count"), None);

    let topic = unique_topic("deleted-whole");
    let publisher = PartitionedPublisher::new(plain.clone(), coordinator.clone()).topic(&topic, 2);
    let batch = (0..4).map(|n| Message::new("t", &n).expect("message")).collect();
    publisher.publish_batch(&topic, batch).await.expect("batch");
    let member = member(backend, &coordinator, &topic, 2).await;
    let mut sub = member.subscribe(&topic, opts("g", "m")).await.expect("subscribe");
    for _ in 0..4 {
        recv(&mut sub).await.ack().await.expect("ack");
    }
    drop(sub);
    member
        .delete_topic(&topic)
        .await
        .expect("delete the partitioned topic");
    assert_eq!(coordinator.partitions(&topic).await.expect("count"), None);
    // The name is free: a plain stream may have it now, or a partitioned topic of another count.
    let other = PartitionedPublisher::new(plain.clone(), coordinator.clone()).topic(&topic, 3);
    other
        .publish(&topic, Message::new("t", &1).expect("message"))
        .await
        .expect("the name partitioned anew");
    assert_eq!(coordinator.partitions(&topic).await.expect("count"), Some(3));
    member.close().await.expect("close");
}

/// A member name is the member's while it lives: a second subscription under it (another
/// process with the same name) is refused once it has seen the first stay alive, and the first
/// goes on.
pub async fn a_member_name_is_refused_while_its_holder_lives(backend: &dyn TestBackend) {
    let Some(coordinator) = coordinator(backend, "a_member_name_is_refused_while_its_holder_lives").await
    else {
        return;
    };
    let topic = unique_topic("member-name");
    let publisher =
        PartitionedPublisher::new(backend.publisher().await.expect("publisher"), coordinator.clone())
            .topic(&topic, 2);
    let first = member(backend, &coordinator, &topic, 2).await;
    let mut first_sub = first
        .subscribe(&topic, opts("g", "same"))
        .await
        .expect("subscribe");
    publisher
        .publish(&topic, Message::new("t", &1).expect("message"))
        .await
        .expect("publish");
    recv(&mut first_sub).await.ack().await.expect("ack");

    let second = member(backend, &coordinator, &topic, 2).await;
    let mut second_sub = second
        .subscribe(&topic, opts("g", "same"))
        .await
        .expect("subscribe");
    match tokio::time::timeout(WAIT, second_sub.next()).await {
        Ok(Some(Err(Error::ConsumerActive { consumer, .. }))) => assert_eq!(consumer, "same"),
        Ok(other) => panic!("the second holder of a live member name got {other:?}"),
        Err(_) => panic!("the second holder of a live member name was not refused"),
    }
    publisher
        .publish(&topic, Message::new("t", &2).expect("message"))
        .await
        .expect("publish");
    recv(&mut first_sub).await.ack().await.expect("ack");
    second.close().await.expect("close");
    first.close().await.expect("close");
}

/// A member that hands a partition off lets the partition's deliveries finish until its
/// hand-off deadline, then lets the partition go: a handler stuck past the deadline cannot
/// keep the next owner out. Its entry goes to the next owner (delivered again), and the stuck
/// handler's late ack is refused.
pub async fn a_stuck_handler_holds_a_partition_only_until_the_handoff_deadline(backend: &dyn TestBackend) {
    let scenario = "a_stuck_handler_holds_a_partition_only_until_the_handoff_deadline";
    let Some(coordinator) = coordinator(backend, scenario).await else {
        return;
    };
    let topic = unique_topic("partitioned-handoff");
    let deadline = Duration::from_millis(500);
    // A second member that rendezvous hashing gives the one partition to.
    let second = (0..)
        .map(|n| format!("member-{n}"))
        .find(|name| crate::partition::owner_of(0, &["first", name.as_str()]) == Some(name.as_str()))
        .expect("some name wins the partition");
    let publisher =
        PartitionedPublisher::new(backend.publisher().await.expect("publisher"), coordinator.clone())
            .topic(&topic, 1);
    publisher
        .publish_keyed(&topic, "k", Message::new("t", &7).expect("message"))
        .await
        .expect("publish");
    let options = PartitionOptions::default().handoff_deadline(deadline);
    let a = member_with(backend, &coordinator, &topic, 1, options).await;
    let mut sub_a = a.subscribe(&topic, opts("g", "first")).await.expect("subscribe");
    let stuck = recv(&mut sub_a).await;

    let b = member(backend, &coordinator, &topic, 1).await;
    let joined = Instant::now();
    let mut sub_b = b.subscribe(&topic, opts("g", &second)).await.expect("subscribe");
    let again = recv(&mut sub_b).await;
    assert!(
        joined.elapsed() >= deadline,
        "the partition moved after {:?}, before the stuck delivery's deadline",
        joined.elapsed()
    );
    assert_eq!(again.id(), stuck.id(), "the stuck entry goes to the next owner");
    assert!(again.delivery_count() >= 2, "delivered again");
    assert!(
        stuck.ack().await.is_err(),
        "the stuck handler's ack, past the deadline, was taken"
    );
    again.ack().await.expect("ack by the new owner");
    sub_b.flush().await.expect("flush");
    let stream = crate::partition::partition_stream(&topic, 0);
    assert_eq!(backend.pending(&stream, "g").await.expect("pending"), 0);
    expect_quiet(&mut sub_b, "nothing else on the partition").await;
    drop((sub_a, sub_b));
    b.close().await.expect("close b");
    a.close().await.expect("close a");
}
