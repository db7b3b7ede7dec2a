//! The inbox: [`InboxLayer`], a router layer that runs each delivery's handler in a database
//! transaction together with the record of its message UUID, so that the handler's effects
//! happen once however often the message is delivered; [`InboxTx`], the handler's way to that
//! transaction; [`purge_inbox`], the retention of the records.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures::future::BoxFuture;
use streamwise::router::{FromIncoming, Incoming, Outcome, Verdict};
use streamwise::{BoxError, Message};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};
use tower::{Layer, Service};

use crate::error::{Error, Result};
use crate::outbox::Outbox;

const RECORD: &str = "INSERT INTO streamwise_inbox (consumer, message_uuid) VALUES ($1, $2) \
     ON CONFLICT DO NOTHING";

tokio::task_local! {
    /// The transaction of the delivery being handled, while its handler runs.
    static CURRENT: InboxTx;
}

/// Whose inbox a delivery is recorded in.
#[derive(Clone, Debug)]
enum Consumer {
    /// The delivery's consumer group.
    Group,
    /// A name given.
    Named(Arc<str>),
}

/// A router layer that makes a handler's database effects happen exactly once per message.
///
/// For each delivery it takes a connection from the pool, begins a transaction, and records
/// the message's UUID in `streamwise_inbox` under the consumer (by default the delivery's
/// consumer group; [`consumer`](Self::consumer) names another). Then:
///
/// - **Seen before** (the record is there: the handler's transaction committed earlier): the
///   handler is not called, and the delivery is acknowledged. A duplicate being handled at the
///   same moment elsewhere waits for that transaction, and is then skipped if it committed.
/// - **New:** the handler runs; it reaches the transaction through [`InboxTx`] (an extractor,
///   or [`InboxTx::current`]) to write its own rows and to publish follow-up events through
///   the outbox ([`InboxTx::publish`]). When it returns an ack, the transaction commits: the
///   record, the handler's rows and its outbox rows together. A nack, a dead letter or an
///   error rolls everything back (the delivery is settled as the handler said, and a
///   redelivery runs the handler again).
///
/// A commit that fails makes the delivery an error (nacked after the backoff), and so does
/// an ack from a handler that swallowed the error of one of its statements (the transaction
/// is aborted then, and PostgreSQL would answer the commit with a rollback). A commit whose
/// reply was lost but that did commit leaves the record, so the redelivery is skipped.
/// A delivery abandoned midway (a timeout outside this layer, the router's shutdown
/// deadline) closes its connection instead of returning it to the pool, which rolls its
/// transaction back.
///
/// Messages a handler returns in its [`Outcome`] are published by the router after the
/// commit, outside the transaction, and are **lost** if that publish fails: the router nacks,
/// and the redelivery is skipped as already handled. Publish follow-ups through
/// [`InboxTx::publish`] instead, which makes consume → change → emit one atomic step.
///
/// ```no_run
/// # async fn demo(pool: deadpool_postgres::Pool) {
/// use streamwise::router::{Handler, Json, Routes};
/// use streamwise::Message;
/// use streamwise_outbox::{InboxLayer, InboxTx};
///
/// async fn on_order_placed(Json(id): Json<i64>, tx: InboxTx) -> Result<(), streamwise_outbox::Error> {
///     tx.execute("UPDATE stats SET orders = orders + 1", &[]).await?;
///     tx.publish("emails", &Message::new("email.requested", &id)?).await?;
///     Ok(())
/// }
///
/// let routes = Routes::new().route("order.placed", on_order_placed.layer(InboxLayer::new(pool)));
/// # let _ = routes; }
/// ```
#[derive(Clone)]
pub struct InboxLayer {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    consumer: Consumer,
    outbox: Outbox,
}

impl fmt::Debug for InboxLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxLayer")
            .field("consumer", &self.shared.consumer)
            .field("outbox", &self.shared.outbox)
            .finish_non_exhaustive()
    }
}

impl InboxLayer {
    /// An inbox on the database of `pool`, recording each message under the delivery's
    /// consumer group, with [`InboxTx::publish`] going through a default [`Outbox`].
    ///
    /// Each delivery holds one of the pool's connections while its handler runs: size the pool
    /// to the subscription's `max_in_flight` (deadpool's default is 4 per core).
    pub fn new(pool: Pool) -> Self {
        InboxLayer {
            shared: Arc::new(Shared {
                pool,
                consumer: Consumer::Group,
                outbox: Outbox::new(),
            }),
        }
    }

    /// Records messages under `name` instead of the delivery's consumer group. Two layers
    /// with the same name share their records: a message handled under one is skipped
    /// under the other.
    #[must_use]
    pub fn consumer(self, name: impl Into<Arc<str>>) -> Self {
        self.with(|shared| shared.consumer = Consumer::Named(name.into()))
    }

    /// The outbox [`InboxTx::publish`] writes through.
    #[must_use]
    pub fn outbox(self, outbox: Outbox) -> Self {
        self.with(|shared| shared.outbox = outbox)
    }

    fn with(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Shared {
            pool: self.shared.pool.clone(),
            consumer: self.shared.consumer.clone(),
            outbox: self.shared.outbox.clone(),
        };
        change(&mut shared);
        InboxLayer {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for InboxLayer {
    type Service = InboxService<S>;

    fn layer(&self, inner: S) -> InboxService<S> {
        InboxService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`InboxLayer`].
#[derive(Clone)]
pub struct InboxService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for InboxService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxService")
            .field("consumer", &self.shared.consumer)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Incoming> for InboxService<S>
where
    S: Service<Incoming, Response = Outcome, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<Outcome, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        // The service polled ready goes into the future; a fresh clone stays for the next call.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let shared = self.shared.clone();
        Box::pin(async move {
            let consumer: &str = match &shared.consumer {
                Consumer::Group => incoming.info().group(),
                Consumer::Named(name) => name,
            };
            let uuid = incoming.message().uuid();
            let tx = InboxTx::begin(&shared).await?;
            let recorded = tx
                .execute_typed(RECORD, &[(&consumer, Type::TEXT), (&uuid, Type::UUID)])
                .await;
            match recorded {
                Ok(0) => {
                    tx.finish("ROLLBACK").await?;
                    tracing::debug!(%uuid, consumer, "already handled; skipped and acknowledged");
                    return Ok(Outcome::ack());
                }
                Ok(_) => {}
                Err(e) => {
                    tx.finish("ROLLBACK").await.ok();
                    return Err(Error::from(e).into());
                }
            }
            let future = CURRENT.sync_scope(tx.clone(), || inner.call(incoming));
            let result = CURRENT.scope(tx.clone(), future).await;
            match &result {
                Ok(outcome) if *outcome.verdict() == Verdict::Ack => {
                    // PostgreSQL answers COMMIT of a transaction in which a statement failed
                    // (the handler swallowed the error) with a rollback, not an error: the
                    // SELECT fails first in that case, and the query ends there.
                    if let Err(e) = tx.finish("SELECT 1; COMMIT").await {
                        tx.finish("ROLLBACK").await.ok();
                        return Err(e.into());
                    }
                }
                _ => {
                    if let Err(e) = tx.finish("ROLLBACK").await {
                        tracing::warn!(%uuid, error = %e, "rolling back a delivery's transaction failed; its connection is closed");
                    }
                }
            }
            result
        })
    }
}

/// The transaction of the delivery being handled, for a handler under an [`InboxLayer`]: a
/// handler argument (an extractor), or [`InboxTx::current`] anywhere in the handler's task.
///
/// It dereferences to the [`tokio_postgres::Client`] whose transaction it is, so a handler
/// runs statements with it as with a [`tokio_postgres::Transaction`] (`tx.execute(..)`,
/// `tx.query(..)`), and passes `&*tx` wherever a `GenericClient` is taken. The layer began the
/// transaction and ends it: do not run `COMMIT` or `ROLLBACK` yourself (use `SAVEPOINT` for
/// partial rollbacks), and do not use it in tasks that outlive the handler.
///
/// Why not a `Transaction<'_>`: handlers are `'static` futures, and a tokio-postgres
/// transaction borrows its client. This handle owns the pooled connection instead, in a
/// transaction the layer began with `BEGIN`.
///
/// As an extractor outside an [`InboxLayer`] it nacks the delivery (after 1 s) and logs an
/// error: the handler is not called without its transaction.
#[derive(Clone)]
pub struct InboxTx {
    inner: Arc<TxInner>,
}

struct TxInner {
    /// The pooled connection; taken only by `Drop`.
    client: Option<Object>,
    /// Whether `COMMIT` or `ROLLBACK` went through: the connection may go back to the pool.
    finished: AtomicBool,
    outbox: Outbox,
}

impl Drop for TxInner {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Acquire)
            && let Some(object) = self.client.take()
        {
            // Out of the pool and closed: the server rolls the transaction back.
            drop(Object::take(object));
        }
    }
}

impl fmt::Debug for InboxTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxTx")
            .field("finished", &self.inner.finished.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl InboxTx {
    async fn begin(shared: &Shared) -> Result<Self> {
        let client = shared.pool.get().await?;
        let tx = InboxTx {
            inner: Arc::new(TxInner {
                client: Some(client),
                finished: AtomicBool::new(false),
                outbox: shared.outbox.clone(),
            }),
        };
        tx.batch_execute("BEGIN").await?;
        Ok(tx)
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`; after that the connection may go
    /// back to the pool.
    async fn finish(&self, statement: &str) -> Result<()> {
        self.client().batch_execute(statement).await?;
        self.inner.finished.store(true, Ordering::Release);
        Ok(())
    }

    /// The transaction of the delivery this task is handling, if an [`InboxLayer`] runs it.
    pub fn current() -> Option<InboxTx> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// The client, in the delivery's transaction.
    pub fn client(&self) -> &Client {
        match &self.inner.client {
            Some(object) => object,
            None => unreachable!("the client is taken only when the last handle drops"),
        }
    }

    /// Writes `message` for `topic` into the outbox in this transaction (through the layer's
    /// [`Outbox`]): it is sent if, and once, the delivery's transaction commits.
    pub async fn publish(&self, topic: &str, message: &Message) -> Result<i64> {
        self.inner.outbox.publish(self.client(), topic, message).await
    }
}

impl Deref for InboxTx {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client()
    }
}

impl<S> FromIncoming<S> for InboxTx {
    fn from_incoming(incoming: &Incoming, _: &S) -> std::result::Result<Self, Outcome> {
        InboxTx::current().ok_or_else(|| {
            tracing::error!(
                id = %incoming.info().id(),
                event_type = incoming.message().event_type(),
                "a handler takes an InboxTx but no InboxLayer wraps it; the delivery is nacked"
            );
            Outcome::nack_after(Duration::from_secs(1))
        })
    }
}

/// Deletes the inbox records older than `older_than` and returns how many. A message
/// redelivered after its record is gone is handled again: keep records longer than a message
/// can take to come back (the subscription's reclaim and retry horizon, a relay's downtime).
pub async fn purge_inbox<C>(client: &C, older_than: Duration) -> Result<u64>
where
    C: GenericClient + Sync,
{
    let secs = older_than.as_secs_f64();
    Ok(client
        .execute_typed(
            "DELETE FROM streamwise_inbox WHERE handled_at < now() - make_interval(secs => $1)",
            &[(&secs, Type::FLOAT8)],
        )
        .await?)
}

/// The inbox records of `consumer` for `uuid` (0 or 1): whether the message was handled.
pub async fn was_handled<C>(client: &C, consumer: &str, uuid: streamwise::Uuid) -> Result<bool>
where
    C: GenericClient + Sync,
{
    let row = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM streamwise_inbox WHERE consumer = $1 AND message_uuid = $2)",
            &[(&consumer, Type::TEXT), (&uuid, Type::UUID)],
        )
        .await?;
    Ok(row.try_get(0)?)
}
