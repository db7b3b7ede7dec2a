//! The exported test harness, `streamwise::testing::RedisServer`: servers start on free
//! ports, answer, restart, freeze, and die on drop, their files kept out of the repository.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use streamwise::testing::{RedisServer, free_port};

#[test]
fn servers_start_on_distinct_free_ports_and_answer() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.port(), 6379, "the machine's own server must not be used");
    assert_eq!(a.command("PING"), "+PONG");
    assert_eq!(b.command("PING"), "+PONG");
    // Persistence is off.
    assert_eq!(a.config("appendonly"), "no");
    assert_eq!(a.config("save"), "");
    assert!(a.url().starts_with("redis://127.0.0.1:"));
}

#[test]
fn data_is_private_to_each_server() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_eq!(a.command("SET k 1"), "+OK");
    assert_eq!(b.command("EXISTS k"), ":0");
    assert_eq!(a.command("EXISTS k"), ":1");
}

#[test]
fn a_dropped_server_is_gone() {
    let server = RedisServer::start();
    let port = server.port();
    drop(server);
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
        "the server still accepts connections after drop"
    );
}

#[test]
fn a_killed_server_restarts_on_the_same_port() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    assert_eq!(server.config("appendonly"), "yes");
    assert_eq!(server.command("SET survivor 1"), "+OK");
    let port = server.port();
    server.kill();
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(
        server.command("EXISTS survivor"),
        ":1",
        "AOF with fsync always keeps the key"
    );
}

#[test]
fn the_scratch_directory_is_a_fresh_temp_dir_removed_on_drop() {
    let server = RedisServer::start();
    let dir = server.dir().to_path_buf();
    assert!(
        dir.starts_with(std::env::temp_dir()),
        "{dir:?} is not under the temp dir"
    );
    assert_eq!(
        server.config("dir"),
        dir.canonicalize().unwrap().to_string_lossy()
    );
    assert!(
        dir.join("redis.log").exists(),
        "the server logs into its directory"
    );
    drop(server);
    assert!(!dir.exists(), "{dir:?} is left behind");
}

#[test]
fn a_frozen_server_answers_nothing_until_thawed() {
    let server = RedisServer::start();
    server.freeze();
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = [0u8; 7];
    assert!(stream.read_exact(&mut reply).is_err(), "a frozen server answered");
    server.thaw();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply, b"+PONG\r\n",
        "the PING sent while frozen is answered after the thaw"
    );
}

#[test]
fn a_server_with_a_password_counts_as_started() {
    let server = RedisServer::start_with(&["--requirepass", "secret"]);
    assert!(server.command("PING").starts_with("-NOAUTH"));
    assert_eq!(server.command_lines("AUTH secret", 1), ["+OK"]);
}

#[test]
fn free_ports_are_never_the_standard_one() {
    for _ in 0..100 {
        assert_ne!(free_port(), 6379);
    }
}

#[test]
#[should_panic(expected = "RedisServer sets --port itself")]
fn the_harness_keeps_its_own_port() {
    let _ = RedisServer::start_with(&["--port", "6379"]);
}

/// The cluster harness: three masters with a replica each, every slot served, keys
/// reachable through redirects, the seed-list URL naming every node, and every node gone
/// (its port closed) once the cluster drops.
#[test]
fn a_cluster_forms_serves_every_slot_and_stops_on_drop() {
    let cluster = streamwise::testing::RedisCluster::start();
    assert_eq!(cluster.nodes().len(), 6);
    assert_eq!(cluster.masters().len(), 3);
    let info = cluster.cli(&["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok"), "{info}");
    assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    assert!(
        !ports.contains(&6379),
        "the machine's own server must not be used"
    );
    for key in ["a", "b", "c", "orders", "{orders}:x"] {
        assert_eq!(cluster.cli(&["SET", key, "1"]).trim(), "OK");
        assert_eq!(cluster.cli(&["GET", key]).trim(), "1");
    }
    let url = cluster.url();
    assert!(url.starts_with("redis-cluster://127.0.0.1:"), "{url}");
    for port in &ports {
        assert!(url.contains(&format!("127.0.0.1:{port}")), "{url}");
    }
    drop(cluster);
    for port in ports {
        assert!(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
            "node on {port} still answers after the cluster dropped"
        );
    }
}
