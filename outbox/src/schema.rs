//! The schema: the migration that creates the outbox and inbox tables, and [`migrate`], which
//! applies it once per database.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The migrations, in order: (version, SQL). Version 1 creates `streamwise_outbox` and
/// `streamwise_inbox` with their indexes (the file `migrations/0001_outbox_inbox.sql`).
pub const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_outbox_inbox.sql"))];

/// The newest schema version this release knows.
pub const SCHEMA_VERSION: i32 = 1;

/// The advisory lock class (the first key of `pg_advisory_xact_lock(int, int)`) that
/// [`migrate`] takes, so that processes starting together migrate one after the other.
const MIGRATE_LOCK: i32 = 0x7377_6f00;

/// Brings the database's schema up to [`SCHEMA_VERSION`], in one transaction: creates the
/// bookkeeping table `streamwise_outbox_schema` and applies each migration of [`MIGRATIONS`]
/// not applied yet. Idempotent, and safe to call from several processes at once (they take
/// turns on an advisory lock). Returns the versions it applied (empty when the schema was
/// up to date).
///
/// Fails with [`Error::SchemaTooNew`] when a newer release migrated the database.
///
/// To apply the schema with your own migration tool instead, run the SQL of [`MIGRATIONS`]
/// (every statement is idempotent).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATE_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS streamwise_outbox_schema (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: Option<i32> = tx
        .query_one("SELECT max(version) FROM streamwise_outbox_schema", &[])
        .await?
        .get(0);
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO streamwise_outbox_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        applied.push(version);
    }
    tx.commit().await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "outbox schema migrated");
    }
    Ok(applied)
}
