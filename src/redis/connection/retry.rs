//! What a failed attempt means: connection trouble that a retry (maybe on a new connection)
//! can cure, a refused login or TLS handshake, or the server's own refusal, which every
//! connection would get again; and how long to wait before the next attempt.

use std::time::Duration;

use redis::{ErrorKind, RedisError, RetryMethod};

use super::tls::tls_refusal;
use crate::redis::protocol::replies;

/// Errors that a new attempt, maybe on a new connection, can cure.
pub(crate) fn is_transient(e: &RedisError) -> bool {
    if is_auth_failure(e) || e.code() == Some("NOPERM") || tls_refusal(e).is_some() {
        return false;
    }
    e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect | RetryMethod::RetryImmediately | RetryMethod::WaitAndRetry
        )
}

/// A server's answer while a cluster changes: the slot moved (`MOVED`, `ASK`), the node became
/// a replica (`READONLY`, or `UNBLOCKED` for a blocked read of a demoted master), the cluster
/// is failing over (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`). On a cluster, a new attempt on a
/// connection to the slot's master of then can cure it
/// ([`RedisConnection::transient`](super::RedisConnection::transient)); on one server, the
/// answers that are not [`is_transient`] anyway are the server's refusal.
pub(crate) fn is_cluster_change(e: &RedisError) -> bool {
    matches!(
        e.retry_method(),
        RetryMethod::MovedRedirect | RetryMethod::AskRedirect | RetryMethod::RefreshSlotsAndRetry
    ) || matches!(
        e.code(),
        Some("MOVED" | "ASK" | "READONLY" | "UNBLOCKED" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN")
    )
}

/// The server's own answer, which a new connection would get again: an error reply (or a reply
/// of another type than asked for) that is neither connection trouble nor a refused login or
/// TLS handshake.
pub(crate) fn is_server_refusal(e: &RedisError) -> bool {
    !is_transient(e) && !is_auth_failure(e) && tls_refusal(e).is_none() && replies::is_answer(e)
}

/// Wrong or missing credentials: retrying cannot help, and the error says so. (`NOPERM`, an
/// ACL refusing a command or key, is a server error of its own, not a failed login.)
pub(super) fn is_auth_failure(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// The delay before retry number `attempt` (0-based): `base` doubled per attempt, capped at
/// `max`, with "equal jitter" (half fixed, half random) so that clients do not retry in step.
pub(super) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(31)));
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changing_cluster_is_transient() {
        let answer = |text: &str| -> RedisError {
            let reply = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).expect("an error reply");
            reply.extract_error().expect_err("an error")
        };
        for text in [
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "READONLY You can't write against a read only replica.",
            "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)",
            "CLUSTERDOWN The cluster is down",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ] {
            let e = answer(text);
            assert!(is_cluster_change(&e), "{text}: {e:?}");
        }
        let refused = answer("WRONGTYPE Operation against a key holding the wrong kind of value");
        assert!(!is_transient(&refused) && !is_cluster_change(&refused));
        // On one server, a replica's refusal to write is an answer, as it always was.
        let readonly = answer("READONLY You can't write against a read only replica.");
        let single = crate::redis::RedisConnection::new("redis://127.0.0.1:1").unwrap();
        let cluster = crate::redis::RedisConnection::new("redis-cluster://127.0.0.1:1").unwrap();
        assert!(!single.transient(&readonly) && cluster.transient(&readonly));
        assert!(is_server_refusal(&readonly));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stays_capped() {
        for attempt in 0..40 {
            let full = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(Duration::from_secs(1));
            let d = backoff(Duration::from_millis(100), Duration::from_secs(1), attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
    }
}
