//! The `streamwise` binary against real `redis-server`s the tests start (free loopback ports),
//! on data the library makes: a backlog, pending entries of a live and of a crashed consumer,
//! dead letters of each reason, a partitioned topic. JSON output is parsed and checked against
//! what `XINFO`, `XPENDING` and `XRANGE` say.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value as Json;
use streamwise::redis::RedisSubscriberOptions;
use streamwise::{Publisher, SubscribeOptions};

const GROUP: &str = "billing";

/// `orders` with 10 entries; group `billing` with a live consumer `live-1` holding 2 entries
/// pending and a crashed consumer `dead-1` that held 3 when its lease ran out; 5 undelivered.
async fn backlog(env: &Env) -> Worker {
    env.publish("orders", 10).await;
    crash_a_consumer(&env.url, "orders", GROUP, "dead-1", 3, Duration::from_millis(300)).await;
    let worker = Worker::start(
        &env.url,
        "orders",
        SubscribeOptions::new(GROUP, "live-1")
            .max_in_flight(2)
            .batch_size(2),
        RedisSubscriberOptions::default(),
        holds,
    )
    .await;
    eventually(
        "2 entries pending for live-1",
        Duration::from_secs(10),
        || async {
            let p =
                streamwise::redis::admin::pending_entries(env.conn(), "orders", GROUP, Some("live-1")).await;
            p.is_ok_and(|p| p.len() == 2)
        },
    )
    .await;
    // The crashed consumer's lease (300 ms) runs out.
    eventually("dead-1's lease gone", Duration::from_secs(5), || async {
        int(&env
            .cmd(&["EXISTS", "streamwise:lease:{orders}:billing:dead-1"])
            .await)
            == 0
    })
    .await;
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_consumers_and_pending_match_xinfo_and_xpending() {
    let env = Env::start();
    let worker = backlog(&env).await;

    let groups = cli_json(&env.url, &["groups", "orders"], 0).await;
    let xgroups = xinfo(&env, &["XINFO", "GROUPS", "orders"]).await;
    assert_eq!(groups["groups"].as_array().unwrap().len(), xgroups.len());
    let g = &groups["groups"][0];
    let x = &xgroups[0];
    assert_eq!(g["group"], GROUP);
    assert_eq!(g["consumers"].as_i64().unwrap(), int(&x["consumers"]));
    assert_eq!(g["pending"].as_i64().unwrap(), int(&x["pending"]));
    assert_eq!(g["pending"], 5);
    assert_eq!(
        g["last_delivered_id"].as_str().unwrap(),
        text(&x["last-delivered-id"])
    );
    assert_eq!(g["lag"].as_i64().unwrap(), int(&x["lag"]));
    assert_eq!(g["lag"], 5);
    assert_eq!(g["live_consumers"], 1);
    assert!(g["lag_ms"].as_u64().unwrap() > 0);
    let first = env.entries("orders").await[0].0.clone();
    assert_eq!(g["oldest_pending_id"].as_str().unwrap(), first);

    let consumers = cli_json(&env.url, &["consumers", "orders", GROUP], 0).await;
    let xconsumers = xinfo(&env, &["XINFO", "CONSUMERS", "orders", GROUP]).await;
    let rows = consumers["consumers"].as_array().unwrap();
    assert_eq!(rows.len(), xconsumers.len());
    for x in &xconsumers {
        let name = text(&x["name"]);
        let row = rows
            .iter()
            .find(|r| r["consumer"] == name.as_str())
            .expect("each consumer");
        assert_eq!(row["pending"].as_i64().unwrap(), int(&x["pending"]), "{name}");
    }
    let live = rows.iter().find(|r| r["consumer"] == "live-1").unwrap();
    assert_eq!(live["lease"], "alive");
    assert!(live["lease_ttl_ms"].as_u64().unwrap() > 0);
    assert_eq!(live["crashed"], false);
    let dead = rows.iter().find(|r| r["consumer"] == "dead-1").unwrap();
    assert_eq!(dead["lease"], "expired");
    assert_eq!(dead["crashed"], true);
    assert_eq!(dead["pending"], 3);

    let pending = cli_json(&env.url, &["pending", "orders", GROUP], 0).await;
    let entries = pending["entries"].as_array().unwrap();
    let Value::Array(xpending) = env.cmd(&["XPENDING", "orders", GROUP, "-", "+", "100"]).await else {
        panic!("XPENDING")
    };
    assert_eq!(entries.len(), xpending.len());
    for (row, x) in entries.iter().zip(&xpending) {
        let Value::Array(x) = x else { panic!("row") };
        assert_eq!(row["id"].as_str().unwrap(), text(&x[0]));
        assert_eq!(row["consumer"].as_str().unwrap(), text(&x[1]));
        assert_eq!(row["deliveries"].as_i64().unwrap(), int(&x[3]));
        assert_eq!(row["event_type"], "order.placed");
    }
    let mine = cli_json(
        &env.url,
        &["pending", "orders", GROUP, "--consumer", "dead-1", "--limit", "2"],
        0,
    )
    .await;
    let mine = mine["entries"].as_array().unwrap();
    assert_eq!(mine.len(), 2);
    assert!(mine.iter().all(|r| r["consumer"] == "dead-1"));
    let idle = cli_json(&env.url, &["pending", "orders", GROUP, "--min-idle", "1h"], 0).await;
    assert_eq!(idle["entries"].as_array().unwrap().len(), 0);

    let streams = cli_json(&env.url, &["streams"], 0).await;
    let orders = streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "orders")
        .expect("orders listed");
    assert_eq!(orders["length"], 10);
    assert_eq!(orders["groups"], 1);
    assert_eq!(orders["kind"], "stream");
    assert_eq!(orders["first_id"].as_str().unwrap(), first);

    // The tables name the same things.
    let table = cli(&env.url, &["groups", "orders"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    // billing: 2 consumers, 1 of them live.
    assert!(
        table.stdout.contains(GROUP) && table.stdout.contains("2 (1)"),
        "{}",
        table.stdout
    );
    let table = cli(&env.url, &["consumers", "orders", GROUP]).await;
    assert!(
        table.stdout.contains("expired") && table.stdout.contains("alive"),
        "{}",
        table.stdout
    );
    worker.stop().await;
}

/// Dead letters of each reason on `poison`: 3 by the handler, 4 past `max_deliveries`, 1 not
/// JSON, 1 larger than `max_entry_size`, 1 trimmed while pending.
async fn dead_letters_of_each_reason(env: &Env) {
    let publisher = env.redis.publisher();
    let message = |n: u64| streamwise::Message::new("order.placed", &serde_json::json!({ "n": n })).unwrap();
    for n in 0..3 {
        publisher.publish("poison", message(n)).await.unwrap();
    }
    let failing = Worker::start(
        &env.url,
        "poison",
        SubscribeOptions::new("handler", "w"),
        RedisSubscriberOptions::default(),
        fails,
    )
    .await;
    eventually("3 dead letters", Duration::from_secs(10), || async {
        env.xlen("{poison}-dead").await == 3
    })
    .await;
    failing.stop().await;
    // Nacked past its limit, not JSON, too large: the subscriber gives up by itself.
    publisher.publish("poison", message(3)).await.unwrap();
    env.cmd(&[
        "XADD",
        "poison",
        "*",
        "event_type",
        "order.placed",
        "payload",
        "{not json",
    ])
    .await;
    let big = "x".repeat(600);
    publisher
        .publish("poison", streamwise::Message::new("order.placed", &big).unwrap())
        .await
        .unwrap();
    let nacking = Worker::start(
        &env.url,
        "poison",
        SubscribeOptions::new("limits", "w")
            .max_deliveries(1)
            .block(Duration::from_millis(100)),
        RedisSubscriberOptions::default().max_entry_size(500),
        |d| Box::pin(async move { d.nack().await.expect("nack") }),
    )
    .await;
    // "limits" reads all 6 entries: the first 4 are nacked until they are over the limit.
    eventually("6 more dead letters", Duration::from_secs(20), || async {
        env.xlen("{poison}-dead").await == 3 + 6
    })
    .await;
    nacking.stop().await;
    // Trimmed while pending: delivered, nacked for later, trimmed away meanwhile; the claim
    // of its retry finds it gone.
    let retrying = Worker::start(
        &env.url,
        "poison",
        SubscribeOptions::new("trimmed", "w")
            .start_from(streamwise::StartFrom::Latest)
            .block(Duration::from_millis(100)),
        RedisSubscriberOptions::default(),
        |d| Box::pin(async move { d.nack_after(Duration::from_millis(500)).await.expect("nack") }),
    )
    .await;
    publisher.publish("poison", message(4)).await.unwrap();
    eventually(
        "the entry pending in group trimmed",
        Duration::from_secs(10),
        || async { env.redis.pending_count("poison", "trimmed").await.unwrap() == 1 },
    )
    .await;
    env.cmd(&["XTRIM", "poison", "MAXLEN", "0"]).await;
    eventually(
        "the trimmed entry dead-lettered",
        Duration::from_secs(20),
        || async { env.xlen("{poison}-dead").await == 3 + 6 + 1 },
    )
    .await;
    retrying.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_peek_counts_each_reason_and_shows_the_latest() {
    let env = Env::start();
    dead_letters_of_each_reason(&env).await;
    let records = env.dead_letters("poison").await;
    let peek = cli_json(&env.url, &["dlq", "peek", "poison", "--limit", "4"], 0).await;
    assert_eq!(peek["total"].as_u64().unwrap(), records.len() as u64);
    let reasons = peek["reasons"].as_array().unwrap();
    let count = |needle: &str| -> u64 {
        reasons
            .iter()
            .filter(|r| r["reason"].as_str().unwrap().contains(needle))
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count("payment service down"), 3);
    assert_eq!(count("the limit is 1"), 4, "{reasons:#?}");
    assert_eq!(count("is not JSON"), 1, "{reasons:#?}");
    assert_eq!(count("larger than max_entry_size"), 1, "{reasons:#?}");
    assert_eq!(count("trimmed from the stream while pending"), 1, "{reasons:#?}");
    let sum: u64 = reasons.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(sum, records.len() as u64);
    // The latest 4, newest first, as XRANGE has them.
    let latest = peek["latest"].as_array().unwrap();
    assert_eq!(latest.len(), 4);
    let newest: Vec<&str> = records.iter().rev().take(4).map(|(id, _)| id.as_str()).collect();
    let shown: Vec<&str> = latest.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(shown, newest);
    for (row, (_, record)) in latest.iter().zip(records.iter().rev()) {
        let meta = record.metadata();
        assert_eq!(row["reason"].as_str(), meta.get("dead_letter.reason"));
        assert_eq!(row["group"].as_str(), meta.get("dead_letter.group"));
        assert_eq!(row["original_id"].as_str(), meta.get("dead_letter.original_id"));
        assert_eq!(row["event_type"].as_str(), Some(record.event_type()));
    }
    let filtered = cli_json(&env.url, &["dlq", "peek", "poison", "--reason", "payment"], 0).await;
    assert_eq!(filtered["matching"], 3);
    assert_eq!(filtered["total"].as_u64().unwrap(), records.len() as u64);
    assert!(
        filtered["latest"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["reason"] == "payment service down")
    );
    let table = cli(&env.url, &["dlq", "peek", "poison"]).await;
    assert_eq!(table.code, 0);
    assert!(table.stdout.contains("payment service down"), "{}", table.stdout);

    // A dry run of a replay leaves everything in place and says it would change something.
    let dry = cli_json(&env.url, &["dlq", "replay", "poison"], 2).await;
    assert_eq!(dry["mode"], "dry_run");
    // Neither the undecodable entry's record nor the trimmed one's can be replayed.
    assert_eq!(dry["not_replayable"], 2);
    assert_eq!(dry["replayed"].as_u64().unwrap(), records.len() as u64 - 2);
    assert_eq!(env.xlen("{poison}-dead").await, records.len() as u64);
}

/// Group `billing` on `orders`, whose handler still fails: it dead-letters every delivery.
async fn still_failing(env: &Env) -> Worker {
    Worker::start(
        &env.url,
        "orders",
        SubscribeOptions::new(GROUP, "w").max_in_flight(16),
        RedisSubscriberOptions::default(),
        fails,
    )
    .await
}

/// `n` dead letters of `orders` in group `billing`, by a handler that still fails.
async fn failed_orders(env: &Env, n: u64) -> BTreeSet<streamwise::Uuid> {
    env.publish("orders", n).await;
    let failing = still_failing(env).await;
    eventually("every order dead-lettered", Duration::from_secs(20), || async {
        env.xlen("{orders}-dead").await == n
    })
    .await;
    failing.stop().await;
    env.dead_letters("orders")
        .await
        .iter()
        .map(|(_, m)| m.uuid())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_while_the_handler_still_fails_ends_and_is_paced() {
    let env = Env::start();
    const N: u64 = 30;
    let uuids = failed_orders(&env, N).await;
    // The handler still fails.
    let failing = still_failing(&env).await;
    let started = Instant::now();
    let report = cli_json(
        &env.url,
        &["dlq", "replay", "orders", "--rate", "20/s", "--execute"],
        0,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(report["replayed"], N);
    assert_eq!(report["interrupted"], false);
    // N records at 20/s: the first at once, the last (N - 1) / 20 s later.
    let least = Duration::from_secs_f64((N - 1) as f64 / 20.0);
    assert!(took >= least, "{took:?} < {least:?}");
    let rate = report["rate"].as_f64().unwrap();
    assert!(rate <= 20.5, "rate {rate}");
    // Every record went once, and came back once: the same records, each replayed once.
    eventually(
        "every replayed order dead-lettered again",
        Duration::from_secs(20),
        || async {
            let dead = env.dead_letters("orders").await;
            dead.len() as u64 == N
                && dead
                    .iter()
                    .all(|(_, m)| m.metadata().get("replay.count") == Some("1"))
        },
    )
    .await;
    failing.stop().await;
    let dead = env.dead_letters("orders").await;
    let again: BTreeSet<_> = dead.iter().map(|(_, m)| m.uuid()).collect();
    assert_eq!(again, uuids);
    for (_, m) in &dead {
        assert_eq!(m.metadata().get("replay.reason"), Some("payment service down"));
        assert_eq!(
            m.metadata().get("dead_letter.reason"),
            Some("payment service down")
        );
    }
    // The original N, plus N replayed, each once.
    assert_eq!(env.xlen("orders").await, 2 * N);
    assert_eq!(report["records"].as_array().unwrap().len() as u64, N);
    let peek = cli_json(&env.url, &["dlq", "peek", "orders", "--limit", "1"], 0).await;
    assert_eq!(peek["latest"][0]["replays"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_is_resumed_and_replays_every_record_exactly_once() {
    let env = Env::start();
    const N: u64 = 40;
    let uuids = failed_orders(&env, N).await;
    let failing = still_failing(&env).await;
    let child = tokio::process::Command::new(BIN)
        .args([
            "--url",
            &env.url,
            "--output",
            "json",
            "dlq",
            "replay",
            "orders",
            "--rate",
            "20/s",
            "--execute",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Half-way (20 of 40 replayed into orders), SIGINT.
    eventually("half replayed", Duration::from_secs(20), || async {
        env.xlen("orders").await >= N + N / 2
    })
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let first = child.wait_with_output().await.unwrap();
    let first_report: Json = serde_json::from_slice(&first.stdout).expect("a report on stdout");
    assert_eq!(first.status.code(), Some(1), "{first:?}");
    assert_eq!(first_report["interrupted"], true);
    let first_replayed = first_report["replayed"].as_u64().unwrap();
    assert!((N / 2..N).contains(&first_replayed), "{first_replayed}");
    assert!(String::from_utf8_lossy(&first.stderr).contains("run the same command again"));

    // The rerun resumes: up to the same last record, so the records dead-lettered again by the
    // still failing handler meanwhile are not replayed a second time.
    let second = cli_json(&env.url, &["dlq", "replay", "orders", "--execute"], 0).await;
    assert_eq!(second["bounds"][0]["resumed"], true);
    assert_eq!(second["bounds"][0]["up_to"], first_report["bounds"][0]["up_to"]);
    assert_eq!(first_replayed + second["replayed"].as_u64().unwrap(), N);

    eventually("all dead-lettered again", Duration::from_secs(20), || async {
        env.xlen("{orders}-dead").await == N && env.xlen("orders").await == 2 * N
    })
    .await;
    failing.stop().await;
    // Exactly once: the N replayed entries are the N records, each once, and each record is
    // back once, replayed once.
    let replayed: Vec<_> = env
        .entries("orders")
        .await
        .into_iter()
        .filter(|(_, m)| m.metadata().get("replay.count").is_some())
        .map(|(_, m)| m.uuid())
        .collect();
    assert_eq!(replayed.len() as u64, N);
    assert_eq!(replayed.iter().copied().collect::<BTreeSet<_>>(), uuids);
    let dead = env.dead_letters("orders").await;
    assert!(
        dead.iter()
            .all(|(_, m)| m.metadata().get("replay.count") == Some("1"))
    );
    // The run finished: the next one starts fresh (and would replay the N records again).
    let next = cli_json(&env.url, &["dlq", "replay", "orders"], 2).await;
    assert_eq!(next["bounds"][0]["resumed"], false);
    assert_eq!(next["replayed"], N);
}

/// A trim to 2 entries that lets go groups idle for more than a millisecond.
const LENIENT_TRIM: &[&str] = &[
    "trim",
    "orders",
    "--maxlen",
    "2",
    "--idle-group-age",
    "1ms",
    "--execute",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_and_trim_refuse_while_a_consumer_is_live() {
    let env = Env::start();
    let worker = backlog(&env).await;
    let last_delivered = || async {
        let groups = xinfo(&env, &["XINFO", "GROUPS", "orders"]).await;
        text(&groups[0]["last-delivered-id"])
    };
    let before = last_delivered().await;

    // Refused (3), in a dry run as with --execute, and nothing moves.
    let refused = cli_json(
        &env.url,
        &["group", "reset", "orders", GROUP, "--to", "earliest"],
        3,
    )
    .await;
    assert_eq!(refused["refused"], true);
    assert_eq!(refused["live"][0]["consumer"], "live-1");
    let refused = cli(
        &env.url,
        &["group", "reset", "orders", GROUP, "--to", "earliest", "--execute"],
    )
    .await;
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(refused.stdout.contains("Refused"), "{}", refused.stdout);
    assert_eq!(last_delivered().await, before);

    // Trimming to 2 entries would cut entries live-1's group has pending and undelivered.
    let trim = cli_json(&env.url, &["trim", "orders", "--maxlen", "2", "--execute"], 3).await;
    assert_eq!(trim["refused"], true);
    assert_eq!(trim["streams"][0]["would_cut"], true);
    assert_eq!(trim["streams"][0]["protected_for"][0], GROUP);
    assert_eq!(env.xlen("orders").await, 10);
    // However long its consumers have not read (live-1's handlers hold its two slots), a
    // group with a live consumer is never let go as idle.
    let idle_ms = || async {
        let consumers = xinfo(&env, &["XINFO", "CONSUMERS", "orders", GROUP]).await;
        consumers.iter().map(|c| int(&c["idle"])).min().unwrap()
    };
    eventually("the consumers idle for 2 ms", Duration::from_secs(5), || async {
        idle_ms().await >= 2
    })
    .await;
    let still = cli_json(&env.url, LENIENT_TRIM, 3).await;
    assert_eq!(still["refused"], true);
    assert_eq!(still["streams"][0]["idle_groups"].as_array().unwrap().len(), 0);
    assert_eq!(env.xlen("orders").await, 10);
    // A trim that removes nothing refuses nothing (the boundary is in
    // a_trim_may_reach_the_first_needed_entry_but_not_pass_it).
    let none = cli_json(&env.url, &["trim", "orders", "--older-than", "1h"], 0).await;
    assert_eq!(none["refused"], false);
    assert_eq!(none["streams"][0]["removes"], 0);

    // --force does what it says.
    let forced = cli_json(
        &env.url,
        &[
            "group",
            "reset",
            "orders",
            GROUP,
            "--to",
            "earliest",
            "--execute",
            "--force",
        ],
        0,
    )
    .await;
    assert_eq!(forced["streams"][0]["to"], "0-0");
    assert_eq!(last_delivered().await, "0-0");
    // A forced trim cuts into the live group's pending entries (the oldest, dead-1's).
    let cut = cli_json(
        &env.url,
        &["trim", "orders", "--maxlen", "9", "--execute", "--force"],
        0,
    )
    .await;
    assert_eq!(cut["refused"], false);
    assert_eq!(cut["streams"][0]["would_cut"], true);
    assert_eq!(cut["streams"][0]["removes"], 1);
    assert_eq!(env.xlen("orders").await, 9);

    // Once the consumer is gone: a dry run says it would change (2), --execute does it.
    worker.stop().await;
    let ids: Vec<String> = env
        .entries("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let dry = cli_json(&env.url, &["group", "reset", "orders", GROUP, "--to", &ids[5]], 2).await;
    assert_eq!(dry["refused"], false);
    assert_eq!(last_delivered().await, "0-0");
    cli_json(
        &env.url,
        &["group", "reset", "orders", GROUP, "--to", &ids[5], "--execute"],
        0,
    )
    .await;
    assert_eq!(last_delivered().await, ids[5]);
    let latest = cli_json(
        &env.url,
        &["group", "reset", "orders", GROUP, "--to", "latest", "--execute"],
        0,
    )
    .await;
    assert_eq!(latest["streams"][0]["to"].as_str().unwrap(), ids[8]);
    assert_eq!(last_delivered().await, ids[8]);

    // No consumer is live, but the group still has entries pending (the crashed dead-1's,
    // and those live-1 held when it stopped): they hold the trim back.
    let pending: Vec<String> = streamwise::redis::admin::pending_entries(env.conn(), "orders", GROUP, None)
        .await
        .unwrap()
        .iter()
        .map(|p| p.id.to_string())
        .collect();
    assert!(!pending.is_empty());
    let held = cli_json(&env.url, &["trim", "orders", "--maxlen", "2", "--execute"], 3).await;
    assert_eq!(held["refused"], true);
    assert_eq!(held["streams"][0]["protected_for"][0], GROUP);
    assert_eq!(held["streams"][0]["protected_from"].as_str().unwrap(), pending[0]);
    assert_eq!(held["live"].as_array().unwrap().len(), 0);
    assert_eq!(env.xlen("orders").await, 9);
    // Once all the group's consumers have idled past --idle-group-age, it no longer does.
    eventually("the consumers idle for 2 ms", Duration::from_secs(5), || async {
        idle_ms().await >= 2
    })
    .await;
    let dry = cli_json(
        &env.url,
        &["trim", "orders", "--maxlen", "2", "--idle-group-age", "1ms"],
        2,
    )
    .await;
    assert_eq!(dry["streams"][0]["removes"], 7);
    assert_eq!(dry["streams"][0]["idle_groups"][0], GROUP);
    assert_eq!(env.xlen("orders").await, 9);
    let done = cli_json(&env.url, LENIENT_TRIM, 0).await;
    assert_eq!(done["streams"][0]["removes"], 7);
    assert_eq!(env.xlen("orders").await, 2);
    let kept: Vec<String> = env
        .entries("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(kept, ids[7..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_dead_letters_up_to_the_start_and_by_age() {
    let env = Env::start();
    failed_orders(&env, 5).await;
    let young = cli_json(
        &env.url,
        &["dlq", "purge", "orders", "--older-than", "1h", "--execute"],
        0,
    )
    .await;
    assert_eq!(young["total"], 0);
    let dry = cli_json(&env.url, &["dlq", "purge", "orders"], 2).await;
    assert_eq!(dry["total"], 5);
    assert_eq!(env.xlen("{orders}-dead").await, 5);
    let done = cli_json(&env.url, &["dlq", "purge", "orders", "--execute"], 0).await;
    assert_eq!(done["total"], 5);
    assert_eq!(env.xlen("{orders}-dead").await, 0);
    let again = cli_json(&env.url, &["dlq", "purge", "orders", "--execute"], 0).await;
    assert_eq!(again["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_round_trip() {
    let env = Env::start();
    let run = cli(
        &env.url,
        &[
            "publish",
            "orders",
            "order.placed",
            r#"{"id":7}"#,
            "--metadata",
            "source=cli",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("Published "), "{}", run.stdout);
    cli_json(
        &env.url,
        &["publish", "orders", "order.cancelled", r#"{"id":7}"#],
        0,
    )
    .await;
    let bad = cli(&env.url, &["publish", "orders", "order.placed", "{not json"]).await;
    assert_eq!(bad.code, 1);

    let tail = cli(&env.url, &["--output", "json", "tail", "orders", "--from", "-1h"]).await;
    assert_eq!(tail.code, 0, "{tail:?}");
    let lines: Vec<Json> = tail
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["event_type"], "order.placed");
    assert_eq!(lines[0]["metadata"]["source"], "cli");
    assert_eq!(lines[0]["payload"]["id"], 7);
    assert_eq!(lines[1]["event_type"], "order.cancelled");
    let only = cli(
        &env.url,
        &[
            "--output",
            "json",
            "tail",
            "orders",
            "--event-type",
            "order.cancelled",
        ],
    )
    .await;
    assert_eq!(only.stdout.lines().count(), 1, "{only:?}");
    let from = cli(
        &env.url,
        &[
            "--output",
            "json",
            "tail",
            "orders",
            "--from",
            lines[1]["id"].as_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(from.stdout.lines().count(), 1, "{from:?}");
    // Reading changed nothing: no group, no pending entry.
    assert_eq!(xinfo(&env, &["XINFO", "GROUPS", "orders"]).await.len(), 0);

    // --follow prints what comes, until ctrl-c.
    let mut follow = tokio::process::Command::new(BIN)
        .args([
            "--url", &env.url, "--output", "json", "tail", "orders", "--from", "$", "--follow",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let publisher = env.redis.publisher();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        // Published until the follower shows one (it may start reading after the first).
        loop {
            publisher
                .publish("orders", streamwise::Message::new("order.shipped", &1).unwrap())
                .await
                .unwrap();
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
            {
                return line;
            }
        }
    })
    .await
    .expect("a followed entry");
    assert!(got.contains("order.shipped"), "{got}");
    let pid = follow.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), follow.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_is_shown_per_partition_with_its_owners() {
    use std::sync::Arc;
    use streamwise::partition::{PartitionedPublisher, PartitionedSubscriber};
    let env = Env::start();
    let coordinator = Arc::new(env.redis.coordinator());
    let publisher =
        PartitionedPublisher::new(Arc::new(env.redis.publisher()), coordinator.clone()).topic("accounts", 2);
    for key in ["ada", "bob", "cy", "dee"] {
        publisher
            .publish_keyed("accounts", key, streamwise::Message::new("opened", &key).unwrap())
            .await
            .unwrap();
    }
    let subscriber = PartitionedSubscriber::new(Arc::new(env.redis.subscriber().unwrap()), coordinator)
        .topic("accounts", 2);
    use streamwise::Subscriber;
    let mut member = subscriber
        .subscribe(
            "accounts",
            SubscribeOptions::new("ledger", "worker-1").max_in_flight(8),
        )
        .await
        .unwrap();
    // worker-1, alone, owns both partitions: it reads all four.
    for _ in 0..4 {
        use futures::StreamExt;
        let d = tokio::time::timeout(Duration::from_secs(20), member.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
    }
    member.flush().await.unwrap();

    let groups = cli_json(&env.url, &["groups", "accounts"], 0).await;
    assert_eq!(groups["partitions"], 2);
    let rows = groups["groups"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (p, row) in rows.iter().enumerate() {
        assert_eq!(row["partition"], p);
        assert_eq!(row["stream"], format!("accounts~p{p}"));
        assert_eq!(row["owner"], "worker-1");
        assert_eq!(row["pending"], 0);
        assert_eq!(row["live_consumers"], 1);
    }
    let consumers = cli_json(&env.url, &["consumers", "accounts", "ledger"], 0).await;
    assert_eq!(consumers["members"][0]["member"], "worker-1");
    assert_eq!(consumers["members"][0]["live"], true);
    assert_eq!(consumers["members"][0]["partitions"], serde_json::json!([0, 1]));
    for row in consumers["consumers"].as_array().unwrap() {
        assert_eq!(row["consumer"], "owner");
        assert_eq!(row["member"], "worker-1");
        assert_eq!(row["lease"], "alive");
    }
    // A reset of the partitioned group is refused while worker-1 owns the partitions.
    let refused = cli_json(
        &env.url,
        &["group", "reset", "accounts", "ledger", "--to", "earliest"],
        3,
    )
    .await;
    assert_eq!(refused["live"].as_array().unwrap().len(), 2);
    let streams = cli_json(&env.url, &["streams", "--pattern", "accounts*"], 0).await;
    let kinds: Vec<&str> = streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["partition", "partition"]);
    drop(member);
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show_in_any_line() {
    let env_server = RedisServer::start_with(&["--requirepass", "s3cr3t-pw"]);
    let good = format!("redis://:s3cr3t-pw@127.0.0.1:{}", env_server.port());
    let bad = format!("redis://:wr0ng-pw@127.0.0.1:{}", env_server.port());
    let published = cli(&good, &["publish", "orders", "t", "1"]).await;
    assert_eq!(published.code, 0, "{published:?}");
    for (url, code) in [(good.as_str(), 0), (bad.as_str(), 1)] {
        let run = cli(url, &["groups", "orders"]).await;
        assert_eq!(run.code, code, "{run:?}");
        for secret in ["s3cr3t-pw", "wr0ng-pw"] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "{run:?}"
            );
        }
    }
    // Nothing listens there: the error names the URL, redacted.
    let gone = format!(
        "redis://:s3cr3t-pw@127.0.0.1:{}",
        streamwise::testing::free_port()
    );
    let run = cli(&gone, &["streams"]).await;
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("error:"), "{run:?}");
    assert!(!run.stderr.contains("s3cr3t-pw"), "{run:?}");
    // --help with REDIS_URL set does not show it.
    let help = tokio::process::Command::new(BIN)
        .arg("--help")
        .env("REDIS_URL", &good)
        .output()
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("s3cr3t-pw"));
    // A missing URL is an error that says what to do.
    let none = tokio::process::Command::new(BIN)
        .args(["streams"])
        .env_remove("REDIS_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("REDIS_URL"));
}

use streamwise::redis::client::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_master_is_listed_and_a_replay_stays_in_its_slot() {
    let cluster = streamwise::testing::RedisCluster::start();
    let url = cluster.url();
    let redis = streamwise::redis::RedisBackend::new(&url).unwrap();
    let publisher = redis.publisher();
    let topics = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    for topic in topics {
        publisher
            .publish(topic, streamwise::Message::new("t", &1).unwrap())
            .await
            .unwrap();
    }
    let masters: BTreeSet<u16> = topics
        .iter()
        .map(|t| cluster.master_of(t).unwrap().port())
        .collect();
    assert!(masters.len() > 1, "the topics are on one master: pick others");
    let streams = cli_json(&url, &["streams"], 0).await;
    let names: BTreeSet<&str> = streams["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(names, topics.into_iter().collect());

    // Dead letters on the cluster, replayed into their stream, or into one in the same slot.
    let failing = Worker::start(
        &url,
        "alpha",
        SubscribeOptions::new(GROUP, "w"),
        RedisSubscriberOptions::default(),
        fails,
    )
    .await;
    let dead = || async {
        redis
            .connection()
            .command::<u64>(streamwise::redis::client::cmd("XLEN").arg("{alpha}-dead"))
            .await
            .unwrap()
    };
    eventually("alpha dead-lettered", Duration::from_secs(20), || async {
        dead().await == 1
    })
    .await;
    failing.stop().await;
    let groups = cli_json(&url, &["groups", "alpha"], 0).await;
    assert_eq!(groups["groups"][0]["group"], GROUP);
    let elsewhere = cli(&url, &["dlq", "replay", "alpha", "--to", "bravo", "--execute"]).await;
    assert_eq!(elsewhere.code, 1, "{elsewhere:?}");
    assert!(elsewhere.stderr.contains("hash tag"), "{}", elsewhere.stderr);
    let replayed = cli_json(
        &url,
        &["dlq", "replay", "alpha", "--to", "{alpha}-retry", "--execute"],
        0,
    )
    .await;
    assert_eq!(replayed["replayed"], 1);
    assert_eq!(dead().await, 0);
    let tail = cli(&url, &["--output", "json", "tail", "{alpha}-retry"]).await;
    let line: Json = serde_json::from_str(tail.stdout.lines().next().expect("the replayed entry")).unwrap();
    assert_eq!(line["metadata"]["replay.count"], "1");
    assert_eq!(line["metadata"]["replay.group"], GROUP);

    // The guarded reset and trim run on the master of the stream's slot, with the group's
    // registry and leases beside the stream.
    let reset = cli_json(
        &url,
        &["group", "reset", "alpha", GROUP, "--to", "earliest", "--execute"],
        0,
    )
    .await;
    assert_eq!(reset["streams"][0]["applied"], true, "{reset}");
    let trim = cli_json(&url, &["trim", "alpha", "--maxlen", "0", "--execute"], 0).await;
    assert_eq!(trim["streams"][0]["applied"], true, "{trim}");
    assert_eq!(trim["streams"][0]["removes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_may_reach_the_first_needed_entry_but_not_pass_it() {
    let env = Env::start();
    env.publish("orders", 10).await;
    let ids: Vec<String> = env
        .entries("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Group billing has handled the first 4 (read and acknowledged by a consumer without a
    // lease); live-1, live, holds the next 2 pending; 4 are undelivered. The first entry the
    // group still needs is ids[4].
    env.cmd(&["XGROUP", "CREATE", "orders", GROUP, "0"]).await;
    env.cmd(&[
        "XREADGROUP",
        "GROUP",
        GROUP,
        "done-1",
        "COUNT",
        "4",
        "STREAMS",
        "orders",
        ">",
    ])
    .await;
    let mut ack = vec!["XACK", "orders", GROUP];
    ack.extend(ids[..4].iter().map(String::as_str));
    assert_eq!(int(&env.cmd(&ack).await), 4);
    let worker = Worker::start(
        &env.url,
        "orders",
        SubscribeOptions::new(GROUP, "live-1")
            .max_in_flight(2)
            .batch_size(2),
        RedisSubscriberOptions::default(),
        holds,
    )
    .await;
    eventually(
        "2 entries pending for live-1",
        Duration::from_secs(10),
        || async {
            streamwise::redis::admin::pending_entries(env.conn(), "orders", GROUP, Some("live-1"))
                .await
                .is_ok_and(|p| p.len() == 2)
        },
    )
    .await;

    // Keeping 6 cuts just below ids[4]: allowed.
    let exact = cli_json(&env.url, &["trim", "orders", "--maxlen", "6"], 2).await;
    let row = &exact["streams"][0];
    assert_eq!(row["protected_from"].as_str().unwrap(), ids[4]);
    assert_eq!(row["before"].as_str().unwrap(), ids[4]);
    assert_eq!(row["would_cut"], false);
    assert_eq!(row["removes"], 4);
    // Keeping 5 would cut ids[4]: refused, and nothing goes.
    let past = cli_json(&env.url, &["trim", "orders", "--maxlen", "5", "--execute"], 3).await;
    assert_eq!(past["refused"], true);
    assert_eq!(past["streams"][0]["before"].as_str().unwrap(), ids[5]);
    assert_eq!(past["streams"][0]["would_cut"], true);
    assert_eq!(past["streams"][0]["applied"], false);
    assert_eq!(past["live"][0]["consumer"], "live-1");
    assert_eq!(env.xlen("orders").await, 10);
    let done = cli_json(&env.url, &["trim", "orders", "--maxlen", "6", "--execute"], 0).await;
    assert_eq!(done["streams"][0]["removes"], 4);
    assert_eq!(done["streams"][0]["applied"], true);
    let kept: Vec<String> = env
        .entries("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(kept, ids[4..]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maxlen_trim_reads_no_more_than_a_page_at_once() {
    let env = Env::start();
    const LEN: u64 = 6000;
    // 6000 entries of about 650 bytes; a reply of more than 1 MB closes the connection.
    env.cmd(&[
        "EVAL",
        "for i = 1, tonumber(ARGV[1]) do redis.call('XADD', KEYS[1], '*', 'payload', ARGV[2]) end",
        "1",
        "orders",
        &LEN.to_string(),
        &"x".repeat(600),
    ])
    .await;
    env.cmd(&["CONFIG", "SET", "client-output-buffer-limit", "normal 1mb 1mb 0"])
        .await;
    // Keep 4000 (of 6000: the cut is found from the oldest end), then 1000 (from the newest).
    for keep in [4000u64, 1000] {
        let before = env.xlen("orders").await;
        let dry = cli_json(&env.url, &["trim", "orders", "--maxlen", &keep.to_string()], 2).await;
        assert_eq!(dry["streams"][0]["removes"].as_u64().unwrap(), before - keep);
        let done = cli_json(
            &env.url,
            &["trim", "orders", "--maxlen", &keep.to_string(), "--execute"],
            0,
        )
        .await;
        assert_eq!(done["streams"][0]["removes"].as_u64().unwrap(), before - keep);
        assert_eq!(env.xlen("orders").await, keep);
        // The cut is where the report says: the first entry left is `before`.
        let Value::Array(first) = env.cmd(&["XRANGE", "orders", "-", "+", "COUNT", "1"]).await else {
            panic!("XRANGE")
        };
        let Value::Array(first) = &first[0] else {
            panic!("entry")
        };
        assert_eq!(text(&first[0]), done["streams"][0]["before"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replay_fixes_every_range_first_and_resumes_without_duplicates() {
    use std::sync::Arc;
    use streamwise::partition::PartitionedPublisher;
    let env = Env::start();
    let publisher =
        PartitionedPublisher::new(Arc::new(env.redis.publisher()), Arc::new(env.redis.coordinator()))
            .topic("accounts", 2);
    for i in 0..24 {
        publisher
            .publish_keyed(
                "accounts",
                &format!("k{i}"),
                streamwise::Message::new("opened", &i).unwrap(),
            )
            .await
            .unwrap();
    }
    let n = [env.xlen("accounts~p0").await, env.xlen("accounts~p1").await];
    assert!(n[0] >= 4 && n[1] >= 4, "the keys fall unevenly: {n:?}");
    let dead = |p: usize| format!("{{accounts~p{p}}}-dead");
    // A member whose handler still fails.
    let failing = Worker::start_partitioned(
        &env.url,
        "accounts",
        2,
        SubscribeOptions::new("ledger", "worker-1").max_in_flight(16),
        fails,
    )
    .await;
    eventually("every entry dead-lettered", Duration::from_secs(20), || async {
        env.xlen(&dead(0)).await == n[0] && env.xlen(&dead(1)).await == n[1]
    })
    .await;
    let mut originals: Vec<BTreeSet<streamwise::Uuid>> = Vec::new();
    let mut last_records = Vec::new();
    for p in 0..2 {
        let records = env.entries(&dead(p)).await;
        originals.push(records.iter().map(|(_, m)| m.uuid()).collect());
        last_records.push(records.last().unwrap().0.clone());
    }

    // A partition is no target: its records would come back into a range still to replay.
    let into_partition = cli(
        &env.url,
        &["dlq", "replay", "accounts", "--to", "accounts~p1", "--execute"],
    )
    .await;
    assert_eq!(into_partition.code, 1, "{into_partition:?}");
    assert!(into_partition.stderr.contains("partition"), "{into_partition:?}");
    assert_eq!(env.xlen(&dead(0)).await, n[0]);

    // Interrupted while on p1, after p0 was done (p0's records are back in its dead letters).
    let child = spawn_cli(
        &env.url,
        &["dlq", "replay", "accounts", "--rate", "10/s", "--execute"],
    );
    eventually("p0 done and p1 begun", Duration::from_secs(20), || async {
        env.xlen("accounts~p1").await >= n[1] + 2
    })
    .await;
    let (first, first_report) = interrupt(child).await;
    assert_eq!(first.code, 1, "{first:?}");
    assert_eq!(first_report["interrupted"], true);
    let first_replayed = first_report["replayed"].as_u64().unwrap();
    assert!(
        first_replayed >= n[0] + 2 && first_replayed < n[0] + n[1],
        "{first_report}"
    );
    // Both ranges were fixed at the start, before p0's records came back, and are kept.
    let bounds = first_report["bounds"].as_array().unwrap();
    assert_eq!(bounds.len(), 2);
    for (p, bound) in bounds.iter().enumerate() {
        assert_eq!(bound["up_to"].as_str().unwrap(), last_records[p], "p{p}");
        assert!(env.exists(&resume_key(&format!("accounts~p{p}"))).await, "p{p}");
    }
    eventually(
        "p0's records dead-lettered again",
        Duration::from_secs(20),
        || async { env.xlen(&dead(0)).await == n[0] },
    )
    .await;

    // The rerun resumes both ranges: p0's records, back in its dead letters, stay there.
    let second = cli_json(&env.url, &["dlq", "replay", "accounts", "--execute"], 0).await;
    for p in 0..2 {
        assert_eq!(second["bounds"][p]["resumed"], true, "{second}");
        assert_eq!(second["bounds"][p]["up_to"], first_report["bounds"][p]["up_to"]);
    }
    assert_eq!(
        first_replayed + second["replayed"].as_u64().unwrap(),
        n[0] + n[1],
        "{second}"
    );
    eventually("every record back once", Duration::from_secs(20), || async {
        env.xlen(&dead(0)).await == n[0]
            && env.xlen(&dead(1)).await == n[1]
            && env.xlen("accounts~p0").await == 2 * n[0]
            && env.xlen("accounts~p1").await == 2 * n[1]
    })
    .await;
    failing.stop().await;
    // Exactly once: each partition got each of its records back once.
    for p in 0..2 {
        let replayed: Vec<_> = env
            .entries(&format!("accounts~p{p}"))
            .await
            .into_iter()
            .filter(|(_, m)| m.metadata().get("replay.count").is_some())
            .map(|(_, m)| m.uuid())
            .collect();
        assert_eq!(replayed.len() as u64, n[p]);
        assert_eq!(replayed.into_iter().collect::<BTreeSet<_>>(), originals[p]);
        assert!(
            env.dead_letters(&format!("accounts~p{p}"))
                .await
                .iter()
                .all(|(_, m)| m.metadata().get("replay.count") == Some("1"))
        );
        // The run went through both ranges: the next starts afresh.
        assert!(!env.exists(&resume_key(&format!("accounts~p{p}"))).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_run_after_an_interruption_keeps_the_range_for_the_next() {
    let env = Env::start();
    const N: u64 = 30;
    let uuids = failed_orders(&env, N).await;
    let failing = still_failing(&env).await;
    let child = spawn_cli(
        &env.url,
        &["dlq", "replay", "orders", "--rate", "20/s", "--execute"],
    );
    eventually("a few replayed", Duration::from_secs(20), || async {
        env.xlen("orders").await >= N + 5
    })
    .await;
    let (first, first_report) = interrupt(child).await;
    assert_eq!(first.code, 1, "{first:?}");
    let first_replayed = first_report["replayed"].as_u64().unwrap();
    assert!((5..N - 3).contains(&first_replayed), "{first_replayed}");
    let up_to = first_report["bounds"][0]["up_to"].clone();

    // 3 more, resuming: the range is not done, so its end stays for the next run.
    let limited = cli_json(
        &env.url,
        &["dlq", "replay", "orders", "--limit", "3", "--execute"],
        0,
    )
    .await;
    assert_eq!(limited["bounds"][0]["resumed"], true);
    assert_eq!(limited["bounds"][0]["up_to"], up_to);
    assert_eq!(limited["replayed"], 3);
    assert_eq!(limited["unfinished"], true);
    assert!(env.exists(&resume_key("orders")).await);
    eventually(
        "the replayed records dead-lettered again",
        Duration::from_secs(20),
        || async { env.xlen("{orders}-dead").await == N },
    )
    .await;

    // The next run goes on to the same end, and not beyond it to the records that came back.
    let rest = cli_json(&env.url, &["dlq", "replay", "orders", "--execute"], 0).await;
    assert_eq!(rest["bounds"][0]["resumed"], true);
    assert_eq!(rest["bounds"][0]["up_to"], up_to);
    assert_eq!(rest["replayed"].as_u64().unwrap(), N - first_replayed - 3);
    assert_eq!(rest["unfinished"], false);
    assert!(!env.exists(&resume_key("orders")).await);
    eventually("all back", Duration::from_secs(20), || async {
        env.xlen("{orders}-dead").await == N && env.xlen("orders").await == 2 * N
    })
    .await;
    failing.stop().await;
    let replayed: Vec<_> = env
        .entries("orders")
        .await
        .into_iter()
        .filter(|(_, m)| m.metadata().get("replay.count").is_some())
        .map(|(_, m)| m.uuid())
        .collect();
    assert_eq!(replayed.len() as u64, N);
    assert_eq!(replayed.into_iter().collect::<BTreeSet<_>>(), uuids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_takes_chosen_ids_reasons_a_fresh_start_and_another_target() {
    let env = Env::start();
    failed_orders(&env, 6).await;
    let records: Vec<String> = env
        .dead_letters("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // A record without a reason (another tool's).
    let reasonless = env
        .add(
            "{orders}-dead",
            "*",
            &streamwise::Message::new("order.placed", &serde_json::json!({ "n": 99 })).unwrap(),
        )
        .await;

    // --ids: only those, and nothing kept to resume.
    let ids = format!("{},{}", records[1], records[3]);
    let chosen = cli_json(
        &env.url,
        &["dlq", "replay", "orders", "--ids", &ids, "--execute"],
        0,
    )
    .await;
    assert_eq!(chosen["replayed"], 2);
    assert_eq!(chosen["bounds"][0]["up_to"], Json::Null);
    let back: Vec<String> = env
        .entries("orders")
        .await
        .into_iter()
        .filter_map(|(_, m)| m.metadata().get("replay.record_id").map(str::to_owned))
        .collect();
    assert_eq!(back, [records[1].clone(), records[3].clone()]);
    let left: Vec<String> = env
        .dead_letters("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        left,
        [&records[0], &records[2], &records[4], &records[5], &reasonless].map(String::clone)
    );
    assert!(!env.exists(&resume_key("orders")).await);

    // --reason: peek and replay select alike, "(none)" being the records without one.
    let peek = cli_json(&env.url, &["dlq", "peek", "orders", "--reason", "(none)"], 0).await;
    assert_eq!(peek["matching"], 1);
    let dry = cli_json(&env.url, &["dlq", "replay", "orders", "--reason", "(none)"], 2).await;
    assert_eq!(dry["selected"], 1);
    assert_eq!(dry["records"][0]["id"].as_str().unwrap(), reasonless);
    let peek = cli_json(&env.url, &["dlq", "peek", "orders", "--reason", "none"], 0).await;
    let dry = cli_json(&env.url, &["dlq", "replay", "orders", "--reason", "none"], 0).await;
    assert_eq!(
        (peek["matching"].as_u64(), dry["selected"].as_u64()),
        (Some(0), Some(0))
    );

    // A rate too slow to pace is refused before anything moves.
    let slow = cli(
        &env.url,
        &["dlq", "replay", "orders", "--rate", "1e-18", "--execute"],
    )
    .await;
    assert_eq!(slow.code, 1, "{slow:?}");
    assert!(slow.stderr.contains("rate"), "{slow:?}");
    assert_eq!(env.xlen("{orders}-dead").await, 5);

    // --limit leaves the rest of the range to the next run; --fresh starts over instead.
    let one = cli_json(
        &env.url,
        &["dlq", "replay", "orders", "--limit", "1", "--execute"],
        0,
    )
    .await;
    assert_eq!(one["records"][0]["id"].as_str().unwrap(), records[0]);
    assert_eq!(one["unfinished"], true);
    let newer = env
        .add(
            "{orders}-dead",
            "*",
            &streamwise::Message::new("order.placed", &7).unwrap(),
        )
        .await;
    let resumed = cli_json(&env.url, &["dlq", "replay", "orders"], 2).await;
    assert_eq!(resumed["bounds"][0]["resumed"], true);
    assert_eq!(resumed["bounds"][0]["up_to"].as_str().unwrap(), reasonless);
    assert_eq!(resumed["replayed"], 4);
    let fresh = cli_json(&env.url, &["dlq", "replay", "orders", "--fresh"], 2).await;
    assert_eq!(fresh["bounds"][0]["resumed"], false);
    assert_eq!(fresh["bounds"][0]["up_to"].as_str().unwrap(), newer);
    assert_eq!(fresh["replayed"], 5);

    // --to: neither a dead-letter stream nor a partition; another stream takes the records,
    // with their replay marker.
    for to in ["{orders}-dead", "orders~p1"] {
        let refused = cli(&env.url, &["dlq", "replay", "orders", "--to", to, "--execute"]).await;
        assert_eq!(refused.code, 1, "{to}: {refused:?}");
    }
    let retried = cli_json(
        &env.url,
        &[
            "dlq",
            "replay",
            "orders",
            "--reason",
            "payment",
            "--to",
            "orders-retry",
            "--execute",
        ],
        0,
    )
    .await;
    assert_eq!(retried["bounds"][0]["resumed"], true);
    assert_eq!(retried["replayed"], 3);
    let retry = env.entries("orders-retry").await;
    let replayed: Vec<&str> = retry
        .iter()
        .map(|(_, m)| m.metadata().get("replay.record_id").unwrap())
        .collect();
    assert_eq!(
        replayed,
        [&records[2], &records[4], &records[5]].map(String::as_str)
    );
    assert!(
        retry
            .iter()
            .all(|(_, m)| m.metadata().get("replay.group") == Some(GROUP))
    );
    let left: Vec<String> = env
        .dead_letters("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, [reasonless, newer]);
    // That run went through its range: nothing is kept to resume.
    assert!(!env.exists(&resume_key("orders")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_reset_goes_to_a_checkpoint_and_to_a_time() {
    let env = Env::start();
    for ms in [1000, 2000, 3000, 4000] {
        env.add(
            "orders",
            &format!("{ms}-0"),
            &streamwise::Message::new("order.placed", &ms).unwrap(),
        )
        .await;
    }
    let worker = Worker::start(
        &env.url,
        "orders",
        SubscribeOptions::new(GROUP, "w").start_from(streamwise::StartFrom::Beginning),
        RedisSubscriberOptions::default(),
        acks,
    )
    .await;
    eventually("all acknowledged", Duration::from_secs(10), || async {
        let g = xinfo(&env, &["XINFO", "GROUPS", "orders"]).await;
        text(&g[0]["last-delivered-id"]) == "4000-0" && int(&g[0]["pending"]) == 0
    })
    .await;
    worker.stop().await;
    let last_delivered = || async {
        let groups = xinfo(&env, &["XINFO", "GROUPS", "orders"]).await;
        text(&groups[0]["last-delivered-id"])
    };
    let groups = cli_json(&env.url, &["groups", "orders"], 0).await;
    let checkpoint = groups["groups"][0]["checkpoint"]
        .as_str()
        .expect("a checkpoint")
        .to_owned();
    assert_eq!(checkpoint, "4000-0");

    // To a time: before the first entry added at or after it.
    let at = cli_json(
        &env.url,
        &[
            "group",
            "reset",
            "orders",
            GROUP,
            "--to",
            "1970-01-01T00:00:02.500Z",
            "--execute",
        ],
        0,
    )
    .await;
    assert_eq!(at["streams"][0]["applied"], true);
    assert_eq!(last_delivered().await, "2499-18446744073709551615");
    // Back to the checkpoint.
    let dry = cli_json(
        &env.url,
        &["group", "reset", "orders", GROUP, "--to", "checkpoint"],
        2,
    )
    .await;
    assert_eq!(dry["streams"][0]["to"].as_str().unwrap(), checkpoint);
    assert_eq!(dry["streams"][0]["applied"], false);
    cli_json(
        &env.url,
        &[
            "group",
            "reset",
            "orders",
            GROUP,
            "--to",
            "checkpoint",
            "--execute",
        ],
        0,
    )
    .await;
    assert_eq!(last_delivered().await, checkpoint);
    // A group without a checkpoint cannot go there.
    env.cmd(&["XGROUP", "CREATE", "orders", "audit", "0"]).await;
    let none = cli(
        &env.url,
        &[
            "group",
            "reset",
            "orders",
            "audit",
            "--to",
            "checkpoint",
            "--execute",
        ],
    )
    .await;
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("no checkpoint"), "{none:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_age_splits_old_from_young_records() {
    let env = Env::start();
    let record = |n: u64| streamwise::Message::new("order.placed", &n).unwrap();
    // Two records of 1970, three of now.
    env.add("{orders}-dead", "1000-0", &record(0)).await;
    env.add("{orders}-dead", "2000-0", &record(1)).await;
    let mut young = Vec::new();
    for n in 2..5 {
        young.push(env.add("{orders}-dead", "*", &record(n)).await);
    }
    let dry = cli_json(&env.url, &["dlq", "purge", "orders", "--older-than", "1h"], 2).await;
    assert_eq!(dry["total"], 2);
    assert_eq!(dry["older_than_ms"], 3_600_000);
    assert_eq!(env.xlen("{orders}-dead").await, 5);
    let done = cli_json(
        &env.url,
        &["dlq", "purge", "orders", "--older-than", "1h", "--execute"],
        0,
    )
    .await;
    assert_eq!(done["total"], 2);
    let left: Vec<String> = env
        .dead_letters("orders")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, young);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_character_password_is_never_printed_and_changes_no_output() {
    let server = RedisServer::start_with(&["--requirepass", "1"]);
    let url = format!("redis://:1@127.0.0.1:{}", server.port());
    let redis = streamwise::redis::RedisBackend::new(&url).unwrap();
    let env = Env {
        url: url.clone(),
        redis,
        server,
    };
    env.publish("orders", 3).await;
    env.cmd(&["XGROUP", "CREATE", "orders", GROUP, "0"]).await;
    env.cmd(&[
        "XREADGROUP",
        "GROUP",
        GROUP,
        "c-1",
        "COUNT",
        "1",
        "STREAMS",
        "orders",
        ">",
    ])
    .await;
    let runs: [(&[&str], i32); 8] = [
        (&["groups", "orders"], 0),
        (&["consumers", "orders", GROUP], 0),
        (&["pending", "orders", GROUP], 0),
        (&["dlq", "peek", "orders"], 0),
        (&["dlq", "purge", "orders"], 0),
        (&["dlq", "replay", "orders"], 0),
        (&["group", "reset", "orders", GROUP, "--to", "earliest"], 2),
        // c-1 holds the first entry pending: the trim would cut it, and is refused.
        (&["trim", "orders", "--maxlen", "1"], 3),
    ];
    let mut reports = Vec::new();
    for (args, code) in runs {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let run = cli(&url, &all).await;
        assert_eq!(run.code, code, "{args:?}: {run:?}");
        assert!(
            !run.stdout.contains(":1@") && !run.stderr.contains(":1@"),
            "{run:?}"
        );
        reports.push(run.json());
    }
    assert_eq!(reports[0]["groups"][0]["pending"], 1);
    assert_eq!(reports[0]["groups"][0]["consumers"], 1);
    assert_eq!(reports[2]["entries"].as_array().unwrap().len(), 1);
    assert_eq!(reports[6]["streams"][0]["to"], "0-0");
    assert_eq!(reports[7]["streams"][0]["removes"], 2);
    assert_eq!(reports[7]["refused"], true);
    // The errors name the server with its password hidden.
    let wrong = format!("redis://:2@127.0.0.1:{}", env.server.port());
    let gone = format!("redis://:1@127.0.0.1:{}", streamwise::testing::free_port());
    for url in [wrong, gone] {
        let run = cli(&url, &["groups", "orders"]).await;
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains("redis://:***@127.0.0.1:"), "{run:?}");
        assert!(
            !run.stderr.contains(":1@") && !run.stderr.contains(":2@"),
            "{run:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_and_panics_exit_1_and_print_no_password() {
    let url = "redis://:s3cr3t-pw@127.0.0.1:1";
    let run_bin = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(BIN);
        command.args(args).env_remove("REDIS_URL");
        command.envs(env.iter().copied());
        async move { Run::of(command.output().await.unwrap()) }
    };
    // 2 is a dry run that would change something: a typo never says that.
    for args in [
        &["grups"][..],
        &[],
        &["dlq", "replay", "orders", "--bogus"],
        &["trim", "orders"],
        &["--url", url, "groups", "orders", url],
    ] {
        let run = run_bin(args, &[]).await;
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{run:?}");
        assert!(!run.stderr.contains("s3cr3t-pw"), "{run:?}");
    }
    let stray = run_bin(&["--url", url, "groups", "orders", url], &[]).await;
    assert!(stray.stderr.contains("redis://:***@127.0.0.1:1"), "{stray:?}");
    for args in [&["--help"][..], &["--version"], &["dlq", "replay", "--help"]] {
        let run = run_bin(args, &[]).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert!(!run.stdout.is_empty());
    }
    // A panic (made on purpose in debug builds) exits 1 and shows the URL redacted, whether
    // it came as --url or as REDIS_URL.
    let panic = run_bin(&["--url", url, "streams"], &[("STREAMWISE_CLI_TEST_PANIC", "1")]).await;
    let from_env = run_bin(
        &["streams"],
        &[("STREAMWISE_CLI_TEST_PANIC", "1"), ("REDIS_URL", url)],
    )
    .await;
    for run in [panic, from_env] {
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains("streamwise failed"), "{run:?}");
        assert!(run.stderr.contains("redis://:***@127.0.0.1:1"), "{run:?}");
        assert!(!run.stderr.contains("s3cr3t-pw"), "{run:?}");
    }
}
