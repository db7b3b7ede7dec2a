//! The crate's one error type.

/// What can go wrong in the outbox, the relay and the inbox.
///
/// No variant carries a connection string: PostgreSQL's and the pool's errors say what failed,
/// never with the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// PostgreSQL refused a statement, or the connection failed. The message includes
    /// the server's (`ERROR: duplicate key value violates unique constraint ...`), which
    /// tokio-postgres keeps in the source.
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),

    /// No connection could be taken from the pool.
    #[error("no PostgreSQL connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),

    /// The message or the topic was refused before anything was written: an invalid topic
    /// name ([`streamwise::Error::Invalid`], field `topic`), a payload that is not JSON
    /// (field `payload`), an entry over the size limit ([`streamwise::Error::PayloadTooLarge`]),
    /// or metadata that cannot be encoded.
    #[error(transparent)]
    Message(#[from] streamwise::Error),

    /// An outbox row does not hold a message in the wire format (it was written by something
    /// else than [`Outbox::publish`](crate::Outbox::publish), or changed by hand).
    #[error("outbox row {id} cannot be decoded: {reason}")]
    Decode {
        /// The row's `id`.
        id: i64,
        /// Why.
        reason: String,
    },

    /// The database's schema was made by a newer release of this crate.
    #[error("the outbox schema is at version {found}; this release knows versions up to {supported}")]
    SchemaTooNew {
        /// The version recorded in the database.
        found: i32,
        /// The newest version this release knows.
        supported: i32,
    },

    /// An option is out of range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The option at fault.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
}

/// A tokio-postgres error with its cause: its own `Display` says only "db error" or "error
/// connecting to server".
fn describe(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
