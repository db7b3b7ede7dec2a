//! A topic's dead letters (`{<stream>}-dead`, one stream per partition on a partitioned
//! topic): a look at them by reason ([`peek_dead_letters`]), putting them back into a stream
//! safely ([`replay_dead_letters`]) and dropping old ones ([`purge_dead_letters`]).
//!
//! Replay is where a hand-written tool goes wrong: re-publishing records while the handler
//! still fails makes new records, which such a tool then replays again, in a loop. Here a run
//! stops at the last record there was when it started (in every dead-letter stream of the topic,
//! all read before the first record moves), so a record dead-lettered again meanwhile waits
//! for the next run; each record is moved (added to the target, deleted from the dead-letter
//! stream) by one script step, so a run interrupted anywhere publishes no record twice and
//! loses none; a run that did not finish its range (interrupted, or stopped at its limit) is
//! resumed by the next, up to the same last records.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Mode, count_before, id_at, id_time, last_id, next_id, now_ms, streams_of};
use crate::codec::{Codec, RawEntry};
use crate::dead_letter::{self, TRIMMED_EVENT_TYPE, UNDECODABLE_EVENT_TYPE, replay_keys};
use crate::error::{Error, Result, validate_stream_name};
use crate::message::{EntryId, Message, saturating_ms};
use crate::partition::parse_partition_stream;
use crate::redis::connection::{RedisConnection, slot_of};
use crate::redis::coordinator::refuse_partitioned;
use crate::redis::{admin, keys, scripts};
use crate::wire_format::{WireFormat, WireSettings};

/// How many records are read at once.
const PAGE: usize = 200;

/// How long an interrupted replay's end is kept for the next run to resume (7 days).
const RESUME_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// The slowest replay rate: one record a day.
const MIN_RATE: f64 = 1.0 / 86_400.0;

/// The fastest replay rate a second.
const MAX_RATE: f64 = 1_000_000.0;

/// The reason shown for a record without one, and the reason filter that selects such
/// records.
pub const NO_REASON: &str = "(none)";

/// Whether a record with `reason` is selected by the reason filter `filter`: a reason that
/// contains it, or no reason for the filter [`NO_REASON`]. Peek and replay select alike.
fn reason_selected(reason: Option<&str>, filter: &str) -> bool {
    match reason {
        Some(reason) => reason.contains(filter),
        None => filter == NO_REASON,
    }
}

/// One dead-letter record, decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetterRecord {
    /// The dead-letter stream it is in.
    pub dead_letter_stream: String,
    /// Its id there.
    pub id: EntryId,
    /// When it was dead-lettered (the id's time, ISO 8601, UTC).
    pub time: String,
    /// Why (`dead_letter.reason`).
    pub reason: Option<String>,
    /// The entry's id in its stream.
    pub original_id: Option<EntryId>,
    /// The stream it came from.
    pub stream: Option<String>,
    /// The group that gave up on it.
    pub group: Option<String>,
    /// How many times it had been delivered.
    pub delivery_count: Option<u64>,
    /// How many times it was replayed before (`replay.count`).
    pub replays: u64,
    /// Its event type (`streamwise.undecodable` and `streamwise.trimmed` for what streamwise
    /// could not hand out at all).
    pub event_type: Option<String>,
    /// Its UUID.
    pub uuid: Option<uuid::Uuid>,
    /// Its payload; `None` when the record itself is not in the wire format.
    pub payload: Option<serde_json::Value>,
}

impl DeadLetterRecord {
    fn new(dead_letter_stream: &str, id: EntryId, message: Option<&Message>) -> Self {
        let meta = |key: &str| message.and_then(|m| m.metadata().get(key)).map(str::to_owned);
        DeadLetterRecord {
            dead_letter_stream: dead_letter_stream.to_owned(),
            id,
            time: id_time(id),
            reason: meta(dead_letter::keys::REASON),
            original_id: meta(dead_letter::keys::ORIGINAL_ID).and_then(|id| id.parse().ok()),
            stream: meta(dead_letter::keys::STREAM),
            group: meta(dead_letter::keys::GROUP),
            delivery_count: meta(dead_letter::keys::DELIVERY_COUNT).and_then(|n| n.parse().ok()),
            replays: replays_of(message),
            event_type: message.map(|m| m.event_type().to_owned()),
            uuid: message.map(Message::uuid),
            payload: message.and_then(|m| m.json().ok()),
        }
    }
}

fn replays_of(message: Option<&Message>) -> u64 {
    message
        .and_then(|m| m.metadata().get(replay_keys::COUNT))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How many records give one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReasonCount {
    /// The reason (`(none)` for records without one).
    pub reason: String,
    /// How many records give it.
    pub count: u64,
}

/// What [`peek_dead_letters`] found.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetterPeek {
    /// The topic.
    pub topic: String,
    /// Its dead-letter streams (one per partition on a partitioned topic).
    pub dead_letter_streams: Vec<String>,
    /// Records in all of them.
    pub total: u64,
    /// Records whose reason contains the filter (all without one).
    pub matching: u64,
    /// A count per reason of the matching records, most frequent first ([`NO_REASON`] for
    /// records without one).
    pub reasons: Vec<ReasonCount>,
    /// The latest matching records, newest first.
    pub latest: Vec<DeadLetterRecord>,
}

/// The records of `stream` up to `end`, in pages, oldest first, to `visit`, which returns
/// `false` to stop.
async fn each_record(
    conn: &RedisConnection,
    stream: &str,
    end: EntryId,
    mut visit: impl AsyncFnMut(RawEntry) -> Result<bool>,
) -> Result<()> {
    let (mut from, to) = ("-".to_owned(), end.to_string());
    loop {
        let page = admin::range(conn, stream, &from, &to, PAGE, false).await?;
        let full = page.len() == PAGE;
        let last = page.last().map(|e| e.id);
        for raw in page {
            if !visit(raw).await? {
                return Ok(());
            }
        }
        match last {
            Some(last) if full => from = format!("({last}"),
            _ => return Ok(()),
        }
    }
}

/// The dead letters of `topic` (of every partition of a partitioned topic): how many, a count
/// per reason, and the latest `limit` records, newest first; with `reason`, only the records
/// whose reason contains it ([`NO_REASON`]: the records without one). The records are read
/// with `codec`, the topic's layout, in which its subscriptions wrote them
/// ([`JsonCodec`](crate::codec::JsonCodec), streamwise's own, unless its subscribers use a
/// peer's).
pub async fn peek_dead_letters(
    conn: &RedisConnection,
    topic: &str,
    limit: usize,
    reason: Option<&str>,
    codec: &dyn Codec,
) -> Result<DeadLetterPeek> {
    let (_, streams) = streams_of(conn, topic).await?;
    let mut peek = DeadLetterPeek {
        topic: topic.to_owned(),
        dead_letter_streams: Vec::new(),
        total: 0,
        matching: 0,
        reasons: Vec::new(),
        latest: Vec::new(),
    };
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut latest: Vec<DeadLetterRecord> = Vec::new();
    for (_, stream) in streams {
        let dead_letters = dead_letter::stream_for(&stream);
        peek.dead_letter_streams.push(dead_letters.clone());
        let Some(end) = last_id(conn, &dead_letters).await? else {
            continue;
        };
        let mut newest: VecDeque<DeadLetterRecord> = VecDeque::with_capacity(limit.min(1024));
        each_record(conn, &dead_letters, end, async |raw| {
            peek.total += 1;
            let id = raw.id;
            let message = codec.decode(raw).ok();
            let record = DeadLetterRecord::new(&dead_letters, id, message.as_ref());
            if reason.is_none_or(|filter| reason_selected(record.reason.as_deref(), filter)) {
                let why = record.reason.clone().unwrap_or_else(|| NO_REASON.to_owned());
                peek.matching += 1;
                *reasons.entry(why).or_default() += 1;
                if limit > 0 {
                    if newest.len() == limit {
                        newest.pop_front();
                    }
                    newest.push_back(record);
                }
            }
            Ok(true)
        })
        .await?;
        latest.extend(newest);
    }
    latest.sort_by_key(|r| std::cmp::Reverse(r.id));
    latest.truncate(limit);
    peek.latest = latest;
    peek.reasons = reasons
        .into_iter()
        .map(|(reason, count)| ReasonCount { reason, count })
        .collect();
    peek.reasons
        .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    Ok(peek)
}

/// What [`replay_dead_letters`] replays, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayOptions {
    mode: Mode,
    ids: Option<Vec<EntryId>>,
    limit: Option<u64>,
    reason: Option<String>,
    rate: Option<f64>,
    to: Option<String>,
    fresh: bool,
    layout: (WireFormat, WireSettings),
}

impl ReplayOptions {
    /// Every record, as fast as Redis takes them, each back into the stream it came from.
    pub fn new(mode: Mode) -> Self {
        ReplayOptions {
            mode,
            ids: None,
            limit: None,
            reason: None,
            rate: None,
            to: None,
            fresh: false,
            layout: (WireFormat::Streamwise, WireSettings::default()),
        }
    }

    /// Only these records (their ids in the dead-letter stream).
    pub fn ids(mut self, ids: Vec<EntryId>) -> Self {
        self.ids = Some(ids);
        self
    }

    /// At most `limit` records, the oldest first.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Only records whose reason contains `reason` ([`NO_REASON`]: the records without one).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// At most `per_second` records a second (from one a day, 1/86400, to 1,000,000).
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = Some(per_second);
        self
    }

    /// Into `stream` instead of the stream each record came from. On a Redis Cluster it must
    /// hash to the dead-letter stream's slot (a topic with the hash tag of the source,
    /// `{orders}-retry`), so that each record moves in one script step. Neither a dead-letter
    /// stream nor a partition of a partitioned topic (only its publisher writes there).
    pub fn to(mut self, stream: impl Into<String>) -> Self {
        self.to = Some(stream.into());
        self
    }

    /// Start a new run even when an unfinished one could be resumed (its records that were
    /// dead-lettered again since are then replayed again).
    pub fn fresh(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }

    /// The layout of the topic (default streamwise's own), such as Watermill's for a topic
    /// its subscribers read with `WatermillCodec` (the `interop` feature): its subscriptions
    /// wrote the dead-letter records in it, and the replayed entries are written in it, so
    /// that the topic's other readers (a Go service) read them as they read the original.
    pub fn layout(mut self, format: WireFormat, settings: WireSettings) -> Self {
        self.layout = (format, settings);
        self
    }

    fn check(&self) -> Result<()> {
        if let Some(rate) = self.rate
            && !(MIN_RATE..=MAX_RATE).contains(&rate)
        {
            return Err(Error::invalid(
                "rate",
                format_args!("{rate} a second is not between one a day (1/86400) and {MAX_RATE}"),
            ));
        }
        if self.limit == Some(0) {
            return Err(Error::invalid("limit", "must be at least 1"));
        }
        if let Some(to) = &self.to {
            validate_stream_name("to", to)?;
            if dead_letter::source_of(to).is_some() {
                return Err(Error::invalid("to", format_args!("{to} is a dead-letter stream")));
            }
            if let Some((topic, _)) = parse_partition_stream(to) {
                return Err(Error::invalid(
                    "to",
                    format_args!(
                        "{to} is a partition of {topic}: only its partitioned publisher writes there"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What became of one record in a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// Added to the target and deleted from the dead-letter stream.
    Replayed,
    /// A dry run would replay it.
    WouldReplay,
    /// Left in place: the record of an entry streamwise could not decode or that was trimmed,
    /// or a record that is not in the wire format. Nothing a handler could take.
    NotReplayable,
    /// Gone before its turn (replayed or purged by another run meanwhile).
    Gone,
}

/// One record of a replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReplayedRecord {
    /// The dead-letter stream it was in.
    pub dead_letter_stream: String,
    /// Its id there.
    pub id: EntryId,
    /// The stream it goes to.
    pub target: String,
    /// Its new id in `target`, once replayed.
    pub new_id: Option<EntryId>,
    /// Its event type.
    pub event_type: Option<String>,
    /// Why it had been dead-lettered.
    pub reason: Option<String>,
    /// What became of it.
    pub outcome: ReplayOutcome,
}

/// Where a replay of one dead-letter stream stops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReplayBound {
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// The last record the run replays (the last there was when it started, or the end of the
    /// unfinished run it resumes); `None` when there was none or only chosen ids are replayed.
    pub up_to: Option<EntryId>,
    /// It resumes a run that did not finish (interrupted, or stopped at its limit).
    pub resumed: bool,
}

/// What [`replay_dead_letters`] did, or would do.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// The topic.
    pub topic: String,
    /// Dry run or executed.
    pub mode: Mode,
    /// Where the run stops, per dead-letter stream.
    pub bounds: Vec<ReplayBound>,
    /// Records the selection (ids, reason, limit) took.
    pub selected: u64,
    /// Records replayed (executed) or that would be (dry run).
    pub replayed: u64,
    /// Records left in place because nothing could handle them.
    pub not_replayable: u64,
    /// Records that were gone before their turn.
    pub gone: u64,
    /// The run was stopped before its end; run again to resume it.
    pub interrupted: bool,
    /// The run stopped at its limit with records of its range left; the next run resumes it
    /// (up to the same last records).
    pub unfinished: bool,
    /// How long it took, in milliseconds.
    pub elapsed_ms: u64,
    /// Records a second, replayed, between the first record moved and the last (executed runs
    /// of more than one record).
    pub rate: Option<f64>,
    /// Every record the selection took, in order.
    pub records: Vec<ReplayedRecord>,
}

impl ReplayReport {
    /// Whether the run changed something (executed) or would (dry run).
    pub fn changes(&self) -> bool {
        self.replayed > 0
    }
}

/// Puts the dead letters of `topic` back into the stream each came from (or
/// [`ReplayOptions::to`]), each with a replay marker in its metadata ([`replay_keys`]; the
/// record's own `dead_letter.*` keys are dropped), then deletes it from the dead-letter
/// stream, both in one script step. In [`Mode::DryRun`] it only lists what it would replay.
///
/// - **No loop:** a run stops at the last record there was when it started, in each
///   dead-letter stream of the topic (all read before the first record moves), so a record
///   dead-lettered again during the run (its handler still fails) is not replayed again by it.
/// - **No duplicates, nothing lost:** each record moves in one step, so a run interrupted
///   anywhere (`stop`, a crash, a lost connection) publishes no record twice.
/// - **Resumable:** an executed run keeps where each dead-letter stream's range ends in Redis
///   (for 7 days), all before the first record moves, until it has gone through the whole
///   range; a run that stops earlier (interrupted, or at [`ReplayOptions::limit`]) is resumed
///   by the next, up to the same last records, unless [`ReplayOptions::fresh`]. Runs of chosen
///   [`ReplayOptions::ids`] neither resume nor leave anything to resume.
/// - **Paced:** with [`ReplayOptions::rate`], no faster than that.
/// - Records of entries streamwise could not decode or that were trimmed are left in place
///   ([`ReplayOutcome::NotReplayable`]): no handler could take them.
///
/// `stop` ends the run between two records when it completes (a signal handler, a deadline);
/// `progress` is called with the records looked at so far and about how many there are.
pub async fn replay_dead_letters(
    conn: &RedisConnection,
    topic: &str,
    options: &ReplayOptions,
    stop: impl Future<Output = ()>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<ReplayReport> {
    options.check()?;
    let started = Instant::now();
    let (_, streams) = streams_of(conn, topic).await?;
    let mut sources = Vec::with_capacity(streams.len());
    for (_, stream) in streams {
        let target = options.to.clone().unwrap_or_else(|| stream.clone());
        let dead_letters = dead_letter::stream_for(&stream);
        if conn.is_cluster() && slot_of(&target) != slot_of(&dead_letters) {
            return Err(Error::invalid(
                "to",
                format_args!(
                    "{target} hashes to another cluster slot than {dead_letters}: give it the hash tag of \
                     {stream} ({}) so that each record moves in one step",
                    crate::redis::keys::in_slot(&stream)
                ),
            ));
        }
        refuse_partitioned(conn, &target).await?;
        sources.push((dead_letters, target));
    }
    let mut total = 0;
    for (dead_letters, _) in &sources {
        let len: u64 = conn.command(redis::cmd("XLEN").arg(dead_letters)).await?;
        total += len;
    }
    if let Some(ids) = &options.ids {
        total = total.min(ids.len() as u64);
    }
    let execute = options.mode == Mode::Execute;
    // Every stream's range, fixed before the first record moves: a record that one stream's
    // replay sends back to the dead letters (of its own stream, or of another through `to`)
    // lies beyond the range of every stream, and the keys let a rerun find the same ranges.
    let mut bounds = Vec::with_capacity(sources.len());
    for (dead_letters, _) in &sources {
        bounds.push(match options.ids {
            Some(_) => ReplayBound {
                dead_letter_stream: dead_letters.clone(),
                up_to: None,
                resumed: false,
            },
            None => range_of(conn, dead_letters, options.fresh).await?,
        });
    }
    if execute && options.ids.is_none() {
        for bound in &bounds {
            // An empty range is kept too (as 0-0), so that a resumed run leaves alone what
            // came into that stream since.
            let end = bound.up_to.unwrap_or(EntryId::ZERO);
            let _: () = conn
                .command(
                    redis::cmd("SET")
                        .arg(keys::replay(&bound.dead_letter_stream))
                        .arg(end.to_string())
                        .arg("EX")
                        .arg(RESUME_TTL_SECONDS),
                )
                .await?;
        }
    }
    let codec = options.layout.0.codec_with(&options.layout.1)?;
    let mut run = Run {
        conn,
        options,
        codec,
        report: ReplayReport {
            topic: topic.to_owned(),
            mode: options.mode,
            bounds,
            selected: 0,
            replayed: 0,
            not_replayable: 0,
            gone: 0,
            interrupted: false,
            unfinished: false,
            elapsed_ms: 0,
            rate: None,
            records: Vec::new(),
        },
        looked_at: 0,
        total,
        pace_from: Instant::now(),
        last_move: None,
        max_lengths: BTreeMap::new(),
        progress,
    };
    let mut stop = std::pin::pin!(stop);
    for (n, (dead_letters, target)) in sources.iter().enumerate() {
        let end = run.report.bounds[n].up_to;
        if !run.one_stream(dead_letters, target, end, stop.as_mut()).await? {
            break;
        }
    }
    // Only a run that went through its whole range lets the next one start afresh.
    if execute && options.ids.is_none() && !run.report.interrupted && !run.report.unfinished {
        for (dead_letters, _) in &sources {
            let _: i64 = conn
                .command(redis::cmd("DEL").arg(keys::replay(dead_letters)))
                .await?;
        }
    }
    run.report.elapsed_ms = saturating_ms(started.elapsed());
    // Between the first record moved and the last: what a rate limit bounds.
    if let Some(last) = run.last_move
        && run.report.replayed > 1
    {
        let span = last.duration_since(run.pace_from).as_secs_f64().max(1e-9);
        run.report.rate = Some((run.report.replayed - 1) as f64 / span);
    }
    Ok(run.report)
}

/// Where a run replaying `dead_letters` stops: the end of the unfinished run it resumes (kept
/// under [`keys::replay`]), or, fresh, the last record there is now.
async fn range_of(conn: &RedisConnection, dead_letters: &str, fresh: bool) -> Result<ReplayBound> {
    let stored: Option<String> = conn
        .command(redis::cmd("GET").arg(keys::replay(dead_letters)))
        .await?;
    let stored = stored
        .and_then(|id| id.parse::<EntryId>().ok())
        .filter(|_| !fresh);
    let last = last_id(conn, dead_letters).await?;
    let (up_to, resumed) = match stored {
        // 0-0: that run's range was empty.
        Some(stored) => (
            last.map(|last| last.min(stored))
                .filter(|end| *end != EntryId::ZERO),
            true,
        ),
        None => (last, false),
    };
    Ok(ReplayBound {
        dead_letter_stream: dead_letters.to_owned(),
        up_to,
        resumed,
    })
}

/// One replay run's state.
struct Run<'a> {
    conn: &'a RedisConnection,
    options: &'a ReplayOptions,
    /// The layout the replayed entries are written in.
    codec: std::sync::Arc<dyn Codec>,
    report: ReplayReport,
    looked_at: u64,
    total: u64,
    /// The pacing's start: record `n` goes no sooner than `n / rate` after it.
    pace_from: Instant,
    /// When the last record was moved.
    last_move: Option<Instant>,
    /// Each target's `max_length` setting.
    max_lengths: BTreeMap<String, Option<u64>>,
    progress: &'a mut (dyn FnMut(u64, u64) + Send),
}

impl Run<'_> {
    /// Replays the selected records of `dead_letters` up to `end` (the chosen ids instead,
    /// with [`ReplayOptions::ids`]) into `target`; `false` when the run stops here
    /// (interrupted, or at its limit).
    async fn one_stream(
        &mut self,
        dead_letters: &str,
        target: &str,
        end: Option<EntryId>,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool> {
        let conn = self.conn;
        if let Some(ids) = &self.options.ids {
            for id in ids {
                let Some(raw) = admin::read_entry(conn, dead_letters, *id).await? else {
                    continue;
                };
                if !self.one_record(dead_letters, target, raw, stop.as_mut()).await? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        let Some(end) = end else { return Ok(true) };
        let mut go_on = true;
        each_record(conn, dead_letters, end, async |raw| {
            go_on = self.one_record(dead_letters, target, raw, stop.as_mut()).await?;
            Ok(go_on)
        })
        .await?;
        Ok(go_on)
    }

    /// Replays one record; `false` when the run stops at it (at the limit: a record is left
    /// in the range, [`ReplayReport::unfinished`]) or after it (interrupted).
    async fn one_record(
        &mut self,
        dead_letters: &str,
        target: &str,
        raw: RawEntry,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool> {
        let id = raw.id;
        // A subscription writes its dead-letter records in its topic's layout.
        let message = self.codec.decode(raw).ok();
        let reason = message
            .as_ref()
            .and_then(|m| m.metadata().get(dead_letter::keys::REASON))
            .map(str::to_owned);
        if let Some(filter) = &self.options.reason
            && !reason_selected(reason.as_deref(), filter)
        {
            self.looked_at += 1;
            (self.progress)(self.looked_at, self.total);
            return Ok(true);
        }
        // The limit is reached when a record beyond it is found: only then is the range known
        // to be unfinished.
        if self
            .options
            .limit
            .is_some_and(|limit| self.report.selected >= limit)
        {
            self.report.unfinished = true;
            return Ok(false);
        }
        self.looked_at += 1;
        (self.progress)(self.looked_at, self.total);
        self.report.selected += 1;
        let mut record = ReplayedRecord {
            dead_letter_stream: dead_letters.to_owned(),
            id,
            target: target.to_owned(),
            new_id: None,
            event_type: message.as_ref().map(|m| m.event_type().to_owned()),
            reason,
            outcome: ReplayOutcome::NotReplayable,
        };
        let replayable = message
            .as_ref()
            .filter(|m| ![UNDECODABLE_EVENT_TYPE, TRIMMED_EVENT_TYPE].contains(&m.event_type()));
        match (replayable, self.options.mode) {
            (None, _) => self.report.not_replayable += 1,
            (Some(_), Mode::DryRun) => {
                record.outcome = ReplayOutcome::WouldReplay;
                self.report.replayed += 1;
            }
            (Some(message), Mode::Execute) => {
                if let Some(rate) = self.options.rate {
                    // `check` keeps the rate at one a day or more; should the sum still not
                    // fit the clock, the record goes now rather than never.
                    let due = Duration::try_from_secs_f64(self.report.replayed as f64 / rate)
                        .ok()
                        .and_then(|wait| self.pace_from.checked_add(wait))
                        .unwrap_or_else(Instant::now);
                    tokio::select! {
                        biased;
                        () = stop.as_mut() => {
                            self.report.interrupted = true;
                            self.report.selected -= 1;
                            return Ok(false);
                        }
                        () = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                if self.report.replayed == 0 {
                    self.pace_from = Instant::now();
                }
                match self.move_record(dead_letters, target, id, message).await? {
                    Some(new_id) => {
                        self.last_move = Some(Instant::now());
                        record.new_id = Some(new_id);
                        record.outcome = ReplayOutcome::Replayed;
                        self.report.replayed += 1;
                    }
                    None => {
                        record.outcome = ReplayOutcome::Gone;
                        self.report.gone += 1;
                    }
                }
            }
        }
        self.report.records.push(record);
        // Between two records, a stop that came meanwhile ends the run.
        let stopped = tokio::select! {
            biased;
            () = stop.as_mut() => true,
            () = std::future::ready(()) => false,
        };
        if stopped {
            self.report.interrupted = true;
        }
        Ok(!stopped)
    }

    /// Moves record `id` of `dead_letters` into `target` as the replayed `message`, in one
    /// script step; `None` when the record was gone.
    async fn move_record(
        &mut self,
        dead_letters: &str,
        target: &str,
        id: EntryId,
        message: &Message,
    ) -> Result<Option<EntryId>> {
        let max_length = match self.max_lengths.get(target) {
            Some(max_length) => *max_length,
            None => {
                let (settings, _) = admin::stream_settings(self.conn, target).await?;
                self.max_lengths.insert(target.to_owned(), settings.max_length);
                settings.max_length
            }
        };
        let replayed = replayed_message(message, id);
        let fields = self.codec.encode(&replayed)?;
        let max_length = max_length.map(|n| n.to_string()).unwrap_or_default();
        let new_id: Option<String> = self
            .conn
            .run_mapped("replay dead letter", |mut c| {
                let mut call = scripts::REPLAY.key(dead_letters);
                call.key(target).arg(id.to_string()).arg(&max_length);
                for (field, value) in &fields {
                    call.arg(*field).arg(value.as_ref());
                }
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        new_id.map(|id| id.parse().map_err(Error::from)).transpose()
    }
}

/// The message a record is replayed as: the record without its `dead_letter.*` keys, with
/// the [`replay_keys`].
fn replayed_message(record: &Message, id: EntryId) -> Message {
    let mut message = record.clone();
    let replays = replays_of(Some(record)) + 1;
    let metadata = message.metadata_mut();
    let reason = metadata.remove(dead_letter::keys::REASON);
    let group = metadata.remove(dead_letter::keys::GROUP);
    for key in [
        dead_letter::keys::ORIGINAL_ID,
        dead_letter::keys::STREAM,
        dead_letter::keys::DELIVERY_COUNT,
    ] {
        metadata.remove(key);
    }
    metadata.insert(replay_keys::RECORD_ID, id.to_string());
    metadata.insert(replay_keys::COUNT, replays.to_string());
    if let Some(reason) = reason {
        metadata.insert(replay_keys::REASON, reason);
    }
    if let Some(group) = group {
        metadata.insert(replay_keys::GROUP, group);
    }
    message
}

/// Dead letters purged, or that would be, from one dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PurgeRow {
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Records with ids below this go.
    pub before: EntryId,
    /// How many.
    pub removes: u64,
}

/// What [`purge_dead_letters`] did, or would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PurgeReport {
    /// The topic.
    pub topic: String,
    /// Dry run or executed.
    pub mode: Mode,
    /// Only records older than this many milliseconds (all without it).
    pub older_than_ms: Option<u64>,
    /// Per dead-letter stream.
    pub streams: Vec<PurgeRow>,
    /// Records removed, or that would be, in all.
    pub total: u64,
}

impl PurgeReport {
    /// Whether the purge changed something (executed) or would (dry run).
    pub fn changes(&self) -> bool {
        self.total > 0
    }
}

/// Deletes the dead letters of `topic` (of each partition) that are older than `older_than`,
/// or all of them, up to the last record there was when it started (`XTRIM MINID`); in
/// [`Mode::DryRun`] it counts them.
pub async fn purge_dead_letters(
    conn: &RedisConnection,
    topic: &str,
    older_than: Option<Duration>,
    mode: Mode,
) -> Result<PurgeReport> {
    let (_, streams) = streams_of(conn, topic).await?;
    let mut report = PurgeReport {
        topic: topic.to_owned(),
        mode,
        older_than_ms: older_than.map(saturating_ms),
        streams: Vec::new(),
        total: 0,
    };
    for (_, stream) in streams {
        let dead_letters = dead_letter::stream_for(&stream);
        let Some(last) = last_id(conn, &dead_letters).await? else {
            continue;
        };
        let mut before = next_id(last);
        if let Some(age) = report.older_than_ms {
            before = before.min(id_at(now_ms().saturating_sub(age)));
        }
        let removes = match mode {
            Mode::DryRun => count_before(conn, &dead_letters, before, u64::MAX).await?,
            Mode::Execute => {
                conn.command(
                    redis::cmd("XTRIM")
                        .arg(&dead_letters)
                        .arg("MINID")
                        .arg(before.to_string()),
                )
                .await?
            }
        };
        report.total += removes;
        report.streams.push(PurgeRow {
            dead_letter_stream: dead_letters,
            before,
            removes,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_message_drops_the_record_keys_and_counts_its_replays() {
        let record = crate::dead_letter::DeadLetter {
            reason: "payment service down",
            original_id: EntryId::new(5, 1),
            stream: "orders",
            group: "billing",
            delivery_count: 3,
        }
        .for_message(&Message::new("order.placed", &1).unwrap().with_metadata("k", "v"));
        let once = replayed_message(&record, EntryId::new(9, 0));
        let m = once.metadata();
        assert_eq!(m.get("k"), Some("v"));
        assert_eq!(m.get(replay_keys::RECORD_ID), Some("9-0"));
        assert_eq!(m.get(replay_keys::COUNT), Some("1"));
        assert_eq!(m.get(replay_keys::REASON), Some("payment service down"));
        assert_eq!(m.get(replay_keys::GROUP), Some("billing"));
        assert!(m.iter().all(|(k, _)| !k.starts_with("dead_letter.")), "{m:?}");
        assert_eq!(once.uuid(), record.uuid());
        let twice = replayed_message(&once, EntryId::new(10, 0));
        assert_eq!(twice.metadata().get(replay_keys::COUNT), Some("2"));
    }

    #[test]
    fn peek_and_replay_select_reasons_alike() {
        assert!(reason_selected(Some("payment service down"), "payment"));
        assert!(!reason_selected(Some("payment service down"), "timeout"));
        // A record without a reason is selected by the label peek shows for it, and only so.
        assert!(reason_selected(None, NO_REASON));
        assert!(!reason_selected(None, "none"));
    }

    #[test]
    fn replay_options_are_checked() {
        for (options, field) in [
            (ReplayOptions::new(Mode::Execute).rate(0.0), "rate"),
            (ReplayOptions::new(Mode::Execute).rate(f64::NAN), "rate"),
            // Slower than one a day: the pacing's sums would overflow the clock.
            (ReplayOptions::new(Mode::Execute).rate(1e-18), "rate"),
            (ReplayOptions::new(Mode::Execute).rate(f64::INFINITY), "rate"),
            (ReplayOptions::new(Mode::Execute).to("orders~p1"), "to"),
            (ReplayOptions::new(Mode::Execute).limit(0), "limit"),
            (ReplayOptions::new(Mode::Execute).to("{orders}-dead"), "to"),
            (ReplayOptions::new(Mode::Execute).to("a b"), "to"),
        ] {
            assert_eq!(options.check().unwrap_err().invalid_field(), Some(field));
        }
    }
}
