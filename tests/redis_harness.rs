//! The test harness itself: servers start on free ports, answer, restart, and die on drop.

mod common;

use std::net::{Ipv4Addr, TcpStream};

use common::RedisServer;

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
