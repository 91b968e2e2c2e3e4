//! [`Binding`]: one variable's binding, layered over the current frame each time it is run,
//! made once and reused while that frame stays the same.

use std::{fmt, marker::PhantomData};

use crate::{current, local::BindingState, node::Site, AsyncLocal};

/// A binding of one variable that synchronous code enters again and again: each
/// [`run`](Binding::run) makes the current frame plus this binding current, as a poll of a
/// [`Scope`](crate::Scope) does, and keeps the frame's node for the next run under the same
/// frame (one allocation for any number of runs, where each `sync_scope` makes a node).
///
/// For middleware that must enter a request's bindings in several places (its `call`, each
/// poll of its future, a response body) over whatever frame the caller has there: it *layers*,
/// so a binding made outside stays visible inside. Nest two runs to enter two bindings; the
/// inner one's node then stays valid as long as the outer one's does.
///
/// ```
/// use contextflow::{AsyncLocal, Binding};
///
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
/// static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
///
/// let mut id = Binding::new(&REQUEST_ID, "req-1".to_string());
/// let first = id.run(|| REQUEST_ID.get());
/// // An outer binding is seen too: the binding layers over the caller's frame.
/// let second = TENANT.sync_scope(7, || id.run(|| (REQUEST_ID.get(), TENANT.get())));
/// assert_eq!(first.as_deref(), Some("req-1"));
/// assert_eq!(second, (Some("req-1".to_string()), Some(7)));
/// assert_eq!(REQUEST_ID.get(), None, "restored after each run");
/// ```
pub struct Binding<T: Send + Sync + 'static> {
    /// The value until the first run, then a node whose parent is the frame of the latest run
    /// (reused while that frame stays the same). Re-parenting replaces the node, so a frame
    /// that ran us once is not kept alive once another frame runs us.
    state: BindingState<T>,
    /// Invariant in `T`, like `AsyncLocal<T>`.
    _value: PhantomData<fn(T) -> T>,
}

// ===== impl Binding =====

impl<T: Send + Sync + 'static> Binding<T> {
    /// A binding of `var` to `value`, entered by [`run`](Binding::run).
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Binding};
    /// static DEPTH: AsyncLocal<u32> = AsyncLocal::new();
    /// let mut depth = Binding::new(&DEPTH, 1);
    /// assert_eq!(depth.run(|| DEPTH.get()), Some(1));
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn new(var: &AsyncLocal<T>, value: T) -> Self {
        Binding {
            state: BindingState::Pending {
                value: Some(value),
                key: var.key(),
                name: var.name(),
                inherit: var.inherit_policy(),
                site: Site::caller(),
            },
            _value: PhantomData,
        }
    }

    /// Runs `f` with the current frame plus this binding, and returns what `f` returns. The
    /// previous frame is restored when `f` returns or panics.
    ///
    /// The first run, and a run under another frame than the previous one, makes a node;
    /// other runs only enter it.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Binding, Snapshot};
    /// static USER: AsyncLocal<&'static str> = AsyncLocal::named("user");
    ///
    /// let mut user = Binding::new(&USER, "alice");
    /// // A capture inside keeps the value after the binding is gone.
    /// let snapshot = user.run(Snapshot::capture);
    /// drop(user);
    /// assert_eq!(snapshot.get(&USER), Some("alice"));
    /// ```
    #[inline]
    pub fn run<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let frame = self.state.frame();
        // `self` owns the frame's node and outlives `_entered`; `f` cannot reach `self`.
        let _entered = current::enter_borrowed(frame);
        f()
    }
}

impl<T: Send + Sync + 'static> fmt::Debug for Binding<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field("name", &self.state.name())
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}
