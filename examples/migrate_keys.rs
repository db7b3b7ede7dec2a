//! Renames the keys release 0.1 wrote to the names of this release, once, before the new
//! release starts (see `streamwise::redis::admin::migrate_key_names`): stop the consumers,
//! run this against the Redis they use, then start the new release.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example migrate_keys
//! ```

use streamwise::redis::RedisConnection;
use streamwise::redis::admin::migrate_key_names;

#[tokio::main]
async fn main() -> streamwise::Result<()> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = RedisConnection::new(&url)?;
    let done = migrate_key_names(&conn).await?;
    for (old, new) in &done.moved {
        println!("moved {old} -> {new}");
    }
    for (old, new) in &done.left {
        println!("left {old}: {new} exists already; read both, or move the old records by hand");
    }
    println!("{} keys moved, {} left", done.moved.len(), done.left.len());
    Ok(())
}
