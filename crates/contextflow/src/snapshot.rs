//! [`Snapshot`]: a captured, immutable context.

use std::{fmt, ptr};

use crate::{carry, current, node, node::Header, node::NodeRef, AsyncLocal, EnterGuard};

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
    /// the current `opentelemetry::Context`) are captured too.
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
    pub fn capture_inheritable() -> Snapshot {
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

    /// Whether nothing is set in this snapshot.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Snapshot};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// assert!(Snapshot::capture().is_empty());
    /// assert!(!ID.sync_scope(1, Snapshot::capture).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.variables().is_null()
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
        let mut seen: Vec<usize> = Vec::new();
        let mut frame = self.as_ptr();
        while !frame.is_null() {
            // SAFETY: `self` keeps the whole chain alive.
            let header = unsafe { &*frame };
            if header.is_unset() {
                seen.push(header.key);
            } else if !header.is_marker() && !header.is_hidden() && !seen.contains(&header.key) {
                seen.push(header.key);
                let unnamed;
                let name = if header.name.is_empty() {
                    unnamed = format!("<unnamed #{}>", header.key);
                    unnamed.as_str()
                } else {
                    header.name
                };
                out.field(name, &TypeName(header.type_name()));
            }
            frame = header.parent_ptr();
        }
        out.finish()
    }
}
