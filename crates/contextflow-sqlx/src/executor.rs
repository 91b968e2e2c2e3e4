//! sqlx's [`Executor`] for `&TxPool`: `query(..).fetch_*(&db)`, `query_as`, `query_scalar`, the
//! `query!` family's output and `fetch` streams run on the context's transaction (or the pool).

use std::{
    future::Future,
    panic::Location,
    pin::Pin,
    sync::{Arc, Mutex as StdMutex, PoisonError},
    task::{Context, Poll},
};

use futures_util::{
    future::BoxFuture,
    stream::{BoxStream, Stream, StreamExt as _},
};
use sqlx::{Database, Describe, Either, Execute, Executor};

use crate::{
    pool::{Target, TxPool},
    state::Failure,
};

type Item<DB> = Result<Either<<DB as Database>::QueryResult, <DB as Database>::Row>, sqlx::Error>;

/// Runs queries on the current context's transaction, or on the pool outside one, exactly as
/// [`TxPool::execute`] and the `fetch_*` methods do.
///
/// A row stream ([`fetch`](Executor::fetch), [`fetch_many`](Executor::fetch_many)) holds the
/// transaction's connection until it ends or is dropped: between two rows, another query of
/// the same task fails with [`ConnectionBusy`](crate::ConnectionBusy) instead of waiting for
/// it (collect the rows first, or finish the stream). Outside a transaction a stream holds a
/// pool connection (for a [`TenantPool`](crate::TenantPool), in a transaction of its own,
/// committed when the stream ends and rolled back if it is dropped early).
impl<'p, DB: Database> Executor<'p> for &'p TxPool<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    type Database = DB;

    #[track_caller]
    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Item<DB>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let called_at = Location::caller();
        Box::pin(Gen::new(move |out| rows(self, query, called_at, out)))
    }

    /// As [`TxPool::execute`] (not sqlx's default, which collects a row stream): given up on
    /// before its result, the statement poisons the transaction it runs in.
    #[track_caller]
    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<DB::QueryResult, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        Box::pin(TxPool::execute(self, query))
    }

    /// As [`TxPool::fetch_all`] (not sqlx's default, which collects a row stream): given up on
    /// before all its rows, the statement poisons the transaction it runs in.
    #[track_caller]
    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        Box::pin(TxPool::fetch_all(self, query))
    }

    #[track_caller]
    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let called_at = Location::caller();
        Box::pin(self.fetch_optional_at(query, called_at))
    }

    #[track_caller]
    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [DB::TypeInfo],
    ) -> BoxFuture<'e, Result<DB::Statement<'q>, sqlx::Error>>
    where
        'p: 'e,
    {
        let called_at = Location::caller();
        Box::pin(async move {
            let mut target = self.target(called_at).await?;
            let result = target.conn().prepare_with(sql, parameters).await;
            target.complete(result).await
        })
    }

    #[track_caller]
    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<DB>, sqlx::Error>>
    where
        'p: 'e,
    {
        let called_at = Location::caller();
        Box::pin(async move {
            let mut target = self.target(called_at).await?;
            let result = target.conn().describe(sql).await;
            target.complete(result).await
        })
    }
}

/// The body of a row stream.
async fn rows<'e, 'q: 'e, DB, E>(
    db: &'e TxPool<DB>,
    query: E,
    called_at: &'static Location<'static>,
    out: Yielder<Item<DB>>,
) where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    E: 'q + Execute<'q, DB>,
{
    let mut target = match db.target(called_at).await {
        Ok(target) => target,
        Err(err) => return out.send(Err(err)).await,
    };
    let dialect = target.dialect();
    // A tenant pool's statement outside a block runs in a transaction of its own, committed
    // once the statement has run: its rows are held back until then. Handed out first, a
    // caller that stops after the first row (`try_next`) would drop the stream before the
    // `COMMIT`, and the clean-up would roll back a write whose row the caller holds.
    let own_transaction = matches!(target, Target::Pool { wrapped: true, .. });
    let mut held = Vec::new();
    // Declared after `target`, so dropped (and the record cleared) before it.
    let mut parker = match &target {
        Target::Tx(guard) => Some(guard.parker()),
        Target::Pool { .. } => None,
    };
    // The statement's error, kept back until the failure is recorded: sqlx's own `execute`
    // and `fetch_all` stop at the first error and drop the stream, so an error handed out
    // first would never be recorded (and a transaction the server aborted could "commit").
    let mut failed = None;
    // Until the statement's first item, dropping the stream leaves its outcome unknown: the
    // transaction is poisoned then. After it, the caller knows the statement ran.
    let in_flight = target.arm();
    {
        let mut stream = target.conn().fetch_many(query);
        while let Some(item) = stream.next().await {
            if let Some(flag) = &in_flight {
                flag.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            if let Err(err) = item {
                failed = Some(err);
                break;
            }
            if own_transaction {
                held.push(item);
                continue;
            }
            // Between two rows the stream sits in the caller's code, holding the connection.
            if let Some(parker) = &mut parker {
                parker.park(called_at);
            }
            out.send(item).await;
            if let Some(parker) = &mut parker {
                parker.unpark();
            }
        }
    }
    drop(parker);
    let failure = failed.as_ref().map(|err| Failure::of(dialect, err));
    let ended = target.end(failure).await;
    if failed.is_none() && ended.is_ok() {
        // Committed (only a statement of its own holds rows back).
        for item in held {
            out.send(item).await;
        }
    }
    if let Some(err) = failed {
        out.send(Err(err)).await;
    }
    if let Err(err) = ended {
        out.send(Err(err)).await;
    }
}

/// A stream driven by a future that hands it items through a [`Yielder`]: an async generator
/// without `unsafe`. The item sits in a shared slot; after putting one there the future
/// returns `Pending` once, and the stream hands the item out.
struct Gen<'a, T> {
    fut: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    slot: Arc<StdMutex<Option<T>>>,
}

/// The generator's side of [`Gen`].
struct Yielder<T> {
    slot: Arc<StdMutex<Option<T>>>,
}

/// Returns `Pending` once, without asking to be woken: the stream returns the item just put
/// in the slot, and its consumer polls again when it wants the next one.
struct YieldOnce(bool);

impl<'a, T: Send + 'a> Gen<'a, T> {
    fn new<F, Fut>(body: F) -> Self
    where
        F: FnOnce(Yielder<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'a,
    {
        let slot = Arc::new(StdMutex::new(None));
        let fut = body(Yielder { slot: slot.clone() });
        Gen {
            fut: Some(Box::pin(fut)),
            slot,
        }
    }
}

impl<T> Stream for Gen<'_, T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Ready(None);
        };
        let done = fut.as_mut().poll(cx).is_ready();
        if done {
            self.fut = None;
        }
        // Nothing panics while the slot's lock is held, so poisoning carries no meaning.
        let item = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match item {
            Some(item) => Poll::Ready(Some(item)),
            None if done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl<T> Yielder<T> {
    fn send(&self, item: T) -> YieldOnce {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(item);
        YieldOnce(false)
    }
}

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}
