//! What the tests share: a private PostgreSQL with the schema, and waiting for conditions.
#![allow(dead_code)] // each test binary uses part of it

use std::future::Future;
use std::time::{Duration, Instant};

use streamwise_outbox::testing::PostgresServer;
use streamwise_outbox::tokio_postgres::Client;

/// A fresh server with the schema migrated, and a connection to it.
pub(crate) async fn database() -> (PostgresServer, Client) {
    let server = PostgresServer::start().expect("a private PostgreSQL");
    let mut client = server.connect().await.expect("connect");
    streamwise_outbox::migrate(&mut client).await.expect("migrate");
    (server, client)
}

/// Polls `condition` every 10 ms until it holds; panics with `what` after `within`.
pub(crate) async fn wait_for<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A count from `sql`.
pub(crate) async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}
