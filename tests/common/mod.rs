//! Test harness: a private `redis-server` per test, on a free loopback port, with persistence
//! off. It is killed when the handle drops, so each test stops its own server even when it
//! fails. The machine's own server on 6379 is never used.
//!
//! One server per test (rather than per test binary) because a static shared server is never
//! dropped, so it would outlive `cargo test`; per-test servers also keep tests from seeing each
//! other's keys. Starting one takes a few milliseconds.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it was started.
const STARTUP: Duration = Duration::from_secs(10);

/// A running `redis-server` owned by one test.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server with persistence off.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (for example
    /// `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = scratch_dir();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut last_log = String::new();
        // A free port can be taken by someone else between our probe and the server's bind;
        // try a few ports before giving up.
        for _ in 0..5 {
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
        panic!("redis-server did not start after 5 attempts; last output:\n{last_log}");
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's data directory (for AOF/RDB files of persistence tests).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and directory, after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        let mut child = spawn(self.port, &self.dir, &self.extra);
        if let Err(log) = wait_ready(&mut child, self.port, &self.dir) {
            let _ = child.kill();
            panic!("redis-server did not restart on port {}:\n{log}", self.port);
        }
        self.child = child;
    }

    /// Stops the server process (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        send_signal(self.child.id(), "CONT");
    }

    /// Sends one inline command and returns the first `lines` lines of the reply (for example
    /// `["+PONG"]`). Enough for harness checks without a client library.
    pub fn command_lines(&self, line: &str, lines: usize) -> Vec<String> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).expect("connect to test redis");
        stream.set_read_timeout(Some(STARTUP)).expect("timeout");
        stream.write_all(format!("{line}\r\n").as_bytes()).expect("send");
        let mut reader = BufReader::new(stream);
        (0..lines)
            .map(|_| {
                let mut reply = String::new();
                reader.read_line(&mut reply).expect("reply");
                reply.trim_end().to_owned()
            })
            .collect()
    }

    /// The first line of the reply to one inline command.
    pub fn command(&self, line: &str) -> String {
        self.command_lines(line, 1).remove(0)
    }

    /// The value of a server setting (`CONFIG GET name`).
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

fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamwise-redis-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create a scratch directory for redis-server");
    dir
}

/// A free loopback port other than 6379 (for a second listener, such as a TLS port).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        let port = listener.local_addr().expect("local addr").port();
        if port != 6379 {
            return port;
        }
    }
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
            "redis-server is not installed, and the Redis tests need it. \
             Install it with `apt-get install redis-server`, or run `scripts/test`, which does."
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

/// Publishes one message on `stream`, receives it as consumer `c` of group `g` (created at the
/// beginning of the stream), acks it and checks that nothing stays pending: the smallest proof
/// that a connection works end to end.
pub async fn round_trip(redis: &streamwise::redis::RedisBackend, stream: &str) -> streamwise::Result<()> {
    use futures::StreamExt;
    use streamwise::{Message, Publisher, StartFrom, SubscribeOptions, Subscriber};
    let id = redis.publisher().publish(stream, Message::new("t", &1)?).await?;
    let subscriber = redis.subscriber()?;
    let options = SubscribeOptions::new("g", "c")
        .start_from(StartFrom::Beginning)
        .block(Duration::from_millis(200));
    let mut deliveries = subscriber.subscribe(stream, options).await?;
    let delivery = tokio::time::timeout(Duration::from_secs(20), deliveries.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")?;
    assert_eq!(delivery.id(), id);
    assert_eq!(delivery.message().decode::<i32>()?, 1);
    delivery.ack().await?;
    subscriber.close().await?;
    assert_eq!(redis.pending_count(stream, "g").await?, 0);
    Ok(())
}

fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed");
}
