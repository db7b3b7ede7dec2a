//! A consumer name's lease: one key of the bucket `streamwise_leases` per (topic, group,
//! consumer), whose value is the holder's token.
//!
//! Taking it is a create-if-absent (a write that expects the key to have no live value), so
//! two processes cannot both take it; the holder renews it with a compare-and-set on the
//! revision it wrote last (every third of the bucket's `max_age`), so a holder that was cut
//! off and replaced learns it lost the name instead of taking it back (a key that merely ran
//! out meanwhile, with nobody else taking it, is taken again); closing deletes it with the
//! same check. A crashed holder's key expires with the bucket's `max_age` (the lease TTL),
//! after which the name is free.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use bytes::Bytes;

use super::{Shared, wire};
use crate::error::{Error, Result};

/// A lease held by one subscription.
pub(crate) struct Lease {
    store: kv::Store,
    key: String,
    token: Bytes,
    /// The revision written last; `None` once given back. Renewals and the release take
    /// turns, so that a release never races a renewal's new revision.
    revision: tokio::sync::Mutex<Option<u64>>,
    /// How often to renew it: a third of its TTL.
    pub(crate) period: Duration,
}

/// What a renewal found.
pub(crate) enum Renewed {
    /// Still ours.
    Held,
    /// Another holder has the name now (this one was cut off past its TTL).
    Lost,
}

impl Lease {
    /// Takes the lease of `consumer` in `group` on `topic`, or refuses with
    /// [`Error::ConsumerActive`] while another holder has it.
    pub(crate) async fn acquire(
        shared: &Shared,
        ttl: Duration,
        topic: &str,
        group: &str,
        consumer: &str,
    ) -> Result<Lease> {
        let store = shared.leases(ttl).await?.clone();
        let key = wire::lease_key(topic, group, consumer);
        let token = Bytes::from(crate::unique_consumer_name(consumer));
        let revision = match store.create(&key, token.clone()).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                return Err(Error::ConsumerActive {
                    stream: topic.to_owned(),
                    group: group.to_owned(),
                    consumer: consumer.to_owned(),
                });
            }
            Err(e) => return Err(shared.failed("KV.CREATE", e)),
        };
        let max_age = store.stream.cached_info().config.max_age;
        let ttl = if max_age.is_zero() { ttl } else { max_age };
        Ok(Lease {
            store,
            key,
            token,
            revision: tokio::sync::Mutex::new(Some(revision)),
            period: (ttl / 3).max(Duration::from_millis(100)),
        })
    }

    /// Renews the lease.
    pub(crate) async fn renew(&self) -> std::result::Result<Renewed, kv::UpdateError> {
        let mut held = self.revision.lock().await;
        let Some(revision) = *held else {
            return Ok(Renewed::Held);
        };
        match self.store.update(&self.key, self.token.clone(), revision).await {
            Ok(revision) => {
                *held = Some(revision);
                Ok(Renewed::Held)
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                // Someone else's now, or simply gone: it ran out while the server could not
                // be reached (a restart, a partition) and nobody took it meanwhile. Then it
                // is taken again; only another holder's token means the name is lost.
                match self.store.entry(&self.key).await {
                    Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                        if entry.value == self.token {
                            *held = Some(entry.revision);
                            Ok(Renewed::Held)
                        } else {
                            Ok(Renewed::Lost)
                        }
                    }
                    Ok(_) => match self.store.create(&self.key, self.token.clone()).await {
                        Ok(revision) => {
                            *held = Some(revision);
                            Ok(Renewed::Held)
                        }
                        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Renewed::Lost),
                        // Tried again at the next renewal.
                        Err(_) => Err(e),
                    },
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the name back, unless another holder has it by now. Idempotent.
    pub(crate) async fn release(&self) {
        let Some(revision) = self.revision.lock().await.take() else {
            return;
        };
        if let Err(e) = self.store.delete_expect_revision(&self.key, Some(revision)).await {
            tracing::debug!(key = %self.key, error = %e, "the lease was not deleted; it runs out by itself");
        }
    }
}
