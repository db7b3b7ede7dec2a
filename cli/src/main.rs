//! `streamwise`: see and repair the streams, consumer groups, pending entries and dead letters
//! of services built on streamwise, on one Redis or a Redis Cluster.
//!
//! A front end to [`streamwise::redis::ops`], where the logic and its safety live: this crate
//! owns the arguments, the tables, the JSON output (the reports' fields, serialized) and the
//! exit codes. Exit codes: 0 ok, 1 error, 2 a dry run that would change something, 3 refused
//! (live consumers); usage errors and panics exit 1 too, so that 2 always means a dry run that
//! would change something. Destructive commands are dry runs unless `--execute`.

mod commands;
mod output;
mod parse;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use streamwise::EntryId;
use streamwise::redis::RedisConnection;

use crate::output::{Format, Out};

/// See and repair streamwise's streams, groups, pending entries and dead letters on Redis.
///
/// Exit codes: 0 ok, 1 error, 2 a dry run that would change something, 3 refused because
/// consumers are live. Destructive commands only say what they would do unless --execute.
#[derive(Parser, Debug)]
#[command(name = "streamwise", version, max_term_width = 100)]
struct Cli {
    /// Redis URL: redis://[user:pass@]host:port, rediss://..., redis-cluster://host:port?node=host:port
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    url: Option<String>,
    /// How to print results.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Streams with length, first and last entry, groups and retention settings.
    Streams {
        /// Only streams whose names match this Redis glob.
        #[arg(long, default_value = "*")]
        pattern: String,
    },
    /// The consumer groups of a topic: consumers, pending, lag, oldest pending, checkpoint
    /// (per partition on a partitioned topic).
    Groups {
        /// The topic (a stream, or a partitioned topic).
        topic: String,
    },
    /// The consumers of a group: pending, idle, lease, owned partitions.
    Consumers {
        /// The topic.
        topic: String,
        /// The consumer group.
        group: String,
    },
    /// Pending entries of a group, oldest first: id, consumer, idle, deliveries, event type.
    Pending {
        /// The topic.
        topic: String,
        /// The consumer group.
        group: String,
        /// Only this consumer's entries.
        #[arg(long)]
        consumer: Option<String>,
        /// Only entries idle at least this long (30s, 5m, ...).
        #[arg(long, value_parser = parse::duration, default_value = "0")]
        min_idle: Duration,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Read a topic's entries without a group (nothing is acknowledged or changed).
    Tail(TailArgs),
    /// Publish one message, for testing.
    Publish {
        /// The topic.
        topic: String,
        /// The event type.
        event_type: String,
        /// The payload, JSON.
        json: String,
        /// Metadata, key=value (repeat for more).
        #[arg(long, value_parser = parse::pair)]
        metadata: Vec<(String, String)>,
        /// The partition key, on a partitioned topic (without one: round-robin).
        #[arg(long)]
        key: Option<String>,
    },
    /// Dead letters: peek, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Consumer groups: reset.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Trim a topic, never below what a group still needs (unless --force): an entry it has
    /// pending, or one a group with live consumers has not been delivered.
    Trim {
        /// The topic.
        topic: String,
        #[command(flatten)]
        to: TrimArgs,
        /// Trim (without it: only say what would go).
        #[arg(long)]
        execute: bool,
        /// A group without live consumers whose consumers have all been idle this long no
        /// longer holds the trim back (7d, 12h, ...).
        #[arg(long, value_parser = parse::duration, default_value = "7d", conflicts_with = "force")]
        idle_group_age: Duration,
        /// Trim even into entries groups have pending or not yet delivered.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct TrimArgs {
    /// Keep the newest this many entries (per partition).
    #[arg(long)]
    maxlen: Option<u64>,
    /// Remove entries older than this (7d, 12h, ...).
    #[arg(long, value_parser = parse::duration)]
    older_than: Option<Duration>,
}

#[derive(Args, Debug)]
struct TailArgs {
    /// The topic.
    topic: String,
    /// Where to start: $ (new entries only), an entry id, an ISO 8601 time, or -5m (five
    /// minutes ago). Without it: the last --count entries.
    #[arg(long, value_parser = parse::tail_from, allow_hyphen_values = true)]
    from: Option<parse::From>,
    /// How many of the last entries to show when there is no --from.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Only entries of this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Keep waiting for new entries (ctrl-c stops).
    #[arg(long)]
    follow: bool,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// A count per reason, then the latest records.
    Peek {
        /// The topic whose dead letters to show.
        topic: String,
        /// How many of the latest records to show.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Only records whose reason contains this ("(none)": the records without one).
        #[arg(long)]
        reason: Option<String>,
        /// The topic's layout, in which its subscriptions wrote the records (streamwise,
        /// natricine, watermill; with default settings).
        #[arg(long, default_value = "streamwise")]
        codec: streamwise::WireFormat,
    },
    /// Put dead letters back into their stream, safely: up to the last record there was at the
    /// start, each moved once (resumable after an interruption), with a replay marker.
    Replay {
        /// The topic whose dead letters to replay.
        topic: String,
        /// Only these records (ids in the dead-letter stream; comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_parser = parse::entry_id)]
        ids: Vec<EntryId>,
        /// At most this many records, oldest first (the next run goes on up to the same last
        /// records).
        #[arg(long)]
        limit: Option<u64>,
        /// Only records whose reason contains this ("(none)": the records without one).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many records a second (100/s, 600/m; one a day at the least).
        #[arg(long, value_parser = parse::rate)]
        rate: Option<f64>,
        /// Into this stream instead of the one each came from (not a dead-letter stream, nor a
        /// partition).
        #[arg(long)]
        to: Option<String>,
        /// Start a new run instead of resuming an unfinished one.
        #[arg(long)]
        fresh: bool,
        /// The topic's layout, in which its subscriptions wrote the records and the replayed
        /// entries are written (streamwise, natricine, watermill; with default settings).
        #[arg(long, default_value = "streamwise")]
        codec: streamwise::WireFormat,
        /// Replay (without it: only list what would be replayed).
        #[arg(long)]
        execute: bool,
    },
    /// Delete dead letters: all of them, or those older than --older-than.
    Purge {
        /// The topic whose dead letters to purge.
        topic: String,
        /// Only records older than this (7d, 12h, ...).
        #[arg(long, value_parser = parse::duration)]
        older_than: Option<Duration>,
        /// Delete (without it: only count what would go).
        #[arg(long)]
        execute: bool,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Move a group's position; refused while its consumers hold live leases, unless --force.
    Reset {
        /// The topic.
        topic: String,
        /// The consumer group.
        group: String,
        /// earliest, latest, checkpoint, an entry id, an ISO 8601 time or -<duration>.
        #[arg(long, value_parser = parse::reset_to, allow_hyphen_values = true)]
        to: streamwise::redis::ops::ResetTo,
        /// Reset (without it: only say what would change).
        #[arg(long)]
        execute: bool,
        /// Reset even while consumers hold live leases.
        #[arg(long)]
        force: bool,
    },
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: an error (printed).
    Error = 1,
    /// 2: a dry run that would change something.
    WouldChange = 2,
    /// 3: refused, consumers are live.
    Refused = 3,
}

fn main() -> ExitCode {
    // The URLs the tool was given, in the form they were typed, so that whatever quotes one
    // (a usage error, a panic) prints it redacted.
    let urls: Vec<String> = std::env::args()
        .chain(std::env::var("REDIS_URL").ok())
        .filter_map(|arg| {
            // `--url=redis://...`: the URL starts with its scheme.
            let scheme = arg.find("://")?;
            let start = arg[..scheme]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+-.".contains(c)))
                .map_or(0, |i| i + 1);
            Some(arg[start..].to_owned())
        })
        .collect();
    std::panic::set_hook(Box::new({
        let urls = urls.clone();
        move |info| {
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
            // Not eprintln!, which panics when stderr is closed (a panic in the hook aborts).
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: streamwise failed{at}: {} (a bug: please report it)",
                output::redact_urls(&what, &urls)
            );
            std::process::exit(Exit::Error as u8 as i32);
        }
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e, &urls),
    };
    // Lets the tests see what a panic prints (debug builds only).
    #[cfg(debug_assertions)]
    if std::env::var_os("STREAMWISE_CLI_TEST_PANIC").is_some() {
        panic!("a test panic, naming {:?}", cli.url);
    }
    let out = Out::new(cli.output, urls);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            out.note(&format!("error: cannot start: {e}"));
            return ExitCode::from(Exit::Error as u8);
        }
    };
    let exit = runtime.block_on(async {
        match run(&cli, &out).await {
            Ok(exit) => exit,
            Err(e) => {
                out.note(&format!("error: {e}"));
                Exit::Error
            }
        }
    });
    ExitCode::from(exit as u8)
}

/// Prints what clap says (the URLs in it redacted) and how the tool ends: 0 for --help and
/// --version, 1 for a usage error (never 2, which says a dry run would change something).
fn usage(e: &clap::Error, urls: &[String]) -> ExitCode {
    let text = output::redact_urls(&e.render().to_string(), urls);
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        _ => {
            eprint!("{text}");
            ExitCode::from(Exit::Error as u8)
        }
    }
}

/// Connects and runs the command.
async fn run(cli: &Cli, out: &Out) -> streamwise::Result<Exit> {
    let Some(url) = cli.url.as_deref() else {
        return Err(streamwise::Error::invalid(
            "url",
            "no Redis URL: give --url or set REDIS_URL",
        ));
    };
    // An operator waits for an answer: fail within seconds when Redis is away.
    let conn = RedisConnection::builder(url)
        .max_retries(2)
        .retry_max_delay(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(3))
        .build()?;
    commands::run(&cli.command, &conn, out).await
}
