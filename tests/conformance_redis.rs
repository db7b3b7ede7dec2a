//! The conformance suite against the Redis backend, each test on its own redis-server.

mod common;

use common::{RedisServer, RedisTestBackend};

fn redis() -> RedisTestBackend<RedisServer> {
    let server = RedisServer::start();
    let url = server.url();
    RedisTestBackend::new(server, url)
}

streamwise::conformance_tests!(redis());
