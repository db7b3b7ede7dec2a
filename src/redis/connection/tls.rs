//! TLS for `rediss://`: the certificates given to the builder, checked when it builds; the
//! client configurations made from them (redis-rs's for the shared connection, rustls's for the
//! dedicated ones); and which TLS failures are the setup's fault, which a retry cannot cure.

#[cfg(feature = "tls")]
use std::sync::Arc;

use redis::RedisError;

use crate::error::{Error, Result};
#[cfg(feature = "tls")]
use crate::redis::dedicated::TlsSetup;

/// Certificates for `rediss://`, beyond the system's roots (empty without the `tls` feature).
#[derive(Clone, Default)]
pub(super) struct TlsMaterial {
    /// The CA to trust instead of the system's roots (PEM).
    #[cfg(feature = "tls")]
    pub(super) root: Option<Vec<u8>>,
    /// The client's certificate chain and private key (PEM), for servers that ask for one.
    #[cfg(feature = "tls")]
    pub(super) client: Option<(Vec<u8>, Vec<u8>)>,
}

/// The certificates given to the builder, checked, for redis-rs' clients of a server (or
/// cluster seed) at `addr`: `None` when none were given. Installs the crypto provider for a
/// TLS address; certificates with a plain address are refused (`scheme` names the TLS one).
#[cfg(feature = "tls")]
fn checked_certificates(
    addr: &redis::ConnectionAddr,
    tls: &TlsMaterial,
    scheme: &str,
) -> Result<Option<redis::TlsCertificates>> {
    if matches!(addr, redis::ConnectionAddr::TcpTls { .. }) {
        // rustls needs a process-wide crypto provider. Install ring unless the application
        // already chose one (then `install_default` fails, and its choice stands).
        let _ = rustls::crypto::ring::default_provider().install_default();
    } else if tls.root.is_some() || tls.client.is_some() {
        return Err(Error::invalid(
            "redis_url",
            format_args!("TLS certificates were given, but the URL is not {scheme}"),
        ));
    }
    if tls.root.is_none() && tls.client.is_none() {
        return Ok(None);
    }
    if let Some(pem) = &tls.root {
        check_pem_certificates("tls_root_certificate", pem)?;
    }
    if let Some((certificate, key)) = &tls.client {
        check_pem_certificates("tls_client_certificate", certificate)?;
        check_pem_key(key)?;
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: tls
            .client
            .clone()
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: tls.root.clone(),
    }))
}

/// A client for `info`, with the TLS material given to the builder.
pub(super) fn open_client(
    info: redis::ConnectionInfo,
    tls: TlsMaterial,
    redacted_url: &str,
) -> Result<redis::Client> {
    #[cfg(feature = "tls")]
    if let Some(certificates) = checked_certificates(info.addr(), &tls, "rediss://")? {
        return redis::Client::build_with_tls(info, certificates).map_err(|e| {
            Error::invalid(
                "tls_client_certificate",
                format_args!("the TLS certificates cannot be used ({e})"),
            )
        });
    }
    let _ = tls;
    redis::Client::open(info).map_err(|e| {
        Error::invalid(
            "redis_url",
            format_args!("{redacted_url} cannot be used ({:?})", e.kind()),
        )
    })
}

/// `builder` with the TLS material given to the connection's builder, for a cluster whose
/// first seed node is `seed` (TLS itself follows the seeds' scheme, `rediss-cluster://`).
pub(super) fn cluster_certificates(
    builder: redis::cluster::ClusterClientBuilder,
    seed: &redis::ConnectionInfo,
    tls: &TlsMaterial,
) -> Result<redis::cluster::ClusterClientBuilder> {
    #[cfg(feature = "tls")]
    if let Some(certificates) = checked_certificates(seed.addr(), tls, "rediss-cluster://")? {
        return Ok(builder.certs(certificates));
    }
    let _ = (seed, tls);
    Ok(builder)
}

/// The rustls configuration of the dedicated connections: the given root certificate, else
/// the system's roots (as redis-rs does), and the client certificate when one was given. The
/// crypto provider is the application's process default, else ring.
#[cfg(feature = "tls")]
pub(super) fn client_config(tls: &TlsMaterial) -> std::result::Result<TlsSetup, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut roots = rustls::RootCertStore::empty();
    match &tls.root {
        Some(pem) => {
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate = certificate.map_err(|e| format!("root certificate: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("root certificate: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| e.to_string()).unwrap_or_default();
                return Err(format!("no root certificates found on this system {why}"));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &tls.client {
        Some((certificate, key)) => {
            let chain = CertificateDer::pem_slice_iter(certificate)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            // The PEM error could quote key material: say only what is wrong.
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| "client key is not PEM".to_owned())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Refuses a root certificate that holds no PEM certificate, or a broken one: the client would
/// otherwise trust nothing and fail only when it connects.
#[cfg(feature = "tls")]
fn check_pem_certificates(field: &'static str, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem) {
        certificate.map_err(|e| Error::invalid(field, format_args!("is not valid PEM ({e})")))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::invalid(
            field,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(())
}

/// Refuses a client key that holds no private key. The PEM error names no key material.
#[cfg(feature = "tls")]
fn check_pem_key(pem: &[u8]) -> Result<()> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    PrivateKeyDer::from_pem_slice(pem).map(drop).map_err(|_| {
        Error::invalid(
            "tls_client_key",
            "holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)",
        )
    })
}

/// The TLS error, when the handshake failed for a reason a retry cannot cure (an untrusted or
/// mismatched certificate, no common protocol version): the client must be configured anew.
#[cfg(feature = "tls")]
pub(super) fn tls_refusal(e: &RedisError) -> Option<String> {
    use std::error::Error as _;
    use std::sync::Arc;
    // redis-rs keeps the cause as `Arc<dyn Error>`, and the I/O error wraps the rustls error
    // without exposing it as a source, so both layers are unwrapped by hand.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = cause {
        let inner: &(dyn std::error::Error + 'static) =
            match err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
                Some(arc) => arc.as_ref(),
                None => err,
            };
        let tls = match inner.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            None => inner.downcast_ref::<rustls::Error>(),
        };
        if let Some(tls) = tls.filter(|tls| is_configuration_refusal(tls)) {
            return Some(tls.to_string());
        }
        cause = inner.source();
    }
    None
}

/// TLS errors that come from how the client or server is set up (certificates, protocol
/// versions), as opposed to a connection damaged in transit, which a reconnect cures.
#[cfg(feature = "tls")]
fn is_configuration_refusal(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as Alert;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::UnsupportedNameType => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            Alert::HandshakeFailure
                | Alert::NoCertificate
                | Alert::BadCertificate
                | Alert::UnsupportedCertificate
                | Alert::CertificateRevoked
                | Alert::CertificateExpired
                | Alert::CertificateUnknown
                | Alert::UnknownCA
                | Alert::AccessDenied
                | Alert::ProtocolVersion
                | Alert::InsufficientSecurity
                | Alert::CertificateRequired
        ),
        _ => false,
    }
}

#[cfg(not(feature = "tls"))]
pub(super) fn tls_refusal(_: &RedisError) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::connection::retry::is_transient;

    #[cfg(feature = "tls")]
    #[test]
    fn only_tls_setup_errors_are_refusals_and_transit_damage_is_retried() {
        let wrapped =
            |e: rustls::Error| RedisError::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        let untrusted = wrapped(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(tls_refusal(&untrusted).unwrap().contains("UnknownIssuer"));
        assert!(!is_transient(&untrusted));
        let alert = wrapped(rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA));
        assert!(tls_refusal(&alert).is_some());
        for damage in [
            rustls::Error::DecryptError,
            rustls::Error::AlertReceived(rustls::AlertDescription::InternalError),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac),
        ] {
            assert_eq!(tls_refusal(&wrapped(damage)), None);
        }
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(tls_refusal(&reset), None);
    }
}
