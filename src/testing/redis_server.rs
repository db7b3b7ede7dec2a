//! A private `redis-server` for one test: [`RedisServer`] and [`free_port`].
//!
//! Plain std processes and sockets, so it needs neither the `redis` feature nor an async
//! runtime, and any client (this crate's backend, a third-party one, `redis-cli`) can talk to
//! it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it was started, and the most a
/// [`RedisServer::command`] waits for its reply.
const STARTUP: Duration = Duration::from_secs(10);

/// How many free ports [`RedisServer::start_with`] tries: one can be taken by someone else
/// between the probe and the server's bind.
const ATTEMPTS: usize = 5;

/// The standard Redis port, the machine's own server: never used by the harness.
const STANDARD_PORT: u16 = 6379;

/// Arguments the harness sets itself and relies on (the server must stay on loopback, on the
/// port it picked, in its scratch directory, in the foreground so that drop can stop it).
const RESERVED_ARGS: &[&str] = &["--port", "--bind", "--dir", "--logfile", "--daemonize"];

/// A running `redis-server` owned by one test: the harness this crate's tests use, for
/// third-party backends and users' own tests too.
///
/// Each server listens on a free loopback port (never the standard 6379, so a machine's own
/// server is never touched), keeps its files in a fresh directory under the system's temp
/// dir, has persistence off unless asked for, and is killed (by its pid) and its directory
/// removed when the handle drops, so a test stops its server even when it fails. One server
/// per test rather than one per test binary: a shared static is never dropped, so its server
/// would outlive `cargo test`; and tests do not see each other's keys. Starting one takes a
/// few milliseconds.
///
/// The harness panics, with a message that says why, when `redis-server` is not installed or
/// does not start: it is meant for tests.
///
/// ```no_run
/// use streamwise::testing::RedisServer;
///
/// let server = RedisServer::start();
/// assert_eq!(server.command("PING"), "+PONG");
/// // Point any client at it, e.g. streamwise::redis::RedisBackend::new(&server.url()).
/// let url = server.url();
/// # let _ = url;
///
/// // Extra redis-server arguments: persistence, a password, ACL users, a TLS port ...
/// let durable = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
/// assert_eq!(durable.config("appendonly"), "yes");
/// ```
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server with persistence off.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed, or does not answer PING within 10 s on any of
    /// a few free ports.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, which come after (and so
    /// override) the harness's own: for example `["--appendonly", "yes"]`,
    /// `["--requirepass", "secret"]`, `["--user", "alice", "on", ">pw", "~*", "+@all"]`, or
    /// `["--tls-port", &free_port().to_string(), ...]`. A server that requires a password
    /// counts as started when it answers PING with `-NOAUTH`.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start); and when `extra` holds `--port`, `--bind`, `--dir`,
    /// `--logfile` or `--daemonize`, which the harness sets itself.
    pub fn start_with(extra: &[&str]) -> Self {
        if let Some(reserved) = extra.iter().find(|arg| RESERVED_ARGS.contains(arg)) {
            panic!("RedisServer sets {reserved} itself (free loopback port, scratch directory, foreground)");
        }
        let dir = scratch_dir();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut last_log = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut child = spawn(port, &dir, &extra);
            match wait_ready(&mut child, port, &dir) {
                Ok(()) => {
                    return RedisServer {
                        child,
                        port,
                        dir,
                        extra,
                    };
                }
                Err(log) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = log;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-server did not start after {ATTEMPTS} attempts; last output:\n{last_log}");
    }

    /// One attempt on `port` (for [`RedisCluster`](super::RedisCluster), whose nodes need a
    /// free bus port beside their own): the server, or its output when it did not start.
    pub(super) fn start_on(port: u16, extra: &[&str]) -> Result<Self, String> {
        let dir = scratch_dir();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut child = spawn(port, &dir, &extra);
        match wait_ready(&mut child, port, &dir) {
            Ok(()) => Ok(RedisServer {
                child,
                port,
                dir,
                extra,
            }),
            Err(log) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                Err(log)
            }
        }
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's data directory (where the AOF and RDB files of persistence tests go).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server at once (SIGKILL), as a crash would. Its directory stays, for
    /// [`restart`](Self::restart).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, directory and arguments (killing it first
    /// if it still runs), so that clients reconnect to the same address and persistence
    /// tests find their files.
    ///
    /// # Panics
    ///
    /// When it does not answer PING within 10 s (for example because someone else took the
    /// port meanwhile).
    pub fn restart(&mut self) {
        self.kill();
        let mut child = spawn(self.port, &self.dir, &self.extra);
        if let Err(log) = wait_ready(&mut child, self.port, &self.dir) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server did not restart on port {}:\n{log}", self.port);
        }
        self.child = child;
    }

    /// Stops the server process (SIGSTOP): connections stay open, nothing is answered, as
    /// with a server that hangs or a network that drops everything.
    ///
    /// # Panics
    ///
    /// When the signal cannot be sent (the server was killed).
    pub fn freeze(&self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Lets a [frozen](Self::freeze) server go on (SIGCONT).
    ///
    /// # Panics
    ///
    /// When the signal cannot be sent (the server was killed).
    pub fn thaw(&self) {
        send_signal(self.child.id(), "CONT");
    }

    /// Sends one inline command (words separated by spaces, no quoting) on a new connection
    /// and returns the first `lines` lines of the reply in RESP, for example `["+PONG"]`,
    /// or `["$1", "1"]` for a bulk string. Enough for checks without a client library; the
    /// connection is not authenticated.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or sends fewer lines within 10 s.
    pub fn command_lines(&self, line: &str, lines: usize) -> Vec<String> {
        let mut stream =
            TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).expect("connect to the test redis-server");
        stream
            .set_read_timeout(Some(STARTUP))
            .expect("set a read timeout");
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("send a command");
        let mut reader = BufReader::new(stream);
        (0..lines)
            .map(|_| {
                let mut reply = String::new();
                reader.read_line(&mut reply).expect("read a reply line");
                reply.trim_end().to_owned()
            })
            .collect()
    }

    /// The first line of the reply to one inline command (see
    /// [`command_lines`](Self::command_lines)): `"+OK"`, `":1"`, `"-ERR ..."`.
    ///
    /// # Panics
    ///
    /// As [`command_lines`](Self::command_lines).
    pub fn command(&self, line: &str) -> String {
        self.command_lines(line, 1).remove(0)
    }

    /// The value of a server setting (`CONFIG GET name`), for example `"no"` for
    /// `appendonly`.
    ///
    /// # Panics
    ///
    /// As [`command_lines`](Self::command_lines).
    pub fn config(&self, name: &str) -> String {
        // *2, $len, name, $len, value
        self.command_lines(&format!("CONFIG GET {name}"), 5).remove(4)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that was free a moment ago, never 6379: for a second listener of a
/// [`RedisServer`], such as a TLS port. Someone else may take it before it is bound.
///
/// # Panics
///
/// When no loopback port can be bound.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port");
        let port = listener.local_addr().expect("the bound address").port();
        if port != STANDARD_PORT {
            return port;
        }
    }
}

/// A fresh directory of this process under the system's temp dir (emptied first, in case a
/// process of the same pid left one behind).
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamwise-redis-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory for redis-server");
    dir
}

fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server must be installed: these tests start their own. \
             Install it with `apt-get install redis-server` (this repository's `scripts/test` does)."
        ),
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

/// Waits until the server answers PING; on failure returns what it printed.
fn wait_ready(child: &mut Child, port: u16, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}:\n{}", output(child, dir)));
        }
        if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            // A server that requires a password answers -NOAUTH: it is up all the same.
            let mut reply = [0u8; 7];
            if stream.write_all(b"PING\r\n").is_ok()
                && stream.read_exact(&mut reply).is_ok()
                && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("no answer to PING within {STARTUP:?}"))
}

/// What an exited server printed: its log file and standard error (only read once the
/// process is gone, so nothing blocks on a full pipe while it runs).
fn output(child: &mut Child, dir: &Path) -> String {
    let mut text = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    if let Some(err) = child.stderr.as_mut() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// Sends a signal by name with `kill(1)` (this crate forbids unsafe code, so no libc).
fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed");
}
