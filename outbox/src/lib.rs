//! The transactional outbox and inbox for [streamwise] on PostgreSQL: events
//! exactly as often as the data changed.
//!
//! - [`Outbox::publish`] writes a message into the `streamwise_outbox` table inside the
//!   application's own transaction: committed, it will be sent; rolled back, it never is.
//! - [`Relay`] moves committed rows to any [`streamwise::Publisher`] (Redis, the in-memory
//!   backend, ...), per topic in commit order, and marks them sent: at least once, with the
//!   same message UUID on every send.
//! - [`InboxLayer`] runs a router handler in a transaction that also records the message's
//!   UUID in `streamwise_inbox`, and skips a message already recorded: the handler's database
//!   effects happen exactly once. Through [`InboxTx::publish`] the handler emits follow-up
//!   events in that same transaction.
//! - [`migrate`] creates the tables ([`MIGRATIONS`] holds the SQL).
//!
//! The crate talks to PostgreSQL through tokio-postgres (and a deadpool pool for the inbox).
//!
//! | module | owns |
//! |---|---|
//! | `schema` | the migration SQL and [`migrate`] |
//! | `outbox` | [`Outbox`]: the insert, its topic lock and notification |
//! | `wire` | a message as a row stores it (streamwise's wire format as a JSON object) |
//! | `relay` | [`Relay`]: topics, batches, marking, `LISTEN`, polling, retention, stop |
//! | `inbox` | [`InboxLayer`], [`InboxTx`], [`purge_inbox`] |
//! | `testing` | `testing::PostgresServer`, a private server for tests (feature `testing`) |
//! | `error` | [`Error`] |

mod error;
mod inbox;
mod outbox;
mod relay;
mod schema;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

pub use deadpool_postgres;
pub use error::{Error, Result};
pub use inbox::{InboxLayer, InboxService, InboxTx, purge_inbox, was_handled};
pub use outbox::{NOTIFY_CHANNEL, Outbox, PUBLISH_LOCK};
pub use relay::{RELAY_LOCK, Relay, RelayHandle, RelayOptions, RelayStats};
pub use schema::{MIGRATIONS, SCHEMA_VERSION, migrate};
pub use tokio_postgres;
