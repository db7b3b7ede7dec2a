//! TLS: a `rediss://` URL with a private CA's root certificate carries a publish, a delivery
//! and its ack end to end; a server whose certificate the client does not trust is refused
//! with a clear connection error that does not quote the password; a malformed root
//! certificate is refused when the connection is built; mutual TLS works with a client
//! certificate and is refused without one.
//!
//! The certificates are made for each run with the `openssl` command line tool (installed by
//! `scripts/test`), so no key material is committed.
#![cfg(feature = "tls")]

mod common;

use std::path::Path;
use std::time::Duration;

use streamwise::Error;
use streamwise::redis::{RedisBackend, RedisConnection};

use common::RedisServer;
use common::certs::make_certificates;

const PASSWORD: &str = "tls-Pa55word";

/// A server with a password, its plain port for the harness and a TLS port for the test.
struct TlsServer {
    /// Kept so that the server lives as long as the test.
    _server: RedisServer,
    tls_port: u16,
}

impl TlsServer {
    /// `auth_clients`: `"no"`, or `"yes"` for mutual TLS.
    fn start(certificates: &Path, auth_clients: &str) -> Self {
        make_certificates(certificates, "good");
        let path = |file: &str| certificates.join(file).to_string_lossy().into_owned();
        let tls_port = common::free_port();
        let server = RedisServer::start_with(&[
            "--requirepass",
            PASSWORD,
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &path("good-server.pem"),
            "--tls-key-file",
            &path("good-server.key"),
            "--tls-ca-cert-file",
            &path("good-ca.pem"),
            "--tls-auth-clients",
            auth_clients,
        ]);
        TlsServer {
            _server: server,
            tls_port,
        }
    }

    fn url(&self) -> String {
        format!("rediss://:{PASSWORD}@127.0.0.1:{}", self.tls_port)
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("streamwise-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_rediss_url_with_the_private_ca_publishes_delivers_and_acks() {
    let dir = scratch("round-trip");
    let tls = TlsServer::start(&dir, "no");
    let ca = std::fs::read(dir.join("good-ca.pem")).unwrap();
    let conn = RedisConnection::builder(&tls.url())
        .tls_root_certificate(ca)
        .build()
        .unwrap();
    common::round_trip(&RedisBackend::with_connection(conn), "orders")
        .await
        .unwrap();
    drop(tls);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_without_quoting_the_password() {
    let dir = scratch("wrong-ca");
    let tls = TlsServer::start(&dir, "no");
    make_certificates(&dir, "other");
    let other_ca = std::fs::read(dir.join("other-ca.pem")).unwrap();
    let conn = RedisConnection::builder(&tls.url())
        .tls_root_certificate(other_ca)
        .max_retries(5)
        .retry_base_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = common::publish_error(conn, "orders").await;
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "an untrusted certificate is not retried"
    );
    let text = format!("{err} {err:?}");
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(
        err.to_string().contains("TLS handshake") && err.to_string().contains("UnknownIssuer"),
        "the error says the certificate is the problem: {text}"
    );
    drop(tls);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_malformed_root_certificate_or_a_plain_url_is_refused_when_building() {
    let err = RedisConnection::builder(&format!("rediss://:{PASSWORD}@127.0.0.1:1"))
        .tls_root_certificate(b"not a certificate".to_vec())
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { field, .. } if field == "tls_root_certificate"),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains(PASSWORD));

    // A root certificate with a plain URL: the URL is what is wrong.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let err = RedisConnection::builder(&format!("redis://:{PASSWORD}@127.0.0.1:1"))
        .tls_root_certificate(pem)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { field, .. } if field == "redis_url"),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains(PASSWORD));
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate_and_works_with_it() {
    let dir = scratch("mutual");
    let tls = TlsServer::start(&dir, "yes");
    let read = |file: &str| std::fs::read(dir.join(file)).unwrap();

    let without = RedisConnection::builder(&tls.url())
        .tls_root_certificate(read("good-ca.pem"))
        .max_retries(1)
        .retry_base_delay(Duration::from_millis(10))
        .build()
        .unwrap();
    let err = common::publish_error(without, "orders").await;
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        err.to_string().contains("TLS handshake"),
        "the server's refusal is reported as such, not retried: {err}"
    );
    assert!(!format!("{err} {err:?}").contains(PASSWORD));

    let conn = RedisConnection::builder(&tls.url())
        .tls_root_certificate(read("good-ca.pem"))
        .tls_client_certificate(read("good-client.pem"), read("good-client.key"))
        .build()
        .unwrap();
    let debug = format!("{conn:?}");
    assert!(
        !debug.contains("PRIVATE KEY") && !debug.contains(PASSWORD),
        "{debug}"
    );
    common::round_trip(&RedisBackend::with_connection(conn), "orders")
        .await
        .unwrap();

    // A key file without a key is refused when building, without quoting it.
    let err = RedisConnection::builder(&tls.url())
        .tls_client_certificate(read("good-client.pem"), read("good-client.pem"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { field, .. } if field == "tls_client_key"),
        "{err:?}"
    );
    assert!(!format!("{err:?}").contains("BEGIN CERTIFICATE"));
    drop(tls);
    let _ = std::fs::remove_dir_all(&dir);
}
