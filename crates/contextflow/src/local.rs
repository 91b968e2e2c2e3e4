//! [`AsyncLocal`]: one typed context variable, and [`Scope`], the future that binds it.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    mem::ManuallyDrop,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
};

use crate::{
    current,
    current::EnterGuard,
    node::{self, Header, NodeRef, Site},
};

/// A typed context variable: the Rust counterpart of one Node.js `AsyncLocalStorage`.
///
/// A value bound with [`scope`](AsyncLocal::scope) (async) or
/// [`sync_scope`](AsyncLocal::sync_scope) is visible to all code that runs inside, through
/// every `.await`, and to tasks and threads started with [`contextflow::spawn`](crate::spawn)
/// and friends. Concurrent scopes on the same thread never see each other's values.
///
/// `AsyncLocal::new` is `const`, so variables are usually `static`s; instances that are not
/// `static` work too (each instance is its own variable).
///
/// A variable is invariant in `T`: it can never be viewed at another type, not even a
/// sub- or supertype (with higher-ranked function types that would let a value be read at the
/// wrong type):
///
/// ```compile_fail,E0308
/// use contextflow::AsyncLocal;
/// static V: AsyncLocal<for<'a> fn(&'a str) -> &'static str> = AsyncLocal::new();
/// let _widened: &AsyncLocal<fn(&'static str) -> &'static str> = &V; // E0308: invariant
/// ```
///
/// The same code at the variable's own type compiles (so the error above is the variance):
///
/// ```
/// use contextflow::AsyncLocal;
/// static V: AsyncLocal<for<'a> fn(&'a str) -> &'static str> = AsyncLocal::new();
/// let _same: &AsyncLocal<for<'a> fn(&'a str) -> &'static str> = &V;
/// ```
///
/// ```
/// use contextflow::AsyncLocal;
///
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// REQUEST_ID
///     .scope("req-123".to_string(), async {
///         tokio::task::yield_now().await;
///         assert_eq!(REQUEST_ID.get().as_deref(), Some("req-123"));
///     })
///     .await;
/// assert!(!REQUEST_ID.is_set());
/// # }
/// ```
pub struct AsyncLocal<T: Send + Sync + 'static> {
    /// Unique key of this variable, assigned on first use (0 = not yet).
    id: AtomicUsize,
    name: &'static str,
    inherit: Inherit,
    /// Makes the value read when nothing is bound (TC39 `defaultValue`).
    default: Option<fn() -> T>,
    /// Invariant in `T`: a variable must never be used at a sub- or supertype of its own type
    /// (with higher-ranked `fn` types that would let a value be read at the wrong type).
    _value: PhantomData<fn(T) -> T>,
}

/// Whether tasks and threads spawned through `contextflow` (and, on a hooked runtime, through
/// plain `tokio::spawn`) see a variable's value.
///
/// The default is [`Inherit::Always`]: contextflow's spawns carry the value, and a plain
/// `tokio::spawn` on a runtime with contextflow's hooks does not (mark ids
/// [`Inherit::Everywhere`] for that). Mark a variable [`Inherit::Never`] when its value must
/// stay with the code that set it: a database transaction, for one, must be committed by the
/// request that opened it, not used concurrently by a background task that may outlive it.
///
/// ```
/// use contextflow::{AsyncLocal, Inherit};
///
/// struct Tx;
/// static TX: AsyncLocal<Tx> = AsyncLocal::named("tx").inherit(Inherit::Never);
///
/// TX.sync_scope(Tx, || {
///     assert!(TX.is_set());
///     let child = contextflow::thread::spawn(|| TX.is_set());
///     assert!(!child.join().unwrap());
/// });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Inherit {
    /// Spawned children see the value (the default).
    #[default]
    Always,
    /// Spawned children do not see the value; they see what was bound outside it, if anything.
    ///
    /// This holds for what contextflow spawns and carries. Code that tokio polls inside the
    /// scope itself is not a child it can see: the tasks of a `LocalSet` driven (`run_until`)
    /// inside the scope, and, on a `current_thread` runtime without contextflow's hooks, plain
    /// tasks polled by a `block_on` called inside it, see the value (see the crate's "What
    /// propagates" table).
    Never,
    /// Like [`Always`](Inherit::Always), and tasks started by a plain `tokio::spawn` (or
    /// `JoinSet::spawn`, `Handle::spawn`) on a runtime with contextflow's hooks
    /// (`contextflow::runtime`, feature `runtime-hooks`; see the [feature flags](crate#feature-flags)) see the value
    /// too. For ids and the trace, which belong in the logs of whatever a request starts.
    /// The tenant, the user and anything that grants access stay [`Always`](Inherit::Always),
    /// so that a connection pool's background task that happens to start during a request
    /// never keeps that request's identity. On an ordinary runtime it is the same as `Always`.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// static REQUEST_ID: AsyncLocal<u64> =
    ///     AsyncLocal::named("request_id").inherit(Inherit::Everywhere);
    /// let child = REQUEST_ID.sync_scope(4, || contextflow::thread::spawn(|| REQUEST_ID.get()));
    /// assert_eq!(child.join().unwrap(), Some(4));
    /// ```
    Everywhere,
}

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
    binding: BindingState<T>,
    /// Structurally pinned; dropped in place by `Drop`, inside the frame.
    inner: ManuallyDrop<F>,
    /// Invariant in `T`, like `AsyncLocal<T>`.
    _value: PhantomData<fn(T) -> T>,
}

/// One binding that a [`Scope`] or a [`Binding`](crate::Binding) enters again and again, each
/// time over the frame current then: made into a node on first use and re-parented (by an
/// alias node) when the frame it is entered under changes.
pub(crate) enum BindingState<T> {
    Pending {
        /// `None` for [`AsyncLocal::unset`](crate::AsyncLocal::unset).
        value: Option<T>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        /// Where the scope was made (zero-sized without the feature `diagnostics`).
        site: Site,
    },
    Node(NodeRef),
    /// The value was taken back out ([`Scope::take_value`]): the scope binds nothing.
    Taken,
    /// Only while switching from `Pending` to `Node`.
    Empty,
}

// ===== impl AsyncLocal =====

impl<T: Send + Sync + 'static> AsyncLocal<T> {
    /// Creates an unnamed variable. `const`, so it can initialize a `static`.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<u64> = AsyncLocal::new();
    /// assert_eq!(TENANT.name(), "");
    /// ```
    pub const fn new() -> Self {
        Self::named("")
    }

    /// Creates a variable whose name appears in `Debug` output and diagnostics, such as the
    /// `Debug` view of a [`Snapshot`](crate::Snapshot).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
    /// assert_eq!(TENANT.name(), "tenant");
    /// ```
    pub const fn named(name: &'static str) -> Self {
        AsyncLocal {
            id: AtomicUsize::new(0),
            name,
            inherit: Inherit::Always,
            default: None,
            _value: PhantomData,
        }
    }

    /// Sets whether spawned tasks and threads inherit this variable (see [`Inherit`]).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// struct Tx;
    /// static TX: AsyncLocal<Tx> = AsyncLocal::named("tx").inherit(Inherit::Never);
    /// assert_eq!(TX.inherit_policy(), Inherit::Never);
    /// ```
    pub const fn inherit(mut self, inherit: Inherit) -> Self {
        self.inherit = inherit;
        self
    }

    /// Gives the variable a default: what [`get`](AsyncLocal::get) and
    /// [`with`](AsyncLocal::with) read where no scope binds it (TC39's `defaultValue`). `make`
    /// runs at each such read, so the default costs nothing while the variable is bound.
    /// [`is_set`](AsyncLocal::is_set) still says whether a value is bound.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<String> =
    ///     AsyncLocal::named("tenant").default_value(|| "public".to_string());
    ///
    /// assert_eq!(TENANT.get().as_deref(), Some("public"));
    /// assert!(!TENANT.is_set());
    /// TENANT.sync_scope("acme".into(), || assert_eq!(TENANT.get().as_deref(), Some("acme")));
    /// // Unset explicitly: the default shows again.
    /// TENANT.sync_scope("acme".into(), || {
    ///     TENANT.sync_unset(|| assert_eq!(TENANT.get().as_deref(), Some("public")))
    /// });
    /// ```
    pub const fn default_value(mut self, make: fn() -> T) -> Self {
        self.default = Some(make);
        self
    }

    /// The variable's [`Inherit`] policy.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// static ID: AsyncLocal<u64> = AsyncLocal::new();
    /// assert_eq!(ID.inherit_policy(), Inherit::Always);
    /// ```
    pub fn inherit_policy(&self) -> Inherit {
        self.inherit
    }

    /// The name given to [`named`](AsyncLocal::named); `""` when unnamed.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER: AsyncLocal<String> = AsyncLocal::named("user");
    /// assert_eq!(USER.name(), "user");
    /// ```
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs `fut` with this variable bound to `value`.
    ///
    /// The value is visible on every poll of `fut` (and while `fut` is dropped), on top of
    /// whatever context the poller has: the frame is the poller's frame plus this binding.
    /// The returned future is `Send` when `F` is.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let tenant = TENANT.scope("acme", async { TENANT.get() }).await;
    /// assert_eq!(tenant, Some("acme"));
    /// # }
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn scope<F: Future>(&self, value: T, fut: F) -> Scope<T, F> {
        let site = Site::caller();
        Scope::new(Some(value), self.key(), self.name, self.inherit, site, fut)
    }

    /// Runs `f` with this variable bound to `value`, and returns what `f` returns.
    ///
    /// The previous context is restored when `f` returns or panics.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static DEPTH: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let inner = DEPTH.sync_scope(1, || DEPTH.sync_scope(2, || DEPTH.get()));
    /// assert_eq!(inner, Some(2));
    /// assert_eq!(DEPTH.get(), None);
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn sync_scope<R>(&self, value: T, f: impl FnOnce() -> R) -> R {
        let site = Site::caller();
        let parent = current::parent_ptr();
        // SAFETY: `parent` is the current frame (or the frame below its guard marker, which the
        // marker holds), kept alive by its owner (a construct further up this stack) until after
        // `node` is gone: `node` is dropped at the end of this call. The
        // node stays on this thread unless shared, and sharing goes through `node::share`.
        let node = unsafe {
            NodeRef::new_value_borrowing(parent, self.key(), self.name, self.inherit, value, site)
        };
        let node = ScopedNode::<T>(ManuallyDrop::new(node), PhantomData);
        // `node` outlives `_entered` (declared before it), as `enter_borrowed` requires.
        let _entered = current::enter_borrowed(node.0.as_ptr());
        f()
    }

    /// Runs `f` with this variable unset, whatever is bound outside, and returns what `f`
    /// returns: Node's `asyncLocalStorage.exit(callback)`, for one variable. Other variables
    /// stay as they are.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
    /// static REQUEST_ID: AsyncLocal<u64> = AsyncLocal::named("request_id");
    ///
    /// REQUEST_ID.sync_scope(7, || {
    ///     TENANT.sync_scope(42, || {
    ///         let seen = TENANT.sync_unset(|| (TENANT.get(), REQUEST_ID.get()));
    ///         assert_eq!(seen, (None, Some(7)));
    ///         assert_eq!(TENANT.get(), Some(42), "restored afterwards");
    ///     })
    /// });
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn sync_unset<R>(&self, f: impl FnOnce() -> R) -> R {
        let site = Site::caller();
        let node = NodeRef::new_unset(current::share(), self.key(), self.name, self.inherit, site);
        // `node` outlives `_entered` (declared before it), as `enter_borrowed` requires.
        let _entered = current::enter_borrowed(node.as_ptr());
        f()
    }

    /// Runs `fut` with this variable unset on every poll (and while `fut` is dropped), on top of
    /// whatever context the poller has: the async form of [`sync_unset`](AsyncLocal::sync_unset).
    /// Tasks spawned inside do not see the variable either.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// TENANT
    ///     .scope(42, async {
    ///         // Background work that must not act for the request's tenant.
    ///         let job = TENANT.unset(async {
    ///             contextflow::thread::spawn(|| TENANT.get()).join().unwrap()
    ///         });
    ///         assert_eq!(job.await, None);
    ///         assert_eq!(TENANT.get(), Some(42));
    ///     })
    ///     .await;
    /// # }
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn unset<F: Future>(&self, fut: F) -> Scope<T, F> {
        let site = Site::caller();
        Scope::new(None, self.key(), self.name, self.inherit, site, fut)
    }

    /// Calls `f` with a reference to the current value, or `None` when the variable is not set.
    ///
    /// Neither allocates nor touches a reference count.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::new();
    ///
    /// REQUEST_ID.sync_scope("req-1".into(), || {
    ///     let len = REQUEST_ID.with(|id| id.map_or(0, |id| id.len()));
    ///     assert_eq!(len, 5);
    /// });
    /// ```
    #[inline]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn with<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
        let key = self.key();
        let Some(top) = current::borrowed_top() else {
            return self.with_slow(key, f);
        };
        // SAFETY: a borrowed current frame is owned by a construct up this thread's stack and
        // outlives this call (see `current::borrowed_top`); references into it do not escape.
        let top = unsafe { &*top };
        if top.key == key && !top.is_unset() {
            // SAFETY: it binds `key`, this variable's unique key, so it holds a `T`.
            return f(Some(unsafe { top.value::<T>() }));
        }
        self.with_below(top, key, f)
    }

    /// [`with`](Self::with) when the variable is not the innermost binding of the borrowed
    /// current frame `top`: a deeper binding through the per-thread cache, or the default.
    #[inline(never)]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn with_below<R>(&self, top: &Header, key: usize, f: impl FnOnce(Option<&T>) -> R) -> R {
        // SAFETY: `top` is the borrowed current frame, alive for this call (see `with`).
        match unsafe { node::lookup(top, key) } {
            // SAFETY: `key` is this variable's unique key, so the node holds a `T`.
            Some(b) => f(Some(unsafe { b.value::<T>() })),
            None => {
                #[cfg(feature = "diagnostics")]
                self.report_unset(std::panic::Location::caller());
                self.with_default(f)
            }
        }
    }

    /// [`with`](Self::with) when the current frame is not borrowed: nothing is set, or an enter
    /// guard's frame is current (a reference is held). Out of line, as `with_below`, so that the
    /// fast path stays small enough to inline everywhere.
    #[inline(never)]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn with_slow<R>(&self, key: usize, f: impl FnOnce(Option<&T>) -> R) -> R {
        #[cfg(feature = "diagnostics")]
        let read_at = std::panic::Location::caller();
        current::with_current(|frame| {
            // SAFETY: `with_current` keeps `frame` alive for this whole closure, and the
            // reference handed to `f` does not escape it.
            let binding = unsafe { node::lookup(frame, key) };
            match binding {
                // SAFETY: `key` is this variable's unique key, so the node holds a `T`.
                Some(b) => f(Some(unsafe { b.value::<T>() })),
                None => {
                    #[cfg(feature = "diagnostics")]
                    self.report_unset(read_at);
                    self.with_default(f)
                }
            }
        })
    }

    /// Calls `f` with the default value (a fresh one), or `None` without a default.
    #[cold]
    #[inline(never)]
    pub(crate) fn with_default<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
        match self.default {
            Some(make) => f(Some(&make())),
            None => f(None),
        }
    }

    /// A clone of the current value, or `None` when the variable is not set.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    /// assert_eq!(USER.get(), None);
    /// USER.sync_scope("ada".into(), || assert_eq!(USER.get().as_deref(), Some("ada")));
    /// ```
    #[inline]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn get(&self) -> Option<T>
    where
        T: Clone,
    {
        let key = self.key();
        let Some(top) = current::borrowed_top() else {
            return self.get_slow(key);
        };
        // SAFETY: as in `with`: the borrowed current frame outlives this call.
        let top = unsafe { &*top };
        if top.key == key && !top.is_unset() {
            // SAFETY: it binds `key`, so it holds a `T`; cloned before this call returns.
            return Some(unsafe { top.value::<T>() }.clone());
        }
        self.get_below(top, key)
    }

    /// [`get`](Self::get) below the innermost binding (see [`with_below`](Self::with_below)).
    #[inline(never)]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn get_below(&self, top: &Header, key: usize) -> Option<T>
    where
        T: Clone,
    {
        // SAFETY: `top` is the borrowed current frame, alive for this call (see `get`).
        match unsafe { node::lookup(top, key) } {
            // SAFETY: `key` is this variable's unique key, so the node holds a `T`.
            Some(b) => Some(unsafe { b.value::<T>() }.clone()),
            None => {
                #[cfg(feature = "diagnostics")]
                self.report_unset(std::panic::Location::caller());
                self.default.map(|make| make())
            }
        }
    }

    /// [`get`](Self::get) when the current frame is not borrowed (see
    /// [`with_slow`](Self::with_slow)).
    #[inline(never)]
    #[cfg_attr(feature = "diagnostics", track_caller)]
    fn get_slow(&self, key: usize) -> Option<T>
    where
        T: Clone,
    {
        let found = current::with_current(|frame| {
            // SAFETY: `with_current` keeps `frame` alive for this closure; the value is cloned
            // before it returns. `key` is this variable's, so the node holds a `T`.
            unsafe { node::lookup(frame, key) }.map(|b| unsafe { b.value::<T>() }.clone())
        });
        match found {
            Some(value) => Some(value),
            None => {
                #[cfg(feature = "diagnostics")]
                self.report_unset(std::panic::Location::caller());
                self.default.map(|make| make())
            }
        }
    }

    /// A read at `read_at` found nothing bound: reports it if this code's context was lost on
    /// the way from where the variable was set (feature `diagnostics`).
    #[cfg(feature = "diagnostics")]
    #[cold]
    #[inline(never)]
    fn report_unset(&self, read_at: &'static std::panic::Location<'static>) {
        crate::diagnostics::unset_read(self.key(), self.name, std::any::type_name::<T>(), read_at);
    }

    /// Whether a value is bound to the variable in the current context (a
    /// [default value](AsyncLocal::default_value) does not count).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    /// assert!(!USER.is_set());
    /// USER.sync_scope("ada".into(), || assert!(USER.is_set()));
    /// ```
    #[inline]
    pub fn is_set(&self) -> bool {
        let key = self.key();
        // SAFETY: `with_current` keeps `frame` alive for the call.
        current::with_current(|frame| unsafe { node::lookup(frame, key) }.is_some())
    }

    /// Binds `value` until the returned guard is dropped: for synchronous code that cannot be
    /// written as a closure (a callback registered elsewhere, a test fixture).
    ///
    /// Prefer [`sync_scope`](AsyncLocal::sync_scope) and [`scope`](AsyncLocal::scope). The
    /// guard is `!Send`; never hold it across an `.await` (see [`EnterGuard`]).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER: AsyncLocal<String> = AsyncLocal::new();
    ///
    /// {
    ///     let _guard = USER.enter("ada".into());
    ///     assert_eq!(USER.get().as_deref(), Some("ada"));
    /// }
    /// assert_eq!(USER.get(), None);
    /// ```
    #[track_caller]
    pub fn enter(&self, value: T) -> EnterGuard {
        let site = Site::caller();
        let node = NodeRef::new_value_at(
            current::share(),
            self.key(),
            self.name,
            self.inherit,
            value,
            site,
        );
        EnterGuard::new(node, self.name)
    }

    /// This variable's unique key.
    #[inline]
    pub(crate) fn key(&self) -> usize {
        // Relaxed is enough: the key is a plain number that carries no other data with it.
        match self.id.load(Ordering::Relaxed) {
            0 => assign_key(&self.id),
            key => key,
        }
    }
}

impl<T: Send + Sync + 'static> Default for AsyncLocal<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send + Sync + 'static> fmt::Debug for AsyncLocal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncLocal")
            .field("name", &self.name)
            .field("type", &std::any::type_name::<T>())
            .field("inherit", &self.inherit)
            .field("is_set", &self.is_set())
            .finish()
    }
}

// ===== impl Scope =====

impl<T: Send + Sync + 'static> BindingState<T> {
    /// The frame to enter: the current frame plus this binding (the current frame itself
    /// once the value was taken).
    #[inline]
    pub(crate) fn frame(&mut self) -> *const Header {
        let (frame, old) = self.frame_and_old();
        // Released once `self` holds its new node (see `bind_under`).
        drop(old);
        frame
    }

    /// As [`frame`](Self::frame), also handing back the node the binding had under another
    /// frame, for the caller to release when it suits it: `Scope`'s destructor drops the inner
    /// future inside the context first, then releases the old node, whose old parent's values
    /// may have destructors that panic.
    #[inline]
    pub(crate) fn frame_and_old(&mut self) -> (*const Header, Option<NodeRef>) {
        self.frame_and_old_under(current::current_ptr())
    }

    /// As [`frame_and_old`](Self::frame_and_old), for a destructor: without the debug-build
    /// check for a guard of another task (which panics, and a destructor must drop what it
    /// owns first).
    #[inline]
    pub(crate) fn frame_and_old_in_drop(&mut self) -> (*const Header, Option<NodeRef>) {
        self.frame_and_old_under(current::current_ptr_unchecked())
    }

    #[inline]
    fn frame_and_old_under(&mut self, current: *const Header) -> (*const Header, Option<NodeRef>) {
        // A new node's parent never is a guard's marker (see `current::parent_ptr`).
        // SAFETY: `current` is the current frame, alive until it changes.
        let parent = unsafe { node::skip_markers(current) };
        match self {
            BindingState::Node(node) if node.header().parent_ptr() == parent => {
                (node.as_ptr(), None)
            }
            BindingState::Taken => (current, None),
            _ => self.bind_under(parent),
        }
    }

    #[cold]
    fn bind_under(&mut self, parent: *const Header) -> (*const Header, Option<NodeRef>) {
        let parent = if parent.is_null() {
            None
        } else {
            // SAFETY: `parent` is this thread's current frame (below its guard marker, if any),
            // alive for this call.
            Some(unsafe { node::share(parent) })
        };
        // The node this binding had, released by the caller once `self` holds the new one:
        // releasing it may drop the old parent frame's values, whose destructors may panic.
        let mut old_node = None;
        let node = match std::mem::replace(self, BindingState::Empty) {
            BindingState::Pending {
                value,
                key,
                name,
                inherit,
                site,
            } => match value {
                Some(value) => NodeRef::new_value_at(parent, key, name, inherit, value, site),
                None => NodeRef::new_unset(parent, key, name, inherit, site),
            },
            // The alias shares the value; dropping the old node releases the old parent.
            BindingState::Node(old) => {
                let alias = NodeRef::new_alias(old.header(), parent);
                old_node = Some(old);
                alias
            }
            // `frame` does not call us for `Taken`, and the state is `Empty` only inside this
            // function, which does not re-enter.
            BindingState::Taken | BindingState::Empty => {
                unreachable!("binding observed mid-update")
            }
        };
        let ptr = node.as_ptr();
        *self = BindingState::Node(node);
        (ptr, old_node)
    }

    /// The variable's name, for `Debug`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            BindingState::Pending { name, .. } => name,
            BindingState::Node(node) => node.header().name,
            BindingState::Taken | BindingState::Empty => "",
        }
    }
}

impl<T: Send + Sync + 'static, F> Scope<T, F> {
    pub(crate) fn new(
        value: Option<T>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        site: Site,
        inner: F,
    ) -> Self {
        Scope {
            binding: BindingState::Pending {
                value,
                key,
                name,
                inherit,
                site,
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
        match std::mem::replace(&mut this.binding, BindingState::Taken) {
            BindingState::Pending { value, .. } => value,
            // SAFETY: a `Node` binding holds a value node made for a `T` or an alias of one
            // (after a re-frame), or an unset node, which `try_take` refuses.
            BindingState::Node(node) => match unsafe { node.try_take::<T>() } {
                Ok(value) => Some(value),
                Err(node) => {
                    this.binding = BindingState::Node(node);
                    None
                }
            },
            BindingState::Taken | BindingState::Empty => None,
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
        let frame = this.binding.frame();
        // `this` owns the frame's node and outlives `_entered`.
        let _entered = current::enter_borrowed(frame);
        // SAFETY: see above; `this` came from a pinned reference.
        unsafe { Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<T: Send + Sync + 'static, F> Drop for Scope<T, F> {
    fn drop(&mut self) {
        // The node the binding had under another frame is released last: its old parent's
        // values may have destructors that panic, and the inner future is dropped first, inside
        // the context, either way.
        let (frame, old) = self.binding.frame_and_old_in_drop();
        let entered = current::enter_borrowed(frame);
        // SAFETY: dropped exactly once, in place (allowed for pinned data), and never used
        // again; the frame's nodes are other fields, dropped after this body returns.
        unsafe { ManuallyDrop::drop(&mut self.inner) }
        drop(entered);
        drop(old);
    }
}

impl<T: Send + Sync + 'static, F> fmt::Debug for Scope<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("name", &self.binding.name())
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

/// The node of a `sync_scope`, released through the typed fast path when the scope ends
/// (returns or unwinds).
struct ScopedNode<T: Send + Sync + 'static>(ManuallyDrop<NodeRef>, PhantomData<fn(T) -> T>);

impl<T: Send + Sync + 'static> Drop for ScopedNode<T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: taken once, here; `sync_scope` made the node with a `T`.
        unsafe { ManuallyDrop::take(&mut self.0).release_value_node::<T>() }
    }
}

// ===== keys =====

/// Source of variable keys; 0 means "not assigned yet" (and marks guard markers), 1 is
/// carried values' (`carry::CARRIED_KEY`).
static NEXT_KEY: AtomicUsize = AtomicUsize::new(2);

#[cold]
#[inline(never)]
fn assign_key(slot: &AtomicUsize) -> usize {
    keys::assign(slot, &NEXT_KEY)
}

/// Key assignment, written once over a small atomic trait so that the loom model checks the
/// very code that runs.
pub(crate) mod keys {
    /// The two atomic operations key assignment needs.
    pub(crate) trait Atomic {
        fn fetch_add_relaxed(&self, n: usize) -> usize;
        fn cas_relaxed(&self, current: usize, new: usize) -> Result<usize, usize>;
    }

    /// One body for std's atomic and loom's (whose `Ordering` is std's), so that the loom
    /// model checks the operations that ship.
    macro_rules! atomic {
        ($atomic:ty) => {
            impl Atomic for $atomic {
                fn fetch_add_relaxed(&self, n: usize) -> usize {
                    self.fetch_add(n, std::sync::atomic::Ordering::Relaxed)
                }
                fn cas_relaxed(&self, current: usize, new: usize) -> Result<usize, usize> {
                    use std::sync::atomic::Ordering::Relaxed;
                    self.compare_exchange(current, new, Relaxed, Relaxed)
                }
            }
        };
    }

    atomic!(std::sync::atomic::AtomicUsize);
    #[cfg(all(test, loom))]
    atomic!(loom::sync::atomic::AtomicUsize);

    /// Gives `slot` a key from `next` unless another thread got there first, in which case
    /// the winner's key is used by everyone. Keys are never 0 and never reused.
    pub(crate) fn assign<A: Atomic>(slot: &A, next: &A) -> usize {
        let fresh = next.fetch_add_relaxed(1);
        if fresh == 0 || fresh == usize::MAX {
            // 2^64 variables cannot be created in practice; refuse to wrap around to 0.
            std::process::abort();
        }
        match slot.cas_relaxed(0, fresh) {
            Ok(_) => fresh,
            Err(existing) => existing,
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests;
