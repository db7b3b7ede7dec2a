//! [`DedupStore`]: where the marks of handled messages live, and [`MemoryDedupStore`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use streamwise::{Error, Result};

/// What [`DedupStore::mark`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marked {
    /// The key was not marked (or its mark had expired); it is marked now, by the caller.
    New,
    /// The key was already marked, by `holder`; nothing was changed.
    Seen {
        /// The holder given when the mark was set (the layer uses the entry id of the
        /// delivery that took the mark).
        holder: String,
    },
}

/// Where deduplication marks live: "mark this key as seen for `ttl`, and tell me whether it
/// already was", and "forget this key". Implementations: [`MemoryDedupStore`] and, with the
/// `dedup-redis` feature, `RedisDedupStore`.
///
/// `mark` must be atomic: when two callers mark the same key at once, exactly one gets
/// [`Marked::New`].
pub trait DedupStore: Send + Sync + 'static {
    /// Marks `key` as seen by `holder` for `ttl`, unless it is marked already. Returns
    /// [`Marked::New`] when this call set the mark, or [`Marked::Seen`] with the holder of the
    /// existing mark (which is left as it was). A `ttl` below 1 ms is refused with
    /// [`Error::Invalid`] (`ttl`).
    fn mark<'a>(&'a self, key: &'a str, holder: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Marked>>;

    /// Removes the mark of `key`, if there is one.
    fn forget<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// Checks a mark's time to live: at least 1 ms (the resolution of Redis `PX`).
pub(crate) fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::invalid(
            "ttl",
            format_args!("{ttl:?} is too short; a mark must live at least 1 ms"),
        ));
    }
    Ok(())
}

/// Below this many marks the store does not bother sweeping out expired ones.
const SWEEP_FLOOR: usize = 1024;

/// Marks in process memory, each with its expiry. Expired marks are swept out whenever the
/// map has doubled since the last sweep, so memory stays proportional to the marks alive
/// within one `ttl` (for a single process; use the Redis store to deduplicate across
/// consumers).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> streamwise::Result<()> {
/// use std::time::Duration;
/// use streamwise_middleware::dedup::{DedupStore, Marked, MemoryDedupStore};
///
/// let store = MemoryDedupStore::new();
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.mark("orders:svc:42", "1-0", ttl).await?, Marked::New);
/// assert_eq!(store.mark("orders:svc:42", "2-0", ttl).await?, Marked::Seen { holder: "1-0".into() });
/// store.forget("orders:svc:42").await?;
/// assert_eq!(store.mark("orders:svc:42", "2-0", ttl).await?, Marked::New);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MemoryDedupStore {
    marks: Mutex<Marks>,
}

#[derive(Debug)]
struct Marks {
    map: HashMap<String, Mark>,
    /// Sweep expired marks when the map reaches this size.
    sweep_at: usize,
}

#[derive(Debug)]
struct Mark {
    holder: String,
    /// `None`: the ttl is beyond what the clock can represent; the mark does not expire.
    expires: Option<Instant>,
}

impl Mark {
    fn alive(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

impl Default for MemoryDedupStore {
    fn default() -> Self {
        MemoryDedupStore {
            marks: Mutex::new(Marks {
                map: HashMap::new(),
                sweep_at: SWEEP_FLOOR,
            }),
        }
    }
}

impl MemoryDedupStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn marks(&self) -> MutexGuard<'_, Marks> {
        // The map is consistent after every statement; a panic elsewhere cannot corrupt it.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many marks are alive (not expired).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.marks().map.values().filter(|m| m.alive(now)).count()
    }

    /// Whether no mark is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn mark_now(&self, key: &str, holder: &str, ttl: Duration) -> Result<Marked> {
        check_ttl(ttl)?;
        let now = Instant::now();
        let mut marks = self.marks();
        if marks.map.len() >= marks.sweep_at {
            marks.map.retain(|_, m| m.alive(now));
            marks.sweep_at = SWEEP_FLOOR.max(marks.map.len().saturating_mul(2));
        }
        if let Some(existing) = marks.map.get(key).filter(|m| m.alive(now)) {
            return Ok(Marked::Seen {
                holder: existing.holder.clone(),
            });
        }
        marks.map.insert(
            key.to_owned(),
            Mark {
                holder: holder.to_owned(),
                expires: now.checked_add(ttl),
            },
        );
        Ok(Marked::New)
    }
}

impl DedupStore for MemoryDedupStore {
    fn mark<'a>(&'a self, key: &'a str, holder: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Marked>> {
        Box::pin(std::future::ready(self.mark_now(key, holder, ttl)))
    }

    fn forget<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        self.marks().map.remove(key);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn marks_are_set_once_and_report_their_holder() {
        let store = MemoryDedupStore::new();
        assert_eq!(store.mark("k", "a", MINUTE).await.unwrap(), Marked::New);
        assert_eq!(
            store.mark("k", "b", MINUTE).await.unwrap(),
            Marked::Seen { holder: "a".into() }
        );
        assert_eq!(store.mark("other", "b", MINUTE).await.unwrap(), Marked::New);
        assert_eq!(store.len(), 2);
        store.forget("k").await.unwrap();
        store.forget("never-marked").await.unwrap();
        assert_eq!(store.mark("k", "c", MINUTE).await.unwrap(), Marked::New);
    }

    #[tokio::test]
    async fn marks_expire_after_their_ttl() {
        let store = MemoryDedupStore::new();
        let ttl = Duration::from_millis(30);
        assert_eq!(store.mark("k", "a", ttl).await.unwrap(), Marked::New);
        assert!(matches!(
            store.mark("k", "b", ttl).await.unwrap(),
            Marked::Seen { .. }
        ));
        tokio::time::sleep(ttl + Duration::from_millis(10)).await;
        assert!(store.is_empty());
        assert_eq!(store.mark("k", "b", ttl).await.unwrap(), Marked::New);
    }

    #[tokio::test]
    async fn expired_marks_are_swept_so_memory_stays_bounded() {
        let store = MemoryDedupStore::new();
        let short = Duration::from_millis(5);
        for i in 0..SWEEP_FLOOR {
            store.mark(&format!("old-{i}"), "h", short).await.unwrap();
        }
        assert_eq!(store.marks().map.len(), SWEEP_FLOOR);
        tokio::time::sleep(short * 2).await;
        store.mark("fresh", "h", MINUTE).await.unwrap();
        assert_eq!(store.marks().map.len(), 1, "the expired marks were swept");
        // Live marks are never swept: the threshold grows with them instead.
        for i in 0..3 * SWEEP_FLOOR {
            store.mark(&format!("live-{i}"), "h", MINUTE).await.unwrap();
        }
        assert_eq!(store.len(), 3 * SWEEP_FLOOR + 1);
    }

    #[tokio::test]
    async fn bad_and_extreme_ttls_do_not_panic() {
        let store = MemoryDedupStore::new();
        for ttl in [Duration::ZERO, Duration::from_micros(999)] {
            let err = store.mark("k", "a", ttl).await.unwrap_err();
            assert_eq!(err.invalid_field(), Some("ttl"), "{ttl:?}");
        }
        assert!(store.is_empty());
        assert_eq!(store.mark("k", "a", Duration::MAX).await.unwrap(), Marked::New);
        assert!(matches!(
            store.mark("k", "b", MINUTE).await.unwrap(),
            Marked::Seen { .. }
        ));
    }
}
