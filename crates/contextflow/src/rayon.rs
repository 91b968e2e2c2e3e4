//! rayon in the caller's context (feature `rayon`): [`join`], [`scope`], [`spawn`],
//! [`install`] and parallel iterators whose closures see the caller's context on every worker.
//!
//! A rayon worker thread has no context of its own, and plain `rayon::join` or
//! `par_iter()` closures see whatever frame their worker thread has (none, normally). The
//! helpers here capture the caller's *inheritable* context (everything but the variables
//! marked [`Inherit::Never`](crate::Inherit::Never): a database transaction never crosses to
//! a worker) when they are called, and run each closure inside it, on whichever thread
//! rayon picks, restoring the worker's previous frame afterwards (also when the closure
//! panics). They share rayon's names, so switching is an import change.
//!
//! ```
//! use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal};
//! use rayon::prelude::*;
//!
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//!
//! let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
//! let ids: Vec<Option<String>> = REQUEST_ID.sync_scope("req-1".into(), || {
//!     contextflow::rayon::install(&pool, || {
//!         (0..1_000)
//!             .into_par_iter()
//!             .in_current_context() // right after the source: every closure below sees it
//!             .map(|_| REQUEST_ID.get())
//!             .collect()
//!     })
//! });
//! assert!(ids.iter().all(|id| id.as_deref() == Some("req-1")));
//! // Plain rayon: the worker sees no context.
//! let plain = REQUEST_ID.sync_scope("req-1".into(), || pool.install(|| REQUEST_ID.get()));
//! assert_eq!(plain, None);
//! ```
//!
//! A plain `pool.install(|| ..)` runs its closure on a worker *without* the caller's
//! context, so an adaptor inside it captures nothing: use [`install`] (or capture a
//! [`Snapshot`] outside and pass it to [`ParallelIteratorExt::with_snapshot`]).
//!
//! # Where the parallel-iterator adaptor goes
//!
//! [`ParallelIteratorExt::in_current_context`] runs everything *downstream* of it in the
//! captured context: put it right after the source (`par_iter()`, `into_par_iter()`,
//! `par_chunks(..)`...), before `map`, `filter`, `fold`, `for_each`, `reduce`. Closures
//! upstream of it (between the source and the adaptor) run without it.
//!
//! With an indexed adaptor downstream (`enumerate`, `zip`, `chunks`, `rev`...), rayon drives
//! the pipeline through producers: there only the items' closures run in the context, while
//! `fold`'s identity, `map_init`'s init and the reductions between leaves may not, and carried
//! values (a `tracing` span) are not entered. Put the adaptor *after* the indexed adaptors
//! (`.enumerate().in_current_context()`), where everything downstream runs in it.
//!
//! # Work stealing
//!
//! A worker that waits inside a closure (for a nested `join` or a nested parallel iterator)
//! may run other queued rayon jobs meanwhile. Jobs started through these helpers enter their
//! own context; a *plain* rayon job run that way sees the waiting closure's frame. Start all
//! work that reads the context through these helpers.

use rayon::iter::{
    plumbing::{Consumer, Folder, Producer, ProducerCallback, Reducer, UnindexedConsumer},
    IndexedParallelIterator, ParallelIterator,
};

use crate::{EnterGuard, Snapshot};

/// Runs `a` and `b`, potentially in parallel, each in the caller's inheritable context;
/// otherwise exactly [`rayon::join`].
///
/// # Panics
/// As [`rayon::join`]: a panic in either closure is propagated once both have finished.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let (a, b) = ID.sync_scope(7, || contextflow::rayon::join(|| ID.get(), || ID.get()));
/// assert_eq!((a, b), (Some(7), Some(7)));
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    let snapshot = Snapshot::capture_inheritable();
    let for_b = snapshot.clone();
    rayon::join(move || snapshot.run(a), move || for_b.run(b))
}

/// Runs `op` on the current rayon pool (as [`rayon::scope`]) in the caller's inheritable
/// context; every task spawned with [`Scope::spawn`] runs in the context current where it
/// was spawned.
///
/// # Panics
/// As [`rayon::scope`]: a panic in `op` or a spawned task is propagated once every task has
/// finished.
///
/// ```
/// use std::sync::Mutex;
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let seen = Mutex::new(Vec::new());
/// ID.sync_scope(1, || {
///     contextflow::rayon::scope(|s| {
///         s.spawn(|_| seen.lock().unwrap().push(ID.get()));
///         // A task spawned under another binding gets that one.
///         ID.sync_scope(2, || s.spawn(|_| seen.lock().unwrap().push(ID.get())));
///     })
/// });
/// let mut seen = seen.into_inner().unwrap();
/// seen.sort();
/// assert_eq!(seen, [Some(1), Some(2)]);
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn scope<'scope, OP, R>(op: OP) -> R
where
    OP: for<'a> FnOnce(Scope<'a, 'scope>) -> R + Send,
    R: Send,
{
    let snapshot = Snapshot::capture_inheritable();
    rayon::scope(move |inner| snapshot.run(|| op(Scope { inner })))
}

/// Runs `op` on `pool` (as [`rayon::ThreadPool::install`]) in the caller's inheritable
/// context.
///
/// # Panics
/// As [`rayon::ThreadPool::install`]: a panic in `op` is propagated.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
/// assert_eq!(ID.sync_scope(3, || contextflow::rayon::install(&pool, || ID.get())), Some(3));
/// assert_eq!(ID.sync_scope(3, || pool.install(|| ID.get())), None, "plain install");
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn install<OP, R>(pool: &rayon::ThreadPool, op: OP) -> R
where
    OP: FnOnce() -> R + Send,
    R: Send,
{
    let snapshot = Snapshot::capture_inheritable();
    pool.install(move || snapshot.run(op))
}

/// Spawns `f` on the current rayon pool (as [`rayon::spawn`]) in the caller's inheritable
/// context.
///
/// # Panics
/// A panic in `f` goes to the pool's panic handler (rayon aborts the process by default).
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let (tx, rx) = std::sync::mpsc::channel();
/// ID.sync_scope(4, || contextflow::rayon::spawn(move || tx.send(ID.get()).unwrap()));
/// assert_eq!(rx.recv().unwrap(), Some(4));
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn spawn<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    let snapshot = Snapshot::capture_inheritable();
    rayon::spawn(move || snapshot.run(f))
}

/// The handle of [`scope`]: spawns tasks that run in the context current at the spawn.
/// `Copy`, so a task can capture it and spawn more.
///
/// ```
/// use contextflow::AsyncLocal;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let sum = AtomicU32::new(0);
/// ID.sync_scope(5, || {
///     contextflow::rayon::scope(|s| {
///         s.spawn(|s| {
///             // Nested: the inner task inherits the outer task's context.
///             s.spawn(|_| { sum.fetch_add(ID.get().unwrap(), Ordering::Relaxed); });
///         });
///     })
/// });
/// assert_eq!(sum.into_inner(), 5);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a, 'scope> {
    inner: &'a rayon::Scope<'scope>,
}

impl<'scope> Scope<'_, 'scope> {
    /// Spawns `body` into the scope (as [`rayon::Scope::spawn`]), in the current inheritable
    /// context.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let mut seen = None;
    /// ID.sync_scope(6, || contextflow::rayon::scope(|s| s.spawn(|_| seen = ID.get())));
    /// assert_eq!(seen, Some(6));
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn spawn<BODY>(&self, body: BODY)
    where
        BODY: for<'b> FnOnce(Scope<'b, 'scope>) + Send + 'scope,
    {
        let snapshot = Snapshot::capture_inheritable();
        self.inner
            .spawn(move |inner| snapshot.run(|| body(Scope { inner })))
    }

    /// The rayon scope underneath, for its other methods (tasks spawned through it directly
    /// do not carry the context).
    ///
    /// ```
    /// contextflow::rayon::scope(|s| {
    ///     let _rayon: &rayon::Scope<'_> = s.as_rayon();
    /// });
    /// ```
    pub fn as_rayon(&self) -> &rayon::Scope<'scope> {
        self.inner
    }
}

/// Runs a parallel iterator's downstream closures in a captured context, on every worker;
/// implemented for every [`ParallelIterator`].
///
/// ```
/// use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal, Snapshot};
/// use rayon::prelude::*;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let snapshot = ID.sync_scope(9, Snapshot::capture);
/// let sum: u32 = (0..100u32)
///     .into_par_iter()
///     .with_snapshot(snapshot)
///     .map(|_| ID.get().unwrap())
///     .sum();
/// assert_eq!(sum, 900);
/// ```
pub trait ParallelIteratorExt: ParallelIterator {
    /// Captures the current inheritable context (all but [`Inherit::Never`] variables) and
    /// runs every closure downstream of this adaptor in it, on whichever worker. Put it right
    /// after the source; see the [module docs](self#where-the-parallel-iterator-adaptor-goes).
    ///
    /// [`Inherit::Never`]: crate::Inherit::Never
    ///
    /// ```
    /// use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal};
    /// use rayon::prelude::*;
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let v: Vec<u32> = ID.sync_scope(2, || {
    ///     vec![1, 2, 3].par_iter().in_current_context().map(|x| x * ID.get().unwrap()).collect()
    /// });
    /// assert_eq!(v, [2, 4, 6]);
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn in_current_context(self) -> InContext<Self> {
        self.with_snapshot(Snapshot::capture_inheritable())
    }

    /// Runs every closure downstream of this adaptor in `snapshot`, on whichever worker.
    ///
    /// ```
    /// use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal, Snapshot};
    /// use rayon::prelude::*;
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let none = ID.sync_scope(1, || {
    ///     (0..10).into_par_iter().with_snapshot(Snapshot::empty()).all(|_| ID.get().is_none())
    /// });
    /// assert!(none);
    /// ```
    fn with_snapshot(self, snapshot: Snapshot) -> InContext<Self> {
        InContext {
            base: self,
            snapshot,
        }
    }
}

impl<I: ParallelIterator> ParallelIteratorExt for I {}

/// The parallel iterator of [`ParallelIteratorExt`]: the items of `I`, with everything
/// downstream run in a captured context. Indexed when `I` is.
///
/// ```
/// use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal};
/// use rayon::prelude::*;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let pairs: Vec<(usize, Option<u32>)> = ID.sync_scope(8, || {
///     vec!['a', 'b'].into_par_iter().in_current_context().enumerate().map(|(i, _)| (i, ID.get())).collect()
/// });
/// assert_eq!(pairs, [(0, Some(8)), (1, Some(8))]);
/// ```
#[derive(Clone, Debug)]
#[must_use = "iterator adaptors are lazy and do nothing unless consumed"]
pub struct InContext<I> {
    base: I,
    snapshot: Snapshot,
}

// ===== impl InContext =====

impl<I: ParallelIterator> ParallelIterator for InContext<I> {
    type Item = I::Item;

    fn drive_unindexed<C>(self, consumer: C) -> C::Result
    where
        C: UnindexedConsumer<Self::Item>,
    {
        self.base.drive_unindexed(InContextConsumer {
            base: consumer,
            snapshot: self.snapshot,
        })
    }

    fn opt_len(&self) -> Option<usize> {
        self.base.opt_len()
    }
}

impl<I: IndexedParallelIterator> IndexedParallelIterator for InContext<I> {
    fn drive<C>(self, consumer: C) -> C::Result
    where
        C: Consumer<Self::Item>,
    {
        self.base.drive(InContextConsumer {
            base: consumer,
            snapshot: self.snapshot,
        })
    }

    fn len(&self) -> usize {
        self.base.len()
    }

    fn with_producer<CB>(self, callback: CB) -> CB::Output
    where
        CB: ProducerCallback<Self::Item>,
    {
        self.base.with_producer(InContextCallback {
            base: callback,
            snapshot: self.snapshot,
        })
    }
}

// ===== the consumer side: downstream folders and reducers run in the snapshot =====

struct InContextConsumer<C> {
    base: C,
    snapshot: Snapshot,
}

impl<C> InContextConsumer<C> {
    fn wrap<T>(&self, base: T) -> InContextConsumer<T> {
        InContextConsumer {
            base,
            snapshot: self.snapshot.clone(),
        }
    }
}

impl<T, C: Consumer<T>> Consumer<T> for InContextConsumer<C> {
    type Folder = InContextConsumer<C::Folder>;
    type Reducer = InContextConsumer<C::Reducer>;
    type Result = C::Result;

    fn split_at(self, index: usize) -> (Self, Self, Self::Reducer) {
        let InContextConsumer { base, snapshot } = self;
        let (left, right, reducer) = snapshot.run(|| base.split_at(index));
        let wrap = |base| InContextConsumer {
            base,
            snapshot: snapshot.clone(),
        };
        (
            wrap(left),
            wrap(right),
            InContextConsumer {
                base: reducer,
                snapshot,
            },
        )
    }

    fn into_folder(self) -> Self::Folder {
        // Downstream folders may run user code when made (a `fold`'s identity).
        let folder = self.snapshot.run(|| self.base.into_folder());
        InContextConsumer {
            base: folder,
            snapshot: self.snapshot,
        }
    }

    fn full(&self) -> bool {
        self.base.full()
    }
}

impl<T, C: UnindexedConsumer<T>> UnindexedConsumer<T> for InContextConsumer<C> {
    fn split_off_left(&self) -> Self {
        self.wrap(self.snapshot.run(|| self.base.split_off_left()))
    }

    fn to_reducer(&self) -> Self::Reducer {
        self.wrap(self.base.to_reducer())
    }
}

impl<T, F: Folder<T>> Folder<T> for InContextConsumer<F> {
    type Result = F::Result;

    fn consume(self, item: T) -> Self {
        let base = self.snapshot.run(|| self.base.consume(item));
        InContextConsumer {
            base,
            snapshot: self.snapshot,
        }
    }

    fn consume_iter<It>(self, iter: It) -> Self
    where
        It: IntoIterator<Item = T>,
    {
        // One frame switch for a whole run of items, not one per item.
        let base = self.snapshot.run(|| self.base.consume_iter(iter));
        InContextConsumer {
            base,
            snapshot: self.snapshot,
        }
    }

    fn complete(self) -> F::Result {
        self.snapshot.run(|| self.base.complete())
    }

    fn full(&self) -> bool {
        self.base.full()
    }
}

impl<T, R: Reducer<T>> Reducer<T> for InContextConsumer<R> {
    fn reduce(self, left: T, right: T) -> T {
        self.snapshot.run(|| self.base.reduce(left, right))
    }
}

// ===== the producer side (indexed adaptors downstream: `enumerate`, `zip`...) =====

struct InContextCallback<CB> {
    base: CB,
    snapshot: Snapshot,
}

impl<T, CB: ProducerCallback<T>> ProducerCallback<T> for InContextCallback<CB> {
    type Output = CB::Output;

    fn callback<P>(self, base: P) -> CB::Output
    where
        P: Producer<Item = T>,
    {
        self.base.callback(InContextProducer {
            base,
            snapshot: self.snapshot,
        })
    }
}

struct InContextProducer<P> {
    base: P,
    snapshot: Snapshot,
}

impl<P: Producer> Producer for InContextProducer<P> {
    type Item = P::Item;
    type IntoIter = InContextIter<P::IntoIter>;

    fn into_iter(self) -> Self::IntoIter {
        // A downstream producer (`enumerate`, `zip`) iterates this one and feeds the items to
        // its folder, outside any call of ours: the snapshot stays entered for as long as the
        // iterator lives, which is one leaf of the split on one worker.
        let guard = self.snapshot.enter();
        InContextIter {
            iter: self.base.into_iter(),
            _guard: guard,
        }
    }

    fn min_len(&self) -> usize {
        self.base.min_len()
    }

    fn max_len(&self) -> usize {
        self.base.max_len()
    }

    fn split_at(self, index: usize) -> (Self, Self) {
        let (left, right) = self.base.split_at(index);
        let snapshot = self.snapshot;
        (
            InContextProducer {
                base: left,
                snapshot: snapshot.clone(),
            },
            InContextProducer {
                base: right,
                snapshot,
            },
        )
    }

    fn fold_with<F: Folder<Self::Item>>(self, folder: F) -> F {
        self.snapshot.run(|| self.base.fold_with(folder))
    }
}

/// A leaf's iterator, with the snapshot entered until it is dropped. Field order matters: the
/// iterator (and what it owns) drops first, still inside the snapshot.
struct InContextIter<It> {
    iter: It,
    _guard: EnterGuard,
}

impl<It: Iterator> Iterator for InContextIter<It> {
    type Item = It::Item;

    fn next(&mut self) -> Option<It::Item> {
        self.iter.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl<It: DoubleEndedIterator> DoubleEndedIterator for InContextIter<It> {
    fn next_back(&mut self) -> Option<It::Item> {
        self.iter.next_back()
    }
}

impl<It: ExactSizeIterator> ExactSizeIterator for InContextIter<It> {}
