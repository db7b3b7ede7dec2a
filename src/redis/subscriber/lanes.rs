//! Read lanes: connections shared by the subscriptions that read without blocking, one per
//! server node for the whole subscriber. A member of a partitioned topic reads its first
//! partitions on connections of their own (blocking reads); the partitions past that bound
//! read here, so the connections a process opens stay bounded however many partitions it
//! owns.
//!
//! Each lane is a task that owns its connection and runs the commands sent to it one at a
//! time, in the order they came: a command finishes whether or not the subscription that sent
//! it is still polled (a caller that stopped polling one subscription holds up no other), and
//! one whose sender is gone leaves its reply unread. A subscription on a lane reads without
//! `BLOCK` and, when it found nothing, waits [`LANE_POLL`] before it asks again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use crate::redis::connection::RedisConnection;
use crate::redis::dedicated::DedicatedConnection;
use crate::redis::protocol::replies::ReplyEntry;

/// How long a subscription on a lane waits after a read found nothing new, before it reads
/// again (the latency a new entry may see on a partition read this way).
pub(crate) const LANE_POLL: Duration = Duration::from_millis(100);

/// A lane's task ends after this long without a command (its node may be gone); the next
/// command starts another.
const LANE_IDLE: Duration = Duration::from_secs(60);

/// Commands waiting for a lane, at most.
const LANE_QUEUE: usize = 1024;

/// What a command sent on a lane answers.
enum Answer {
    /// A stream read's entries.
    Entries(RedisResult<Vec<ReplyEntry>>),
    /// Any other reply.
    Value(RedisResult<Value>),
}

struct Request {
    cmd: Cmd,
    /// A key of the command, to connect to the node that serves it.
    key: Arc<str>,
    entries: bool,
    answer: oneshot::Sender<Answer>,
}

/// Lanes by server node (`None`: the one server).
type ByNode = HashMap<Option<(String, u16)>, mpsc::Sender<Request>>;

/// The lanes of one subscriber.
#[derive(Clone, Default)]
pub(super) struct ReadLanes(Arc<Mutex<ByNode>>);

impl ReadLanes {
    /// The lane to the node that serves `stream` (by the slot map, learned when unknown), for
    /// commands about `stream`.
    pub(super) async fn lane(
        &self,
        conn: &RedisConnection,
        stream: &Arc<str>,
        response_timeout: Duration,
    ) -> crate::error::Result<Lane> {
        let node = conn.master_of(stream).await?;
        let mut lanes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let requests = match lanes.get(&node) {
            Some(requests) if !requests.is_closed() => requests.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                tokio::spawn(serve(rx, conn.clone(), node.clone(), response_timeout));
                lanes.insert(node, tx.clone());
                tx
            }
        };
        Ok(Lane {
            requests,
            key: stream.clone(),
        })
    }
}

/// A subscription's handle on a lane: sends its commands there and waits for their answers.
#[derive(Clone)]
pub(super) struct Lane {
    requests: mpsc::Sender<Request>,
    key: Arc<str>,
}

impl Lane {
    async fn ask(&self, cmd: Cmd, entries: bool) -> RedisResult<Answer> {
        let (answer, answered) = oneshot::channel();
        let request = Request {
            cmd,
            key: self.key.clone(),
            entries,
            answer,
        };
        let gone = || lane_error("the read lane stopped");
        self.requests.send(request).await.map_err(|_| gone())?;
        answered.await.map_err(|_| gone())
    }

    /// Sends a stream read and parses its reply into entries.
    pub(super) async fn read_entries(&self, cmd: &Cmd) -> RedisResult<Vec<ReplyEntry>> {
        match self.ask(cmd.clone(), true).await? {
            Answer::Entries(entries) => entries,
            Answer::Value(_) => Err(lane_error("a read lane answered a read with a value")),
        }
    }
}

impl ConnectionLike for Lane {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.ask(cmd.clone(), false).await? {
                Answer::Value(value) => value,
                Answer::Entries(_) => Err(lane_error("a read lane answered a command with entries")),
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _pipeline: &'a redis::Pipeline,
        _offset: usize,
        _count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async { Err(lane_error("a read lane sends no pipelines")) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A failure of the lane itself, retried as a connection failure is.
fn lane_error(what: &str) -> RedisError {
    std::io::Error::new(std::io::ErrorKind::NotConnected, what.to_owned()).into()
}

/// The task of the lane to `node`: connects on the first command (and after a failure) and
/// runs the commands one by one, until every handle is gone or none came for [`LANE_IDLE`].
async fn serve(
    mut requests: mpsc::Receiver<Request>,
    conn: RedisConnection,
    node: Option<(String, u16)>,
    response_timeout: Duration,
) {
    let mut connection: Option<DedicatedConnection> = None;
    while let Ok(Some(request)) = tokio::time::timeout(LANE_IDLE, requests.recv()).await {
        if request.answer.is_closed() {
            continue;
        }
        let c = match connection.as_mut() {
            Some(c) => c,
            None => match conn.dedicated(&request.key, response_timeout).await {
                // The slot map sent this stream here, but its slot is served elsewhere now.
                Ok(c) if conn.is_cluster() && c.node() != node.as_ref() => {
                    conn.forget_slot_map();
                    let moved = lane_error("the stream's slot moved to another node");
                    let _ = request.answer.send(failed(request.entries, moved));
                    continue;
                }
                Ok(c) => connection.insert(c),
                Err(e) => {
                    let _ = request
                        .answer
                        .send(failed(request.entries, lane_error(&e.to_string())));
                    continue;
                }
            },
        };
        let answer = if request.entries {
            Answer::Entries(c.read_entries(&request.cmd).await)
        } else {
            Answer::Value(c.req_packed_command(&request.cmd).await)
        };
        let failed = match &answer {
            Answer::Entries(r) => r.is_err(),
            Answer::Value(r) => r.is_err(),
        };
        // An error reply leaves the connection in step; a broken one (a reply owed) does not.
        if failed && !c.is_idle() {
            connection = None;
        }
        let _ = request.answer.send(answer);
    }
}

fn failed(entries: bool, e: RedisError) -> Answer {
    if entries {
        Answer::Entries(Err(e))
    } else {
        Answer::Value(Err(e))
    }
}
