//! The value bound in the context while a transaction runs, and the guards that end it.
//!
//! One top-level transaction owns one [`Shared`]: the sqlx `Transaction` behind an async mutex,
//! plus the rollback that dropped savepoints still owe the connection. Each nesting level
//! (the transaction itself, then one per savepoint) is a [`Level`] bound in the context; its
//! `busy` mutex is what keeps a level's queries out of a savepoint opened beneath it.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex as StdMutex, PoisonError,
};

use sqlx::{Database, Executor, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::{conn::Conn, error::TransactionClosed};

/// The connection of one top-level transaction, shared by all its levels.
pub(crate) struct Shared<DB: Database> {
    pub(crate) conn: Arc<Mutex<TxConn<DB>>>,
    /// The outermost savepoint whose future was dropped before it ended, if any: rolled back
    /// before anything else uses the connection. A std mutex, because `Drop` records it and
    /// cannot await. Only the outermost matters: dropped savepoints that pile up between two
    /// uses of the connection are nested in one another (siblings never coexist, see
    /// `Level::busy`), and rolling back to the outermost one undoes the others too.
    pending: StdMutex<Option<u64>>,
    next_savepoint: AtomicU64,
}

/// What the async mutex guards.
pub(crate) struct TxConn<DB: Database> {
    /// `None` once the top-level transaction has ended (committed, rolled back or dropped).
    pub(crate) tx: Option<Transaction<'static, DB>>,
    /// Set when a savepoint could not be rolled back: the transaction's content is unknown, so
    /// it may only be rolled back.
    pub(crate) poisoned: bool,
}

/// One nesting level: what a `TxPool`'s context variable holds.
pub(crate) struct Level<DB: Database> {
    pub(crate) shared: Arc<Shared<DB>>,
    /// Held by each query of this level while it runs, and by a savepoint opened beneath this
    /// level for the savepoint's whole life.
    pub(crate) busy: Arc<Mutex<()>>,
    /// 1 for the top-level transaction, 2 for a savepoint inside it, and so on.
    pub(crate) depth: usize,
}

/// Rolls the top-level transaction back if its future is dropped before it finished.
pub(crate) struct RootGuard<DB: Database> {
    shared: Option<Arc<Shared<DB>>>,
}

/// Rolls a savepoint back if its future is dropped before it finished.
pub(crate) struct SavepointGuard<DB: Database> {
    shared: Arc<Shared<DB>>,
    /// The savepoint's number; `None` once released or rolled back.
    number: Option<u64>,
    /// Keeps the parent level's queries out until the savepoint has ended. Declared last, so
    /// it is released after `Drop::drop` has queued the rollback.
    _parent_busy: OwnedMutexGuard<()>,
}

// ===== impl Shared =====

impl<DB: Database> Shared<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    pub(crate) fn new(tx: Transaction<'static, DB>) -> Self {
        Shared {
            conn: Arc::new(Mutex::new(TxConn {
                tx: Some(tx),
                poisoned: false,
            })),
            pending: StdMutex::new(None),
            next_savepoint: AtomicU64::new(1),
        }
    }

    /// Locks the connection for one query (or a few) and settles what dropped savepoints owe.
    pub(crate) async fn lock(&self) -> Result<OwnedMutexGuard<TxConn<DB>>, sqlx::Error> {
        let mut guard = self.conn.clone().lock_owned().await;
        if guard.poisoned {
            return Err(TransactionClosed::poisoned());
        }
        let Some(tx) = guard.tx.as_mut() else {
            return Err(TransactionClosed::ended());
        };
        if let Some(number) = self.take_pending() {
            if let Err(err) = rollback_to(tx, number).await {
                guard.poisoned = true;
                return Err(err);
            }
        }
        Ok(guard)
    }

    /// Takes the transaction out at the end of the top-level block; later users get
    /// [`TransactionClosed`].
    pub(crate) async fn take(&self) -> Taken<DB> {
        let mut guard = self.conn.lock().await;
        Taken {
            tx: guard.tx.take(),
            poisoned: guard.poisoned,
            pending: self.take_pending(),
        }
    }
}

impl<DB: Database> Shared<DB> {
    fn take_pending(&self) -> Option<u64> {
        // Nothing can panic while the std mutex is held, so poisoning carries no meaning.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn push_pending(&self, number: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Savepoints are numbered in creation order, so an enclosing one has a smaller number.
        *pending = Some(pending.map_or(number, |n| n.min(number)));
    }

    fn next_savepoint(&self) -> u64 {
        // Relaxed: the counter only has to hand out distinct, increasing numbers, and it is
        // only used with the connection's mutex held.
        self.next_savepoint.fetch_add(1, Ordering::Relaxed)
    }
}

/// The transaction and its state, taken out of [`Shared`] when the top-level block ends.
pub(crate) struct Taken<DB: Database> {
    tx: Option<Transaction<'static, DB>>,
    poisoned: bool,
    pending: Option<u64>,
}

impl<DB: Database> Taken<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Commits, after settling what dropped savepoints owe; rolls back instead if anything
    /// went wrong on the way.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        let Some(mut tx) = self.tx else {
            return Err(TransactionClosed::ended());
        };
        if self.poisoned {
            // The rollback's own error is less useful than the reason we roll back.
            let _ = tx.rollback().await;
            return Err(TransactionClosed::poisoned());
        }
        if let Some(number) = self.pending {
            if let Err(err) = rollback_to(&mut tx, number).await {
                let _ = tx.rollback().await;
                return Err(err);
            }
        }
        if DB::NAME == "PostgreSQL" {
            // PostgreSQL silently turns the COMMIT of a transaction in which a statement failed
            // into a ROLLBACK, and sqlx cannot tell: a statement run now fails in exactly that
            // case, which turns a silent loss of the block's work into an error.
            if let Err(err) = exec(&mut tx, "SELECT 1").await {
                let _ = tx.rollback().await;
                return Err(err);
            }
        }
        tx.commit().await
    }

    /// Rolls back. A failure here means the connection is broken; the pool closes it when it
    /// comes back (sqlx pings a connection on release), so the error is not reported over the
    /// one that caused the rollback.
    pub(crate) async fn rollback(self) {
        if let Some(tx) = self.tx {
            let _ = tx.rollback().await;
        }
    }
}

// ===== impl Level =====

impl<DB: Database> Level<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    pub(crate) fn root(shared: Arc<Shared<DB>>) -> Self {
        Level {
            shared,
            busy: Arc::new(Mutex::new(())),
            depth: 1,
        }
    }

    /// A connection for a query of this level: waits for this level's earlier queries and for
    /// any savepoint open beneath it.
    pub(crate) async fn acquire(&self) -> Result<Conn<DB>, sqlx::Error> {
        let busy = self.busy.clone().lock_owned().await;
        let guard = self.shared.lock().await?;
        Conn::from_tx(guard, busy)
    }

    /// Opens a savepoint beneath this level: returns the new level and the guard that ends it.
    pub(crate) async fn savepoint(&self) -> Result<(Level<DB>, SavepointGuard<DB>), sqlx::Error> {
        let parent_busy = self.busy.clone().lock_owned().await;
        let number;
        {
            let mut guard = self.shared.lock().await?;
            number = self.shared.next_savepoint();
            let Some(tx) = guard.tx.as_mut() else {
                return Err(TransactionClosed::ended());
            };
            // If this future is dropped mid-statement, a savepoint may exist with no guard:
            // harmless, since nothing runs inside it and the enclosing transaction's end
            // (commit or rollback) ends it too.
            exec(tx, &format!("SAVEPOINT {}", name(number))).await?;
        }
        let level = Level {
            shared: self.shared.clone(),
            busy: Arc::new(Mutex::new(())),
            depth: self.depth + 1,
        };
        let guard = SavepointGuard {
            shared: self.shared.clone(),
            number: Some(number),
            _parent_busy: parent_busy,
        };
        Ok((level, guard))
    }
}

// ===== impl RootGuard =====

impl<DB: Database> RootGuard<DB> {
    pub(crate) fn new(shared: Arc<Shared<DB>>) -> Self {
        RootGuard {
            shared: Some(shared),
        }
    }

    /// The block has finished; the caller ends the transaction itself.
    pub(crate) fn disarm(&mut self) {
        self.shared = None;
    }
}

impl<DB: Database> Drop for RootGuard<DB> {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        // Dropping a sqlx `Transaction` queues a ROLLBACK that runs on the connection's next
        // use; a pooled connection is used (pinged) as soon as it is back in the pool. If a
        // query still holds the lock (a task that kept this context alive), the transaction is
        // dropped, and so rolled back, with the last reference to `shared` instead.
        let tx = match shared.conn.try_lock() {
            Ok(mut guard) => guard.tx.take(),
            Err(_) => None,
        };
        drop(tx);
    }
}

// ===== impl SavepointGuard =====

impl<DB: Database> SavepointGuard<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Releases the savepoint (its work becomes part of the enclosing level). If that fails
    /// (PostgreSQL refuses when a statement inside failed), rolls it back and returns the error.
    pub(crate) async fn release(mut self) -> Result<(), sqlx::Error> {
        let Some(number) = self.number else {
            return Ok(());
        };
        let mut guard = self.shared.lock().await?;
        let result = match guard.tx.as_mut() {
            Some(tx) => exec(tx, &format!("RELEASE SAVEPOINT {}", name(number))).await,
            None => Err(TransactionClosed::ended()),
        };
        if let Err(err) = result {
            if let Some(tx) = guard.tx.as_mut() {
                if rollback_to(tx, number).await.is_err() {
                    guard.poisoned = true;
                }
            }
            self.number = None;
            return Err(err);
        }
        self.number = None;
        Ok(())
    }

    /// Rolls the savepoint back (undoing its work only) and releases it.
    pub(crate) async fn rollback(mut self) {
        let Some(number) = self.number else {
            return;
        };
        // When `lock` fails the transaction has ended or may only be rolled back as a whole.
        if let Ok(mut guard) = self.shared.lock().await {
            if let Some(tx) = guard.tx.as_mut() {
                if rollback_to(tx, number).await.is_err() {
                    guard.poisoned = true;
                }
            }
        }
        self.number = None;
    }
}

impl<DB: Database> Drop for SavepointGuard<DB> {
    fn drop(&mut self) {
        if let Some(number) = self.number.take() {
            // Cannot await here: record the rollback; it runs before the connection's next
            // use, and the parent level's queries wait for `_parent_busy`, released after this.
            self.shared.push_pending(number);
        }
    }
}

/// The SQL name of savepoint `number`.
fn name(number: u64) -> String {
    format!("contextflow_sp_{number}")
}

/// Rolls back to savepoint `number` and releases it.
async fn rollback_to<DB: Database>(
    tx: &mut Transaction<'static, DB>,
    number: u64,
) -> Result<(), sqlx::Error>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let name = name(number);
    exec(tx, &format!("ROLLBACK TO SAVEPOINT {name}")).await?;
    exec(tx, &format!("RELEASE SAVEPOINT {name}")).await
}

/// Runs one statement of our own (no parameters) on the transaction's connection.
async fn exec<DB: Database>(tx: &mut Transaction<'static, DB>, sql: &str) -> Result<(), sqlx::Error>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    (&mut **tx).execute(sql).await.map(drop)
}
