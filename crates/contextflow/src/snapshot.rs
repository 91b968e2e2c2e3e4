//! [`Snapshot`]: a captured, immutable context, and [`WithContext`], the future (or stream)
//! that runs inside one ([`FutureExt`], [`StreamExt`]).

use std::{
    fmt,
    future::Future,
    mem::ManuallyDrop,
    pin::Pin,
    ptr,
    task::{Context, Poll},
};

use crate::{
    carry, current, node,
    node::{Header, NodeRef, Site},
    AsyncLocal, EnterGuard,
};

/// An immutable copy of a context, to carry it where it does not flow by itself.
///
/// Capturing is O(1) (one reference count, whatever the number of variables set) and so is
/// cloning. A snapshot never changes after capture: scopes entered later, here or anywhere,
/// do not show up in it. It is `Send + Sync` and can be run on any thread.
///
/// ```
/// use contextflow::{AsyncLocal, Snapshot};
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// let snapshot = REQUEST_ID.sync_scope("req-7".into(), Snapshot::capture);
/// assert_eq!(REQUEST_ID.get(), None);
///
/// // Carry it to a thread pool, a callback, a queue consumer...
/// std::thread::spawn(move || {
///     snapshot.run(|| assert_eq!(REQUEST_ID.get().as_deref(), Some("req-7")));
/// })
/// .join()
/// .unwrap();
/// ```
#[derive(Clone, Default)]
pub struct Snapshot {
    frame: Option<NodeRef>,
}

/// A future or stream that runs inside a captured [`Snapshot`]; returned by
/// [`FutureExt::in_current_context`], [`FutureExt::with_snapshot`] and their `StreamExt` twins.
///
/// It adds one pointer to the wrapped future. It enters the snapshot on every poll and while
/// dropping the inner future, so destructors of an aborted task see its context.
///
/// ```
/// use contextflow::{AsyncLocal, FutureExt, Snapshot};
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let fut = ID.sync_scope(1, || async { ID.get() }.in_current_context());
/// assert_eq!(fut.await, Some(1));
/// assert_eq!(async { ID.get() }.with_snapshot(Snapshot::empty()).await, None);
/// # }
/// ```
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct WithContext<F> {
    snapshot: Snapshot,
    /// Structurally pinned; dropped in place by `Drop`, inside the snapshot.
    inner: ManuallyDrop<F>,
}

/// Extension methods that attach a context to any future.
///
/// ```
/// use contextflow::{AsyncLocal, FutureExt};
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // A plain `tokio::spawn` does not inherit; `in_current_context` carries the context over.
/// let handle = ID.sync_scope(5, || tokio::spawn(async { ID.get() }.in_current_context()));
/// assert_eq!(handle.await.unwrap(), Some(5));
/// # }
/// ```
pub trait FutureExt: Future + Sized {
    /// Captures the current context *now* and runs `self` inside it wherever it is polled.
    ///
    /// Like a spawn, this captures only the variables spawned children inherit (see
    /// [`Inherit`](crate::Inherit)); use [`with_snapshot`](FutureExt::with_snapshot) with
    /// [`Snapshot::capture`] to carry every variable.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, FutureExt};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let fut = ID.sync_scope(3, || async { ID.get() }.in_current_context());
    /// assert_eq!(fut.await, Some(3));
    /// # }
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn in_current_context(self) -> WithContext<Self> {
        WithContext::new(Snapshot::capture_inheritable(), self)
    }

    /// Runs `self` inside `snapshot` wherever it is polled.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, FutureExt, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let snapshot = ID.sync_scope(9, Snapshot::capture);
    /// assert_eq!(async { ID.get() }.with_snapshot(snapshot).await, Some(9));
    /// # }
    /// ```
    fn with_snapshot(self, snapshot: Snapshot) -> WithContext<Self> {
        WithContext::new(snapshot, self)
    }
}

impl<F: Future> FutureExt for F {}

/// Extension methods that attach a context to any stream (feature `futures`).
///
/// ```
/// use contextflow::{AsyncLocal, StreamExt as _};
/// use futures_util::{stream, StreamExt};
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let ids = ID.sync_scope(4, || stream::iter(0..2).map(|_| ID.get()).in_current_context());
/// assert_eq!(ids.collect::<Vec<_>>().await, vec![Some(4), Some(4)]);
/// # }
/// ```
#[cfg(feature = "futures")]
#[cfg_attr(docsrs, doc(cfg(feature = "futures")))]
pub trait StreamExt: futures_core::Stream + Sized {
    /// Captures the current (inheritable) context now and polls `self` inside it.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, StreamExt as _};
    /// use futures_util::{stream, StreamExt};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let s = ID.sync_scope(1, || stream::once(async { ID.get() }).in_current_context());
    /// assert_eq!(s.collect::<Vec<_>>().await, vec![Some(1)]);
    /// # }
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn in_current_context(self) -> WithContext<Self> {
        WithContext::new(Snapshot::capture_inheritable(), self)
    }

    /// Polls `self` inside `snapshot`.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot, StreamExt as _};
    /// use futures_util::{stream, StreamExt};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let snap = ID.sync_scope(2, Snapshot::capture);
    /// let s = stream::once(async { ID.get() }).with_snapshot(snap);
    /// assert_eq!(s.collect::<Vec<_>>().await, vec![Some(2)]);
    /// # }
    /// ```
    fn with_snapshot(self, snapshot: Snapshot) -> WithContext<Self> {
        WithContext::new(snapshot, self)
    }
}

#[cfg(feature = "futures")]
impl<S: futures_core::Stream> StreamExt for S {}

// ===== impl Snapshot =====

impl Snapshot {
    /// Captures the whole current context, every variable included (even those marked
    /// [`Inherit::Never`](crate::Inherit::Never)), and the values of the registered
    /// [carriers](crate::carry) (the current tracing span, the current
    /// `opentelemetry::Context`), as an inheriting spawn does: `spawn_with(Snapshot::capture(),
    /// fut)` keeps them.
    ///
    /// O(1) in the number of variables set. A binding shadowed by a later binding of the same
    /// variable is left out (it could never be read through the snapshot), so a snapshot never
    /// keeps a value alive that no lookup can reach.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// let snap = ID.sync_scope(1, Snapshot::capture);
    /// assert_eq!(snap.get(&ID), Some(1));
    /// ```
    #[inline]
    pub fn capture() -> Snapshot {
        if crate::flow::is_flow_suppressed() {
            // The suppression belongs to the code inside `suppress_flow`, not to the context
            // it captures: code run in this snapshot later spawns normally.
            return crate::flow::unsuppressed(Snapshot::capture_whole);
        }
        Snapshot::capture_whole()
    }

    fn capture_whole() -> Snapshot {
        Snapshot {
            frame: carry::capture_into(current::capture(false)),
        }
    }

    /// Captures what a spawned child inherits: the current context without the variables
    /// marked [`Inherit::Never`](crate::Inherit::Never). This is what
    /// [`contextflow::spawn`](crate::spawn) and [`FutureExt::in_current_context`](crate::FutureExt::in_current_context) use.
    ///
    /// O(1) unless a non-inherited variable is set; then it re-links the bindings made after
    /// it, sharing their values. Registered [carriers](crate::carry) (the current tracing span,
    /// the current `opentelemetry::Context`) are captured too. Inside
    /// [`suppress_flow`](crate::suppress_flow) it is empty.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// static TX: AsyncLocal<&str> = AsyncLocal::new().inherit(Inherit::Never);
    ///
    /// let snap = ID.sync_scope(1, || TX.sync_scope("tx", Snapshot::capture_inheritable));
    /// assert_eq!(snap.get(&ID), Some(1));
    /// assert_eq!(snap.get(&TX), None);
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn capture_inheritable() -> Snapshot {
        if let Some(empty) = crate::flow::suppressed_snapshot(Site::caller()) {
            return empty;
        }
        Snapshot {
            frame: carry::capture_into(current::capture(true)),
        }
    }

    /// A snapshot with nothing set: for work that must not inherit the request that started
    /// it (a cron job, a cache refresher shared by all requests).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// ID.sync_scope(1, || Snapshot::empty().run(|| assert!(!ID.is_set())));
    /// ```
    pub const fn empty() -> Snapshot {
        Snapshot { frame: None }
    }

    /// Whether nothing is set in this snapshot (a variable unset by
    /// [`unset`](crate::AsyncLocal::unset) is not set).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// static OTHER: AsyncLocal<u32> = AsyncLocal::new();
    /// assert!(Snapshot::capture().is_empty());
    /// assert!(!ID.sync_scope(1, Snapshot::capture).is_empty());
    /// assert!(ID.sync_unset(Snapshot::capture).is_empty());
    /// assert!(ID.sync_scope(1, || ID.sync_unset(Snapshot::capture)).is_empty());
    /// assert!(!OTHER.sync_scope(2, || ID.sync_unset(Snapshot::capture)).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.bindings(self.variables()).next().is_none()
    }

    /// The bindings a reader of this snapshot sees, from `from` outwards, innermost first:
    /// the first node of each variable, unless that node unsets it. Markers, carried values
    /// and (with diagnostics) the record of a lost context are no bindings.
    fn bindings(&self, from: *const Header) -> impl Iterator<Item = &Header> + '_ {
        let mut seen: Vec<usize> = Vec::new();
        let mut frame = from;
        std::iter::from_fn(move || {
            // SAFETY: `self` keeps the whole chain alive, and `from` is a node of it.
            while let Some(header) = unsafe { frame.as_ref() } {
                frame = header.parent_ptr();
                #[cfg(feature = "diagnostics")]
                let skip =
                    header.is_marker() || header.is_hidden() || crate::diagnostics::is_loss(header);
                #[cfg(not(feature = "diagnostics"))]
                let skip = header.is_marker() || header.is_hidden();
                if seen.contains(&header.key) {
                    continue;
                }
                if header.is_unset() {
                    seen.push(header.key);
                    continue;
                }
                if skip {
                    continue;
                }
                seen.push(header.key);
                return Some(header);
            }
            None
        })
    }

    /// A snapshot of `frame`, as it is.
    #[cfg(feature = "diagnostics")]
    pub(crate) fn from_frame(frame: Option<NodeRef>) -> Snapshot {
        Snapshot { frame }
    }

    /// Runs `f` inside this snapshot (replacing the current context, not adding to it), and
    /// restores the previous context when `f` returns or panics.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// let snap = ID.sync_scope(1, Snapshot::capture);
    /// assert_eq!(snap.run(|| ID.get()), Some(1));
    /// ```
    #[inline]
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        // `self` keeps the frame alive for the call.
        carry::run_in(self.as_ptr(), f)
    }

    /// Enters this snapshot until the returned guard is dropped (the guard form of
    /// [`run`](Snapshot::run); see [`EnterGuard`] for its rules).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// let snap = ID.sync_scope(1, Snapshot::capture);
    /// let guard = snap.enter();
    /// assert_eq!(ID.get(), Some(1));
    /// drop(guard);
    /// assert_eq!(ID.get(), None);
    /// ```
    #[track_caller]
    pub fn enter(&self) -> EnterGuard {
        // The guard enters the variables only: carried values need a closure to be entered
        // (use `run`), and must not end up under later bindings.
        let frame = self.variables();
        // SAFETY: `self` keeps the chain alive; a snapshot's chain holds counted parents only.
        let frame = (!frame.is_null()).then(|| unsafe { NodeRef::clone_raw(frame) });
        EnterGuard::new(NodeRef::new_marker(frame), "a Snapshot")
    }

    /// The value `var` has in this snapshot.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    /// let snap = USER.sync_scope("ada".into(), Snapshot::capture);
    /// assert_eq!(snap.get(&USER).as_deref(), Some("ada"));
    /// ```
    pub fn get<T: Clone + Send + Sync + 'static>(&self, var: &AsyncLocal<T>) -> Option<T> {
        self.with(var, |v| v.cloned())
    }

    /// Calls `f` with a reference to the value `var` has in this snapshot.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    /// let snap = USER.sync_scope("ada".into(), Snapshot::capture);
    /// assert_eq!(snap.with(&USER, |u| u.map(String::len)), Some(3));
    /// ```
    pub fn with<T: Send + Sync + 'static, R>(
        &self,
        var: &AsyncLocal<T>,
        f: impl FnOnce(Option<&T>) -> R,
    ) -> R {
        // SAFETY: `self` keeps the frame alive for the call; the reference does not escape `f`.
        let binding = unsafe { node::lookup(self.as_ptr(), var.key()) };
        match binding {
            // SAFETY: the key is `var`'s, so the node holds a `T`.
            Some(b) => f(Some(unsafe { b.value::<T>() })),
            None => var.with_default(f),
        }
    }

    /// Captures the current (inheritable) context now and returns a closure that runs `f`
    /// inside it: for callbacks handed to code that calls them later or elsewhere.
    ///
    /// The closure is `Send` when `f` is.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// let callback = ID.sync_scope(8, || Snapshot::bind(|| ID.get()));
    /// assert_eq!(std::thread::spawn(callback).join().unwrap(), Some(8));
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn bind<F: FnOnce() -> R, R>(f: F) -> impl FnOnce() -> R {
        let snapshot = Snapshot::capture_inheritable();
        move || snapshot.run(f)
    }

    /// Like [`bind`](Snapshot::bind) for a callback called many times with an argument (use a
    /// tuple for several).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// let on_item = ID.sync_scope(2, || Snapshot::bind_fn(|x: u32| x + ID.get().unwrap()));
    /// assert_eq!([1, 2].map(&on_item), [3, 4]);
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn bind_fn<A, R, F: Fn(A) -> R>(f: F) -> impl Fn(A) -> R {
        let snapshot = Snapshot::capture_inheritable();
        move |arg| snapshot.run(|| f(arg))
    }

    /// The innermost node, or null when empty.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *const Header {
        self.frame.as_ref().map_or(ptr::null(), NodeRef::as_ptr)
    }

    /// The innermost node of the variables, without the carried values on top; null if none.
    fn variables(&self) -> *const Header {
        // SAFETY: `self` keeps the chain alive.
        unsafe { node::skip_markers(carry::below_carried(self.as_ptr())) }
    }
}

/// Lists the variables set, innermost first, with their type (values are not printed: they need
/// not implement `Debug`, and context holds ids and tokens that do not belong in a log).
/// A variable rebound by an inner scope is listed once. Answers "why is my context missing?":
///
/// ```
/// use contextflow::{AsyncLocal, Snapshot};
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
/// static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
///
/// let dbg = REQUEST_ID.sync_scope("r".into(), || {
///     TENANT.sync_scope(1, || format!("{:?}", Snapshot::capture()))
/// });
/// assert_eq!(dbg, r#"Snapshot { tenant: u64, request_id: alloc::string::String }"#);
/// ```
impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct TypeName(&'static str);
        impl fmt::Debug for TypeName {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        let mut out = f.debug_struct("Snapshot");
        for header in self.bindings(self.as_ptr()) {
            let unnamed;
            let name = if header.name.is_empty() {
                unnamed = format!("<unnamed #{}>", header.key);
                unnamed.as_str()
            } else {
                header.name
            };
            out.field(name, &TypeName(header.type_name()));
        }
        out.finish()
    }
}

// ===== impl WithContext =====

impl<F> WithContext<F> {
    pub(crate) fn new(snapshot: Snapshot, inner: F) -> Self {
        WithContext {
            snapshot,
            inner: ManuallyDrop::new(inner),
        }
    }

    /// The snapshot this future runs in.
    ///
    /// ```
    /// use contextflow::{FutureExt, Snapshot};
    /// let fut = async {}.with_snapshot(Snapshot::empty());
    /// assert!(fut.snapshot().is_empty());
    /// ```
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    #[inline]
    fn project(self: Pin<&mut Self>) -> (&Snapshot, Pin<&mut F>) {
        // SAFETY: `inner` is structurally pinned (never moved out, dropped in place); the
        // snapshot is not pinned and is only read.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: as above.
        (&this.snapshot, unsafe {
            Pin::new_unchecked(&mut *this.inner)
        })
    }
}

impl<F: Future> Future for WithContext<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let (snapshot, inner) = self.project();
        // The snapshot is borrowed from `self`, which outlives the call.
        carry::run_in(snapshot.as_ptr(), || inner.poll(cx))
    }
}

#[cfg(feature = "futures")]
impl<S: futures_core::Stream> futures_core::Stream for WithContext<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let (snapshot, inner) = self.project();
        carry::run_in(snapshot.as_ptr(), || inner.poll_next(cx))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<F> Drop for WithContext<F> {
    fn drop(&mut self) {
        /// The inner future until it is dropped: a carrier that panics before calling the
        /// closure below (a subscriber's `on_enter`) would otherwise leak it, and with it
        /// every value and guard it owns.
        struct Pending<'a, F>(Option<&'a mut ManuallyDrop<F>>);
        impl<F> Drop for Pending<'_, F> {
            fn drop(&mut self) {
                if let Some(inner) = self.0.take() {
                    // SAFETY: the future is dropped in place once (taken out of the `Option`)
                    // and never used again: `WithContext` is being dropped.
                    unsafe { ManuallyDrop::drop(inner) }
                }
            }
        }
        let frame = self.snapshot.as_ptr();
        let mut pending = Pending(Some(&mut self.inner));
        carry::run_in(frame, || {
            if let Some(inner) = pending.0.take() {
                // SAFETY: dropped exactly once (taken out of the `Option` first), in place,
                // never used again; the snapshot is another field, dropped after this body
                // returns.
                unsafe { ManuallyDrop::drop(inner) }
            }
        })
    }
}

impl<F> fmt::Debug for WithContext<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithContext")
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}
