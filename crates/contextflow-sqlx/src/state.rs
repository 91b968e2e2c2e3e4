//! The value bound in the context while a transaction runs, and the guards that end it.
//!
//! One top-level transaction owns one [`Shared`]: its [`Tracked`] connection behind an async
//! mutex, plus the rollback that dropped savepoints still owe the connection. Each nesting
//! level (the transaction itself, then one per savepoint) is a [`Level`] bound in the
//! context; its `busy` mutex is what keeps a level's queries out of a savepoint opened
//! beneath it. Nothing here knows about [`Conn`](crate::Conn): it hands out [`TxGuard`]s.

use std::{
    collections::HashMap,
    future::Future,
    panic::Location,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex as StdMutex, MutexGuard as StdMutexGuard, PoisonError,
    },
};

use sqlx::{Database, Executor};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::{
    dialect::{self, Dialect},
    error::{ClosedReason, ConnectionBusy, TransactionClosed},
    tracked::{CommitError, Tracked},
};

/// Work to run after the top-level transaction commits.
pub(crate) type Hook = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The connection of one top-level transaction, shared by all its levels.
pub(crate) struct Shared<DB: Database> {
    slot: Arc<Mutex<Slot<DB>>>,
    /// The outermost savepoint whose future was dropped before it ended, if any, with the
    /// `errored` flag from when it was opened: rolled back before anything else uses the
    /// connection. A std mutex, because `Drop` records it and cannot await. Only the outermost
    /// matters: dropped savepoints that pile up between two uses of the connection are nested
    /// in one another (siblings never coexist, see `Level::busy`), and rolling back to the
    /// outermost one undoes the others too.
    pending: StdMutex<Option<(u64, bool)>>,
    next_savepoint: AtomicU64,
    /// A guard on the connection that sits in user code (a `Conn`, a stream between two rows),
    /// and which task holds it: a query of that same task would wait for it forever.
    parked: StdMutex<Option<Parked>>,
    /// The savepoints open now (their guards alive), by number, with the task that opened each
    /// and the depth of its level:
    /// the top-level block's end waits for them, except for one of its own task, which would
    /// wait for itself forever.
    savepoints: StdMutex<Vec<OpenSavepoint>>,
    /// The tenant the transaction was opened for (tenant pools only).
    tenant: Option<Box<str>>,
}

/// What the async mutex guards.
pub(crate) struct Slot<DB: Database> {
    /// `None` once the top-level transaction has ended (committed, rolled back or dropped).
    tracked: Option<Tracked<DB>>,
    /// Set when the transaction may only be rolled back.
    poisoned: Option<ClosedReason>,
    /// A statement failed since the transaction was last known healthy (PostgreSQL aborts the
    /// transaction then); a savepoint's rollback restores it.
    errored: bool,
    /// User code had the raw connection: anything may have been run on it.
    raw: bool,
    /// A statement failed on SQLite with an error that may have ended the whole transaction
    /// (`INSERT OR ROLLBACK`, a `UNIQUE ON CONFLICT ROLLBACK` column, a trigger's
    /// `RAISE(ROLLBACK, ...)`, an interrupt): its error code does not say. The next use asks
    /// the connection first, so that later statements do not run, and commit one by one,
    /// outside the transaction.
    unverified: bool,
}

/// A savepoint open now, in [`Shared::savepoints`].
struct OpenSavepoint {
    number: u64,
    /// The task that opened it.
    owner: Owner,
    /// The depth of its level.
    depth: usize,
    /// Its level's `ended` flag.
    ended: Arc<AtomicBool>,
    /// Set when an enclosing savepoint was rolled back, which undid this one on the server
    /// too: its guard then issues nothing more for it.
    gone: Arc<AtomicBool>,
}

/// A guard parked in user code, and where it came from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parked {
    owner: Owner,
    at: &'static Location<'static>,
}

/// Who runs the current code: a tokio task, or a thread's `block_on` future.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

/// One nesting level: what a `TxPool`'s context variable holds.
pub(crate) struct Level<DB: Database> {
    pub(crate) shared: Arc<Shared<DB>>,
    /// Held by each query of this level while it runs, and by a savepoint opened beneath this
    /// level for the savepoint's whole life.
    busy: Arc<Mutex<()>>,
    /// 1 for the top-level transaction, 2 for a savepoint inside it, and so on.
    pub(crate) depth: usize,
    /// After-commit hooks registered at this level; a savepoint's move to its parent when it
    /// is released, and are dropped when it is rolled back.
    hooks: StdMutex<Hooks>,
    /// A block joined to this level failed: it may only be rolled back.
    rollback_only: AtomicBool,
    /// Set when this level's savepoint ends (released, rolled back, or its block dropped): a
    /// query made afterwards through this level (a task or snapshot that outlived the nested
    /// block) gets [`TransactionClosed`](crate::TransactionClosed) instead of running, unseen,
    /// in the enclosing transaction. Never set on the top level, which ends with its slot.
    ended: Arc<AtomicBool>,
    /// The blocks joined to this level (`Required`, `Mandatory`) that are running, by the task
    /// that runs each: the level's end (commit, release) waits for those of other tasks, so
    /// that a joined block is never half committed.
    joins: StdMutex<Vec<Owner>>,
    /// Notified when a joined block ends.
    joins_done: tokio::sync::Notify,
}

/// A level's after-commit hooks, and whether it still takes new ones.
struct Hooks {
    list: Vec<Hook>,
    /// False once the level's end has begun (its joined blocks have ended and it goes on to
    /// commit or release) or its hooks were taken: a hook registered then belongs to work
    /// that can no longer reach the commit (its statements get `TransactionClosed`).
    accepting: bool,
}

/// A block joined to a level, running ([`Level::joined`]).
pub(crate) struct JoinGuard<'a, DB: Database> {
    level: &'a Level<DB>,
    owner: Owner,
}

/// Exclusive use of the transaction's connection, for one query or a `Conn`.
pub(crate) struct TxGuard<DB: Database> {
    slot: OwnedMutexGuard<Slot<DB>>,
    /// The level's `busy` lock; declared after `slot`, so released after it.
    _busy: OwnedMutexGuard<()>,
    shared: Arc<Shared<DB>>,
    /// Set while a statement's future holds the guard and has seen nothing of the statement's
    /// result: dropped then (the caller gave up on it), its outcome is unknown, and the
    /// transaction is poisoned. Shared, so that a row stream, whose statement borrows the
    /// guard, can clear it at its first row.
    in_flight: Option<Arc<AtomicBool>>,
}

/// Records that a [`TxGuard`] sits in user code (a `Conn`, a stream between two rows), so that
/// a query of the same task fails instead of waiting for it. Clears the record when dropped.
pub(crate) struct Parker<DB: Database> {
    shared: Arc<Shared<DB>>,
    parked: bool,
}

/// How many connections of a pool each task holds parked (in `Conn`s, or in transactions
/// suspended by `REQUIRES_NEW`): a task that holds all of them and asks for another would
/// wait forever.
#[derive(Debug, Default)]
pub(crate) struct PoolParking {
    by_owner: StdMutex<HashMap<Owner, usize>>,
}

/// One connection counted in [`PoolParking`] until dropped.
#[derive(Debug)]
pub(crate) struct ParkTicket {
    parking: Arc<PoolParking>,
    owner: Owner,
}

/// What a failed statement means for the transaction it ran in, taken from the error before
/// the error goes to the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Failure {
    /// The database rolled the whole transaction back (a MySQL deadlock).
    pub(crate) rolled_back_by_server: bool,
    /// The server answered with an error (as opposed to a broken connection).
    pub(crate) from_server: bool,
}

/// Ends the top-level transaction if its future is dropped before it finished.
pub(crate) struct RootGuard<DB: Database> {
    shared: Option<Arc<Shared<DB>>>,
}

/// Rolls a savepoint back if its future is dropped before it finished.
pub(crate) struct SavepointGuard<DB: Database> {
    shared: Arc<Shared<DB>>,
    /// The savepoint's number; `None` once released or rolled back.
    number: Option<u64>,
    /// The savepoint's number, for `Shared::savepoints`.
    id: u64,
    /// The depth of its level.
    depth: usize,
    /// Set when an enclosing savepoint's rollback undid this one (see [`OpenSavepoint`]).
    gone: Arc<AtomicBool>,
    /// `Slot::errored` when the savepoint was opened.
    errored_before: bool,
    /// The level's `ended` flag, set as soon as the savepoint starts to end.
    ended: Arc<AtomicBool>,
    /// Keeps the parent level's queries out until the savepoint has ended. Declared last, so
    /// it is released after `Drop::drop` has recorded the rollback.
    _parent_busy: OwnedMutexGuard<()>,
}

/// The transaction taken out of [`Shared`] when the top-level block ends.
pub(crate) struct Taken<DB: Database> {
    tracked: Option<Tracked<DB>>,
    poisoned: Option<ClosedReason>,
    suspect: bool,
    pending: Option<(u64, bool)>,
}

// ===== impl Failure =====

impl Failure {
    pub(crate) fn of(dialect: Dialect, err: &sqlx::Error) -> Failure {
        Failure {
            rolled_back_by_server: dialect::rolled_back_by_server(dialect, err),
            from_server: matches!(err, sqlx::Error::Database(_)),
        }
    }
}

// ===== impl Owner =====

impl Owner {
    /// The current task, or, in a `block_on` future (no task), the current thread: a
    /// `block_on` future never leaves the thread that runs it.
    pub(crate) fn current() -> Owner {
        match tokio::task::try_id() {
            Some(id) => Owner::Task(id),
            None => Owner::Thread(std::thread::current().id()),
        }
    }
}

// ===== impl Shared =====

impl<DB: Database> Shared<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    pub(crate) fn new(tracked: Tracked<DB>, tenant: Option<Box<str>>) -> Self {
        Shared {
            slot: Arc::new(Mutex::new(Slot {
                tracked: Some(tracked),
                poisoned: None,
                errored: false,
                raw: false,
                unverified: false,
            })),
            pending: StdMutex::new(None),
            next_savepoint: AtomicU64::new(1),
            parked: StdMutex::new(None),
            savepoints: StdMutex::new(Vec::new()),
            tenant,
        }
    }

    /// Locks the connection and settles what dropped savepoints owe.
    async fn lock_slot(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<OwnedMutexGuard<Slot<DB>>, sqlx::Error> {
        let mut slot = self.lock_checked(&self.slot, called_at).await?;
        if let Some(reason) = slot.poisoned {
            return Err(TransactionClosed::error(reason));
        }
        if slot.tracked.is_none() {
            return Err(TransactionClosed::ended());
        }
        if slot.unverified {
            // Poisoned until the answer says otherwise: a probe that fails, or whose future is
            // dropped (its `BEGIN` may still run and open a new, empty transaction), leaves the
            // transaction to be rolled back, its connection to the clean-up.
            slot.poisoned = Some(ClosedReason::StatementDropped);
            let open = match slot.tracked.as_mut() {
                Some(tracked) => tracked.verify_open().await?,
                None => true,
            };
            slot.unverified = false;
            if !open {
                slot.poisoned = Some(ClosedReason::RolledBackByServer);
                return Err(TransactionClosed::error(ClosedReason::RolledBackByServer));
            }
            slot.poisoned = None;
        }
        if let Some((number, errored_before)) = self.take_pending() {
            slot.rollback_to(number, errored_before).await?;
        }
        Ok(slot)
    }

    /// Takes the transaction out at the end of the top-level block; later users get
    /// [`TransactionClosed`].
    ///
    /// # Errors
    /// [`ConnectionBusy`] when a `Conn` of this task escaped the block and still holds the
    /// connection: nothing is committed, and the transaction is rolled back when it is dropped.
    pub(crate) async fn take(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<Taken<DB>, sqlx::Error> {
        let mut slot = self.lock_checked(&self.slot, called_at).await?;
        Ok(Taken {
            tracked: slot.tracked.take(),
            poisoned: slot.poisoned,
            suspect: slot.errored || slot.raw,
            pending: self.take_pending(),
        })
    }

    /// Locks `mutex`, unless it is held by a guard parked in the current task's own code:
    /// waiting for it would wait forever.
    async fn lock_checked<T>(
        &self,
        mutex: &Arc<Mutex<T>>,
        called_at: &'static Location<'static>,
    ) -> Result<OwnedMutexGuard<T>, sqlx::Error> {
        if let Ok(guard) = mutex.clone().try_lock_owned() {
            return Ok(guard);
        }
        if let Some(parked) = *self.parked() {
            if parked.owner == Owner::current() {
                return Err(ConnectionBusy::in_transaction(Some(parked.at), called_at));
            }
        }
        Ok(mutex.clone().lock_owned().await)
    }
}

impl<DB: Database> Shared<DB> {
    /// The tenant the transaction was opened for.
    pub(crate) fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    fn parked(&self) -> StdMutexGuard<'_, Option<Parked>> {
        // Nothing panics while this std mutex is held, so poisoning carries no meaning.
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_pending(&self) -> Option<(u64, bool)> {
        // As above: no panic while held.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn push_pending(&self, number: u64, errored_before: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        // Savepoints are numbered in creation order, so an enclosing one has a smaller number.
        if pending.is_none_or(|(n, _)| number < n) {
            *pending = Some((number, errored_before));
        }
    }

    fn next_savepoint(&self) -> u64 {
        // Relaxed: the counter only has to hand out distinct, increasing numbers, and it is
        // only used with the connection's mutex held.
        self.next_savepoint.fetch_add(1, Ordering::Relaxed)
    }
}

// ===== impl Slot =====

impl<DB: Database> Slot<DB> {
    fn tracked(&mut self) -> &mut Tracked<DB> {
        match self.tracked.as_mut() {
            Some(tracked) => tracked,
            // Every path to a `Slot` goes through `Shared::lock_slot`, which refuses an ended
            // transaction, and holds the lock, so nobody can end it meanwhile; `Taken` owns the
            // connection after `Shared::take`.
            None => unreachable!("transaction slot used after the transaction ended"),
        }
    }

    fn tracked_ref(&self) -> &Tracked<DB> {
        match self.tracked.as_ref() {
            Some(tracked) => tracked,
            // As in `tracked`.
            None => unreachable!("transaction slot used after the transaction ended"),
        }
    }
}

impl<DB: Database> Slot<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Rolls back to savepoint `number` and releases it; poisons the transaction on failure.
    ///
    /// Cancellation-safe: the transaction counts as poisoned from before the first statement
    /// until both succeeded, so if this future is dropped in between (a timeout around the call
    /// that settles a dropped savepoint's rollback), the savepoint's work is never committed:
    /// the transaction is closed and rolled back as a whole.
    async fn rollback_to(&mut self, number: u64, errored_before: bool) -> Result<(), sqlx::Error> {
        let name = name(number);
        let poisoned_before = self.poisoned.replace(ClosedReason::SavepointRollbackFailed);
        let tracked = self.tracked();
        let mut result = tracked.exec(&format!("ROLLBACK TO SAVEPOINT {name}")).await;
        if result.is_ok() {
            result = tracked.exec(&format!("RELEASE SAVEPOINT {name}")).await;
        }
        match result {
            Ok(()) => {
                self.poisoned = poisoned_before;
                self.errored = errored_before;
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Records the outcome of a statement of ours run inside the transaction.
    fn note<T>(&mut self, dialect: Dialect, result: &Result<T, sqlx::Error>) {
        if let Err(err) = result {
            self.errored = true;
            if dialect::rolled_back_by_server(dialect, err) {
                self.poisoned = Some(ClosedReason::RolledBackByServer);
            } else if dialect == Dialect::Sqlite && matches!(err, sqlx::Error::Database(_)) {
                self.unverified = true;
            }
        }
    }
}

// ===== impl TxGuard =====

impl<DB: Database> TxGuard<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Records that a statement run on [`conn`](TxGuard::conn) failed.
    pub(crate) fn note_failure(&mut self, failure: Failure) {
        self.slot.errored = true;
        if failure.rolled_back_by_server {
            self.slot.poisoned = Some(ClosedReason::RolledBackByServer);
        } else if failure.from_server && self.dialect() == Dialect::Sqlite {
            self.slot.unverified = true;
        }
    }

    /// User code gets the raw connection: anything may be run on it, so the transaction is
    /// checked with the server before it commits.
    pub(crate) fn mark_raw(&mut self) {
        self.slot.raw = true;
    }

    /// The dialect of the connection.
    pub(crate) fn dialect(&self) -> Dialect {
        self.slot.tracked_ref().dialect()
    }
}

impl<DB: Database> TxGuard<DB> {
    /// A statement's future holds the guard from now on (see the field); the flag to clear
    /// once its result is known.
    pub(crate) fn arm(&mut self) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(true));
        self.in_flight = Some(flag.clone());
        flag
    }

    /// The statement's result is known (see [`arm`](TxGuard::arm)).
    pub(crate) fn disarm(&mut self) {
        self.in_flight = None;
    }

    /// The transaction's connection.
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        self.slot.tracked().raw()
    }

    /// The transaction's connection, shared.
    pub(crate) fn conn_ref(&self) -> &DB::Connection {
        self.slot.tracked_ref().raw_ref()
    }

    /// A [`Parker`] for this guard's transaction.
    pub(crate) fn parker(&self) -> Parker<DB> {
        Parker {
            shared: self.shared.clone(),
            parked: false,
        }
    }
}

impl<DB: Database> Drop for TxGuard<DB> {
    fn drop(&mut self) {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
        {
            // The caller gave up on a statement that may have run (a timeout around an
            // INSERT, say): committing would keep a write the caller believes absent, and a
            // retry would make it twice.
            self.slot
                .poisoned
                .get_or_insert(ClosedReason::StatementDropped);
        }
    }
}

// ===== impl Parker =====

impl<DB: Database> Parker<DB> {
    /// The guard now sits in the current task's code.
    pub(crate) fn park(&mut self, at: &'static Location<'static>) {
        *self.shared.parked() = Some(Parked {
            owner: Owner::current(),
            at,
        });
        self.parked = true;
    }

    /// The guard is back in contextflow-sqlx's hands (a stream being polled).
    pub(crate) fn unpark(&mut self) {
        if self.parked {
            *self.shared.parked() = None;
            self.parked = false;
        }
    }
}

impl<DB: Database> Drop for Parker<DB> {
    fn drop(&mut self) {
        self.unpark();
    }
}

// ===== impl PoolParking =====

impl PoolParking {
    /// How many connections `owner` holds parked.
    pub(crate) fn count(&self, owner: Owner) -> usize {
        self.by_owner().get(&owner).copied().unwrap_or(0)
    }

    /// Counts one more connection parked by the current task, until the ticket is dropped.
    pub(crate) fn ticket(self: &Arc<Self>) -> ParkTicket {
        let owner = Owner::current();
        *self.by_owner().entry(owner).or_insert(0) += 1;
        ParkTicket {
            parking: self.clone(),
            owner,
        }
    }

    fn by_owner(&self) -> StdMutexGuard<'_, HashMap<Owner, usize>> {
        // Only map operations run while it is held: no panic, no poisoning.
        self.by_owner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ParkTicket {
    fn drop(&mut self) {
        let mut by_owner = self.parking.by_owner();
        if let Some(count) = by_owner.get_mut(&self.owner) {
            *count -= 1;
            if *count == 0 {
                by_owner.remove(&self.owner);
            }
        }
    }
}

// ===== impl Taken =====

impl<DB: Database> Taken<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Commits, after settling what dropped savepoints owe; rolls back instead if anything
    /// went wrong on the way.
    pub(crate) async fn commit(mut self) -> Result<(), CommitError> {
        let Some(mut tracked) = self.tracked.take() else {
            return Err(CommitError::Closed(ClosedReason::Ended));
        };
        if let Some(reason) = self.poisoned {
            if reason == ClosedReason::StatementDropped {
                // The driver may still owe the dropped statement's answer (sqlx-mysql panics
                // on a connection left so): the clean-up of an abandoned connection, which
                // rolls it back in the background and closes it if the driver fails, takes it.
                drop(tracked);
            } else {
                // The rollback's own error is less useful than the reason we roll back.
                let _ = tracked.rollback().await;
            }
            return Err(CommitError::Closed(reason));
        }
        if let Some((number, _)) = self.pending {
            let name = name(number);
            let mut result = tracked.exec(&format!("ROLLBACK TO SAVEPOINT {name}")).await;
            if result.is_ok() {
                result = tracked.exec(&format!("RELEASE SAVEPOINT {name}")).await;
            }
            if let Err(err) = result {
                let _ = tracked.rollback().await;
                return Err(CommitError::Refused(err));
            }
        }
        let result = tracked.commit(self.suspect).await;
        if matches!(result, Err(CommitError::Refused(_))) {
            let _ = tracked.rollback().await;
        }
        result
    }

    /// Rolls back. A failure here leaves the connection to its `Drop`, which cleans it up or
    /// closes it; the error is not reported over the one that caused the rollback.
    pub(crate) async fn rollback(mut self) {
        if let Some(mut tracked) = self.tracked.take() {
            if self.poisoned == Some(ClosedReason::StatementDropped) {
                // As in `commit`: left to the clean-up of an abandoned connection.
                drop(tracked);
            } else {
                let _ = tracked.rollback().await;
            }
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
            hooks: StdMutex::new(Hooks {
                list: Vec::new(),
                accepting: true,
            }),
            rollback_only: AtomicBool::new(false),
            ended: Arc::new(AtomicBool::new(false)),
            joins: StdMutex::new(Vec::new()),
            joins_done: tokio::sync::Notify::new(),
        }
    }

    /// The connection, for a query of this level: waits for this level's earlier queries and
    /// for any savepoint open beneath it.
    pub(crate) async fn lock(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<TxGuard<DB>, sqlx::Error> {
        let busy = self.shared.lock_checked(&self.busy, called_at).await?;
        let slot = self.shared.lock_slot(called_at).await?;
        self.check_open()?;
        Ok(TxGuard {
            slot,
            _busy: busy,
            shared: self.shared.clone(),
            in_flight: None,
        })
    }

    /// Waits until nothing runs at this level: no query, and no savepoint open beneath it (a
    /// savepoint holds its parent's `busy` lock for its whole life, also in another task that
    /// carries the block's context). The top-level block's end holds this while it takes the
    /// transaction out, so work of a savepoint that has not ended is never committed with it.
    pub(crate) async fn idle(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<OwnedMutexGuard<()>, sqlx::Error> {
        let current = Owner::current();
        loop {
            // What this very task holds would never end while it waits: an error instead. A
            // savepoint beneath this level opened by this task and still open (its future kept
            // past the block; savepoints form a stack: one open at a greater depth while this
            // level is active is beneath it, ancestors are not), or a `Conn` of this task
            // (checked by `lock_checked`, also before waiting for a joined block that may
            // itself wait for that `Conn`).
            if self
                .shared
                .savepoints
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|open| open.depth > self.depth && open.owner == current)
            {
                return Err(ConnectionBusy::in_transaction(None, called_at));
            }
            if let Some(parked) = *self.shared.parked() {
                if parked.owner == current {
                    return Err(ConnectionBusy::in_transaction(Some(parked.at), called_at));
                }
            }
            self.joins_ended(called_at).await?;
            let idle = self.shared.lock_checked(&self.busy, called_at).await?;
            // A block joined meanwhile (it started between the wait and the lock): wait for it
            // too, without holding the level.
            if self
                .joins
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                return Ok(idle);
            }
        }
    }

    /// Waits until no block joined to this level runs in another task. One of this very task
    /// still running (its future kept past the block) would never end: an error instead.
    async fn joins_ended(&self, called_at: &'static Location<'static>) -> Result<(), sqlx::Error> {
        let current = Owner::current();
        loop {
            let notified = self.joins_done.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before looking, so an end between the look and the wait is not lost.
            notified.as_mut().enable();
            {
                let joins = self.joins.lock().unwrap_or_else(PoisonError::into_inner);
                if joins.is_empty() {
                    return Ok(());
                }
                if joins.contains(&current) {
                    return Err(ConnectionBusy::in_transaction(None, called_at));
                }
            }
            notified.await;
        }
    }

    /// Opens a savepoint beneath this level: returns the new level and the guard that ends it.
    pub(crate) async fn savepoint(
        &self,
        called_at: &'static Location<'static>,
    ) -> Result<(Level<DB>, SavepointGuard<DB>), sqlx::Error> {
        let parent_busy = self.shared.lock_checked(&self.busy, called_at).await?;
        let number;
        let errored_before;
        {
            let mut slot = self.shared.lock_slot(called_at).await?;
            self.check_open()?;
            number = self.shared.next_savepoint();
            errored_before = slot.errored;
            // If this future is dropped mid-statement, a savepoint may exist with no guard:
            // harmless, since nothing runs inside it and the enclosing transaction's end
            // (commit or rollback) ends it too.
            let result = slot
                .tracked()
                .exec(&format!("SAVEPOINT {}", name(number)))
                .await;
            let dialect = slot.tracked().dialect();
            slot.note(dialect, &result);
            result?;
        }
        let ended = Arc::new(AtomicBool::new(false));
        let gone = Arc::new(AtomicBool::new(false));
        let level = Level {
            shared: self.shared.clone(),
            busy: Arc::new(Mutex::new(())),
            depth: self.depth + 1,
            hooks: StdMutex::new(Hooks {
                list: Vec::new(),
                accepting: true,
            }),
            rollback_only: AtomicBool::new(false),
            ended: ended.clone(),
            joins: StdMutex::new(Vec::new()),
            joins_done: tokio::sync::Notify::new(),
        };
        self.shared
            .savepoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(OpenSavepoint {
                number,
                owner: Owner::current(),
                depth: self.depth + 1,
                ended: ended.clone(),
                gone: gone.clone(),
            });
        let guard = SavepointGuard {
            shared: self.shared.clone(),
            number: Some(number),
            id: number,
            depth: self.depth + 1,
            errored_before,
            ended,
            gone,
            _parent_busy: parent_busy,
        };
        Ok((level, guard))
    }
}

impl<DB: Database> Level<DB> {
    /// Records a block joined to this level as running until the guard is dropped.
    pub(crate) fn joined(&self) -> JoinGuard<'_, DB> {
        let owner = Owner::current();
        self.joins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(owner);
        JoinGuard { level: self, owner }
    }

    /// Ends this level for every later statement (they get [`TransactionClosed`]).
    pub(crate) fn mark_ended(&self) {
        // Release: pairs with the Acquire load in `check_open`.
        self.ended.store(true, Ordering::Release);
    }

    /// `Err(TransactionClosed)` once this level's savepoint has ended. Checked with the
    /// connection's lock held, so a query either ran inside the savepoint, before it ended,
    /// or not at all.
    fn check_open(&self) -> Result<(), sqlx::Error> {
        // Acquire: pairs with the Release store of the guard that ends the level.
        if self.ended.load(Ordering::Acquire) {
            return Err(TransactionClosed::ended());
        }
        Ok(())
    }

    /// Registers work to run after the top-level commit; hands `hook` back when this level has
    /// ended or is ending (its hooks were sealed or taken, or its savepoint ended): nobody
    /// would ever run it, or it would run for work that cannot commit.
    pub(crate) fn push_hook(&self, hook: Hook) -> Result<(), Hook> {
        let mut hooks = self.hooks();
        // Acquire: pairs with the Release store of the guard that ends the level.
        if hooks.accepting && !self.ended.load(Ordering::Acquire) {
            hooks.list.push(hook);
            Ok(())
        } else {
            Err(hook)
        }
    }

    /// Whether [`push_hook`](Self::push_hook) would take a hook now.
    pub(crate) fn accepts_hooks(&self) -> bool {
        self.hooks().accepting && !self.ended.load(Ordering::Acquire)
    }

    /// Refuses every hook registered from now on, keeping those registered so far: called
    /// when the level's end begins (after `idle`), before its connection is taken or its
    /// savepoint released. A block joined from then on (a snapshot of the context used in
    /// another task) cannot run a statement in this level any more, so a hook it registered
    /// would announce work that never happened.
    pub(crate) fn seal_hooks(&self) {
        self.hooks().accepting = false;
    }

    /// Whether this level holds after-commit hooks.
    pub(crate) fn has_hooks(&self) -> bool {
        !self.hooks().list.is_empty()
    }

    /// Takes this level's after-commit hooks, for good: a hook registered afterwards is
    /// refused.
    pub(crate) fn take_hooks(&self) -> Vec<Hook> {
        let mut hooks = self.hooks();
        hooks.accepting = false;
        std::mem::take(&mut hooks.list)
    }

    /// Marks this level as only fit for rolling back (a joined block failed).
    pub(crate) fn set_rollback_only(&self) {
        // Relaxed: read by the code that ends this level, which runs after the joined block
        // on the same task (or after awaiting it), or, for a joined block of another task,
        // after `idle` saw it end (its `JoinGuard`, dropped after this store, releases the
        // `joins` lock that `idle` then takes), so the store happens-before the load.
        self.rollback_only.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_rollback_only(&self) -> bool {
        self.rollback_only.load(Ordering::Relaxed)
    }

    fn hooks(&self) -> StdMutexGuard<'_, Hooks> {
        // Only `Vec` operations run while it is held: no panic, no poisoning.
        self.hooks.lock().unwrap_or_else(PoisonError::into_inner)
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
        // Take the connection out now, so that it is cleaned up (or closed) at once by
        // `Tracked`'s drop. If a query still holds the lock (a task that kept this context
        // alive), take it out as soon as that query is done: waiting for the last reference
        // to `shared` instead would keep the transaction open, and its locks held, for as
        // long as some snapshot of the context lives.
        let tracked = match shared.slot.try_lock() {
            Ok(mut slot) => slot.tracked.take(),
            Err(_) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let slot = shared.slot.clone();
                    runtime.spawn(async move {
                        let tracked = slot.lock().await.tracked.take();
                        drop(tracked);
                    });
                }
                None
            }
        };
        drop(tracked);
    }
}

impl<DB: Database> Drop for JoinGuard<'_, DB> {
    fn drop(&mut self) {
        let mut joins = self
            .level
            .joins
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = joins.iter().position(|owner| *owner == self.owner) {
            joins.swap_remove(at);
        }
        drop(joins);
        self.level.joins_done.notify_waiters();
    }
}

// ===== impl SavepointGuard =====

impl<DB: Database> SavepointGuard<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Releases the savepoint (its work becomes part of the enclosing level). If that fails
    /// (PostgreSQL refuses when a statement inside failed), rolls it back and returns the error.
    /// Releases the savepoint, then calls `released` while the parent level is still held
    /// (its `busy` lock), so that what `released` hands the parent (the savepoint's hooks)
    /// is there before the parent's end can begin.
    pub(crate) async fn release(
        mut self,
        called_at: &'static Location<'static>,
        released: impl FnOnce(),
    ) -> Result<(), sqlx::Error> {
        let Some(number) = self.number else {
            return Ok(());
        };
        self.ended.store(true, Ordering::Release);
        if self.gone.load(Ordering::Acquire) {
            // An enclosing savepoint was rolled back, and this one with it: its work is gone.
            self.number = None;
            return Err(TransactionClosed::ended());
        }
        // On error (the transaction is poisoned, or a `Conn` escaped the block), `number` stays
        // set and `Drop` records the rollback. It also stays set until the savepoint is gone: if
        // this future is dropped with the `RELEASE` in flight, `Drop` records the rollback, as
        // for any dropped block (when the `RELEASE` did reach the server, that rollback fails
        // and poisons the transaction: its outcome is unknown, so it is rolled back whole).
        let mut slot = self.shared.lock_slot(called_at).await?;
        if self.gone.load(Ordering::Acquire) {
            // Undone meanwhile, by an enclosing savepoint's rollback that went first.
            self.number = None;
            return Err(TransactionClosed::ended());
        }
        let result = slot
            .tracked()
            .exec(&format!("RELEASE SAVEPOINT {}", name(number)))
            .await;
        if let Err(err) = result {
            self.end_beneath();
            slot.rollback_to(number, self.errored_before).await.ok();
            self.number = None;
            return Err(err);
        }
        self.number = None;
        released();
        // `self` (with the parent's `busy` lock) is dropped on return, after `released`.
        Ok(())
    }

    /// Rolls the savepoint back (undoing its work only) and releases it.
    pub(crate) async fn rollback(mut self, called_at: &'static Location<'static>) {
        let Some(number) = self.number else {
            return;
        };
        self.ended.store(true, Ordering::Release);
        if self.gone.load(Ordering::Acquire) {
            self.number = None;
            return;
        }
        self.end_beneath();
        // When `lock_slot` fails, `number` stays set and `Drop` records the rollback (or the
        // transaction may only be rolled back as a whole anyway); `rollback_to` poisons the
        // transaction when it fails.
        if let Ok(mut slot) = self.shared.lock_slot(called_at).await {
            self.number = None;
            // Undone meanwhile by an enclosing savepoint's rollback that went first: nothing
            // left to roll back.
            if !self.gone.load(Ordering::Acquire) {
                slot.rollback_to(number, self.errored_before).await.ok();
            }
        }
    }
}

impl<DB: Database> SavepointGuard<DB> {
    /// This savepoint is about to be rolled back: the savepoints open beneath it (in other
    /// tasks: a snapshot of its context outlived its block) are undone with it on the server,
    /// so their levels end now (a later statement through them gets `TransactionClosed`
    /// instead of running, unseen, in the enclosing transaction) and their guards issue
    /// nothing more. Savepoints form a stack: one deeper than this, open now, is inside it.
    fn end_beneath(&self) {
        for open in self
            .shared
            .savepoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|open| open.depth > self.depth)
        {
            // Release: pairs with the Acquire loads in `check_open` and the guard's methods.
            open.gone.store(true, Ordering::Release);
            open.ended.store(true, Ordering::Release);
        }
    }
}

impl<DB: Database> Drop for SavepointGuard<DB> {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Release);
        if self.gone.load(Ordering::Acquire) {
            // Undone with an enclosing savepoint: nothing to roll back.
            self.number = None;
        }
        if self.number.is_some() {
            self.end_beneath();
        }
        self.shared
            .savepoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|open| open.number != self.id);
        if let Some(number) = self.number.take() {
            // Cannot await here: record the rollback; it runs before the connection's next
            // use, and the parent level's queries wait for `_parent_busy`, released after this.
            self.shared.push_pending(number, self.errored_before);
        }
    }
}

/// The SQL name of savepoint `number`.
fn name(number: u64) -> String {
    format!("contextflow_sp_{number}")
}
