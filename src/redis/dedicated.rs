//! [`DedicatedConnection`]: a connection of one's own (the reads of one subscription or
//! reader, a publisher's awaited publishes), speaking RESP2 itself over TCP, a Unix socket or
//! TLS.
//!
//! Why not a redis-rs connection: a stream reply parsed by redis-rs becomes a value tree with a
//! `Vec<u8>` per field, which cost more than everything else the subscriber does per entry.
//! Here a reply is read into one buffer and stream replies are parsed straight into entries
//! whose fields are slices of it ([`resp::stream_reply`]). Reads can be sent ahead
//! ([`send`](DedicatedConnection::send)) so that the server prepares the next batch while the
//! client handles the last. Every other command goes through redis-rs as usual: the connection
//! implements [`redis::aio::ConnectionLike`], and its replies are parsed by redis-rs.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisFuture, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::protocol::replies::ReplyEntry;
use super::protocol::resp::{self, Scan, ScanState};

/// A byte stream to a server.
trait Socket: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Socket for T {}

/// The least one socket read asks for: a batch of small entries arrives in one read.
const READ_CHUNK: usize = 64 * 1024;

/// How much longer than its `BLOCK` a blocking read waits for its reply, before the
/// connection is taken for broken.
pub(crate) const BLOCK_REPLY_MARGIN: Duration = Duration::from_secs(10);

/// TLS settings for `rediss://` (the client configuration, built once per
/// [`RedisConnection`](super::RedisConnection)).
#[cfg(feature = "tls")]
pub(crate) type TlsSetup = std::sync::Arc<rustls::ClientConfig>;
/// Without the `tls` feature there is nothing to set up (`rediss://` is refused earlier).
#[cfg(not(feature = "tls"))]
pub(crate) type TlsSetup = ();

pub(crate) struct DedicatedConnection {
    socket: Box<dyn Socket>,
    input: BytesMut,
    /// How far the reply at the start of `input` has been scanned.
    scanned: ScanState,
    output: Vec<u8>,
    db: i64,
    response_timeout: Duration,
    /// Replies the server owes for commands sent.
    unread: usize,
    /// False once a request was abandoned half-way (its future dropped): then nobody knows
    /// where the next reply starts, and every further request fails as a dropped connection.
    in_step: bool,
    /// The cluster node connected to (`None` for a single server).
    node: Option<(String, u16)>,
    /// The size in bytes of the last reply taken.
    last_reply_len: usize,
}

impl DedicatedConnection {
    /// Connects to the server of `info`, authenticates and selects the database, within
    /// `connect_timeout`. `response_timeout` bounds every reply afterwards (so it must exceed
    /// the longest `BLOCK` sent).
    pub(crate) async fn connect(
        info: &ConnectionInfo,
        tls: Option<TlsSetup>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let setup = async {
            let socket = open(info.addr(), tls).await?;
            let mut conn = DedicatedConnection {
                socket,
                input: BytesMut::with_capacity(READ_CHUNK),
                scanned: ScanState::default(),
                output: Vec::with_capacity(256),
                db: info.redis_settings().db(),
                response_timeout,
                unread: 0,
                last_reply_len: 0,
                in_step: true,
                node: None,
            };
            let settings = info.redis_settings();
            if let Some(password) = settings.password() {
                conn.authenticate(settings.username(), password).await?;
            }
            if conn.db != 0 {
                redis::cmd("SELECT")
                    .arg(conn.db)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(conn)
        };
        match tokio::time::timeout(connect_timeout, setup).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connecting timed out").into()),
        }
    }

    /// `AUTH`, as redis-rs does it: a refusal is [`ErrorKind::AuthenticationFailed`] (the
    /// server's message, which never holds the password, is dropped with it), and a server
    /// older than 6 that knows no user names is asked again with the password alone.
    async fn authenticate(&mut self, username: Option<&str>, password: &str) -> RedisResult<()> {
        let auth = |user: Option<&str>| {
            let mut cmd = redis::cmd("AUTH");
            if let Some(user) = user {
                cmd.arg(user);
            }
            cmd.arg(password);
            cmd
        };
        let refused = |e: RedisError| match e.code() {
            // Refused by the server; an I/O error stays what it is (and is retried).
            Some(_) => RedisError::from((ErrorKind::AuthenticationFailed, "Password authentication failed")),
            None => e,
        };
        match auth(username).query_async::<()>(self).await {
            Ok(()) => Ok(()),
            Err(e)
                if username.is_some()
                    && e.to_string()
                        .contains("wrong number of arguments for 'auth' command") =>
            {
                auth(None).query_async::<()>(self).await.map_err(refused)
            }
            Err(e) => Err(refused(e)),
        }
    }

    /// The connection, known to be to cluster node `host:port`.
    pub(crate) fn at_node(mut self, host: String, port: u16) -> Self {
        self.node = Some((host, port));
        self
    }

    /// The cluster node connected to, or `None` on a single server.
    pub(crate) fn node(&self) -> Option<&(String, u16)> {
        self.node.as_ref()
    }

    /// Bounds every reply from now on (a reader whose `BLOCK` grew needs a longer one).
    pub(crate) fn set_response_timeout(&mut self, timeout: Duration) {
        self.response_timeout = timeout;
    }

    /// The size in bytes of the last reply taken (0 before the first).
    pub(crate) fn last_reply_len(&self) -> usize {
        self.last_reply_len
    }

    /// Whether the connection can take a request: no reply owed, none abandoned half-way.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_step && self.unread == 0
    }

    fn out_of_step() -> RedisError {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "an earlier request on this connection was abandoned half-way",
        )
        .into()
    }

    /// Sends `cmd` without waiting for its reply; [`recv_entries`](Self::recv_entries) or
    /// [`recv_value`](Self::recv_value) takes it later, in order.
    pub(crate) async fn send(&mut self, cmd: &redis::Cmd) -> RedisResult<()> {
        if !self.in_step {
            return Err(Self::out_of_step());
        }
        self.output.clear();
        cmd.write_packed_command(&mut self.output);
        self.write_output().await?;
        self.unread += 1;
        Ok(())
    }

    async fn write_output(&mut self) -> RedisResult<()> {
        self.in_step = false;
        let write = async {
            self.socket.write_all(&self.output).await?;
            self.socket.flush().await
        };
        match tokio::time::timeout(self.response_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out").into()),
        }
        self.in_step = true;
        Ok(())
    }

    /// The next reply, whole, as a slice of the input buffer.
    async fn recv_frame(&mut self) -> RedisResult<Bytes> {
        if !self.in_step || self.unread == 0 {
            return Err(Self::out_of_step());
        }
        self.in_step = false;
        let deadline = deadline_after(self.response_timeout);
        loop {
            match resp::scan(&self.input, &mut self.scanned)? {
                Scan::Complete(len) => {
                    self.unread -= 1;
                    self.last_reply_len = len;
                    self.in_step = true;
                    return Ok(self.input.split_to(len).freeze());
                }
                Scan::Incomplete(at_least) => {
                    self.input
                        .reserve(at_least.saturating_sub(self.input.len()).max(READ_CHUNK));
                    let read = tokio::time::timeout_at(deadline, self.socket.read_buf(&mut self.input));
                    match read.await {
                        Ok(Ok(0)) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => {
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "no reply in time").into());
                        }
                    }
                }
            }
        }
    }

    /// The next reply as a redis-rs value; a server error is the `Err`.
    pub(crate) async fn recv_value(&mut self) -> RedisResult<Value> {
        let frame = self.recv_frame().await?;
        resp::value(&frame)?.extract_error()
    }

    /// The next reply, an `XREAD`/`XREADGROUP` reply, as entries sliced from it.
    pub(crate) async fn recv_entries(&mut self) -> RedisResult<Vec<ReplyEntry>> {
        let frame = self.recv_frame().await?;
        resp::stream_reply(&frame)
    }

    /// Sends a stream read and parses its reply into entries.
    pub(crate) async fn read_entries(&mut self, cmd: &redis::Cmd) -> RedisResult<Vec<ReplyEntry>> {
        if self.unread != 0 {
            return Err(Self::out_of_step());
        }
        self.send(cmd).await?;
        self.recv_entries().await
    }
}

impl redis::aio::ConnectionLike for DedicatedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            // A reply owed for a read sent ahead would be taken for this command's.
            if self.unread != 0 {
                return Err(Self::out_of_step());
            }
            self.send(cmd).await?;
            self.recv_value().await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            if !self.in_step || self.unread != 0 {
                return Err(Self::out_of_step());
            }
            self.output = pipeline.get_packed_pipeline();
            self.write_output().await?;
            self.unread += offset + count;
            let mut values = Vec::with_capacity(count);
            for index in 0..offset + count {
                let frame = self.recv_frame().await?;
                let value = resp::value(&frame)?;
                if index >= offset {
                    values.push(value);
                }
            }
            Ok(values)
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

/// `timeout` from now, saturating: a blocking read's timeout is `BLOCK` plus a margin, and
/// `Instant + Duration` panics on overflow.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    // About 30 years, as tokio's own timers saturate.
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Opens the byte stream to `addr`.
async fn open(addr: &ConnectionAddr, tls: Option<TlsSetup>) -> RedisResult<Box<dyn Socket>> {
    match addr {
        ConnectionAddr::Tcp(host, port) => Ok(Box::new(tcp(host, *port).await?)),
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        #[cfg(feature = "tls")]
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            ..
        } => {
            let Some(config) = tls else {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "rediss:// without a TLS configuration",
                )));
            };
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "bad TLS server name",
                    e.to_string(),
                ))
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp(host, *port).await?)
                .await?;
            Ok(Box::new(stream))
        }
        // `rediss://...#insecure` (no certificate checks), which redis-rs also refuses
        // without its `tls-rustls-insecure` feature. (The address's Debug output would list
        // the certificates.)
        _ => {
            let _ = tls;
            Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "connection type not supported (TLS without certificate checks)",
            )))
        }
    }
}

async fn tcp(host: &str, port: u16) -> io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    // Commands are small and sent one at a time: no Nagle delay.
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::aio::ConnectionLike;

    /// A connection over an in-process pipe, with a scripted server on the other end.
    fn pipe() -> (DedicatedConnection, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let conn = DedicatedConnection {
            socket: Box::new(client),
            input: BytesMut::new(),
            scanned: ScanState::default(),
            output: Vec::new(),
            db: 0,
            response_timeout: Duration::from_secs(5),
            unread: 0,
            in_step: true,
            node: None,
            last_reply_len: 0,
        };
        (conn, server)
    }

    async fn expect_request(server: &mut tokio::io::DuplexStream, cmd: &redis::Cmd) {
        let want = cmd.get_packed_command();
        let mut got = vec![0; want.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
    }

    #[tokio::test]
    async fn replies_split_across_reads_and_sent_ahead_arrive_in_order() {
        let (mut conn, mut server) = pipe();
        let read = redis::cmd("XREAD").arg("STREAMS").arg("s").arg("0").clone();
        conn.send(&read).await.unwrap();
        assert_eq!(conn.unread, 1);
        // Another command may not go out while a reply is owed: it would take that reply.
        let err = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .unwrap_err();
        assert!(err.is_connection_dropped(), "{err}");
        expect_request(&mut server, &read).await;

        let reply = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$7\r\npayload\r\n$5\r\nhello\r\n";
        let writer = async {
            for chunk in reply.chunks(3) {
                server.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            server.write_all(b"+PONG\r\n").await.unwrap();
        };
        let (entries, ()) = tokio::join!(conn.recv_entries(), writer);
        let entries = entries.unwrap();
        assert_eq!(conn.unread, 0);
        assert_eq!(
            conn.last_reply_len(),
            reply.len(),
            "the whole reply, not the last read"
        );
        let [ReplyEntry::Present(entry)] = &entries[..] else {
            panic!("{entries:?}")
        };
        assert_eq!(entry.id, crate::EntryId::new(1, 1));
        assert_eq!(&entry.fields[0].1[..], b"hello");
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
        expect_request(&mut server, &redis::cmd("PING")).await;
    }

    #[tokio::test]
    async fn server_errors_pipelines_and_a_closed_socket() {
        let (mut conn, mut server) = pipe();
        server
            .write_all(b"-NOGROUP no such group\r\n+OK\r\n:3\r\n")
            .await
            .unwrap();
        let err = redis::cmd("XREADGROUP")
            .query_async::<Value>(&mut conn)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("NOGROUP"));
        let mut pipeline = redis::pipe();
        pipeline.cmd("SET").arg("a").arg(1).cmd("INCR").arg("b");
        let values = conn.req_packed_commands(&pipeline, 0, 2).await.unwrap();
        assert_eq!(values, [Value::Okay, Value::Int(3)]);
        drop(server);
        let err = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .unwrap_err();
        assert!(err.is_connection_dropped(), "{err}");
    }

    #[tokio::test]
    async fn an_abandoned_request_puts_the_connection_out_of_step() {
        let (mut conn, _server) = pipe();
        let ping = redis::cmd("PING");
        {
            // No reply comes: the request is dropped while waiting for it.
            let mut waiting = Box::pin(ping.query_async::<String>(&mut conn));
            assert!(futures::poll!(waiting.as_mut()).is_pending());
        }
        let err = ping.query_async::<String>(&mut conn).await.unwrap_err();
        assert!(err.is_connection_dropped(), "{err}");
    }

    #[tokio::test]
    async fn a_refused_auth_is_an_authentication_failure_and_old_servers_get_the_password_alone() {
        let (mut conn, mut server) = pipe();
        server
            .write_all(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
            .await
            .unwrap();
        let err = conn.authenticate(Some("app"), "pw").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AuthenticationFailed, "{err}");
        expect_request(&mut server, redis::cmd("AUTH").arg("app").arg("pw")).await;

        // Redis 5: no user names; asked again with the password alone.
        server
            .write_all(b"-ERR wrong number of arguments for 'auth' command\r\n+OK\r\n")
            .await
            .unwrap();
        conn.authenticate(Some("app"), "pw").await.unwrap();
        expect_request(&mut server, redis::cmd("AUTH").arg("app").arg("pw")).await;
        expect_request(&mut server, redis::cmd("AUTH").arg("pw")).await;
    }

    #[tokio::test]
    async fn the_longest_response_timeout_does_not_overflow() {
        let (mut conn, mut server) = pipe();
        conn.set_response_timeout(Duration::MAX);
        server.write_all(b"+PONG\r\n").await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
    }

    #[tokio::test]
    async fn a_missing_reply_times_out() {
        let (mut conn, _server) = pipe();
        conn.response_timeout = Duration::from_millis(30);
        let err = redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
    }
}
