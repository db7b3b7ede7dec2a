//! One function per command: it calls [`streamwise::redis::ops`] (or the library's publisher
//! and reader), prints the report as a table or as JSON, and says how the command ended.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use streamwise::checkpoint::MemoryCheckpointStore;
use streamwise::codec::JsonCodec;
use streamwise::partition::{
    PartitionCoordinator, PartitionedPublisher, partition_for_key, partition_stream,
};
use streamwise::redis::ops::{self, LeaseState, Mode, PendingQuery, ReplayOptions, TrimGuard, TrimTo};
use streamwise::redis::{RedisBackend, RedisConnection, StreamReader, admin};
use streamwise::{EntryId, Message, Publisher, StartFrom};

use crate::output::{Format, Out, id_with_time, ms, opt, table};
use crate::parse::From;
use crate::{Command, DlqCommand, Exit, GroupCommand, TailArgs};

/// Runs `command` on `conn`, printing through `out`.
pub(crate) async fn run(command: &Command, conn: &RedisConnection, out: &Out) -> streamwise::Result<Exit> {
    match command {
        Command::Streams { pattern } => streams(conn, out, pattern).await,
        Command::Groups { topic } => groups(conn, out, topic).await,
        Command::Consumers { topic, group } => consumers(conn, out, topic, group).await,
        Command::Pending {
            topic,
            group,
            consumer,
            min_idle,
            limit,
        } => {
            let mut query = PendingQuery::new().min_idle(*min_idle).limit(*limit);
            if let Some(consumer) = consumer {
                query = query.consumer(consumer);
            }
            pending(conn, out, topic, group, &query).await
        }
        Command::Tail(args) => tail(conn, out, args).await,
        Command::Publish {
            topic,
            event_type,
            json,
            metadata,
            key,
        } => publish(conn, out, topic, event_type, json, metadata, key.as_deref()).await,
        Command::Dlq { command } => match command {
            DlqCommand::Peek {
                topic,
                limit,
                reason,
                codec,
            } => {
                let codec = codec.codec()?;
                dlq_peek(conn, out, topic, *limit, reason.as_deref(), &*codec).await
            }
            DlqCommand::Replay {
                topic,
                ids,
                limit,
                reason,
                rate,
                to,
                fresh,
                codec,
                execute,
            } => {
                let mut options = ReplayOptions::new(mode(*execute))
                    .fresh(*fresh)
                    .layout(*codec, Default::default());
                if !ids.is_empty() {
                    options = options.ids(ids.clone());
                }
                if let Some(limit) = limit {
                    options = options.limit(*limit);
                }
                if let Some(reason) = reason {
                    options = options.reason(reason);
                }
                if let Some(rate) = rate {
                    options = options.rate(*rate);
                }
                if let Some(to) = to {
                    options = options.to(to);
                }
                dlq_replay(conn, out, topic, &options).await
            }
            DlqCommand::Purge {
                topic,
                older_than,
                execute,
            } => dlq_purge(conn, out, topic, *older_than, mode(*execute)).await,
        },
        Command::Group {
            command:
                GroupCommand::Reset {
                    topic,
                    group,
                    to,
                    execute,
                    force,
                },
        } => group_reset(conn, out, topic, group, *to, mode(*execute), *force).await,
        Command::Trim {
            topic,
            to,
            execute,
            idle_group_age,
            force,
        } => {
            let to = match (to.maxlen, to.older_than) {
                (Some(n), _) => TrimTo::MaxLen(n),
                (None, Some(age)) => TrimTo::OlderThan(age),
                // clap requires exactly one of the two.
                (None, None) => {
                    return Err(streamwise::Error::invalid(
                        "maxlen",
                        "give --maxlen or --older-than",
                    ));
                }
            };
            let guard = if *force {
                TrimGuard::Force
            } else {
                TrimGuard::Safe {
                    idle_group_age: *idle_group_age,
                }
            };
            trim(conn, out, topic, to, mode(*execute), guard).await
        }
    }
}

fn mode(execute: bool) -> Mode {
    if execute { Mode::Execute } else { Mode::DryRun }
}

/// How a repair ends: refused (3), a dry run that would change something (2), or done (0).
fn repair_exit(refused: bool, mode: Mode, changes: bool) -> Exit {
    match (refused, mode, changes) {
        (true, _, _) => Exit::Refused,
        (false, Mode::DryRun, true) => Exit::WouldChange,
        _ => Exit::Ok,
    }
}

/// A spinner on stderr while `work` runs (only on a terminal, and not with `--output json`).
async fn with_spinner<T>(out: &Out, message: &str, work: impl Future<Output = T>) -> T {
    let spinner = if out.format == Format::Table {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    spinner.set_message(message.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(120));
    let result = work.await;
    spinner.finish_and_clear();
    result
}

async fn streams(conn: &RedisConnection, out: &Out, pattern: &str) -> streamwise::Result<Exit> {
    let streams = with_spinner(out, "scanning", ops::list_streams(conn, pattern)).await?;
    if out.format == Format::Json {
        #[derive(Serialize)]
        struct Streams<'a> {
            streams: &'a [ops::StreamSummary],
        }
        out.json(&Streams { streams: &streams });
        return Ok(Exit::Ok);
    }
    let mut t = table(&["stream", "kind", "length", "first", "last", "groups", "retention"]);
    for s in &streams {
        let kind = match (s.kind, &s.topic) {
            (ops::StreamKind::Partition, Some(topic)) => format!("partition {} of {topic}", opt(s.partition)),
            (ops::StreamKind::DeadLetters, Some(source)) => format!("dead letters of {source}"),
            _ => "stream".to_owned(),
        };
        let retention = match (s.max_length, s.retention_ms) {
            (None, None) => "-".to_owned(),
            (max, age) => [
                max.map(|n| format!("max {n}")),
                age.map(|a| format!("{} old", ms(a))),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", "),
        };
        t.add_row([
            s.stream.clone(),
            kind,
            s.length.to_string(),
            id_with_time(s.first_id),
            id_with_time(s.last_id),
            s.groups.to_string(),
            retention,
        ]);
    }
    out.table(&t);
    out.line(&format!("{} streams", streams.len()));
    Ok(Exit::Ok)
}

async fn groups(conn: &RedisConnection, out: &Out, topic: &str) -> streamwise::Result<Exit> {
    let report = ops::groups(conn, topic).await?;
    if out.format == Format::Json {
        out.json(&report);
        return Ok(Exit::Ok);
    }
    let partitioned = report.partitions.is_some();
    let mut header = vec!["group"];
    if partitioned {
        header.extend(["partition", "owner"]);
    }
    header.extend([
        "consumers (live)",
        "pending",
        "lag",
        "lag time",
        "oldest pending",
        "last delivered",
        "checkpoint",
    ]);
    let mut t = table(&header);
    for g in &report.groups {
        let mut row = vec![g.group.clone()];
        if partitioned {
            row.extend([opt(g.partition), opt(g.owner.clone())]);
        }
        row.extend([
            format!("{} ({})", g.consumers, g.live_consumers),
            g.pending.to_string(),
            opt(g.lag),
            ms(g.lag_ms),
            match (g.oldest_pending_id, g.oldest_pending_idle_ms) {
                (Some(id), Some(idle)) => format!("{id} (idle {})", ms(idle)),
                _ => "-".to_owned(),
            },
            g.last_delivered_id.to_string(),
            opt(g.checkpoint),
        ]);
        t.add_row(row);
    }
    match report.partitions {
        Some(p) => out.line(&format!("{topic}: partitioned, {p} partitions")),
        None => out.line(&format!("{topic}:")),
    }
    out.table(&t);
    Ok(Exit::Ok)
}

fn lease_text(lease: LeaseState, ttl_ms: Option<u64>) -> String {
    match (lease, ttl_ms) {
        (LeaseState::Alive, Some(ttl)) => format!("alive ({} left)", ms(ttl)),
        (LeaseState::Alive, None) => "alive".to_owned(),
        (LeaseState::Expired, _) => "expired".to_owned(),
        (LeaseState::None, _) => "none".to_owned(),
    }
}

async fn consumers(conn: &RedisConnection, out: &Out, topic: &str, group: &str) -> streamwise::Result<Exit> {
    let report = ops::consumers(conn, topic, group).await?;
    if out.format == Format::Json {
        out.json(&report);
        return Ok(Exit::Ok);
    }
    let partitioned = report.partitions.is_some();
    let mut header = vec![];
    if partitioned {
        header.extend(["partition", "member"]);
    }
    header.extend(["consumer", "pending", "idle", "lease", "crashed"]);
    let mut t = table(&header);
    for c in &report.consumers {
        let mut row = vec![];
        if partitioned {
            row.extend([opt(c.partition), opt(c.member.clone())]);
        }
        row.extend([
            c.consumer.clone(),
            c.pending.to_string(),
            ms(c.idle_ms),
            lease_text(c.lease, c.lease_ttl_ms),
            if c.crashed { "yes" } else { "no" }.to_owned(),
        ]);
        t.add_row(row);
    }
    out.line(&format!("{topic} / {group}:"));
    out.table(&t);
    if partitioned {
        let mut members = table(&["member", "live", "owned partitions"]);
        for m in &report.members {
            let owned: Vec<String> = m.partitions.iter().map(u32::to_string).collect();
            members.add_row([
                m.member.clone(),
                if m.live { "yes" } else { "no" }.to_owned(),
                if owned.is_empty() {
                    "-".to_owned()
                } else {
                    owned.join(", ")
                },
            ]);
        }
        out.line("members:");
        out.table(&members);
    }
    Ok(Exit::Ok)
}

async fn pending(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    group: &str,
    query: &PendingQuery,
) -> streamwise::Result<Exit> {
    let entries = ops::pending(conn, topic, group, query).await?;
    if out.format == Format::Json {
        #[derive(Serialize)]
        struct Pending<'a> {
            topic: &'a str,
            group: &'a str,
            entries: &'a [ops::PendingOverview],
        }
        out.json(&Pending {
            topic,
            group,
            entries: &entries,
        });
        return Ok(Exit::Ok);
    }
    let mut t = table(&["stream", "id", "consumer", "idle", "deliveries", "event type"]);
    for e in &entries {
        t.add_row([
            e.stream.clone(),
            e.id.to_string(),
            e.consumer.clone(),
            ms(e.idle_ms),
            e.deliveries.to_string(),
            e.event_type.clone().unwrap_or_else(|| "(trimmed)".to_owned()),
        ]);
    }
    out.table(&t);
    out.line(&format!("{} pending entries shown", entries.len()));
    Ok(Exit::Ok)
}

/// One entry as `tail` prints it in JSON lines.
#[derive(Serialize)]
struct TailEntry<'a> {
    stream: &'a str,
    id: EntryId,
    time: String,
    event_type: Option<&'a str>,
    uuid: Option<streamwise::Uuid>,
    metadata: Option<&'a streamwise::Metadata>,
    payload: Option<serde_json::Value>,
    error: Option<String>,
}

fn print_entry(out: &Out, stream: &str, id: EntryId, message: &streamwise::Result<Message>) {
    let entry = TailEntry {
        stream,
        id,
        time: ops::id_time(id),
        event_type: message.as_ref().ok().map(Message::event_type),
        uuid: message.as_ref().ok().map(Message::uuid),
        metadata: message.as_ref().ok().map(Message::metadata),
        payload: message.as_ref().ok().and_then(|m| m.json().ok()),
        error: message.as_ref().err().map(ToString::to_string),
    };
    if out.format == Format::Json {
        out.json_line(&entry);
        return;
    }
    match message {
        Ok(m) => {
            let metadata = if m.metadata().is_empty() {
                String::new()
            } else {
                format!(" {}", serde_json::to_string(m.metadata()).unwrap_or_default())
            };
            let payload = entry.payload.map(|p| p.to_string()).unwrap_or_default();
            out.line(&format!(
                "{stream} {id} {} {}{metadata} {payload}",
                entry.time,
                m.event_type()
            ));
        }
        Err(e) => out.line(&format!(
            "{stream} {id} {} (not a streamwise message: {e})",
            entry.time
        )),
    }
}

async fn tail(conn: &RedisConnection, out: &Out, args: &TailArgs) -> streamwise::Result<Exit> {
    let coordinator = RedisBackend::with_connection(conn.clone()).coordinator();
    let streams: Vec<String> = match coordinator.partitions(&args.topic).await {
        Ok(Some(p)) => (0..p).map(|n| partition_stream(&args.topic, n)).collect(),
        // A name that cannot be partitioned (`{orders}-dead`) is read as it is.
        Ok(None) | Err(streamwise::Error::Invalid { .. }) => vec![args.topic.clone()],
        Err(e) => return Err(e),
    };
    let mut readers = Vec::with_capacity(streams.len());
    for stream in &streams {
        let last = last_ids(conn, stream, args.count.max(1)).await?;
        let start = match args.from {
            Some(From::New) => StartFrom::Latest,
            Some(From::After(id)) if id == EntryId::ZERO => StartFrom::Beginning,
            Some(From::After(id)) => StartFrom::After(id),
            None => match last.get(
                usize::try_from(args.count)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1),
            ) {
                _ if args.count == 0 => StartFrom::Latest,
                Some(oldest) => StartFrom::After(oldest.prev().unwrap_or(EntryId::ZERO)),
                None => StartFrom::Beginning,
            },
        };
        let reader = StreamReader::open_with(
            conn.clone(),
            stream,
            "streamwise-cli",
            start,
            Arc::new(MemoryCheckpointStore::new()),
            Arc::new(JsonCodec),
        )
        .await?;
        // Without --follow, the tail ends at the last entry there was when it started.
        let end = last.first().copied();
        readers.push((stream.clone(), reader, end, false));
    }
    let mut interrupt = interrupted();
    // What there is now, stream by stream.
    for (stream, reader, end, done) in &mut readers {
        if args.from == Some(From::New) || end.is_none() {
            *done = true;
            continue;
        }
        while !*done {
            let batch = reader.next_batch(100, Duration::from_millis(1)).await?;
            if batch.is_empty() {
                break;
            }
            for (id, message) in &batch {
                if end.is_some_and(|end| *id > end) {
                    *done = true;
                    break;
                }
                if wanted(args, message) {
                    print_entry(out, stream, *id, message);
                }
            }
        }
    }
    if !args.follow {
        return Ok(Exit::Ok);
    }
    let block = Duration::from_millis((1000 / readers.len() as u64).clamp(20, 1000));
    loop {
        for (stream, reader, _, _) in &mut readers {
            let batch = tokio::select! {
                biased;
                () = &mut interrupt => return Ok(Exit::Ok),
                batch = reader.next_batch(100, block) => batch?,
            };
            for (id, message) in &batch {
                if wanted(args, message) {
                    print_entry(out, stream, *id, message);
                }
            }
        }
    }
}

fn wanted(args: &TailArgs, message: &streamwise::Result<Message>) -> bool {
    match (&args.event_type, message) {
        (None, _) => true,
        (Some(wanted), Ok(m)) => m.event_type() == wanted,
        (Some(_), Err(_)) => false,
    }
}

/// The ids of the last `count` entries of `stream`, newest first.
async fn last_ids(conn: &RedisConnection, stream: &str, count: u64) -> streamwise::Result<Vec<EntryId>> {
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    Ok(admin::range(conn, stream, "+", "-", count, true)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect())
}

/// Completes on SIGINT (ctrl-c) or SIGTERM; the handlers are installed at once, so that a
/// signal that comes before the first poll is not lost.
fn interrupted() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => Box::pin(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }),
            _ => Box::pin(async {
                let _ = tokio::signal::ctrl_c().await;
            }),
        }
    }
    #[cfg(not(unix))]
    {
        Box::pin(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    event_type: &str,
    json: &str,
    metadata: &[(String, String)],
    key: Option<&str>,
) -> streamwise::Result<Exit> {
    let payload: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| streamwise::Error::invalid("json", format_args!("the payload is not JSON: {e}")))?;
    let mut message = Message::new(event_type, &payload)?;
    for (k, v) in metadata {
        message = message.with_metadata(k.as_str(), v.as_str());
    }
    let redis = RedisBackend::with_connection(conn.clone());
    let publisher = PartitionedPublisher::new(Arc::new(redis.publisher()), Arc::new(redis.coordinator()));
    let partitions = publisher.partitions(topic).await?;
    let (id, stream) = match (key, partitions) {
        (Some(key), Some(p)) => {
            let id = publisher.publish_keyed(topic, key, message).await?;
            (id, Some(partition_stream(topic, partition_for_key(key, p))))
        }
        (Some(_), None) => {
            return Err(streamwise::Error::invalid(
                "key",
                format_args!("{topic} is not partitioned: publish without --key"),
            ));
        }
        (None, Some(_)) => (publisher.publish(topic, message).await?, None),
        (None, None) => (publisher.publish(topic, message).await?, Some(topic.to_owned())),
    };
    if out.format == Format::Json {
        #[derive(Serialize)]
        struct Published<'a> {
            topic: &'a str,
            stream: Option<&'a str>,
            id: EntryId,
        }
        out.json(&Published {
            topic,
            stream: stream.as_deref(),
            id,
        });
    } else {
        let place = match &stream {
            Some(s) if s != topic => format!(" ({s})"),
            _ => String::new(),
        };
        out.line(&format!("Published {id} to {topic}{place}"));
    }
    Ok(Exit::Ok)
}

/// A payload in a table cell: its JSON, cut to `max` characters.
fn short_json(value: Option<&serde_json::Value>, max: usize) -> String {
    let text = value.map_or_else(|| "-".to_owned(), serde_json::Value::to_string);
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

async fn dlq_peek(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    limit: usize,
    reason: Option<&str>,
    codec: &dyn streamwise::codec::Codec,
) -> streamwise::Result<Exit> {
    let peek = with_spinner(
        out,
        "reading dead letters",
        ops::peek_dead_letters(conn, topic, limit, reason, codec),
    )
    .await?;
    if out.format == Format::Json {
        out.json(&peek);
        return Ok(Exit::Ok);
    }
    let filtered = reason.map(|r| format!(", {} with a reason containing {r:?}", peek.matching));
    out.line(&format!(
        "{} dead letters of {topic} in {}{}",
        peek.total,
        peek.dead_letter_streams.join(", "),
        filtered.unwrap_or_default()
    ));
    if peek.matching == 0 {
        return Ok(Exit::Ok);
    }
    let mut reasons = table(&["count", "reason"]);
    for r in &peek.reasons {
        reasons.add_row([r.count.to_string(), r.reason.clone()]);
    }
    out.table(&reasons);
    out.line(&format!("latest {}:", peek.latest.len()));
    let mut latest = table(&[
        "id",
        "time",
        "reason",
        "original id",
        "group",
        "deliveries",
        "replays",
        "event type",
        "payload",
    ]);
    for r in &peek.latest {
        latest.add_row([
            r.id.to_string(),
            r.time.clone(),
            opt(r.reason.clone()),
            opt(r.original_id),
            opt(r.group.clone()),
            opt(r.delivery_count),
            r.replays.to_string(),
            opt(r.event_type.clone()),
            short_json(r.payload.as_ref(), 60),
        ]);
    }
    out.table(&latest);
    Ok(Exit::Ok)
}

async fn dlq_replay(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    options: &ReplayOptions,
) -> streamwise::Result<Exit> {
    let bar = if out.format == Format::Table {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} records looked at, {per_sec}, {eta} left")
    {
        bar.set_style(style);
    }
    let report = {
        let bar = bar.clone();
        let mut progress = move |done: u64, total: u64| {
            bar.set_length(total.max(done));
            bar.set_position(done);
        };
        ops::replay_dead_letters(conn, topic, options, interrupted(), &mut progress).await
    };
    bar.finish_and_clear();
    let report = report?;
    if out.format == Format::Json {
        out.json(&report);
    } else {
        for bound in &report.bounds {
            match (bound.up_to, bound.resumed) {
                (Some(id), true) => out.line(&format!(
                    "{}: resuming the unfinished run, up to {id}",
                    bound.dead_letter_stream
                )),
                (Some(id), false) => out.line(&format!("{}: up to {id}", bound.dead_letter_stream)),
                (None, _) => {}
            }
        }
        let mut t = table(&["id", "target", "new id", "event type", "reason", "outcome"]);
        const SHOWN: usize = 20;
        for r in report.records.iter().take(SHOWN) {
            t.add_row([
                r.id.to_string(),
                r.target.clone(),
                opt(r.new_id),
                opt(r.event_type.clone()),
                opt(r.reason.clone()),
                serde_json::to_value(r.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ]);
        }
        if !report.records.is_empty() {
            out.table(&t);
        }
        if report.records.len() > SHOWN {
            out.line(&format!("... and {} more", report.records.len() - SHOWN));
        }
        let rate = report.rate.map(|r| format!(" ({r:.0}/s)")).unwrap_or_default();
        let verb = match report.mode {
            Mode::DryRun => "Would replay",
            Mode::Execute => "Replayed",
        };
        out.line(&format!(
            "{verb} {} of {} selected dead letters of {topic} in {}{rate}; {} not replayable, {} gone meanwhile",
            report.replayed,
            report.selected,
            ms(report.elapsed_ms),
            report.not_replayable,
            report.gone
        ));
        if report.mode == Mode::DryRun && report.changes() {
            out.note("dry run: nothing was replayed; add --execute to replay");
        }
    }
    if report.interrupted {
        out.note("interrupted: run the same command again to resume (no record is replayed twice)");
        return Ok(Exit::Error);
    }
    if report.unfinished && report.mode == Mode::Execute {
        out.note(
            "stopped at --limit with records left: the next run goes on up to the same last records \
             (records dead-lettered again meanwhile wait for the run after)",
        );
    }
    Ok(repair_exit(false, report.mode, report.changes()))
}

async fn dlq_purge(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    older_than: Option<Duration>,
    mode: Mode,
) -> streamwise::Result<Exit> {
    let report = with_spinner(
        out,
        "purging",
        ops::purge_dead_letters(conn, topic, older_than, mode),
    )
    .await?;
    if out.format == Format::Json {
        out.json(&report);
    } else {
        let mut t = table(&["dead-letter stream", "records before", "removed"]);
        for row in &report.streams {
            t.add_row([
                row.dead_letter_stream.clone(),
                row.before.to_string(),
                row.removes.to_string(),
            ]);
        }
        out.table(&t);
        let verb = match mode {
            Mode::DryRun => "Would purge",
            Mode::Execute => "Purged",
        };
        out.line(&format!("{verb} {} dead letters of {topic}", report.total));
        if mode == Mode::DryRun && report.changes() {
            out.note("dry run: nothing was deleted; add --execute to purge");
        }
    }
    Ok(repair_exit(false, mode, report.changes()))
}

fn live_table(live: &[ops::LiveConsumer]) -> Table {
    let mut t = table(&["stream", "group", "consumer", "member", "lease left"]);
    for c in live {
        t.add_row([
            c.stream.clone(),
            c.group.clone(),
            c.consumer.clone(),
            opt(c.member.clone()),
            c.lease_ttl_ms.map_or_else(|| "-".to_owned(), ms),
        ]);
    }
    t
}

#[allow(clippy::too_many_arguments)]
async fn group_reset(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    group: &str,
    to: ops::ResetTo,
    mode: Mode,
    force: bool,
) -> streamwise::Result<Exit> {
    let report = ops::reset_group(conn, topic, group, to, mode, force).await?;
    if out.format == Format::Json {
        out.json(&report);
    } else {
        let mut t = table(&["stream", "last delivered", "reset to", "pending (kept)", "reset"]);
        for row in &report.streams {
            t.add_row([
                row.stream.clone(),
                row.from.to_string(),
                row.to.to_string(),
                row.pending.to_string(),
                if row.applied { "yes" } else { "no" }.to_owned(),
            ]);
        }
        out.table(&t);
        if report.refused {
            out.line(&format!(
                "Refused: {} consumers of {group} hold live leases (stop them, or add --force):",
                report.live.len()
            ));
            out.table(&live_table(&report.live));
        } else {
            let verb = match (mode, report.changes()) {
                (_, false) => "Nothing to change for",
                (Mode::DryRun, true) => "Would reset",
                (Mode::Execute, true) => "Reset",
            };
            out.line(&format!("{verb} group {group} of {topic}"));
            if mode == Mode::DryRun && report.changes() {
                out.note("dry run: nothing was changed; add --execute to reset");
            }
        }
    }
    Ok(repair_exit(report.refused, mode, report.changes()))
}

async fn trim(
    conn: &RedisConnection,
    out: &Out,
    topic: &str,
    to: TrimTo,
    mode: Mode,
    guard: TrimGuard,
) -> streamwise::Result<Exit> {
    let report = with_spinner(out, "trimming", ops::trim(conn, topic, to, mode, guard)).await?;
    if out.format == Format::Json {
        out.json(&report);
    } else {
        let mut t = table(&[
            "stream",
            "length",
            "removes",
            "entries before",
            "needed from",
            "needed by",
            "trimmed",
        ]);
        for row in &report.streams {
            t.add_row([
                row.stream.clone(),
                row.length.to_string(),
                row.removes.to_string(),
                opt(row.before),
                opt(row.protected_from),
                if row.protected_for.is_empty() {
                    "-".to_owned()
                } else {
                    row.protected_for.join(", ")
                },
                if row.applied { "yes" } else { "no" }.to_owned(),
            ]);
        }
        out.table(&t);
        let idle: Vec<&str> = report
            .streams
            .iter()
            .flat_map(|r| r.idle_groups.iter().map(String::as_str))
            .collect();
        if !idle.is_empty() {
            out.note(&format!(
                "not holding the trim back, all their consumers idle past --idle-group-age: {}",
                idle.join(", ")
            ));
        }
        if report.refused {
            out.line(
                "Refused: the trim would remove entries that groups have pending or, with live consumers, not yet \
                 delivered (settle or stop them, trim less, or add --force)",
            );
            if !report.live.is_empty() {
                out.line("Their live consumers:");
                out.table(&live_table(&report.live));
            }
        } else {
            let removes: u64 = report.streams.iter().map(|r| r.removes).sum();
            let verb = match mode {
                Mode::DryRun => "Would remove",
                Mode::Execute => "Removed",
            };
            out.line(&format!("{verb} {removes} entries of {topic}"));
            if mode == Mode::DryRun && report.changes() {
                out.note("dry run: nothing was removed; add --execute to trim");
            }
        }
    }
    Ok(repair_exit(report.refused, mode, report.changes()))
}
