//! A private `nats-server` with JetStream for one test: [`NatsServer`].
//!
//! Plain std processes, like [`RedisServer`](super::RedisServer), so it needs neither the
//! `nats` feature nor an async runtime.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a server may take to say it is ready.
const STARTUP: Duration = Duration::from_secs(10);

/// How many free ports [`NatsServer::start_with`] tries.
const ATTEMPTS: usize = 5;

/// The standard NATS port (a machine's own server): never used by the harness.
const STANDARD_PORT: u16 = 4222;

/// Arguments the harness sets itself and relies on.
const RESERVED_ARGS: &[&str] = &[
    "-p",
    "--port",
    "-a",
    "--addr",
    "--net",
    "-sd",
    "--store_dir",
    "-l",
    "--log",
    "-js",
    "--jetstream",
];

/// A running `nats-server -js` owned by one test: the harness of this crate's NATS tests, for
/// third-party backends and users' own tests too.
///
/// It listens on a free loopback port (never the standard 4222, so a machine's own server is
/// never touched), keeps its JetStream store and log in a fresh directory under the system's
/// temp dir, and is killed (by its pid) and its directory removed when the handle drops.
/// Starting one takes some tens of milliseconds.
///
/// The harness panics, with a message that says why, when `nats-server` is not installed or
/// does not start: it is meant for tests.
///
/// ```no_run
/// use streamwise::testing::NatsServer;
///
/// let server = NatsServer::start();
/// // Point a client at it, e.g. streamwise::nats::NatsBackend::connect(&server.url()).
/// let url = server.url();
/// # let _ = url;
/// // Extra nats-server arguments: a user and password, say.
/// let guarded = NatsServer::start_with(&["--user", "alice", "--pass", "s3cret"]);
/// # let _ = guarded;
/// ```
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server with JetStream.
    ///
    /// # Panics
    ///
    /// When `nats-server` is not installed, or does not get ready within 10 s on any of a
    /// few free ports.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `nats-server` arguments (after the harness's own).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start); and when `extra` holds `-p`, `-a`, `-sd`, `-l` or `-js`
    /// (or their long forms), which the harness sets itself.
    pub fn start_with(extra: &[&str]) -> Self {
        if let Some(reserved) = extra.iter().find(|arg| RESERVED_ARGS.contains(arg)) {
            panic!("NatsServer sets {reserved} itself (free loopback port, scratch directory, JetStream)");
        }
        let dir = scratch_dir();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut last_log = String::new();
        for _ in 0..ATTEMPTS {
            let port = loop {
                let port = free_port();
                if port != STANDARD_PORT {
                    break port;
                }
            };
            let mut child = spawn(port, &dir, &extra);
            match wait_ready(&mut child, port, &dir) {
                Ok(()) => {
                    return NatsServer {
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
        panic!("nats-server did not start after {ATTEMPTS} attempts; last output:\n{last_log}");
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's directory (its JetStream store is `store/` in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server at once (SIGKILL), as a crash would. Its store stays, for
    /// [`restart`](Self::restart).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, store and arguments (killing it first if
    /// it still runs): clients reconnect to the same address, and JetStream recovers its
    /// streams from the store.
    ///
    /// # Panics
    ///
    /// When it does not get ready within 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let mut child = spawn(self.port, &self.dir, &self.extra);
        if let Err(log) = wait_ready(&mut child, self.port, &self.dir) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not restart on port {}:\n{log}", self.port);
        }
        self.child = child;
    }
}

impl NatsServer {
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
}

/// Sends a signal by name with `kill(1)` (this crate forbids unsafe code, so no libc).
fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed");
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // A frozen server dies of SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory of this process under the system's temp dir.
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "streamwise-nats-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory for nats-server");
    dir
}

fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    // The log is written afresh for each start, so that readiness is read from this one.
    let _ = std::fs::remove_file(dir.join("nats.log"));
    let mut command = Command::new("nats-server");
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.join("store"))
        .arg("-l")
        .arg(dir.join("nats.log"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "nats-server must be installed: these tests start their own. \
             Install it with `apt-get install nats-server` (this repository's `scripts/test` does)."
        ),
        Err(e) => panic!("cannot start nats-server: {e}"),
    }
}

/// Waits until the server logs that it is ready and accepts a connection; on failure
/// returns its log.
fn wait_ready(child: &mut Child, port: u16, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP;
    let log = dir.join("nats.log");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        let ready = std::fs::File::open(&log)
            .map(|f| {
                BufReader::new(f)
                    .lines()
                    .any(|l| l.is_ok_and(|l| l.contains("Server is ready")))
            })
            .unwrap_or(false);
        if ready && TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "not ready within {STARTUP:?}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    ))
}
