//! [`Outbox`]: writing a message into the outbox table inside the application's transaction.

use streamwise::Message;
use streamwise::codec::{DEFAULT_MAX_ENTRY_SIZE, wire_size};
use tokio_postgres::GenericClient;
use tokio_postgres::types::{Json, Type};

use crate::error::{Error, Result};
use crate::wire;

/// The advisory lock class under which [`Outbox::publish`] takes a topic's transaction lock
/// (`pg_advisory_xact_lock(PUBLISH_LOCK, hashtext(topic))`). Avoid this first key in advisory
/// locks of your own.
pub const PUBLISH_LOCK: i32 = 0x7377_6f01;

/// The channel [`Outbox::publish`] notifies on commit and the relay listens to.
pub const NOTIFY_CHANNEL: &str = "streamwise_outbox";

/// The insert: the topic's lock first (the `OFFSET 0` keeps the subquery, so that the lock is
/// taken before the row's `id` is drawn), then the row; the notification is delivered at
/// commit, once per transaction.
const INSERT_NOTIFY: &str = "INSERT INTO streamwise_outbox (topic, message_uuid, message) \
     SELECT $1, $2, $3 FROM (SELECT pg_advisory_xact_lock(1937207041, hashtext($1)), \
     pg_notify('streamwise_outbox', '') OFFSET 0) AS locked RETURNING id";
const INSERT_QUIET: &str = "INSERT INTO streamwise_outbox (topic, message_uuid, message) \
     SELECT $1, $2, $3 FROM (SELECT pg_advisory_xact_lock(1937207041, hashtext($1)) \
     OFFSET 0) AS locked RETURNING id";

/// Writes messages into the outbox table (`streamwise_outbox`) in the caller's transaction;
/// a [`Relay`](crate::Relay) sends them once the transaction committed, and never when it
/// rolled back. Cheap to clone.
///
/// # Order
///
/// A publish takes a transaction-level advisory lock on its topic before the row gets its
/// `id`, held until the transaction ends: transactions that publish to the same topic commit
/// their outbox rows one after the other, so a topic's `id` order is its commit order, and
/// the relay sends in that order. The price: from its first publish to a topic until it
/// commits, a transaction holds up other transactions publishing to that topic. Publish
/// late in the transaction, and when one transaction publishes to several topics, publish
/// to them in the same order everywhere (PostgreSQL breaks a lock cycle by failing one of
/// the transactions with `deadlock detected`).
///
/// ```no_run
/// # async fn demo(client: &mut tokio_postgres::Client) -> streamwise_outbox::Result<()> {
/// use streamwise::Message;
/// use streamwise_outbox::Outbox;
///
/// let outbox = Outbox::new();
/// let tx = client.transaction().await?;
/// tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", &[&42_i64, &1999_i64]).await?;
/// outbox.publish(&tx, "orders", &Message::new("order.placed", &42)?).await?;
/// tx.commit().await?; // the relay sends order.placed now; after a rollback, never
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    max_entry_size: usize,
    notify: bool,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An outbox with the default options: entries up to
    /// [`DEFAULT_MAX_ENTRY_SIZE`] (1 MiB, the backends' default limit), a notification to
    /// the relays on commit.
    pub fn new() -> Self {
        Outbox {
            max_entry_size: DEFAULT_MAX_ENTRY_SIZE,
            notify: true,
        }
    }

    /// Refuses messages whose encoded entry is larger than `bytes` (set it to the limit of the
    /// publisher the relay sends to, so that the relay is never refused a row). At least 1.
    pub fn max_entry_size(mut self, bytes: usize) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::Invalid {
                field: "max_entry_size",
                reason: "must be at least 1 byte".into(),
            });
        }
        self.max_entry_size = bytes;
        Ok(self)
    }

    /// Whether a publish notifies the relays (`NOTIFY streamwise_outbox`, delivered at commit)
    /// so that they send at once. Default on. Off, the relays find new rows when they poll;
    /// PostgreSQL serializes the commits of notifying transactions briefly, which a very
    /// high commit rate may notice.
    #[must_use]
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Writes `message` for `topic` into the outbox, inside the transaction `tx` (a
    /// [`tokio_postgres::Transaction`], a `deadpool_postgres::Transaction` dereferenced to
    /// one, or an [`InboxTx`](crate::InboxTx)'s client, which is in the delivery's
    /// transaction). Nothing is sent unless that transaction commits. Returns the row's `id`.
    ///
    /// Given a client outside a transaction, the row commits at once, alone: it is sent, but
    /// nothing ties it to your other writes.
    ///
    /// Checked before anything is written ([`Error::Message`]): the topic is a valid stream
    /// name, the payload is JSON, and the encoded entry is within
    /// [`max_entry_size`](Self::max_entry_size), so that the relay's publisher does not
    /// refuse the row later.
    pub async fn publish<C>(&self, tx: &C, topic: &str, message: &Message) -> Result<i64>
    where
        C: GenericClient + Sync,
    {
        streamwise::validate_stream_name("topic", topic)?;
        if let Err(e) = message.json() {
            return Err(streamwise::Error::invalid("payload", e).into());
        }
        let size = wire_size(message);
        if size > self.max_entry_size {
            return Err(streamwise::Error::PayloadTooLarge {
                size,
                limit: self.max_entry_size,
            }
            .into());
        }
        let row = wire::encode(message)?;
        let sql = if self.notify { INSERT_NOTIFY } else { INSERT_QUIET };
        // One round trip: the types are given, so there is no separate prepare.
        let row = tx
            .query_typed_one(
                sql,
                &[
                    (&topic, Type::TEXT),
                    (&message.uuid(), Type::UUID),
                    (&Json(&row), Type::JSONB),
                ],
            )
            .await?;
        Ok(row.get(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_class_in_the_sql_is_the_documented_one() {
        for sql in [INSERT_NOTIFY, INSERT_QUIET] {
            assert!(
                sql.contains(&format!("pg_advisory_xact_lock({PUBLISH_LOCK},")),
                "{sql}"
            );
        }
        assert!(INSERT_NOTIFY.contains(&format!("pg_notify('{NOTIFY_CHANNEL}'")));
    }

    #[test]
    fn a_zero_entry_limit_is_refused() {
        let err = Outbox::new().max_entry_size(0).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "max_entry_size",
                    ..
                }
            ),
            "{err}"
        );
    }
}
