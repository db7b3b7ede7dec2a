//! Partitioned topics: the topic `customer-orders` is spread over 4 partition streams (`customer-orders~p0` ...
//! `customer-orders~p3`) and consumed by a group of two members, `worker-1` and `worker-2`, each a
//! router on a subscriber of its own (as two processes would be). Every order is published
//! with its customer as the key (`publish_keyed`), so all of a customer's orders land in one
//! partition; the members share the partitions out between them (rendezvous hashing), and each
//! customer's orders are handled one at a time, in order, across the whole group, also while
//! partitions move from one member to the other.
//!
//! The demo: `worker-1` starts alone and owns every partition; `worker-2` joins and takes its
//! partitions over (each once `worker-1` has settled what it handed out there); `worker-2`
//! leaves and `worker-1` takes them back. Orders keep coming meanwhile. At the end it prints,
//! per customer, which member handled which of its orders, checks they came in order, and
//! stops both routers.
//!
//! In memory by default; on Redis when `STREAMWISE_URL` (or `REDIS_URL`) is set (on a Redis
//! Cluster, `redis-cluster://...`, the partition streams spread over the masters). On Redis `orders`
//! stays a partitioned topic after the run: a plain subscriber or publisher on that server
//! (the router example's, which uses `orders` as a plain stream) then gets
//! `Error::Partitioned` for it.
//!
//! ```sh
//! cargo run --example partitions
//! STREAMWISE_URL=redis://127.0.0.1:6379 cargo run --example partitions
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamwise::memory::MemoryBackend;
use streamwise::partition::{
    PartitionCoordinator, PartitionOptions, PartitionedPublisher, PartitionedSubscriber, assigned_to,
    parse_partition_stream, partition_for_key,
};
use streamwise::router::{Json, Router, RunningRouter, State};
use streamwise::{DeliveryInfo, Message, Publisher, SubscribeOptions, Subscriber, Uuid};
use tokio::sync::Notify;
use tokio::time::Instant;

const TOPIC: &str = "customer-orders";
const PARTITIONS: u32 = 4;
const GROUP: &str = "fulfilment";
const MEMBERS: [&str; 2] = ["worker-1", "worker-2"];
const CUSTOMERS: [&str; 6] = ["ada", "barbara", "donald", "edsger", "grace", "linus"];
/// How long the whole demo may take before it gives up.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    /// This run of the demo: on Redis the topic outlives the process, and orders an earlier
    /// run left unhandled (it was killed) come first; they are acknowledged and skipped.
    run: String,
    customer: String,
    /// The customer's order number: 1, 2, 3, ...
    number: u32,
}

/// One handled order.
struct Handled {
    member: &'static str,
    partition: u32,
    number: u32,
}

/// What both members record into, shared with their handlers.
#[derive(Default)]
struct Journal {
    /// Per customer, its orders in the order they were handled.
    per_customer: BTreeMap<String, Vec<Handled>>,
    /// (customer, number) of every order handled, to wait on.
    seen: HashSet<(String, u32)>,
    /// Orders of earlier runs, skipped.
    skipped: u64,
}

/// A member's handler state.
#[derive(Clone)]
struct Member {
    name: &'static str,
    run: Arc<str>,
    journal: Arc<Mutex<Journal>>,
    progress: Arc<Notify>,
}

async fn on_placed(Json(order): Json<OrderPlaced>, info: DeliveryInfo, State(member): State<Member>) {
    if *order.run != *member.run {
        member.journal.lock().unwrap().skipped += 1;
        return;
    }
    // A little work, so that deliveries overlap: the router keeps each customer's in order
    // (unless `Routes::order_by` says otherwise, it orders by the partition key), while
    // different customers' run side by side.
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The delivery comes from one of the partition streams (its consumer name is `owner`, the
    // one every owner of a partition reads it under; the member is ours to know).
    let (_, partition) = parse_partition_stream(info.stream()).expect("a partition stream");
    let mut journal = member.journal.lock().unwrap();
    journal.seen.insert((order.customer.clone(), order.number));
    journal
        .per_customer
        .entry(order.customer)
        .or_default()
        .push(Handled {
            member: member.name,
            partition,
            number: order.number,
        });
    member.progress.notify_one();
}

/// Starts the router of member `name` on its own subscriber.
async fn start_member(
    name: &'static str,
    subscriber: Arc<dyn Subscriber>,
    coordinator: Arc<dyn PartitionCoordinator>,
    publisher: Arc<dyn Publisher>,
    state: Member,
) -> streamwise::Result<RunningRouter> {
    // A member's record lives 1.5 s without a heartbeat (one every 0.5 s), so the group sees
    // members join and leave quickly; the default is 10 s.
    let partitioned: Arc<dyn Subscriber> = Arc::new(
        PartitionedSubscriber::new(subscriber, coordinator)
            .options(PartitionOptions::default().member_ttl(Duration::from_millis(1500)))
            .topic(TOPIC, PARTITIONS),
    );
    let router = Router::with_state(Member { name, ..state });
    let routes = router.routes().route("order.placed", on_placed);
    // The consumer name is the member's name; max_in_flight (at least the partitions a member
    // may own) bounds its deliveries across all its partitions.
    let options = SubscribeOptions::new(GROUP, name).max_in_flight(8);
    router
        .subscribe(TOPIC, options, routes)
        .shutdown_deadline(Duration::from_secs(10))
        .start(partitioned, publisher)
        .await
}

/// Publishes the next order of every customer.
async fn publish_round(publisher: &PartitionedPublisher, run: &str, number: u32) -> streamwise::Result<()> {
    for customer in CUSTOMERS {
        let order = OrderPlaced {
            run: run.to_owned(),
            customer: customer.to_owned(),
            number,
        };
        publisher
            .publish_keyed(TOPIC, customer, Message::new("order.placed", &order)?)
            .await?;
    }
    Ok(())
}

/// Waits until every order up to `number` of every customer was handled; fails when a
/// router's subscription ended by itself (its member name is live in another process, say).
async fn wait_handled(
    journal: &Mutex<Journal>,
    progress: &Notify,
    routers: &[&RunningRouter],
    number: u32,
) -> Result<(), String> {
    let deadline = Instant::now() + DEADLINE;
    let failed = futures::future::select_all(routers.iter().map(|r| Box::pin(r.failed())));
    tokio::pin!(failed);
    loop {
        let done = {
            let journal = journal.lock().unwrap();
            CUSTOMERS
                .iter()
                .all(|c| (1..=number).all(|n| journal.seen.contains(&(c.to_string(), n))))
        };
        if done {
            return Ok(());
        }
        tokio::select! {
            _ = progress.notified() => {}
            (error, _, _) = &mut failed => return Err(format!("a member stopped: {error}")),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("orders up to number {number} were not handled in {DEADLINE:?}"));
            }
        }
    }
}

/// Whether `member` handled any order numbered above `after`.
fn handled_after(journal: &Mutex<Journal>, member: &str, after: u32) -> bool {
    let journal = journal.lock().unwrap();
    journal
        .per_customer
        .values()
        .flatten()
        .any(|h| h.member == member && h.number > after)
}

/// What the demo runs on: a publisher, one subscriber per member (each member would be a
/// process of its own), and the coordinator that keeps the topic's partition count and the
/// group's members.
struct Backend {
    publisher: Arc<dyn Publisher>,
    subscribers: [Arc<dyn Subscriber>; 2],
    coordinator: Arc<dyn PartitionCoordinator>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Backend {
        publisher,
        subscribers: [first_subscriber, second_subscriber],
        coordinator,
    } = match streamwise::url_from_env() {
        Some(url) => {
            // Two connections, as two services would have.
            let (first, second) = (streamwise::connect(&url).await?, streamwise::connect(&url).await?);
            let coordinator = first
                .coordinator()
                .ok_or("partitioned topics need a backend that keeps their members (memory or Redis); NATS has none yet")?;
            println!("Using {} at {}", first.kind(), first.location());
            Backend {
                publisher: first.publisher(),
                subscribers: [first.subscriber(), second.subscriber()],
                coordinator,
            }
        }
        None => {
            println!("Using the in-memory backend (set STREAMWISE_URL to use Redis)");
            let memory = MemoryBackend::new();
            Backend {
                publisher: Arc::new(memory.publisher()),
                subscribers: [Arc::new(memory.subscriber()), Arc::new(memory.subscriber())],
                coordinator: Arc::new(memory.coordinator()),
            }
        }
    };

    // Declares the topic with 4 partitions: created so on first use, and an error
    // (PartitionMismatch) if it was created with another count. It also passes topics that are
    // not partitioned through, so the routers publish with it too.
    let publisher =
        Arc::new(PartitionedPublisher::new(publisher, coordinator.clone()).topic(TOPIC, PARTITIONS));

    let run: Arc<str> = Uuid::now_v7().to_string().into();
    let journal = Arc::new(Mutex::new(Journal::default()));
    let progress = Arc::new(Notify::new());
    let state = Member {
        name: "",
        run: run.clone(),
        journal: journal.clone(),
        progress: progress.clone(),
    };

    println!(
        "Topic {TOPIC}: {PARTITIONS} partitions, {TOPIC}~p0 .. {TOPIC}~p{}",
        PARTITIONS - 1
    );
    let with_both = MEMBERS.map(|m| (m, assigned_to(m, &MEMBERS, PARTITIONS)));
    println!(
        "With both members live, {} owns partitions {:?} and {} owns {:?}",
        with_both[0].0, with_both[0].1, with_both[1].0, with_both[1].1
    );
    let second_wins_a_customer = CUSTOMERS
        .iter()
        .any(|c| with_both[1].1.contains(&partition_for_key(c, PARTITIONS)));
    assert!(
        second_wins_a_customer,
        "some customer must map to a partition of {}",
        MEMBERS[1]
    );

    // worker-1 alone: it owns every partition.
    let first = start_member(
        MEMBERS[0],
        first_subscriber,
        coordinator.clone(),
        publisher.clone(),
        state.clone(),
    )
    .await?;
    println!("{} started alone", MEMBERS[0]);
    let mut number = 1;
    publish_round(&publisher, &run, number).await?;
    wait_handled(&journal, &progress, &[&first], number).await?;

    // worker-2 joins: worker-1 sees it at its next heartbeat, stops reading the partitions
    // worker-2 wins, settles what it handed out there, and lets go; worker-2 takes them over.
    // Orders keep coming meanwhile, until worker-2 has handled some.
    let second = start_member(
        MEMBERS[1],
        second_subscriber,
        coordinator.clone(),
        publisher.clone(),
        state.clone(),
    )
    .await?;
    println!("{} joined", MEMBERS[1]);
    let joined_at = number;
    let deadline = Instant::now() + DEADLINE;
    while !handled_after(&journal, MEMBERS[1], joined_at) {
        if Instant::now() > deadline {
            return Err(format!("{} was never given a partition", MEMBERS[1]).into());
        }
        number += 1;
        publish_round(&publisher, &run, number).await?;
        wait_handled(&journal, &progress, &[&first, &second], number).await?;
        // Orders arrive over time, not all at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    number += 1;
    publish_round(&publisher, &run, number).await?;
    wait_handled(&journal, &progress, &[&first, &second], number).await?;
    println!("{} took its partitions over", MEMBERS[1]);

    // worker-2 leaves: it stops reading, settles and flushes what it was handling, and leaves
    // the group, so worker-1 takes its partitions back at its next heartbeat.
    let report = second.shutdown().await?;
    println!(
        "{} left: {} handled, {} abandoned",
        MEMBERS[1], report.handled, report.abandoned
    );
    for _ in 0..2 {
        number += 1;
        publish_round(&publisher, &run, number).await?;
    }
    wait_handled(&journal, &progress, &[&first], number).await?;

    let report = first.shutdown().await?;
    println!(
        "{} stopped: {} handled, {} abandoned",
        MEMBERS[0], report.handled, report.abandoned
    );
    publisher.close().await?;

    // Who handled what, per customer: runs of consecutive orders by the same member.
    let journal = journal.lock().unwrap();
    if journal.skipped > 0 {
        println!("Skipped {} orders left over from an earlier run", journal.skipped);
    }
    let mut in_order = true;
    for (customer, handled) in &journal.per_customer {
        let numbers: Vec<u32> = handled.iter().map(|h| h.number).collect();
        let expected: Vec<u32> = (1..=number).collect();
        in_order &= numbers == expected;
        let mut runs: Vec<(&str, u32, u32)> = Vec::new();
        for h in handled {
            match runs.last_mut() {
                Some((member, _, last)) if *member == h.member => *last = h.number,
                _ => runs.push((h.member, h.number, h.number)),
            }
        }
        let runs: Vec<String> = runs
            .iter()
            .map(|(member, from, to)| {
                if from == to {
                    format!("{from} by {member}")
                } else {
                    format!("{from}-{to} by {member}")
                }
            })
            .collect();
        println!(
            "{customer:<8} ({TOPIC}~p{}): {}{}",
            handled[0].partition,
            runs.join(", "),
            if numbers == expected { "" } else { "  OUT OF ORDER" }
        );
    }
    if !in_order {
        return Err("some customer's orders were not handled exactly once, in order".into());
    }
    println!(
        "All {} orders handled, each customer's in order",
        CUSTOMERS.len() as u32 * number
    );
    Ok(())
}
