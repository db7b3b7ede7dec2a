//! A private Redis Cluster for tests: [`RedisCluster`], three masters and three replicas of
//! [`RedisServer`]s on free loopback ports, joined with `redis-cli --cluster create`.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use super::RedisServer;

/// How long the cluster may take to agree on its slots once created.
const FORMING: Duration = Duration::from_secs(30);

/// How many times a cluster is started afresh when a port was taken meanwhile.
const ATTEMPTS: usize = 5;

/// A cluster node's bus port is its port plus this (Redis' fixed offset).
const BUS_OFFSET: u16 = 10_000;

/// A Redis Cluster of three masters and three replicas owned by one test (or one test
/// binary): every node a [`RedisServer`] on a free loopback port whose bus port (the port plus
/// 10000) was free too, with persistence off, and a short `cluster-node-timeout` (2 s) so
/// that failovers in tests are quick. Every node is killed by its pid when the cluster drops.
///
/// It starts in about two seconds. It needs `redis-server` and `redis-cli` (Debian's
/// `redis-server` package brings both).
///
/// ```no_run
/// use streamwise::testing::RedisCluster;
///
/// let cluster = RedisCluster::start();
/// assert_eq!(cluster.masters().len(), 3);
/// assert!(cluster.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
/// println!("{}", cluster.url()); // redis-cluster://127.0.0.1:<port>?node=127.0.0.1:<port>&...
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters with a replica each, and waits until every node sees all 16384
    /// slots served (`cluster_state:ok`).
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing, or the cluster does not form (the nodes'
    /// logs are in the message).
    pub fn start() -> Self {
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("no Redis Cluster after {ATTEMPTS} attempts; last error:\n{last_error}");
    }

    fn try_start() -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(6);
        for port in free_port_pairs(6) {
            let node = RedisServer::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )?;
            nodes.push(node);
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let created = redis_cli(&create)?;
        if !created.contains("[OK] All 16384 slots covered") {
            return Err(format!("redis-cli --cluster create:\n{created}"));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_formed()?;
        Ok(cluster)
    }

    /// Every node agrees that the cluster is whole, and every replica knows its master.
    fn wait_formed(&self) -> Result<(), String> {
        let deadline = Instant::now() + FORMING;
        loop {
            let states: Vec<String> = self
                .nodes
                .iter()
                .map(|n| node_cli(n.port(), &["CLUSTER", "INFO"]).unwrap_or_default())
                .collect();
            let formed = states.iter().all(|info| {
                info.lines().any(|l| l.trim() == "cluster_state:ok")
                    && info.lines().any(|l| l.trim() == "cluster_known_nodes:6")
            }) && self.masters().len() == 3;
            if formed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the cluster did not form within {FORMING:?}:\n{}",
                    states.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The nodes, in the order they were created (the first three started as masters).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes that are masters now (a failover changes which).
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| {
                node_cli(n.port(), &["ROLE"])
                    .map(|role| role.lines().next().map(str::trim) == Some("master"))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// The cluster's URL, the seed-list form: `redis-cluster://127.0.0.1:<first>?node=...` with
    /// every other node.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port()));
        let first = nodes.next().unwrap_or_default();
        let rest: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
        format!("redis-cluster://{first}?{}", rest.join("&"))
    }

    /// Runs `redis-cli -c` (following redirects) against the first node and returns what it
    /// printed, for example `cluster.cli(&["SET", "k", "v"])`.
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run or fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let port = self.nodes[0].port().to_string();
        let mut all = vec!["-c".to_owned(), "-p".to_owned(), port];
        all.extend(args.iter().map(|a| a.to_string()));
        redis_cli(&all).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `redis-cli -p <port> <args>` on one node, without following redirects.
fn node_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-p".to_owned(), port.to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    redis_cli(&all)
}

fn redis_cli(args: &[String]) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1"])
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "redis-cli must be installed (it comes with Debian's redis-server package)".to_owned()
            }
            _ => format!("cannot run redis-cli: {e}"),
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "redis-cli {} failed: {text}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `count` distinct loopback ports that were free a moment ago, each with its bus port (the
/// port plus 10000) free too; never 6379 or its bus port.
fn free_port_pairs(count: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    let mut held = Vec::new();
    while ports.len() < count {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port");
        let port = listener.local_addr().expect("the bound address").port();
        let Some(bus) = port.checked_add(BUS_OFFSET) else {
            continue;
        };
        if port == 6379 || bus == 6379 + BUS_OFFSET || ports.contains(&port) {
            continue;
        }
        if let Ok(bus_listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, bus)) {
            ports.push(port);
            // Held until all are picked, so the same pair is not chosen twice.
            held.push((listener, bus_listener));
        }
    }
    ports
}
