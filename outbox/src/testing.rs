//! [`PostgresServer`]: a private PostgreSQL server for tests (feature `testing`), in the manner
//! of `streamwise::testing::RedisServer`: a fresh cluster made with `initdb` in a temporary
//! directory, started with `pg_ctl` on a free loopback port, stopped and deleted when the
//! handle drops. It never touches a server of the machine's (5432 or any other).
//!
//! The binaries are found in `$PG_BIN`, else in the newest `/usr/lib/postgresql/<version>/bin`
//! (Debian's `postgresql` package), else on `PATH`. `initdb` refuses to run as root: as root,
//! the server's files belong to the `postgres` user, and the commands run as that user
//! through `runuser`.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{Client, NoTls};

/// A PostgreSQL server of the test's own. Stopped (`SIGQUIT` to its postmaster, by pid, then
/// waited for) and its files deleted on drop.
#[derive(Debug)]
pub struct PostgresServer {
    dir: tempfile::TempDir,
    port: u16,
    pid: Option<u32>,
}

/// How to run the server's commands: directly, or as `postgres` when we are root.
#[derive(Debug, Clone)]
struct Runner {
    bin: PathBuf,
    as_postgres: bool,
}

impl Runner {
    fn find() -> io::Result<Self> {
        let bin = match std::env::var_os("PG_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => newest_debian_bin().unwrap_or_default(),
        };
        if !bin.as_os_str().is_empty() && !bin.join("initdb").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no initdb in {}", bin.display()),
            ));
        }
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        Ok(Runner { bin, as_postgres })
    }

    fn command(&self, program: &str) -> Command {
        let path = if self.bin.as_os_str().is_empty() {
            PathBuf::from(program)
        } else {
            self.bin.join(program)
        };
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn newest_debian_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn check(what: &str, output: io::Result<Output>) -> io::Result<Output> {
    let output = output.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PostgresServer {
    /// Makes a cluster and starts it (about a second or two). Blocking: call it before the
    /// runtime, or accept that it holds up the test's thread meanwhile.
    ///
    /// Tuned for tests, not for keeping data: `fsync`, `synchronous_commit` and
    /// `full_page_writes` are off (a crash of the machine may lose data; a crash of a client
    /// process loses nothing).
    pub fn start() -> io::Result<Self> {
        let runner = Runner::find()?;
        let dir = tempfile::Builder::new().prefix("streamwise-pg-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        if runner.as_postgres {
            check(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path())
                    .output(),
            )?;
        }
        check(
            "initdb",
            runner
                .command("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .output(),
        )?;
        // A port found free may be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                data.display()
            );
            let started = runner
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"])
                .output();
            match check("pg_ctl start", started) {
                Ok(_) => {
                    let pid = read_pid(&data);
                    return Ok(PostgresServer { dir, port, pid });
                }
                Err(e) => last = Some(e),
            }
        }
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        Err(io::Error::other(format!(
            "{}; server log:\n{log}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its files (`data/`, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `tokio_postgres::Config` for the database `postgres` as user `postgres` (no password:
    /// the server trusts loopback connections).
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        config
    }

    /// The server's URL, `postgresql://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A connection, its connection task spawned on the current runtime.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config().connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "test connection ended");
            }
        });
        Ok(client)
    }

    /// A pool of at most `size` connections (checked with a query when handed out again).
    pub fn pool(&self, size: usize) -> Pool {
        let manager = Manager::from_config(
            self.config(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        match Pool::builder(manager).max_size(size).build() {
            Ok(pool) => pool,
            // Building fails only without a runtime or with timeouts and no runtime, neither
            // of which is set here.
            Err(e) => unreachable!("a pool without timeouts builds: {e}"),
        }
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

/// The postmaster's pid: the first line of `postmaster.pid`.
fn read_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        // SIGQUIT: the postmaster's immediate shutdown, which ends its backends too.
        let _ = Command::new("kill").args(["-QUIT", &pid.to_string()]).output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).output();
        }
    }
}
