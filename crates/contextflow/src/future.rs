//! The futures (and streams) that carry a frame: [`Scope`] and [`WithContext`].

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    mem::ManuallyDrop,
    pin::Pin,
    task::{Context, Poll},
};

use crate::{
    carry, current,
    node::{self, Header, NodeRef},
    Inherit, Snapshot,
};

/// A future that runs with one variable bound; returned by
/// [`AsyncLocal::scope`](crate::AsyncLocal::scope).
///
/// On every poll, and while the inner future is dropped, the current frame is the poller's frame
/// plus this binding. The inner future's destructor therefore sees the value, even when the
/// task is aborted or the future is dropped half-way (a client disconnect).
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let fut: contextflow::Scope<u32, _> = ID.scope(7, async { ID.get() });
/// assert_eq!(fut.await, Some(7));
/// # }
/// ```
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct Scope<T: Send + Sync + 'static, F> {
    /// The binding: the value until the first poll, then a node whose parent is the frame of
    /// the latest poller (reused while that frame stays the same: one allocation per scope in
    /// the common case). Re-parenting replaces the node, so a frame that polled us once (a
    /// transaction's, say) is not kept alive once another frame polls us.
    binding: Binding<T>,
    /// Structurally pinned; dropped in place by `Drop`, inside the frame.
    inner: ManuallyDrop<F>,
    /// Invariant in `T`, like `AsyncLocal<T>`.
    _value: PhantomData<fn(T) -> T>,
}

enum Binding<T> {
    Pending {
        /// `None` for [`AsyncLocal::unset`](crate::AsyncLocal::unset).
        value: Option<T>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
    },
    Node(NodeRef),
    /// The value was taken back out ([`Scope::take_value`]): the scope binds nothing.
    Taken,
    /// Only while switching from `Pending` to `Node`.
    Empty,
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

// ===== impl Scope =====

impl<T: Send + Sync + 'static, F> Scope<T, F> {
    pub(crate) fn new(
        value: Option<T>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        inner: F,
    ) -> Self {
        Scope {
            binding: Binding::Pending {
                value,
                key,
                name,
                inherit,
            },
            inner: ManuallyDrop::new(inner),
            _value: PhantomData,
        }
    }

    /// Takes the value back out of the scope, as tokio's `TaskLocalFuture::take_value`: the
    /// scope binds nothing from then on (the inner future, if polled again, sees the poller's
    /// context). `None` if it was taken already, if this is an [`unset`](crate::AsyncLocal::unset)
    /// scope, or if the value is still shared: a snapshot or a spawned child captured inside
    /// the scope holds it (values are shared, never cloned).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use std::pin::pin;
    /// static LOG: AsyncLocal<std::sync::Mutex<Vec<String>>> = AsyncLocal::named("log");
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut fut = pin!(LOG.scope(Default::default(), async {
    ///     LOG.with(|log| log.unwrap().lock().unwrap().push("step 1".into()));
    /// }));
    /// fut.as_mut().await;
    /// let log = fut.as_mut().take_value().unwrap().into_inner().unwrap();
    /// assert_eq!(log, ["step 1"]);
    /// assert!(fut.take_value().is_none(), "taken already");
    /// # }
    /// ```
    pub fn take_value(self: Pin<&mut Self>) -> Option<T> {
        // SAFETY: the binding is not structurally pinned; `inner` is not touched.
        let this = unsafe { self.get_unchecked_mut() };
        match std::mem::replace(&mut this.binding, Binding::Taken) {
            Binding::Pending { value, .. } => value,
            // SAFETY: a `Node` binding holds a value node made for a `T`, or an unset node,
            // which `try_take` refuses.
            Binding::Node(node) => match unsafe { node.try_take::<T>() } {
                Ok(value) => Some(value),
                Err(node) => {
                    this.binding = Binding::Node(node);
                    None
                }
            },
            Binding::Taken | Binding::Empty => None,
        }
    }

    /// The frame to enter: the poller's frame plus our binding.
    #[inline]
    fn frame(&mut self) -> *const Header {
        let parent = current::current_ptr();
        match &self.binding {
            Binding::Node(node) if node.header().parent_ptr() == parent => node.as_ptr(),
            Binding::Taken => parent,
            _ => self.bind_under(parent),
        }
    }

    #[cold]
    fn bind_under(&mut self, parent: *const Header) -> *const Header {
        let parent = if parent.is_null() {
            None
        } else {
            // SAFETY: `parent` is this thread's current frame, alive for this call.
            Some(unsafe { node::share(parent) })
        };
        match std::mem::replace(&mut self.binding, Binding::Empty) {
            Binding::Pending {
                value,
                key,
                name,
                inherit,
            } => {
                let node = match value {
                    Some(value) => NodeRef::new_value(parent, key, name, inherit, value),
                    None => NodeRef::new_unset(parent, key, name, inherit),
                };
                let ptr = node.as_ptr();
                self.binding = Binding::Node(node);
                ptr
            }
            Binding::Node(node) => {
                // The alias shares the value; dropping `node` releases the old parent.
                let under = NodeRef::new_alias(node.header(), parent);
                let ptr = under.as_ptr();
                self.binding = Binding::Node(under);
                drop(node);
                ptr
            }
            // `frame` does not call us for `Taken`, and `binding` is `Empty` only inside this
            // function, which does not re-enter.
            Binding::Taken | Binding::Empty => unreachable!("Scope binding observed mid-update"),
        }
    }
}

impl<T: Send + Sync + 'static, F: Future> Future for Scope<T, F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is structurally pinned: it is never moved out, only polled through a
        // pinned reference and dropped in place; the other fields are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let frame = this.frame();
        // `this` owns the frame's node and outlives `_entered`.
        let _entered = current::enter_borrowed(frame);
        // SAFETY: see above; `this` came from a pinned reference.
        unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<T: Send + Sync + 'static, F> Drop for Scope<T, F> {
    fn drop(&mut self) {
        let frame = self.frame();
        let _entered = current::enter_borrowed(frame);
        // SAFETY: dropped exactly once, in place (allowed for pinned data), and never used
        // again; the frame's nodes are other fields, dropped after this body returns.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
    }
}

impl<T: Send + Sync + 'static, F> fmt::Debug for Scope<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.binding {
            Binding::Pending { name, .. } => *name,
            Binding::Node(node) => node.header().name,
            Binding::Taken | Binding::Empty => "",
        };
        f.debug_struct("Scope")
            .field("name", &name)
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
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
        let inner = &mut self.inner;
        // SAFETY: dropped exactly once, in place, never used again; the snapshot is another
        // field, dropped after this body returns.
        carry::run_in(self.snapshot.as_ptr(), || unsafe {
            ManuallyDrop::drop(inner)
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
