//! The metrics streamwise records, through the [`metrics`](https://docs.rs/metrics) facade
//! (the `metrics` cargo feature, off by default): the library records, the application installs
//! the exporter it wants (Prometheus, StatsD, OpenTelemetry, ...) **before** it starts
//! publishers, subscribers and routers, which take their handles when they start. Without the
//! feature nothing is recorded and nothing is paid; with it, a delivery through the router
//! costs about 0.1 µs more (two clock reads for its durations), exporter or not.
//!
//! Labels are few and bounded: never a consumer name or an entry id. An event type is a label
//! only when a route handles it; the others count as `unrouted`.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `streamwise_published_total` | counter | `topic`, `outcome` (`ok`, `error`) |
//! | `streamwise_publish_duration_seconds` | histogram | `topic` |
//! | `streamwise_deliveries_total` | counter | `topic`, `group`, `event_type`, `outcome` (`ack`, `nack`, `dead_letter`, `error`) |
//! | `streamwise_handler_duration_seconds` | histogram | `topic`, `group`, `event_type`, `outcome` |
//! | `streamwise_in_flight` | gauge | `topic`, `group` |
//! | `streamwise_redeliveries_total` | counter | `topic`, `group` |
//! | `streamwise_dead_letters_total` | counter | `topic`, `group`, `reason` (`decode`, `oversize`, `trimmed`, `max_deliveries`, `handler`) |
//! | `streamwise_reclaimed_total` | counter | `topic`, `group` |
//! | `streamwise_read_errors_total` | counter | `topic`, `group` |
//! | `streamwise_end_to_end_seconds` | histogram | `topic`, `group` |
//!
//! The delivery metrics come from the router: a delivery's `outcome` is how it was settled
//! (a handler that failed and was nacked counts as `nack`; `error` is a settlement that could
//! not be made), its handler duration runs from the handler's start to its settlement, and end
//! to end is the handler's start less the message's timestamp. `topic` is the stream the
//! delivery came from (a partition's stream on a partitioned topic).

// Without the feature the router records nothing and does not call in here.
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The metric names, for dashboards and tests.
pub mod names {
    /// Counter of publishes, by `topic` and `outcome`.
    pub const PUBLISHED_TOTAL: &str = "streamwise_published_total";
    /// Histogram of publish durations in seconds, by `topic`.
    pub const PUBLISH_DURATION_SECONDS: &str = "streamwise_publish_duration_seconds";
    /// Counter of settled deliveries, by `topic`, `group`, `event_type` and `outcome`.
    pub const DELIVERIES_TOTAL: &str = "streamwise_deliveries_total";
    /// Histogram of handler durations in seconds, by `topic`, `group`, `event_type`, `outcome`.
    pub const HANDLER_DURATION_SECONDS: &str = "streamwise_handler_duration_seconds";
    /// Gauge of deliveries being handled, by `topic` and `group`.
    pub const IN_FLIGHT: &str = "streamwise_in_flight";
    /// Counter of deliveries handed out again (delivery count above 1), by `topic`, `group`.
    pub const REDELIVERIES_TOTAL: &str = "streamwise_redeliveries_total";
    /// Counter of dead letters, by `topic`, `group` and `reason`.
    pub const DEAD_LETTERS_TOTAL: &str = "streamwise_dead_letters_total";
    /// Counter of entries taken over from other consumers, by `topic` and `group`.
    pub const RECLAIMED_TOTAL: &str = "streamwise_reclaimed_total";
    /// Counter of failed reads (each retried), by `topic` and `group`.
    pub const READ_ERRORS_TOTAL: &str = "streamwise_read_errors_total";
    /// Histogram of handler start less message timestamp, in seconds, by `topic`, `group`.
    pub const END_TO_END_SECONDS: &str = "streamwise_end_to_end_seconds";
    /// Gauge of entries not delivered to a group yet, by `topic`, `group` (and `partition`).
    pub const GROUP_LAG_ENTRIES: &str = "streamwise_group_lag_entries";
    /// Gauge of how long the oldest entry not delivered yet has waited, in seconds.
    pub const GROUP_LAG_SECONDS: &str = "streamwise_group_lag_seconds";
    /// Gauge of entries delivered to a group and not acknowledged.
    pub const GROUP_PENDING_ENTRIES: &str = "streamwise_group_pending_entries";
    /// Gauge of seconds since the oldest pending entry was last delivered.
    pub const OLDEST_PENDING_SECONDS: &str = "streamwise_oldest_pending_seconds";
    /// Gauge of entries in the stream.
    pub const STREAM_LENGTH_ENTRIES: &str = "streamwise_stream_length_entries";
}

/// Why an entry was dead-lettered, as the `reason` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeadLetterReason {
    /// It could not be decoded (its payload is not JSON, say).
    Decode,
    /// It was larger than `max_entry_size`.
    Oversize,
    /// It was trimmed from its stream while pending.
    Trimmed,
    /// It was delivered `max_deliveries` times.
    MaxDeliveries,
    /// Its handler dead-lettered it.
    Handler,
}

impl DeadLetterReason {
    fn label(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Oversize => "oversize",
            DeadLetterReason::Trimmed => "trimmed",
            DeadLetterReason::MaxDeliveries => "max_deliveries",
            DeadLetterReason::Handler => "handler",
        }
    }
}

/// How a delivery was settled, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeliveryOutcome {
    Ack,
    Nack,
    DeadLetter,
    /// The settlement could not be made.
    Error,
}

const OUTCOMES: [&str; 4] = ["ack", "nack", "dead_letter", "error"];

impl DeliveryOutcome {
    fn index(self) -> usize {
        self as usize
    }
}

#[cfg(feature = "metrics")]
mod handles {
    pub(crate) use metrics::{Counter, Gauge, Histogram};

    fn labels(pairs: &[(&'static str, &str)]) -> Vec<metrics::Label> {
        pairs
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.to_string()))
            .collect()
    }

    pub(crate) fn counter(name: &'static str, pairs: &[(&'static str, &str)]) -> Counter {
        metrics::counter!(name, labels(pairs))
    }

    pub(crate) fn gauge(name: &'static str, pairs: &[(&'static str, &str)]) -> Gauge {
        metrics::gauge!(name, labels(pairs))
    }

    pub(crate) fn histogram(name: &'static str, pairs: &[(&'static str, &str)]) -> Histogram {
        metrics::histogram!(name, labels(pairs))
    }
}

#[cfg(not(feature = "metrics"))]
mod handles {
    //! Without the `metrics` feature: handles that record nothing.
    #[derive(Clone, Debug, Default)]
    pub(crate) struct Counter;
    impl Counter {
        pub(crate) fn increment(&self, _: u64) {}
    }
    #[derive(Clone, Debug, Default)]
    pub(crate) struct Gauge;
    impl Gauge {
        pub(crate) fn increment(&self, _: f64) {}
        pub(crate) fn decrement(&self, _: f64) {}
        pub(crate) fn set(&self, _: f64) {}
    }
    #[derive(Clone, Debug, Default)]
    pub(crate) struct Histogram;
    impl Histogram {
        pub(crate) fn record(&self, _: f64) {}
    }
    pub(crate) fn counter(_: &'static str, _: &[(&'static str, &str)]) -> Counter {
        Counter
    }
    pub(crate) fn gauge(_: &'static str, _: &[(&'static str, &str)]) -> Gauge {
        Gauge
    }
    pub(crate) fn histogram(_: &'static str, _: &[(&'static str, &str)]) -> Histogram {
        Histogram
    }
}

use handles::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// The publish metrics of one topic.
#[derive(Clone)]
struct TopicPublishes {
    ok: Counter,
    error: Counter,
    duration: Histogram,
}

/// A publisher's metrics: handles per topic, taken on the first publish to it.
#[derive(Default)]
pub(crate) struct PublishMetrics {
    topics: Mutex<HashMap<String, TopicPublishes>>,
}

impl std::fmt::Debug for PublishMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishMetrics").finish_non_exhaustive()
    }
}

impl PublishMetrics {
    /// Records `entries` published to `topic` (or failed, `ok` false) in `elapsed`.
    pub(crate) fn record(&self, topic: &str, entries: usize, ok: bool, elapsed: Duration) {
        let handles = {
            let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            match topics.get(topic) {
                Some(h) => h.clone(),
                None => {
                    let h = TopicPublishes {
                        ok: counter(names::PUBLISHED_TOTAL, &[("topic", topic), ("outcome", "ok")]),
                        error: counter(names::PUBLISHED_TOTAL, &[("topic", topic), ("outcome", "error")]),
                        duration: histogram(names::PUBLISH_DURATION_SECONDS, &[("topic", topic)]),
                    };
                    topics.insert(topic.to_owned(), h.clone());
                    h
                }
            }
        };
        let n = entries as u64;
        if ok {
            handles.ok.increment(n);
        } else {
            handles.error.increment(n);
        }
        handles.duration.record(elapsed.as_secs_f64());
    }
}

/// The outcome counters and handler histograms of one event type.
struct TypeMetrics {
    total: [Counter; 4],
    duration: [Histogram; 4],
}

impl TypeMetrics {
    fn new(topic: &str, group: &str, event_type: &str) -> Self {
        let labels = |outcome| {
            [
                ("topic", topic),
                ("group", group),
                ("event_type", event_type),
                ("outcome", outcome),
            ]
        };
        TypeMetrics {
            total: OUTCOMES.map(|o| counter(names::DELIVERIES_TOTAL, &labels(o))),
            duration: OUTCOMES.map(|o| histogram(names::HANDLER_DURATION_SECONDS, &labels(o))),
        }
    }
}

/// The delivery metrics of one stream and group, as the router records them.
struct StreamDeliveries {
    /// Per routed event type (a few: found by a scan, cheaper than hashing here).
    by_type: Vec<(String, TypeMetrics)>,
    unrouted: TypeMetrics,
    in_flight: Gauge,
    redeliveries: Counter,
    handler_dead_letters: Counter,
    end_to_end: Histogram,
}

impl StreamDeliveries {
    fn new(topic: &str, group: &str, event_types: &[String]) -> Self {
        let pair = [("topic", topic), ("group", group)];
        StreamDeliveries {
            by_type: event_types
                .iter()
                .map(|t| (t.clone(), TypeMetrics::new(topic, group, t)))
                .collect(),
            unrouted: TypeMetrics::new(topic, group, "unrouted"),
            in_flight: gauge(names::IN_FLIGHT, &pair),
            redeliveries: counter(names::REDELIVERIES_TOTAL, &pair),
            handler_dead_letters: counter(
                names::DEAD_LETTERS_TOTAL,
                &[
                    ("topic", topic),
                    ("group", group),
                    ("reason", DeadLetterReason::Handler.label()),
                ],
            ),
            end_to_end: histogram(names::END_TO_END_SECONDS, &pair),
        }
    }
}

/// The router's delivery metrics of one subscription. A partitioned topic's deliveries come
/// from its partition streams: each stream gets its handles when its first delivery comes.
pub(crate) struct DeliveryMetrics {
    group: String,
    event_types: Vec<String>,
    /// The subscription's stream (the first one seen), looked up without a lock.
    first: std::sync::OnceLock<(String, StreamDeliveries)>,
    /// The other streams (partitions).
    others: Mutex<HashMap<String, Arc<StreamDeliveries>>>,
}

/// The stream metrics of a delivery: the subscription's own stream's (borrowed from the
/// subscription's metrics, which outlive it), or another's.
enum StreamRef {
    First,
    Other(Arc<StreamDeliveries>),
}

/// A delivery being handled: records its start, and its outcome when it is done.
pub(crate) struct Handling {
    stream: StreamRef,
    event_type: Option<usize>,
    started: std::time::SystemTime,
}

impl DeliveryMetrics {
    /// The metrics of the subscription of `group`, whose routes handle `event_types`.
    pub(crate) fn new(group: &str, event_types: Vec<String>) -> Self {
        DeliveryMetrics {
            group: group.to_owned(),
            event_types,
            first: std::sync::OnceLock::new(),
            others: Mutex::new(HashMap::new()),
        }
    }

    fn of_stream(&self, stream: &str) -> StreamRef {
        let (first, _) = self.first.get_or_init(|| {
            (
                stream.to_owned(),
                StreamDeliveries::new(stream, &self.group, &self.event_types),
            )
        });
        if first == stream {
            return StreamRef::First;
        }
        let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        let m = others
            .entry(stream.to_owned())
            .or_insert_with(|| Arc::new(StreamDeliveries::new(stream, &self.group, &self.event_types)));
        StreamRef::Other(m.clone())
    }

    fn metrics<'a>(&'a self, stream: &'a StreamRef) -> &'a StreamDeliveries {
        match stream {
            StreamRef::Other(m) => m,
            StreamRef::First => match self.first.get() {
                Some((_, m)) => m,
                None => unreachable!("a StreamRef::First is made after the first stream is set"),
            },
        }
    }

    /// A delivery of `event_type` from `stream`, delivered `delivery_count` times, whose
    /// message was stamped `timestamp`, starts its handler.
    pub(crate) fn start(
        &self,
        stream: &str,
        event_type: &str,
        delivery_count: u64,
        timestamp: std::time::SystemTime,
    ) -> Handling {
        if !cfg!(feature = "metrics") {
            // Nothing to record: not even the clock is read.
            return Handling {
                stream: StreamRef::First,
                event_type: None,
                started: std::time::UNIX_EPOCH,
            };
        }
        let stream = self.of_stream(stream);
        let metrics = self.metrics(&stream);
        metrics.in_flight.increment(1.0);
        if delivery_count > 1 {
            metrics.redeliveries.increment(1);
        }
        // One clock read for both: the age of the message, and the start of the handler.
        let started = std::time::SystemTime::now();
        if let Ok(age) = started.duration_since(timestamp) {
            metrics.end_to_end.record(age.as_secs_f64());
        }
        let event_type = metrics.by_type.iter().position(|(t, _)| t == event_type);
        Handling {
            stream,
            event_type,
            started,
        }
    }

    /// No delivery is being handled any more (the router dropped the ones it abandoned at its
    /// shutdown deadline).
    pub(crate) fn none_in_flight(&self) {
        if let Some((_, m)) = self.first.get() {
            m.in_flight.set(0.0);
        }
        let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        for m in others.values() {
            m.in_flight.set(0.0);
        }
    }

    /// The delivery of `handling` was settled with `outcome`.
    pub(crate) fn done(&self, handling: Handling, outcome: DeliveryOutcome) {
        if !cfg!(feature = "metrics") {
            return;
        }
        let m = self.metrics(&handling.stream);
        let by_type = handling.event_type.map_or(&m.unrouted, |i| &m.by_type[i].1);
        by_type.total[outcome.index()].increment(1);
        if let Ok(took) = handling.started.elapsed() {
            by_type.duration[outcome.index()].record(took.as_secs_f64());
        }
        if outcome == DeliveryOutcome::DeadLetter {
            m.handler_dead_letters.increment(1);
        }
        m.in_flight.decrement(1.0);
    }
}

/// The gauges of one group on one stream, as the Redis group monitor records them.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct GroupGauges {
    lag: Gauge,
    lag_seconds: Gauge,
    pending: Gauge,
    oldest_pending: Gauge,
    length: Gauge,
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl GroupGauges {
    /// The gauges of `group` on `topic` (`partition`, on a partitioned topic).
    pub(crate) fn new(topic: &str, group: &str, partition: Option<&str>) -> Self {
        let mut labels = vec![("topic", topic), ("group", group)];
        if let Some(p) = partition {
            labels.push(("partition", p));
        }
        GroupGauges {
            lag: gauge(names::GROUP_LAG_ENTRIES, &labels),
            lag_seconds: gauge(names::GROUP_LAG_SECONDS, &labels),
            pending: gauge(names::GROUP_PENDING_ENTRIES, &labels),
            oldest_pending: gauge(names::OLDEST_PENDING_SECONDS, &labels),
            length: gauge(names::STREAM_LENGTH_ENTRIES, &labels),
        }
    }

    /// Records one poll's figures.
    pub(crate) fn record(
        &self,
        lag: u64,
        lag_age: Duration,
        pending: u64,
        oldest_pending: Option<Duration>,
        length: u64,
    ) {
        self.lag.set(lag as f64);
        self.lag_seconds.set(lag_age.as_secs_f64());
        self.pending.set(pending as f64);
        self.oldest_pending
            .set(oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
        self.length.set(length as f64);
    }
}

/// The backend's metrics of one subscription: dead letters it made itself, reclaims and read
/// errors.
#[derive(Clone)]
pub(crate) struct SubscriptionMetrics {
    dead_letters: [Counter; 4],
    // Only the Redis backend reclaims and reads over a network.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    reclaimed: Counter,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    read_errors: Counter,
}

impl std::fmt::Debug for SubscriptionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionMetrics").finish_non_exhaustive()
    }
}

impl SubscriptionMetrics {
    /// The metrics of `group` on `stream`.
    pub(crate) fn new(stream: &str, group: &str) -> Self {
        let pair = [("topic", stream), ("group", group)];
        let reasons = [
            DeadLetterReason::Decode,
            DeadLetterReason::Oversize,
            DeadLetterReason::Trimmed,
            DeadLetterReason::MaxDeliveries,
        ];
        SubscriptionMetrics {
            dead_letters: reasons.map(|r| {
                counter(
                    names::DEAD_LETTERS_TOTAL,
                    &[("topic", stream), ("group", group), ("reason", r.label())],
                )
            }),
            reclaimed: counter(names::RECLAIMED_TOTAL, &pair),
            read_errors: counter(names::READ_ERRORS_TOTAL, &pair),
        }
    }

    /// An entry the subscription gave up on went to the dead-letter stream.
    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        let i = match reason {
            DeadLetterReason::Decode => 0,
            DeadLetterReason::Oversize => 1,
            DeadLetterReason::Trimmed => 2,
            DeadLetterReason::MaxDeliveries | DeadLetterReason::Handler => 3,
        };
        self.dead_letters[i].increment(1);
    }

    /// `n` entries were taken over from other consumers.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn reclaimed(&self, n: u64) {
        self.reclaimed.increment(n);
    }

    /// A read failed (it is retried).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn read_error(&self) {
        self.read_errors.increment(1);
    }
}
