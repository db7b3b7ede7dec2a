//! Partitioned topics under churn, with real processes: members of a group join, leave, are
//! SIGKILLed and SIGSTOPped while keyed messages flow. Nothing is lost, each key's messages
//! are handled in order (a duplicate only ever repeats a number already handled), every
//! partition ends up owned by the member rendezvous hashing names, and a member cut off past
//! its lease cannot ack into the partitions it lost.
//!
//! The member process is this test binary run again with `STREAMWISE_PART_URL` set (see
//! [`member_process_entry_point`]).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamwise::partition::{
    KEY_METADATA, PartitionOptions, PartitionedPublisher, PartitionedSubscriber, owner_of, partition_stream,
};
use streamwise::redis::client::cmd;
use streamwise::redis::{
    RedisBackend, RedisConnection, RedisCoordinator, RedisSubscriber, RedisSubscriberOptions,
};
use streamwise::router::{Json, Metadata, Router, State};
use streamwise::{Message, Publisher, SubscribeOptions};

use common::RedisServer;

const TOPIC: &str = "orders";
const GROUP: &str = "workers";
const PARTITIONS: u32 = 8;
const KEYS: u64 = 1000;
/// Per member process: deliveries in flight.
const WINDOW: usize = 32;
/// Lease and membership TTL of the member processes.
const TTL: Duration = Duration::from_secs(1);
const DONE: &str = "part-test:done";

fn handled_key(key: &str) -> String {
    format!("part-test:handled:{key}")
}

/// Not a test of its own: the body of the member processes the tests start. Without
/// `STREAMWISE_PART_URL` it does nothing.
#[test]
fn member_process_entry_point() {
    let (Ok(url), Ok(name)) = (
        std::env::var("STREAMWISE_PART_URL"),
        std::env::var("STREAMWISE_PART_NAME"),
    ) else {
        return;
    };
    let work_ms: u64 = std::env::var("STREAMWISE_PART_WORK_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    let dedicated: usize = std::env::var("STREAMWISE_PART_DEDICATED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    let ttl = std::env::var("STREAMWISE_PART_TTL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(TTL, Duration::from_millis);
    if std::env::var_os("STREAMWISE_PART_LOG_DIR").is_some() {
        // Lease and hand-off events, for a failure to be read after the fact.
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let backend = RedisBackend::new(&url).expect("url");
        let redis = Arc::new(
            RedisSubscriber::new(
                backend.connection().clone(),
                RedisSubscriberOptions::default().lease_ttl(ttl),
            )
            .expect("subscriber"),
        );
        let subscriber = PartitionedSubscriber::new(redis.clone(), Arc::new(backend.coordinator()))
            .options(
                PartitionOptions::default()
                    .member_ttl(ttl)
                    .dedicated_readers(dedicated),
            )
            .topic(TOPIC, PARTITIONS);
        #[derive(Clone)]
        struct Worker {
            conn: RedisConnection,
            name: String,
            work: Duration,
        }
        async fn handle(
            Json(seq): Json<u64>,
            metadata: Metadata,
            State(w): State<Worker>,
        ) -> streamwise::Result<()> {
            if !w.work.is_zero() {
                tokio::time::sleep(w.work).await;
            }
            let key = metadata.get(KEY_METADATA).expect("keyed").to_owned();
            // Recorded before the ack: a crash after this line is a duplicate, never a loss.
            w.conn
                .command::<i64>(
                    cmd("RPUSH")
                        .arg(handled_key(&key))
                        .arg(format!("{seq}/{}", w.name)),
                )
                .await?;
            w.conn
                .command::<i64>(cmd("SADD").arg(DONE).arg(format!("{key}/{seq}")))
                .await?;
            Ok(())
        }
        let worker = Worker {
            conn: backend.connection().clone(),
            name: name.clone(),
            work: Duration::from_millis(work_ms),
        };
        let options = SubscribeOptions::new(GROUP, &name)
            .max_in_flight(WINDOW)
            .batch_size(8)
            .block(Duration::from_millis(200));
        let router = Router::with_state(worker);
        let routes = router.routes().route("seq", handle);
        let stopped = router
            .subscribe(TOPIC, options, routes)
            .shutdown_deadline(Duration::from_secs(10))
            .run(
                Arc::new(subscriber),
                Arc::new(backend.publisher()),
                streamwise::router::shutdown_signal(),
            )
            .await;
        // Read by the test after the process exits.
        println!("fenced={}", redis.stats().fenced);
        eprintln!("member {name} stopped: {stopped:?}");
        std::process::exit(if stopped.is_err() { 3 } else { 0 });
    });
}

fn spawn_member(url: &str, name: &str, work_ms: u64) -> Member {
    spawn_member_reading_on(url, name, work_ms, 16)
}

/// A member process whose partitions past the first `dedicated` read in turn on a shared
/// connection.
fn spawn_member_reading_on(url: &str, name: &str, work_ms: u64, dedicated: usize) -> Member {
    spawn_member_process(url, name, work_ms, dedicated, TTL)
}

/// A member process whose membership record and partition leases live `ttl` without a beat.
fn spawn_member_process(url: &str, name: &str, work_ms: u64, dedicated: usize, ttl: Duration) -> Member {
    let child = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "member_process_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("STREAMWISE_PART_URL", url)
        .env("STREAMWISE_PART_NAME", name)
        .env("STREAMWISE_PART_WORK_MS", work_ms.to_string())
        .env("STREAMWISE_PART_DEDICATED", dedicated.to_string())
        .env("STREAMWISE_PART_TTL_MS", ttl.as_millis().to_string())
        .stdout(Stdio::piped())
        .stderr(member_log(name))
        .spawn()
        .expect("start a member process");
    Member(child)
}

/// Where a member's log goes: `$STREAMWISE_PART_LOG_DIR/<name>.log` (appended, at debug)
/// when that is set, else nowhere.
fn member_log(name: &str) -> Stdio {
    let Some(dir) = std::env::var_os("STREAMWISE_PART_LOG_DIR") else {
        return Stdio::null();
    };
    let path = std::path::Path::new(&dir).join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// A member process, SIGKILLed when dropped unless it has ended: a test that fails midway
/// leaves none running (one left over would join the next test's cluster on reused ports).
struct Member(Child);

impl std::ops::Deref for Member {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Member {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} failed");
}

/// Stops a member with SIGTERM and returns what it printed.
fn stop(mut child: Member) -> String {
    signal(&child, "TERM");
    let status = child.wait().expect("wait");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("stdout");
    assert!(status.success(), "member exited with {status:?}: {out}");
    out
}

fn message(key: u64, seq: u64) -> Message {
    Message::new("seq", &seq)
        .expect("message")
        .with_metadata(KEY_METADATA, format!("key-{key}"))
}

/// A connection, the coordinator and a publisher of the topic on the server at `url`.
fn connect(url: &str) -> (RedisConnection, RedisCoordinator, PartitionedPublisher) {
    connect_to(url, TOPIC, PARTITIONS)
}

/// A connection, the coordinator and a publisher of `topic` (`partitions`) at `url`.
fn connect_to(
    url: &str,
    topic: &str,
    partitions: u32,
) -> (RedisConnection, RedisCoordinator, PartitionedPublisher) {
    let backend = RedisBackend::new(url).unwrap();
    let coordinator = backend.coordinator();
    let publisher = PartitionedPublisher::new(Arc::new(backend.publisher()), Arc::new(coordinator.clone()))
        .topic(topic, partitions);
    (backend.connection().clone(), coordinator, publisher)
}

/// Publishes sequence numbers `seqs` for every key, in order, in batches of one round.
async fn publish(publisher: &PartitionedPublisher, seqs: std::ops::Range<u64>) {
    for seq in seqs {
        let batch = (0..KEYS).map(|key| message(key, seq)).collect();
        publisher.publish_batch(TOPIC, batch).await.expect("publish");
    }
}

async fn done(conn: &RedisConnection) -> u64 {
    conn.command(cmd("SCARD").arg(DONE)).await.expect("SCARD")
}

async fn wait_done(conn: &RedisConnection, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = done(conn).await;
        if got >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {got} of {n} handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each partition's owner when the group last settled (`None`: no owner yet).
struct Owners(Vec<Option<String>>);

impl Owners {
    fn none() -> Self {
        Owners(vec![None; PARTITIONS as usize])
    }
}

/// Waits until every partition is owned by the member rendezvous hashing names among the live
/// `members`, and returns how long that took. On the way, no partition moves that rendezvous
/// hashing keeps where it was (`last`, updated), and one that moves goes straight to its new
/// owner (through no owner at all, never through a third member).
async fn wait_settled(coordinator: &RedisCoordinator, members: &[&str], last: &mut Owners) -> Duration {
    let started = Instant::now();
    let want: Vec<Option<String>> = (0..PARTITIONS)
        .map(|p| owner_of(p, members).map(str::to_owned))
        .collect();
    loop {
        let live = coordinator.members(TOPIC, GROUP).await.expect("members");
        let owners = coordinator.owners(TOPIC, GROUP).await.expect("owners");
        for (p, ((now, was), will)) in owners.iter().zip(&last.0).zip(&want).enumerate() {
            if was.is_some() && was == will {
                assert_eq!(
                    now, was,
                    "partition {p} moved, though rendezvous hashing keeps it"
                );
            } else {
                assert!(
                    now == was || now.is_none() || now == will,
                    "partition {p} went to {now:?} on its way from {was:?} to {will:?}"
                );
            }
        }
        if owners == want && live == members {
            let moved = owners.iter().zip(&last.0).filter(|(now, was)| now != was).count();
            eprintln!("{moved} of {PARTITIONS} partitions moved to settle on {members:?}");
            last.0 = owners;
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "partitions not settled: owners {owners:?}, want {want:?}, live {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a key's records may repeat numbers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeats {
    /// Only as an exact replay of the last ones handled: a run `r, r+1, ...` up to the last
    /// number handled, before any new number (what a take-over after a crash redelivers).
    ExactReplay,
    /// Any number handled before, anywhere (a failover's lost acks, a handler that was running
    /// when its member lost the partition).
    AnyRepeat,
}

/// Checks what was handled for every key: each number from 0 to `seqs - 1`, new numbers in
/// order, repeats only as `repeats` allows. Returns the repeats.
async fn check_order(conn: &RedisConnection, seqs: u64, repeats: Repeats) -> u64 {
    let mut duplicates = 0;
    // (first handled by, again by) -> how many: where repeats came from, for a failure's
    // message.
    let mut repeated_by: BTreeMap<(String, String), u64> = BTreeMap::new();
    for key in 0..KEYS {
        let key = format!("key-{key}");
        let records: Vec<String> = conn
            .command(cmd("LRANGE").arg(handled_key(&key)).arg(0).arg(-1))
            .await
            .expect("LRANGE");
        let mut next = 0;
        let mut first_by: Vec<&str> = Vec::new();
        // While replaying: the number the replay must show next.
        let mut replaying: Option<u64> = None;
        for record in &records {
            let (seq, member) = record.split_once('/').expect("seq/member");
            let seq: u64 = seq.parse().expect("number");
            match replaying {
                Some(expected) if repeats == Repeats::ExactReplay => {
                    assert!(
                        seq <= expected,
                        "{key}: {seq} (by {member}) in a replay that was at {expected}: {records:?}"
                    );
                    // (A replay that starts again, earlier: another take-over.)
                    duplicates += 1;
                    tally_repeat(&mut repeated_by, &first_by, seq, member);
                    replaying = (seq + 1 < next).then_some(seq + 1);
                    continue;
                }
                _ => {}
            }
            if seq == next {
                next += 1;
                first_by.push(member);
            } else {
                assert!(
                    seq < next,
                    "{key}: {seq} (by {member}) handled before {next}: {records:?}"
                );
                duplicates += 1;
                tally_repeat(&mut repeated_by, &first_by, seq, member);
                if repeats == Repeats::ExactReplay {
                    replaying = (seq + 1 < next).then_some(seq + 1);
                }
            }
        }
        assert_eq!(next, seqs, "{key}: handled up to {next}: {records:?}");
        assert_eq!(replaying, None, "{key}: a replay stopped short: {records:?}");
    }
    if duplicates > 0 {
        eprintln!("repeats by (first handled by, again by): {repeated_by:?}");
    }
    duplicates
}

/// Counts a repeat of `seq` by `member` under (who handled it first, `member`).
fn tally_repeat(tally: &mut BTreeMap<(String, String), u64>, first_by: &[&str], seq: u64, member: &str) {
    let first = first_by.get(seq as usize).copied().unwrap_or("?");
    *tally.entry((first.to_owned(), member.to_owned())).or_default() += 1;
}

async fn assert_nothing_pending(conn: &RedisConnection) {
    assert_nothing_pending_in(conn, TOPIC, PARTITIONS).await;
}

async fn assert_nothing_pending_in(conn: &RedisConnection, topic: &str, partitions: u32) {
    for p in 0..partitions {
        let stream = partition_stream(topic, p);
        let pending = streamwise::redis::admin::pending_count(conn, &stream, GROUP)
            .await
            .expect("pending");
        assert_eq!(pending, 0, "{stream}");
    }
}

/// 8 partitions, 100,000 keyed messages; members join one by one, one is SIGKILLed and
/// replaced, one leaves with SIGTERM: 0 lost, each key in order, duplicates only from the
/// killed member (its in-flight window and its unwritten acks), and after each change every
/// partition owned by exactly the member rendezvous hashing names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_leave_and_crash_without_loss_or_reordering() {
    let server = RedisServer::start();
    let url = server.url();
    let (conn, coordinator, publisher) = connect(&url);
    let mut owners = Owners::none();
    let seqs = 100;

    let m0 = spawn_member(&url, "m0", 0);
    publish(&publisher, 0..25).await;
    let took = wait_settled(&coordinator, &["m0"], &mut owners).await;
    eprintln!("m0 owns all partitions {took:?} after the first publish");
    let m1 = spawn_member(&url, "m1", 0);
    publish(&publisher, 25..50).await;
    wait_settled(&coordinator, &["m0", "m1"], &mut owners).await;
    // m2 and m3 read all but one of their partitions on a shared connection.
    let m2 = spawn_member_reading_on(&url, "m2", 0, 1);
    let took = wait_settled(&coordinator, &["m0", "m1", "m2"], &mut owners).await;
    eprintln!("rebalanced to m0, m1, m2 in {took:?}");
    publish(&publisher, 50..65).await;

    let mut m1 = m1;
    m1.kill().expect("SIGKILL m1");
    m1.wait().expect("reap m1");
    publish(&publisher, 65..80).await;
    let took = wait_settled(&coordinator, &["m0", "m2"], &mut owners).await;
    eprintln!("m1's partitions taken over {took:?} after the kill was seen");
    let m3 = spawn_member_reading_on(&url, "m3", 0, 1);
    let joined = Instant::now();
    let took = wait_settled(&coordinator, &["m0", "m2", "m3"], &mut owners).await;
    eprintln!(
        "rebalance after m3 joined: {took:?} ({:?} from its start)",
        joined.elapsed()
    );
    publish(&publisher, 80..90).await;
    let fenced = stop(m0);
    eprintln!("m0 left: {fenced}");
    wait_settled(&coordinator, &["m2", "m3"], &mut owners).await;
    publish(&publisher, 90..seqs).await;

    wait_done(&conn, KEYS * seqs).await;
    stop(m2);
    stop(m3);
    let duplicates = check_order(&conn, seqs, Repeats::ExactReplay).await;
    eprintln!("{duplicates} duplicates");
    // Only the killed member's entries come again: joins and graceful leaves hand over with
    // every ack written. What the kill leaves behind is its window in flight plus the acks
    // of deliveries it settled whose XACK had not returned (a slot is free at the settle, not
    // at the write): at most about a second window under load (41 seen in CI).
    assert!(duplicates <= 2 * WINDOW as u64, "{duplicates} duplicates");
    assert_nothing_pending(&conn).await;
}

/// A member paused (SIGSTOP) past its lease while its handlers run: the others take its
/// partitions; once resumed, its acks into them are refused by the fence, and nothing is lost
/// or handled out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_cannot_ack_into_partitions_it_lost() {
    let server = RedisServer::start();
    let url = server.url();
    let (conn, coordinator, publisher) = connect(&url);
    let mut owners = Owners::none();
    let seqs = 20;
    // Slow handlers: the pause always lands while some of them run.
    let paused = spawn_member(&url, "paused", 20);
    wait_settled(&coordinator, &["paused"], &mut owners).await;
    let other = spawn_member(&url, "other", 20);
    wait_settled(&coordinator, &["other", "paused"], &mut owners).await;
    publish(&publisher, 0..seqs).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done(&conn).await < 500 {
        assert!(Instant::now() < deadline, "no progress before the pause");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&paused, "STOP");
    // Its membership and leases run out; the other member takes every partition.
    let took = wait_settled(&coordinator, &["other"], &mut owners).await;
    eprintln!("the paused member's partitions taken over in {took:?}");
    signal(&paused, "CONT");
    wait_done(&conn, KEYS * seqs).await;
    let out = stop(paused);
    stop(other);
    let fenced: u64 = out
        .lines()
        .find_map(|l| l.split("fenced=").nth(1))
        .unwrap_or_else(|| panic!("no stats in the member's output: {out}"))
        .parse()
        .expect("a count");
    assert!(fenced > 0, "the resumed member's acks were all written: {out}");
    eprintln!("{fenced} acks refused by the fence");
    // The handlers running when the member was paused finish after it resumes: their
    // records come late (their acks are refused; the new owner handled those entries too).
    check_order(&conn, seqs, Repeats::AnyRepeat).await;
    assert_nothing_pending(&conn).await;
}

/// The same on a Redis Cluster (3 masters, 3 replicas), with a coordinated failover of the
/// master that holds partition 0 while members consume, and a member SIGKILLed: 0 lost, each
/// key in order, every partition owned as rendezvous hashing says once the group settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_keep_key_order_through_a_cluster_failover() {
    let cluster = streamwise::testing::RedisCluster::start();
    let url = cluster.url();
    let (conn, coordinator, publisher) = connect(&url);
    let mut owners = Owners::none();
    let seqs = 30;
    let first = partition_stream(TOPIC, 0);
    let masters: std::collections::HashSet<u16> = (0..PARTITIONS)
        .filter_map(|p| cluster.master_of(&partition_stream(TOPIC, p)).map(|m| m.port()))
        .collect();
    assert!(
        masters.len() > 1,
        "the partitions spread over the masters: {masters:?}"
    );

    assert_eq!(
        cluster.master_of(TOPIC).map(|m| m.port()),
        cluster.master_of(&first).map(|m| m.port()),
        "the members' records share partition 0's master"
    );
    // Records and leases that outlast the failover, as the README's cluster notes ask. The
    // members' records live in the topic's slot, on the master failed over below: records
    // that ran out within it would make members count each other gone, and a partition could
    // take a detour through a third member. While the client refreshes its slot map after a
    // MOVED, every command of its cluster connection waits, renewals of the leases on the other
    // masters too. (A partition on a master that did not fail over is still seen unowned for
    // a moment now and then, with no other member taking it: once in 40 local runs with 1 s
    // leases, once in 18 with 5 s; the cause is not found yet, see issue 15's notes.)
    let ttl = Duration::from_secs(5);
    let m0 = spawn_member_process(&url, "m0", 0, 16, ttl);
    wait_settled(&coordinator, &["m0"], &mut owners).await;
    let mut m1 = spawn_member_process(&url, "m1", 0, 16, ttl);
    publish(&publisher, 0..10).await;
    wait_settled(&coordinator, &["m0", "m1"], &mut owners).await;
    // m2 reads all but one of its partitions on shared connections, one per master.
    let m2 = spawn_member_process(&url, "m2", 0, 1, ttl);
    wait_settled(&coordinator, &["m0", "m1", "m2"], &mut owners).await;
    publish(&publisher, 10..15).await;

    let master = cluster.master_of(&first).unwrap().port();
    let replica = cluster.replicas_of(master)[0];
    let promoted = replica.port();
    assert_eq!(replica.command("CLUSTER FAILOVER"), "+OK");
    publish(&publisher, 15..20).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.master_of(&first).map(|m| m.port()) != Some(promoted) {
        assert!(Instant::now() < deadline, "the replica was not promoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m1.kill().expect("SIGKILL m1");
    m1.wait().expect("reap m1");
    publish(&publisher, 20..seqs).await;
    let took = wait_settled(&coordinator, &["m0", "m2"], &mut owners).await;
    eprintln!("settled on m0, m2 {took:?} after the kill was seen");

    wait_done(&conn, KEYS * seqs).await;
    stop(m0);
    stop(m2);
    // Acks the old master took and had not replicated come back after the failover, maybe
    // after newer entries were handled.
    let duplicates = check_order(&conn, seqs, Repeats::AnyRepeat).await;
    eprintln!("{duplicates} duplicates");
    assert!(duplicates <= 2 * WINDOW as u64, "{duplicates} duplicates");
    assert_nothing_pending(&conn).await;
}

/// A member SIGKILLed and restarted at once under the same name (as a supervisor does) waits
/// for its old record to run out, then rejoins and takes its partitions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_under_its_name_after_a_crash_rejoins() {
    let server = RedisServer::start();
    let url = server.url();
    let (conn, coordinator, publisher) = connect(&url);
    let mut owners = Owners::none();
    let mut first = spawn_member(&url, "m0", 0);
    wait_settled(&coordinator, &["m0"], &mut owners).await;
    publish(&publisher, 0..2).await;
    wait_done(&conn, 2 * KEYS).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let restarted = spawn_member(&url, "m0", 0);
    publish(&publisher, 2..4).await;
    wait_done(&conn, 4 * KEYS).await;
    wait_settled(&coordinator, &["m0"], &mut owners).await;
    stop(restarted);
    check_order(&conn, 4, Repeats::ExactReplay).await;
    assert_nothing_pending(&conn).await;
}

/// A partition's lease that merely ran out (an outage, a pause; no one else took it) does not
/// refuse its holder's acks: refusing would strand the entries in the pending list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_the_lease_ran_out_unclaimed_is_written() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let conn = backend.connection().clone();
    let coordinator = Arc::new(backend.coordinator());
    let publisher =
        PartitionedPublisher::new(Arc::new(backend.publisher()), coordinator.clone()).topic("lapsed", 1);
    let subscriber =
        PartitionedSubscriber::new(Arc::new(backend.subscriber().unwrap()), coordinator).topic("lapsed", 1);
    let mut sub = subscriber
        .subscribe("lapsed", SubscribeOptions::new("g", "m"))
        .await
        .unwrap();
    publisher
        .publish_keyed("lapsed", "k", Message::new("seq", &0u64).unwrap())
        .await
        .unwrap();
    let delivery = sub.next().await.unwrap().unwrap();
    // The lease runs out while the delivery is handled.
    let deleted: i64 = conn
        .command(cmd("DEL").arg("streamwise:lease:{lapsed~p0}:g:owner"))
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    delivery.ack().await.unwrap();
    sub.flush().await.unwrap();
    let pending = streamwise::redis::admin::pending_count(&conn, "lapsed~p0", "g")
        .await
        .unwrap();
    assert_eq!(pending, 0, "the ack was written");
    drop(sub);
    subscriber.close().await.unwrap();
}

/// A member that owns more partitions than its bound of dedicated readers reads the others in
/// turn on one shared connection: the connections it opens stay bounded (its own readers, the
/// shared read connection, the subscriber's multiplexed connection), and every keyed message
/// is still handled once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_past_the_reader_bound_read_on_one_shared_connection() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    let server = RedisServer::start();
    let url = server.url();
    let (conn, _, publisher) = connect(&url);
    let clients = || async {
        let info: String = conn.command(cmd("INFO").arg("clients")).await.expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .expect("connected_clients")
            .trim()
            .parse::<usize>()
            .expect("a count")
    };
    publish(&publisher, 0..5).await;
    let before = clients().await;
    let dedicated = 2;
    let backend = RedisBackend::new(&url).unwrap();
    let subscriber = PartitionedSubscriber::new(
        Arc::new(backend.subscriber().unwrap()),
        Arc::new(backend.coordinator()),
    )
    .options(PartitionOptions::default().dedicated_readers(dedicated))
    .topic(TOPIC, PARTITIONS);
    let mut sub = subscriber
        .subscribe(
            TOPIC,
            SubscribeOptions::new(GROUP, "m").max_in_flight(64).batch_size(16),
        )
        .await
        .unwrap();
    let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut most = 0;
    for n in 0..5 * KEYS {
        let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {} delivered", 5 * KEYS))
            .expect("open")
            .expect("a delivery");
        let key = delivery
            .message()
            .metadata()
            .get(KEY_METADATA)
            .unwrap()
            .to_owned();
        let seq: u64 = delivery.message().decode().unwrap();
        let expected = last.get(&key).map_or(0, |s| s + 1);
        assert_eq!(seq, expected, "{key}");
        last.insert(key, seq);
        delivery.ack().await.unwrap();
        if n % 500 == 0 {
            most = most.max(clients().await - before);
        }
    }
    most = most.max(clients().await - before);
    // Without the bound, one read connection per partition: PARTITIONS + 1.
    assert!(
        most <= dedicated + 2,
        "{most} connections for {PARTITIONS} partitions with {dedicated} dedicated readers"
    );
    eprintln!("{most} connections for {PARTITIONS} partitions, {dedicated} of them read on their own");
    sub.flush().await.unwrap();
    drop(sub);
    subscriber.close().await.unwrap();
    assert_nothing_pending(&conn).await;
}

/// Partitions read on the shared connection do not wait on one another's callers: a
/// subscription that its caller stopped polling (a plain loop busy with a delivery) holds up
/// no other subscription's reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_not_polled_holds_up_no_other_on_shared_reads() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    let server = RedisServer::start();
    let backend = RedisBackend::new(&server.url()).unwrap();
    let coordinator = Arc::new(backend.coordinator());
    // One subscriber: its members share its one read connection to the server.
    let redis = Arc::new(backend.subscriber().unwrap());
    let shared_reads = PartitionOptions::default().dedicated_readers(0);
    let member = |topic: &str, partitions| {
        PartitionedSubscriber::new(redis.clone(), coordinator.clone())
            .options(shared_reads.clone())
            .topic(topic, partitions)
    };
    let (busy, other) = (member("busy", 2), member("other", 1));
    let publisher = |topic: &str, partitions| {
        PartitionedPublisher::new(Arc::new(backend.publisher()), coordinator.clone()).topic(topic, partitions)
    };
    let busy_publisher = publisher("busy", 2);
    for n in 0..50u64 {
        let key = format!("k{n}");
        busy_publisher
            .publish_keyed("busy", &key, Message::new("seq", &n).unwrap())
            .await
            .unwrap();
    }
    publisher("other", 1)
        .publish_keyed("other", "k", Message::new("seq", &0u64).unwrap())
        .await
        .unwrap();
    let options = |member: &str| {
        SubscribeOptions::new("g", member)
            .batch_size(1)
            .max_in_flight(4)
            .block(Duration::from_millis(500))
    };
    let mut busy_sub = busy.subscribe("busy", options("a")).await.unwrap();
    let mut other_sub = other.subscribe("other", options("b")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), busy_sub.next())
        .await
        .expect("a delivery of the busy topic")
        .unwrap()
        .unwrap();
    first.ack().await.unwrap();
    // The busy subscription is not polled from here on; the other one still gets its entry.
    let delivery = tokio::time::timeout(Duration::from_secs(10), other_sub.next())
        .await
        .expect("the other subscription's entry, while the busy one is not polled")
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    drop((busy_sub, other_sub));
    busy.close().await.unwrap();
    other.close().await.unwrap();
}

/// A member's partitions with a backlog read full batches, as one stream would, not each its
/// share of `max_in_flight` (256 over 16 partitions: 16 entries a read), so that a topic split
/// in 16 costs about the round trips of one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_with_a_backlog_read_full_batches_within_max_in_flight() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    const TOPIC: &str = "backlog";
    const PARTITIONS: u32 = 16;
    const PER_PARTITION: u64 = 1_000;
    const BATCH: usize = 100;
    const MAX_IN_FLIGHT: usize = 256;
    let server = RedisServer::start();
    let url = server.url();
    let backend = RedisBackend::new(&url).unwrap();
    let (conn, _, publisher) = connect_to(&url, TOPIC, PARTITIONS);
    // KEYS keys, spread over the partitions by their hash.
    let seqs = PER_PARTITION * u64::from(PARTITIONS) / KEYS;
    let total = seqs * KEYS;
    for seq in 0..seqs {
        let batch = (0..KEYS).map(|key| message(key, seq)).collect();
        publisher.publish_batch(TOPIC, batch).await.expect("publish");
    }
    // Every partition has its backlog.
    for p in 0..PARTITIONS {
        let len: u64 = conn
            .command(cmd("XLEN").arg(partition_stream(TOPIC, p)))
            .await
            .unwrap();
        assert!(len > 0, "partition {p} is empty; the keys did not spread");
    }
    let _: () = conn.command(cmd("CONFIG").arg("RESETSTAT")).await.unwrap();
    let (subscriber, mut sub) = member_of(&backend, TOPIC, PARTITIONS, MAX_IN_FLIGHT, BATCH).await;
    let mut held = std::collections::VecDeque::new();
    // Most of the backlog, settled a while after it came, as a router's handlers would.
    let window = 2_000;
    for n in 0..total - window {
        held.push_back(next_delivery(&mut sub, n, total).await);
        if held.len() > MAX_IN_FLIGHT / 2 {
            held.pop_front().unwrap().ack().await.unwrap();
        }
    }
    for delivery in held.drain(..) {
        delivery.ack().await.unwrap();
    }
    sub.flush().await.unwrap();
    // Then nothing settled: what is handed out, buffered or being read stays within
    // max_in_flight, backlog reads included.
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        held.push_back(delivery.expect("a delivery"));
    }
    // (Fewer when partitions that ran dry hold their shares in reads waiting for entries.)
    assert!(
        !held.is_empty() && held.len() <= MAX_IN_FLIGHT,
        "{} handed out while none was settled",
        held.len()
    );
    let mut pending = 0;
    for p in 0..PARTITIONS {
        let stream = partition_stream(TOPIC, p);
        pending += streamwise::redis::admin::pending_count(&conn, &stream, GROUP)
            .await
            .expect("pending");
    }
    assert!(
        pending <= MAX_IN_FLIGHT as u64,
        "{pending} pending, all earlier acks written"
    );
    let held_len = held.len() as u64;
    for delivery in held.drain(..) {
        delivery.ack().await.unwrap();
    }
    for n in total - window + held_len..total {
        next_delivery(&mut sub, n, total).await.ack().await.unwrap();
    }
    sub.flush().await.unwrap();
    let stats: String = conn.command(cmd("INFO").arg("commandstats")).await.unwrap();
    let reads: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_xreadgroup:calls="))
        .and_then(|l| l.split(',').next())
        .expect("XREADGROUP was called")
        .parse()
        .unwrap();
    // Full batches: total / BATCH reads, plus the few of each partition's start and end.
    // Reads of a share each would be total / 16 = 1,000.
    let most = total / BATCH as u64 + 20 * u64::from(PARTITIONS);
    eprintln!("{reads} reads for {total} entries in {PARTITIONS} partitions");
    assert!(
        reads <= most,
        "{reads} reads for {total} entries (at most {most})"
    );
    drop(sub);
    subscriber.close().await.unwrap();
    assert_nothing_pending_in(&conn, TOPIC, PARTITIONS).await;
}

/// A member `m` of the group on `topic` (`partitions`), subscribed with `max_in_flight` and
/// `batch`, and its subscriber (to close).
async fn member_of(
    backend: &RedisBackend,
    topic: &str,
    partitions: u32,
    max_in_flight: usize,
    batch: usize,
) -> (PartitionedSubscriber, streamwise::Subscription) {
    use streamwise::Subscriber;
    let subscriber = PartitionedSubscriber::new(
        Arc::new(backend.subscriber().unwrap()),
        Arc::new(backend.coordinator()),
    )
    .topic(topic, partitions);
    let options = SubscribeOptions::new(GROUP, "m")
        .max_in_flight(max_in_flight)
        .batch_size(batch);
    let sub = subscriber.subscribe(topic, options).await.unwrap();
    (subscriber, sub)
}

/// The next delivery of `sub`, the `n`th of `total`.
async fn next_delivery(sub: &mut streamwise::Subscription, n: u64, total: u64) -> streamwise::Delivery {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .unwrap_or_else(|_| panic!("only {n} of {total} delivered"))
        .expect("open")
        .expect("a delivery")
}

/// A partition with a backlog beside idle ones, whose reads wait for entries holding their
/// shares of `max_in_flight`: it reads on at once with what is left, rather than wait for a
/// whole batch of slots that cannot come back while those reads wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_partition_beside_idle_ones_is_not_held_up_by_their_waiting_reads() {
    use futures::StreamExt;
    use streamwise::Subscriber;
    const TOPIC: &str = "busy";
    const PARTITIONS: u32 = 16;
    const N: u64 = 6_000;
    let server = RedisServer::start();
    let url = server.url();
    let backend = RedisBackend::new(&url).unwrap();
    let (conn, _, publisher) = connect_to(&url, TOPIC, PARTITIONS);
    for chunk in 0..N / 100 {
        let batch = (0..100).map(|i| message(0, chunk * 100 + i)).collect();
        publisher.publish_batch(TOPIC, batch).await.expect("publish");
    }
    // The default BLOCK (5 s): the idle partitions' reads hold 15 shares of 16 that long.
    let (subscriber, mut sub) = member_of(&backend, TOPIC, PARTITIONS, 256, 100).await;
    let started = Instant::now();
    for n in 0..N {
        let delivery = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {n} of {N} delivered"))
            .expect("open")
            .expect("a delivery");
        let seq: u64 = delivery.message().decode().unwrap();
        assert_eq!(seq, n, "one key, in order");
        delivery.ack().await.unwrap();
    }
    let took = started.elapsed();
    eprintln!("{N} entries of one partition beside 15 idle ones in {took:?}");
    // Reads of 16 that each first waited 50 ms for a batch of slots: 10 s and more.
    assert!(took < Duration::from_secs(5), "{N} entries took {took:?}");
    sub.flush().await.unwrap();
    drop(sub);
    subscriber.close().await.unwrap();
    assert_nothing_pending_in(&conn, TOPIC, PARTITIONS).await;
}
