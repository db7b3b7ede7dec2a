//! [`StreamReader`]: reads a stream without a consumer group (`XREAD`) and resumes after its
//! checkpoint, which Redis alone cannot do for a group-less reader.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::checkpoint::RedisCheckpointStore;
use super::connection::RedisConnection;
use super::dedicated::{BLOCK_REPLY_MARGIN, DedicatedConnection};
use super::protocol::replies::ReplyEntry;
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::codec::{Codec, JsonCodec};
use crate::error::{Error, Result, validate_name, validate_stream_name};
use crate::message::{EntryId, Message};
use crate::pubsub::{MAX_IN_FLIGHT, MAX_INTERVAL, StartFrom};

/// The pseudo-group under which group-less readers keep their checkpoints. Real group names
/// match `[A-Za-z0-9_-]+`, so it cannot collide with one.
const READER_GROUP: &str = "~reader";

/// Reads one stream in order without a consumer group, from just after its last committed
/// position.
///
/// ```no_run
/// # async fn demo() -> streamwise::Result<()> {
/// use std::time::Duration;
/// use streamwise::StartFrom;
/// use streamwise::redis::{RedisConnection, StreamReader};
///
/// let conn = RedisConnection::new("redis://127.0.0.1:6379")?;
/// let mut reader = StreamReader::open(conn, "audit", "archiver", StartFrom::Beginning).await?;
/// for (id, message) in reader.next_batch(100, Duration::from_secs(5)).await? {
///     println!("{id}: {:?}", message.map(|m| m.event_type().to_owned()));
///     reader.commit(id).await?; // the next open resumes after `id`
/// }
/// # Ok(()) }
/// ```
pub struct StreamReader {
    conn: RedisConnection,
    read_conn: Option<DedicatedConnection>,
    store: Arc<dyn CheckpointStore>,
    codec: Arc<dyn Codec>,
    stream: String,
    name: String,
    cursor: String,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("stream", &self.stream)
            .field("name", &self.name)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// Opens reader `name` on `stream`, with checkpoints in Redis. Without a checkpoint it
    /// starts at `start`.
    pub async fn open(conn: RedisConnection, stream: &str, name: &str, start: StartFrom) -> Result<Self> {
        let store = Arc::new(RedisCheckpointStore::new(conn.clone()));
        Self::open_with(conn, stream, name, start, store, Arc::new(JsonCodec)).await
    }

    /// Opens a reader with another checkpoint store and codec.
    pub async fn open_with(
        conn: RedisConnection,
        stream: &str,
        name: &str,
        start: StartFrom,
        store: Arc<dyn CheckpointStore>,
        codec: Arc<dyn Codec>,
    ) -> Result<Self> {
        validate_stream_name("stream", stream)?;
        validate_name("name", name)?;
        let cursor = match store.load(stream, READER_GROUP, name).await? {
            Some(cp) => cp.message_id.to_string(),
            None => start.to_string(),
        };
        Ok(StreamReader {
            conn,
            read_conn: None,
            store,
            codec,
            stream: stream.to_owned(),
            name: name.to_owned(),
            cursor,
        })
    }

    /// Where the next read starts (after this id, or `$` for new entries only).
    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    /// The committed position of this reader.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        self.store.load(&self.stream, READER_GROUP, &self.name).await
    }

    /// Reads up to `count` entries after the cursor, waiting up to `block` for new ones, and
    /// moves the cursor past them. Each entry comes with its message, or with the decode error
    /// of an entry that is not in the wire format.
    pub async fn next_batch(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(EntryId, Result<Message>)>> {
        if count == 0 || count > MAX_IN_FLIGHT {
            return Err(Error::invalid(
                "count",
                format_args!("{count} is not between 1 and {MAX_IN_FLIGHT}"),
            ));
        }
        if block.is_zero() || block > MAX_INTERVAL {
            return Err(Error::invalid(
                "block",
                format_args!("{block:?} must be longer than zero and at most {MAX_INTERVAL:?}"),
            ));
        }
        let entries = self.read(count, block).await?;
        if let Some(last) = entries.last() {
            self.cursor = last.id().to_string();
        }
        Ok(entries
            .into_iter()
            .filter_map(|e| match e {
                ReplyEntry::Present(raw) => {
                    let id = raw.id;
                    Some((
                        id,
                        crate::codec::decode_entry(&*self.codec, raw).map_err(|(e, _)| e),
                    ))
                }
                // XREAD reads the stream itself, so there are no trimmed placeholders.
                ReplyEntry::Trimmed(_) => None,
            })
            .collect())
    }

    /// One `XREAD`, on a connection of its own, retrying connection failures with the
    /// connection's backoff.
    async fn read(&mut self, count: usize, block: Duration) -> Result<Vec<ReplyEntry>> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&self.cursor);
        let mut attempt = 0;
        loop {
            let timeout = block + BLOCK_REPLY_MARGIN;
            let conn = match &mut self.read_conn {
                Some(conn) => conn,
                None => self
                    .read_conn
                    .insert(self.conn.dedicated(&self.stream, timeout).await?),
            };
            // Each read may block for another time.
            conn.set_response_timeout(timeout);
            match conn.read_entries(&cmd).await {
                Ok(reply) => return Ok(reply),
                Err(e) if self.conn.transient(&e) && attempt < self.conn.max_retries() => {
                    self.read_conn = None;
                    tokio::time::sleep(self.conn.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    if self.conn.transient(&e) {
                        self.read_conn = None;
                    }
                    return Err(self.conn.failure("XREAD", e, attempt));
                }
            }
        }
    }

    /// Records that everything up to `id` is processed: the next [`open`](Self::open) of this
    /// reader resumes after it.
    pub async fn commit(&mut self, id: EntryId) -> Result<()> {
        let checkpoint = Checkpoint {
            message_id: id,
            timestamp: SystemTime::now(),
        };
        self.store
            .save(&self.stream, READER_GROUP, &self.name, checkpoint)
            .await
    }
}
