//! What the bench binaries share (`benches/streams.rs` for Redis, `benches/nats.rs` for NATS
//! JetStream): the result row and its JSON line, the measurement of one workload (wall time,
//! the client's and the server's CPU, peak RSS, latency percentiles), the workloads' message,
//! the pacing of sends, the router workloads, and the table and summary of a run.
//!
//! The binary that includes it (`mod common;`) provides `fn server_cpu_time() -> Duration`
//! at its root: its server's CPU time so far, read by [`measure`] before and after the work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use streamwise::router::{Router, Routes};
use streamwise::{Message, Publisher, StartFrom, SubscribeOptions, Subscriber};

use crate::server_cpu_time;

// ----------------------------------------------------------------------------- measurement

/// One result row.
#[derive(Clone)]
pub(crate) struct Row {
    pub(crate) workload: String,
    pub(crate) system: String,
    pub(crate) threads: usize,
    pub(crate) payload: usize,
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    pub(crate) latency_us: Option<[f64; 3]>,
    pub(crate) cpu_us_per_event: f64,
    /// The server's CPU (user + system) per event, while the workload ran: redis-server's from
    /// `INFO cpu`, nats-server's from `/proc/<pid>/stat`.
    pub(crate) server_cpu_us_per_event: f64,
    pub(crate) peak_rss_mb: f64,
    /// The share of the machine's CPU time the hypervisor gave to others while the workload
    /// ran (`steal` of /proc/stat, in %): a round with a lot of it measured a busy host.
    pub(crate) steal_pct: f64,
}

impl Row {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    pub(crate) fn json(&self) -> String {
        let latency = match self.latency_us {
            Some([p50, p99, p999]) => format!(r#"{{"p50":{p50:.1},"p99":{p99:.1},"p999":{p999:.1}}}"#),
            None => "null".into(),
        };
        format!(
            r#"{{"workload":"{}","system":"{}","threads":{},"payload_bytes":{},"events":{},"seconds":{:.3},"events_per_s":{:.0},"latency_us":{},"cpu_us_per_event":{:.2},"server_cpu_us_per_event":{:.2},"peak_rss_mb":{:.1},"steal_pct":{:.1}}}"#,
            self.workload,
            self.system,
            self.threads,
            self.payload,
            self.events,
            self.seconds,
            self.rate(),
            latency,
            self.cpu_us_per_event,
            self.server_cpu_us_per_event,
            self.peak_rss_mb,
            self.steal_pct
        )
    }
}

/// CPU time of this process (user + system), from /proc/self/stat (clock ticks of 10 ms).
pub(crate) fn cpu_time() -> Duration {
    process_cpu_time("self")
}

/// CPU time (user + system) of process `pid` (`self`: this one), from /proc/<pid>/stat
/// (clock ticks of 10 ms); zero when it cannot be read.
pub(crate) fn process_cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The machine's CPU time so far as (stolen, all), in clock ticks, from the first line of
/// /proc/stat: `steal` is what the hypervisor ran for other guests on this guest's CPUs.
pub(crate) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    (ticks.get(7).copied().unwrap_or(0), ticks.iter().sum())
}

/// The stolen share (%) of the machine's CPU time between two [`machine_ticks`] readings.
pub(crate) fn steal_pct(before: (u64, u64), after: (u64, u64)) -> f64 {
    let all = after.1.saturating_sub(before.1);
    if all == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 * 100.0 / all as f64
}

/// Profiles the measured part of a workload only: with `BENCH_PERF_CTL=<fifo>`, tells
/// `perf record --control fifo:<fifo> -D -1` when to start and stop.
pub(crate) fn perf_control(command: &str) {
    if let Some(fifo) = std::env::var_os("BENCH_PERF_CTL") {
        let _ = std::fs::write(fifo, format!("{command}\n"));
    }
}

/// Resets the peak RSS (Linux: writing 5 to clear_refs) so each workload has its own peak.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn percentiles(mut samples: Vec<Duration>) -> Option<[f64; 3]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    Some([at(0.50), at(0.99), at(0.999)])
}

/// Runs `work` on a runtime with `threads` workers and records a row. `setup` runs first,
/// outside the measurement (preloading a backlog, say).
pub(crate) fn measure<P, PF, F, Fut>(
    workload: &str,
    system: &str,
    threads: usize,
    payload: usize,
    setup: P,
    work: F,
) -> Row
where
    P: FnOnce() -> PF,
    PF: std::future::Future<Output = ()>,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (u64, Vec<Duration>)>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(setup());
    let server_cpu = server_cpu_time();
    perf_control("enable");
    reset_peak_rss();
    let cpu = cpu_time();
    let machine = machine_ticks();
    let started = Instant::now();
    let (events, latencies) = rt.block_on(work());
    let seconds = started.elapsed().as_secs_f64();
    let steal = steal_pct(machine, machine_ticks());
    let cpu = cpu_time().saturating_sub(cpu);
    perf_control("disable");
    let server_cpu = server_cpu_time().saturating_sub(server_cpu);
    let peak = peak_rss_mb();
    drop(rt);
    Row {
        workload: workload.into(),
        system: system.into(),
        threads,
        payload,
        events,
        seconds,
        latency_us: percentiles(latencies),
        cpu_us_per_event: cpu.as_secs_f64() * 1e6 / events.max(1) as f64,
        server_cpu_us_per_event: server_cpu.as_secs_f64() * 1e6 / events.max(1) as f64,
        peak_rss_mb: peak,
        steal_pct: steal,
    }
}

// ----------------------------------------------------------------------------- workloads

pub(crate) fn payload_of(size: usize) -> serde_json::Value {
    // A JSON object of about `size` bytes.
    serde_json::json!({ "data": "x".repeat(size.saturating_sub(12)) })
}

pub(crate) fn message(size: usize) -> Message {
    Message::new("bench.event", &payload_of(size)).expect("message")
}

/// Sends paced at `rate` a second from when it was made (0: as fast as possible).
pub(crate) struct Pacing {
    start: Instant,
    every: Option<Duration>,
}

impl Pacing {
    pub(crate) fn new(rate: u64) -> Self {
        Pacing {
            start: Instant::now(),
            every: (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64)),
        }
    }

    /// Waits until send number `i` is due.
    pub(crate) async fn wait_for(&self, i: u64) {
        if let Some(every) = self.every {
            let due = self.start + every * i as u32;
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
    }
}

/// The router with a no-op handler over a subscriber, until `n` are handled.
pub(crate) async fn router_consume(
    subscriber: Arc<dyn Subscriber>,
    publisher: Arc<dyn Publisher>,
    stream: &str,
    n: u64,
) -> (u64, Vec<Duration>) {
    let options = SubscribeOptions::new("g", "c")
        .batch_size(100)
        .max_in_flight(env("BENCH_MAX_IN_FLIGHT", 256) as usize)
        .block(Duration::from_millis(100))
        .start_from(StartFrom::Beginning);
    let running = Router::new()
        .subscribe(stream, options, Routes::new().route("bench.event", || async {}))
        .start(subscriber, publisher)
        .await
        .expect("router");
    while running.handled() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let report = running.shutdown().await.expect("shutdown");
    (report.handled, Vec::new())
}

/// End to end at `rate` events/s (0 = as fast as possible) for `n` events, latency from
/// publish to handler, both in this process: a router on `subscriber` (its outcomes published
/// with `router_publisher`), the events published with `publisher`.
pub(crate) async fn router_end_to_end(
    subscriber: Arc<dyn Subscriber>,
    router_publisher: Arc<dyn Publisher>,
    publisher: Arc<dyn Publisher>,
    stream: &'static str,
    n: u64,
    rate: u64,
    size: usize,
) -> (u64, Vec<Duration>) {
    let base = Instant::now();
    let router = LatencyRouter::start(
        subscriber,
        router_publisher,
        stream,
        StartFrom::Latest,
        "sent_ns",
        base,
    )
    .await;
    let pacing = Pacing::new(rate);
    for i in 0..n {
        pacing.wait_for(i).await;
        let m = message(size).with_metadata("sent_ns", base.elapsed().as_nanos().to_string());
        publisher.publish(stream, m).await.expect("publish");
    }
    (n, router.finish(n).await)
}

/// A router whose handler records how late each event came: its arrival minus the time (ns
/// since `base`) in the metadata field `stamp`.
pub(crate) struct LatencyRouter {
    running: streamwise::router::RunningRouter,
    seen: Arc<std::sync::Mutex<Vec<Duration>>>,
    got: Arc<AtomicU64>,
}

impl LatencyRouter {
    pub(crate) async fn start(
        subscriber: Arc<dyn Subscriber>,
        publisher: Arc<dyn Publisher>,
        stream: &str,
        start_from: StartFrom,
        stamp: &'static str,
        base: Instant,
    ) -> Self {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let got = Arc::new(AtomicU64::new(0));
        let (s, g) = (seen.clone(), got.clone());
        let handler = move |m: Message| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                let stamped: u64 = m.metadata().get(stamp).and_then(|v| v.parse().ok()).unwrap_or(0);
                let now = base.elapsed().as_nanos() as u64;
                s.lock()
                    .expect("lock")
                    .push(Duration::from_nanos(now.saturating_sub(stamped)));
                g.fetch_add(1, Ordering::Relaxed);
            }
        };
        let options = SubscribeOptions::new("g", "c")
            .batch_size(100)
            .max_in_flight(256)
            .start_from(start_from);
        let running = Router::new()
            .subscribe(stream, options, Routes::new().route("bench.event", handler))
            .start(subscriber, publisher)
            .await
            .expect("router");
        LatencyRouter { running, seen, got }
    }

    /// Waits until `n` events were handled, stops the router, and returns their latencies.
    pub(crate) async fn finish(self, n: u64) -> Vec<Duration> {
        while self.got.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.running.shutdown().await.expect("shutdown");
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// Publishes `n` messages of `size` to `topic` through `publisher`, each awaited before the
/// next (a clone of one message, as the raw loops send one body); the latency of each.
pub(crate) async fn publish_awaited(
    publisher: &dyn Publisher,
    topic: &str,
    n: u64,
    size: usize,
) -> (u64, Vec<Duration>) {
    let base = message(size);
    let mut lat = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let m = base.clone();
        let t = Instant::now();
        publisher.publish(topic, m).await.expect("publish");
        lat.push(t.elapsed());
    }
    (n, lat)
}

/// A numeric knob from the environment.
pub(crate) fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs workload `index` of `spec` in a child process of this binary (`--run <index>
/// <url>`) with `env` set, and reads its row (`None`, said on stderr, when it failed).
pub(crate) fn run_child(spec: &Spec, index: usize, url: &str, env: (&str, &str)) -> Option<Row> {
    let out = std::process::Command::new(std::env::current_exe().expect("own path"))
        .args(["--run", &index.to_string(), url])
        .env(env.0, env.1)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run a workload");
    let row = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(parse_row);
    if row.is_none() {
        eprintln!("workload {spec:?} failed: {}", out.status);
    }
    row
}

/// Runs a workload by `attempt` (a fresh start and a child run; `None`: it failed) until a run
/// had at most `BENCH_MAX_STEAL` % (5) of the machine's CPU stolen by the hypervisor, at most
/// `1 + BENCH_STEAL_RETRIES` (2) times, and keeps the run with the least stolen. On a shared
/// host a run that lost a quarter of the machine measured the neighbours, not the code.
pub(crate) fn least_stolen(spec: &Spec, mut attempt: impl FnMut() -> Option<Row>) -> Option<Row> {
    let max_steal = env("BENCH_MAX_STEAL", 5) as f64;
    let attempts = env("BENCH_STEAL_RETRIES", 2) + 1;
    let mut kept: Option<Row> = None;
    for n in 1..=attempts {
        let row = attempt()?;
        let steal = row.steal_pct;
        if kept.as_ref().is_none_or(|k| steal < k.steal_pct) {
            kept = Some(row);
        }
        if steal <= max_steal {
            break;
        }
        if n < attempts {
            eprintln!(
                "{} / {} ({} thread(s)): {steal:.1} % of the CPU stolen; run again",
                spec.workload, spec.system, spec.threads
            );
        }
    }
    kept
}

/// One workload, run in a child process of its own so that its CPU time and peak RSS are its
/// alone.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) workload: &'static str,
    pub(crate) system: &'static str,
    pub(crate) threads: usize,
    pub(crate) size: usize,
    pub(crate) events: u64,
}

/// A setup with nothing to do.
pub(crate) async fn nothing() {}

/// The row of a JSON line a child printed.
pub(crate) fn parse_row(json: &str) -> Option<Row> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let latency = v["latency_us"].as_object().map(|l| {
        let f = |k: &str| l.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
        [f("p50"), f("p99"), f("p999")]
    });
    Some(Row {
        workload: v["workload"].as_str()?.to_owned(),
        system: v["system"].as_str()?.to_owned(),
        threads: v["threads"].as_u64()? as usize,
        payload: v["payload_bytes"].as_u64()? as usize,
        events: v["events"].as_u64()?,
        seconds: v["seconds"].as_f64()?,
        latency_us: latency,
        cpu_us_per_event: v["cpu_us_per_event"].as_f64()?,
        server_cpu_us_per_event: v["server_cpu_us_per_event"].as_f64().unwrap_or(0.0),
        peak_rss_mb: v["peak_rss_mb"].as_f64()?,
        steal_pct: v["steal_pct"].as_f64().unwrap_or(0.0),
    })
}

/// The identity of a row: workload, system, threads, payload.
pub(crate) type RowKey = (String, String, usize, usize);

pub(crate) fn key(r: &Row) -> RowKey {
    (r.workload.clone(), r.system.clone(), r.threads, r.payload)
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `median [min-max]` of `values`.
pub(crate) fn spread(values: &[f64]) -> String {
    let (min, max) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    format!("{:.2} [{min:.2}-{max:.2}]", median(values.to_vec()))
}

/// The medians of every row over the rounds, and each row beside the raw loop of the same
/// workload, threads and payload, round by round: its rate, client CPU and server CPU per
/// event (and latency percentiles) as ratios, the median of the rounds with their range.
pub(crate) fn summarize(runs: &[(u64, Row)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let rounds = runs.iter().map(|(r, _)| r + 1).max().unwrap_or(0);
    let mut keys: Vec<RowKey> = Vec::new();
    for (_, r) in runs {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    let _ = writeln!(out, "\nMedians of {rounds} rounds");
    let _ = writeln!(
        out,
        "{:<32} {:<34} {:>3} {:>6} {:>10} {:>8} {:>8} {:>9} {:>9} {:>11}",
        "workload",
        "system",
        "thr",
        "bytes",
        "events/s",
        "p50 us",
        "p99 us",
        "cpu us/ev",
        "srv us/ev",
        "steal % max"
    );
    for k in &keys {
        let of: Vec<&Row> = runs.iter().map(|(_, r)| r).filter(|r| key(r) == *k).collect();
        let m = |f: &dyn Fn(&Row) -> f64| median(of.iter().map(|r| f(r)).collect());
        let lat = |i: usize| {
            if of[0].latency_us.is_some() {
                format!("{:.0}", m(&|r: &Row| r.latency_us.map_or(0.0, |l| l[i])))
            } else {
                "-".into()
            }
        };
        let _ = writeln!(
            out,
            "{:<32} {:<34} {:>3} {:>6} {:>10.0} {:>8} {:>8} {:>9.2} {:>9.2} {:>11.1}",
            k.0,
            k.1,
            k.2,
            k.3,
            m(&|r: &Row| r.rate()),
            lat(0),
            lat(1),
            m(&|r: &Row| r.cpu_us_per_event),
            m(&|r: &Row| r.server_cpu_us_per_event),
            of.iter().map(|r| r.steal_pct).fold(0.0, f64::max)
        );
    }
    let _ = writeln!(
        out,
        "\nAgainst the raw loop of the same round (median [min-max] of the rounds)"
    );
    let _ = writeln!(
        out,
        "{:<32} {:<34} {:>3} {:>6} {:>20} {:>20} {:>20} {:>20} {:>20}",
        "workload",
        "system",
        "thr",
        "bytes",
        "rate x raw",
        "cpu/ev x raw",
        "srv/ev x raw",
        "p50 x raw",
        "p99 x raw"
    );
    for k in keys.iter().filter(|k| !k.1.starts_with("raw")) {
        let mut ratios: [Vec<f64>; 5] = Default::default();
        for (round, r) in runs.iter().filter(|(_, r)| key(r) == *k) {
            let raw = runs.iter().find(|(q, b)| {
                q == round
                    && b.system.starts_with("raw")
                    && b.workload == k.0
                    && b.threads == k.2
                    && b.payload == k.3
            });
            let Some((_, raw)) = raw else { continue };
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            ratios[0].push(ratio(r.rate(), raw.rate()));
            ratios[1].push(ratio(r.cpu_us_per_event, raw.cpu_us_per_event));
            ratios[2].push(ratio(r.server_cpu_us_per_event, raw.server_cpu_us_per_event));
            if let (Some(a), Some(b)) = (r.latency_us, raw.latency_us) {
                ratios[3].push(ratio(a[0], b[0]));
                ratios[4].push(ratio(a[1], b[1]));
            }
        }
        if ratios[0].is_empty() {
            continue;
        }
        let cell = |v: &Vec<f64>| if v.is_empty() { "-".to_owned() } else { spread(v) };
        let _ = writeln!(
            out,
            "{:<32} {:<34} {:>3} {:>6} {:>20} {:>20} {:>20} {:>20} {:>20}",
            k.0,
            k.1,
            k.2,
            k.3,
            cell(&ratios[0]),
            cell(&ratios[1]),
            cell(&ratios[2]),
            cell(&ratios[3]),
            cell(&ratios[4])
        );
    }
    out
}

/// Every row of the run, in the order they ran.
pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<32} {:<34} {:>3} {:>6} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7}",
        "workload",
        "system",
        "thr",
        "bytes",
        "events/s",
        "p50 us",
        "p99 us",
        "p999 us",
        "cpu us/ev",
        "srv us/ev",
        "rss MB",
        "steal %"
    );
    for r in rows {
        let (p50, p99, p999) = match r.latency_us {
            Some([a, b, c]) => (format!("{a:.0}"), format!("{b:.0}"), format!("{c:.0}")),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<32} {:<34} {:>3} {:>6} {:>10.0} {:>8} {:>8} {:>8} {:>9.2} {:>9.2} {:>7.1} {:>7.1}",
            r.workload,
            r.system,
            r.threads,
            r.payload,
            r.rate(),
            p50,
            p99,
            p999,
            r.cpu_us_per_event,
            r.server_cpu_us_per_event,
            r.peak_rss_mb,
            r.steal_pct
        );
    }
}
