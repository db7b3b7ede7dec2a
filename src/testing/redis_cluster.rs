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
    /// The nodes' TLS ports, in the order of `nodes` (empty for a plain cluster).
    tls_ports: Vec<u16>,
    /// The CA file clients of a TLS cluster trust (for the harness's own `redis-cli`).
    tls_ca: Option<std::path::PathBuf>,
}

/// The files of a TLS cluster ([`RedisCluster::start_tls`]), all PEM.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// The CA that signed `certificate`, trusted by the nodes and their clients.
    pub ca: std::path::PathBuf,
    /// Every node's certificate, for 127.0.0.1, usable for server and client authentication
    /// (the nodes connect to each other with it).
    pub certificate: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
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
        Self::start_with_tls(None)
    }

    /// Starts a cluster whose nodes talk TLS to clients, to each other (`tls-cluster yes`)
    /// and to their replicas (`tls-replication yes`), with the certificates of `tls`;
    /// clients are not asked for certificates. Each node keeps a plain port on loopback for
    /// the harness ([`RedisServer::port`]); clients use [`tls_url`](Self::tls_url).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_tls(tls: &ClusterTls) -> Self {
        Self::start_with_tls(Some(tls))
    }

    fn start_with_tls(tls: Option<&ClusterTls>) -> Self {
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            match Self::try_start(tls) {
                Ok(cluster) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("no Redis Cluster after {ATTEMPTS} attempts; last error:\n{last_error}");
    }

    fn try_start(tls: Option<&ClusterTls>) -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(6);
        // With TLS the bus listens beside the TLS port, which the nodes announce; the plain
        // port (a free port of its own) stays for the harness.
        let bus_ports = free_port_pairs(6);
        let (plain_ports, tls_ports) = match tls {
            Some(_) => ((0..6).map(|_| super::free_port()).collect(), bus_ports),
            None => (bus_ports, Vec::new()),
        };
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        for (i, port) in plain_ports.iter().enumerate() {
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(tls) = tls {
                args.extend([
                    "--tls-port".to_owned(),
                    tls_ports[i].to_string(),
                    "--tls-cluster".to_owned(),
                    "yes".to_owned(),
                    "--tls-replication".to_owned(),
                    "yes".to_owned(),
                    "--tls-cert-file".to_owned(),
                    path(&tls.certificate),
                    "--tls-key-file".to_owned(),
                    path(&tls.key),
                    "--tls-ca-cert-file".to_owned(),
                    path(&tls.ca),
                    "--tls-auth-clients".to_owned(),
                    "no".to_owned(),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match RedisServer::start_on(*port, &args) {
                Ok(node) => nodes.push(node),
                Err(e) => return Err(e),
            }
        }
        let mut create = Vec::new();
        if let Some(tls) = tls {
            create.extend(["--tls".to_owned(), "--cacert".to_owned(), path(&tls.ca)]);
        }
        create.extend(["--cluster".to_owned(), "create".to_owned()]);
        match tls {
            Some(_) => create.extend(tls_ports.iter().map(|p| format!("127.0.0.1:{p}"))),
            None => create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port()))),
        }
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let created = redis_cli(&create)?;
        if !created.contains("[OK] All 16384 slots covered") {
            return Err(format!("redis-cli --cluster create:\n{created}"));
        }
        let cluster = RedisCluster {
            nodes,
            tls_ports,
            tls_ca: tls.map(|t| t.ca.clone()),
        };
        cluster.wait_formed()?;
        Ok(cluster)
    }

    /// Every node agrees that the cluster is whole, and knows every replica's master.
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
            }) && self.masters().len() == 3
                && self.nodes.iter().all(|n| {
                    // Replicas show as masters for a moment after `--cluster create`.
                    node_cli(n.port(), &["CLUSTER", "NODES"])
                        .map(|t| {
                            t.lines()
                                .filter_map(NodeLine::parse)
                                .filter(|l| l.master_id.is_some())
                                .count()
                                == 3
                        })
                        .unwrap_or(false)
                });
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

    /// The URL of a cluster started with [`start_tls`](Self::start_tls):
    /// `rediss-cluster://127.0.0.1:<tls port>?node=...` (empty for a plain cluster).
    pub fn tls_url(&self) -> String {
        let Some((first, rest)) = self.tls_ports.split_first() else {
            return String::new();
        };
        let rest: Vec<String> = rest.iter().map(|p| format!("node=127.0.0.1:{p}")).collect();
        format!("rediss-cluster://127.0.0.1:{first}?{}", rest.join("&"))
    }

    /// Runs `redis-cli -c` (following redirects) against the first node that answers and
    /// returns what it printed, for example `cluster.cli(&["SET", "k", "v"])`.
    ///
    /// # Panics
    ///
    /// When `redis-cli` cannot run, or fails on every node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut last = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            // On a TLS cluster, redirects name TLS ports.
            let mut all = match &self.tls_ca {
                Some(ca) => vec![
                    "--tls".to_owned(),
                    "--cacert".to_owned(),
                    ca.to_string_lossy().into_owned(),
                    "-p".to_owned(),
                    self.tls_ports[i].to_string(),
                ],
                None => vec!["-p".to_owned(), node.port().to_string()],
            };
            all.push("-c".to_owned());
            all.extend(args.iter().map(|a| a.to_string()));
            match redis_cli(&all) {
                Ok(out) if !out.starts_with("Could not connect") => return out,
                Ok(out) => last = out,
                Err(e) => last = e,
            }
        }
        panic!("redis-cli {args:?} failed on every node: {last}")
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let reply = self.cli(&["CLUSTER", "KEYSLOT", key]);
        reply
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT answered {reply:?}"))
    }

    /// The master that serves `key`'s slot now, as the cluster's nodes see it.
    pub fn master_of(&self, key: &str) -> Option<&RedisServer> {
        let slot = self.slot_of(key);
        let owner = self
            .node_table()
            .into_iter()
            .find(|n| n.is_master() && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))?;
        self.node_announced_at(owner.port)
    }

    /// The node that announces `port` to the cluster (its TLS port on a TLS cluster).
    fn node_announced_at(&self, port: u16) -> Option<&RedisServer> {
        match self.tls_ports.iter().position(|p| *p == port) {
            Some(i) => self.nodes.get(i),
            None => self.nodes.iter().find(|n| n.port() == port),
        }
    }

    /// The port the node on (plain) `port` announces to the cluster.
    fn announced_port(&self, port: u16) -> u16 {
        match self.nodes.iter().position(|n| n.port() == port) {
            Some(i) if !self.tls_ports.is_empty() => self.tls_ports[i],
            _ => port,
        }
    }

    /// The replicas of the master on `port`, as the cluster's nodes see them.
    pub fn replicas_of(&self, port: u16) -> Vec<&RedisServer> {
        let table = self.node_table();
        let announced = self.announced_port(port);
        let Some(master) = table.iter().find(|n| n.port == announced) else {
            return Vec::new();
        };
        table
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .filter_map(|n| self.node_announced_at(n.port))
            .collect()
    }

    /// The node on `port`, to kill, freeze or restart it.
    ///
    /// # Panics
    ///
    /// When no node has that port.
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Waits until every node that answers reports `cluster_state:ok`, `within` at most.
    ///
    /// # Panics
    ///
    /// When the cluster is not healthy in time.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let infos: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| node_cli(n.port(), &["CLUSTER", "INFO"]).ok())
                .filter(|info| info.contains("cluster_state"))
                .collect();
            if !infos.is_empty()
                && infos
                    .iter()
                    .all(|i| i.lines().any(|l| l.trim() == "cluster_state:ok"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not healthy after {within:?}:\n{}",
                infos.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves `slot`, with its keys, to the master on port `to`, the way `redis-cli --cluster
    /// reshard` does: `CLUSTER SETSLOT .. IMPORTING/MIGRATING`, `MIGRATE` of the slot's keys
    /// (a stream moves whole, its consumer groups and pending entries with it), then `CLUSTER
    /// SETSLOT .. NODE` on every master.
    ///
    /// # Panics
    ///
    /// When a step fails, or on a TLS cluster.
    pub fn migrate_slot(&self, slot: u16, to: u16) {
        assert!(
            self.tls_ports.is_empty(),
            "migrate_slot moves keys on plain clusters only"
        );
        let table = self.node_table();
        let source = table
            .iter()
            .find(|n| n.is_master() && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .expect("the slot has a master");
        let target = table.iter().find(|n| n.port == to).expect("the target is a node");
        assert_ne!(source.port, to, "slot {slot} is on port {to} already");
        let slot_text = slot.to_string();
        let on = |port: u16, args: &[&str]| {
            let out = node_cli(port, args).unwrap_or_else(|e| panic!("{e}"));
            assert!(!out.starts_with("ERR"), "redis-cli -p {port} {args:?}: {out}");
            out
        };
        on(to, &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source.id]);
        on(
            source.port,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target.id],
        );
        loop {
            let keys = on(source.port, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"]);
            let keys: Vec<&str> = keys.lines().map(str::trim).filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            on(source.port, &args);
        }
        for node in table.iter().filter(|n| n.is_master()) {
            on(node.port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target.id]);
        }
    }

    /// What the first node that answers `CLUSTER NODES` knows of every node.
    fn node_table(&self) -> Vec<NodeLine> {
        for node in &self.nodes {
            if let Ok(text) = node_cli(node.port(), &["CLUSTER", "NODES"])
                && text.contains("myself")
            {
                return text.lines().filter_map(NodeLine::parse).collect();
            }
        }
        Vec::new()
    }
}

/// One line of `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master id or -> ... <slots>`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: String,
    master_id: Option<String>,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, addr, flags, master, _, _, _, _, slots @ ..] = fields.as_slice() else {
            return None;
        };
        let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
        let slots = slots
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        Some(NodeLine {
            id: (*id).to_owned(),
            port,
            flags: (*flags).to_owned(),
            master_id: (*master != "-").then(|| (*master).to_owned()),
            slots,
        })
    }

    fn is_master(&self) -> bool {
        self.flags.split(',').any(|f| f == "master") && !self.flags.contains("fail")
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
