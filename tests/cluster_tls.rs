//! `rediss-cluster://`: a Redis Cluster whose nodes speak TLS to clients, to each other and to
//! their replicas, with a private CA. The shared cluster connection, the read connections to
//! each stream's master and the `wait_replicas` connections all go over TLS; a client that
//! does not trust the CA is refused with a clear error.
#![cfg(feature = "tls")]

mod common;

use std::time::Duration;

use streamwise::redis::{PublisherOptions, RedisBackend, RedisConnection, RedisPublisher};
use streamwise::testing::{ClusterTls, RedisCluster, unique_topic};
use streamwise::{Error, Message, Publisher};

use common::certs::make_certificates;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_cluster_url_publishes_delivers_and_acks_on_every_master() {
    let dir = std::env::temp_dir().join(format!("streamwise-cluster-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir, "cluster");
    let tls = ClusterTls {
        ca: dir.join("cluster-ca.pem"),
        certificate: dir.join("cluster-server.pem"),
        key: dir.join("cluster-server.key"),
    };
    let cluster = RedisCluster::start_tls(&tls);
    let url = cluster.tls_url();
    assert!(url.starts_with("rediss-cluster://"), "{url}");
    let ca = std::fs::read(&tls.ca).unwrap();
    let connect = || {
        RedisConnection::builder(&url)
            .tls_root_certificate(ca.clone())
            .build()
            .unwrap()
    };
    let redis = RedisBackend::with_connection(connect());

    // Streams until every master has served one (each read connection goes to its master).
    let mut masters = std::collections::BTreeSet::new();
    while masters.len() < 3 {
        let stream = unique_topic("tls");
        masters.insert(cluster.master_of(&stream).unwrap().port());
        common::round_trip(&redis, &stream).await.unwrap();
    }

    // A durable publish: XADD and WAIT on a TLS connection to the stream's master, which its
    // replica (over TLS replication) acknowledges.
    let durable = RedisPublisher::new(
        connect(),
        PublisherOptions::default().wait_replicas(1, Duration::from_secs(5)),
    );
    durable
        .publish(&unique_topic("tls-durable"), Message::new("t", &1).unwrap())
        .await
        .unwrap();

    // A client that does not trust the cluster's CA is refused at once (a retry would wait
    // a second), and the error says why.
    let untrusted = RedisConnection::builder(&url)
        .max_retries(5)
        .retry_base_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = common::publish_error(untrusted, "untrusted").await;
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "not retried: {err}");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
