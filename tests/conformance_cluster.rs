//! The conformance suite, unchanged, against the Redis backend on a Redis Cluster (three
//! masters, three replicas): one cluster for the whole suite, whose scenarios run one after
//! another (each on topics of its own), since a cluster per scenario would take minutes.

mod common;

use common::RedisTestBackend;
use streamwise::testing::{RedisCluster, SCENARIOS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conformance_scenario_holds_on_a_cluster() {
    let cluster = RedisCluster::start();
    let backend = RedisTestBackend::new((), cluster.url());
    for (name, scenario) in SCENARIOS {
        eprintln!("scenario {name}");
        scenario(&backend).await;
    }
}
