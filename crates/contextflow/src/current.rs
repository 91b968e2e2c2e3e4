//! The current frame of each thread, and the one way to change it.
//!
//! `CURRENT` holds a pointer to the innermost node of the current frame (null when nothing is
//! set), with the low bit telling who keeps that node alive:
//!
//! - bit clear (*borrowed*): a construct on this thread's stack owns the node and restores the
//!   previous value before it goes away: a scope future being polled, `sync_scope`,
//!   `Snapshot::run`. This is the hot path: entering and leaving cost one thread-local write
//!   each and no reference count.
//! - bit set (*owned*): the slot itself owns one reference. Only enter guards put an owned
//!   frame there, because a guard can outlive the stack frame that created it. Each guard has a
//!   node of its own, so its frame identifies it.
//!
//! Every change goes through [`Entered`] (borrowed, strictly nested) or an enter guard (owned);
//! both restore on drop, so a panic, an early return or a dropped future always puts back the
//! previous frame. A guard dropped when its frame is not current (out of order, or inside a
//! construct that entered something else) parks its saved frame in its node, and the frame is
//! unwound as soon as it would become current again.

use std::{
    cell::Cell,
    fmt,
    marker::PhantomData,
    panic::{self, AssertUnwindSafe},
};

use crate::node::{self, Header, NodeRef, COPY, EXITED, OWNED, TAGS};

/// Restores the previous context when dropped; returned by
/// [`AsyncLocal::enter`](crate::AsyncLocal::enter) and [`Snapshot::enter`](crate::Snapshot::enter).
///
/// The guard is `!Send`: the context it entered belongs to this thread, so it cannot be held
/// across an `.await` in a future that moves between threads.
///
/// ```compile_fail,E0277
/// # use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(ID.enter(1)); // E0277: `*const ()` cannot be sent between threads
/// ```
///
/// The same check on the future of a scope, the way to bind a value in async code, compiles:
///
/// ```
/// # use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
/// fn assert_send<T: Send>(_: T) {}
/// assert_send(ID.scope(1, async {}));
/// ```
///
/// Binding the guard to `_` drops it at once, so the value is never visible:
///
/// ```
/// # use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
/// let _ = ID.enter(1); // wrong: restored immediately
/// assert!(!ID.is_set());
/// let _guard = ID.enter(1); // right: entered until `_guard` goes out of scope
/// assert_eq!(ID.get(), Some(1));
/// ```
///
/// Dropping guards out of order is tolerated: the context becomes the one from before the
/// first guard once all of them are gone. So is dropping a guard inside a closure or future
/// it was moved into: its frame is left as soon as it would become current again. Forgetting a
/// guard (`mem::forget`) leaks its frame and leaves it current on this thread until an
/// enclosing scope ends.
///
/// # Never across an `.await`
///
/// A guard's binding belongs to the thread, not to a task. Held across an `.await`:
///
/// - in a task of a `multi_thread` runtime, the future is not `Send` and does not compile;
/// - in a task spawned with contextflow ([`spawn_local`](crate::spawn_local) on a `LocalSet`,
///   or any future wrapped by [`in_current_context`](crate::FutureExt::in_current_context)),
///   the binding is cut at the end of the poll: after the `.await` the task no longer sees it;
/// - in a plain `tokio::spawn` or `spawn_local` task on a `current_thread` runtime or a
///   `LocalSet`, or in the `block_on` future itself, the binding stays current on the thread
///   while the task is suspended, and **every other task polled there sees it**, until the
///   guard is dropped. Debug builds (with the `tokio` feature) catch this: the guard records the
///   tokio task that made it and where it was made, and a read, scope or capture that sees its
///   binding from another task panics, naming the variable and that place. Release builds do
///   not check.
///
/// Use [`scope`](crate::AsyncLocal::scope) for async code; `enter` is for synchronous code. To
/// have clippy flag a guard held across an `.await`, add `contextflow::EnterGuard` to
/// `await-holding-invalid-types` in your `clippy.toml` (see this repository's
/// `docs/clippy.toml`).
#[must_use = "dropping the guard restores the previous context"]
pub struct EnterGuard {
    /// This guard's own node: its frame, and its identity.
    node: NodeRef,
    /// The frame to restore, owned (or null).
    saved: usize,
    _not_send: PhantomData<*const ()>,
}

impl EnterGuard {
    /// Enters `node`, which must be a node made for this guard alone; `name` names what it
    /// binds, for the cross-task check.
    #[track_caller]
    pub(crate) fn new(node: NodeRef, name: &'static str) -> Self {
        #[cfg(all(debug_assertions, feature = "tokio"))]
        foreign::record(node.header().id(), name, std::panic::Location::caller());
        #[cfg(not(all(debug_assertions, feature = "tokio")))]
        let _ = name;
        let saved = enter_owned(&node);
        EnterGuard {
            node,
            saved,
            _not_send: PhantomData,
        }
    }
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        #[cfg(all(debug_assertions, feature = "tokio"))]
        foreign::forget(self.node.header().id());
        exit_owned(&self.node, self.saved);
    }
}

impl fmt::Debug for EnterGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnterGuard").finish_non_exhaustive()
    }
}

thread_local! {
    // A `const` initializer and no destructor: the compiler makes this a plain TLS slot, and
    // access never fails, even during thread teardown.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The current frame's innermost node, or null. Whether it is borrowed or owned, it stays alive
/// at least until the current frame changes.
#[inline]
pub(crate) fn current_ptr() -> *const Header {
    let raw = CURRENT.with(Cell::get);
    #[cfg(all(debug_assertions, feature = "tokio"))]
    if raw & OWNED != 0 {
        foreign::check(raw & !TAGS);
    }
    (raw & !TAGS) as *const Header
}

/// [`current_ptr`] without its debug-build check for a guard of another task, for
/// destructors.
#[inline]
pub(crate) fn current_ptr_unchecked() -> *const Header {
    (CURRENT.with(Cell::get) & !TAGS) as *const Header
}

/// The parent for a binding made now: the current frame without the guard marker at its top
/// (a `Snapshot::enter` guard's), or null. A marker binds nothing, and one inside a chain
/// would keep what its guard parks there (the frame saved by a guard dropped out of order)
/// alive for as long as a capture of the chain lives. Alive as long as [`current_ptr`]'s.
#[inline]
pub(crate) fn parent_ptr() -> *const Header {
    // SAFETY: the current frame is alive until it changes (see `current_ptr`), and so is the
    // chain below it.
    unsafe { node::skip_markers(current_ptr()) }
}

/// The current frame's innermost node when a construct further up this thread's stack owns it
/// (a scope being polled, `sync_scope`, `Snapshot::run`: the common case), so that it stays
/// alive for the caller's whole call; `None` when nothing is set or when an enter guard's frame
/// is current (then use [`with_current`], which holds a reference). The reads' fast path.
#[inline(always)]
pub(crate) fn borrowed_top() -> Option<*const Header> {
    let raw = CURRENT.with(Cell::get);
    (raw & OWNED == 0 && raw != 0).then_some(raw as *const Header)
}

/// Runs `f` with the current frame, kept alive for the whole call even if `f` drops the
/// guard that entered it.
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(*const Header) -> R) -> R {
    let raw = CURRENT.with(Cell::get);
    if raw & OWNED == 0 {
        // Borrowed: the owner is a construct further up this thread's stack, which outlives `f`.
        f(raw as *const Header)
    } else {
        // Owned by the slot: `f` could drop the enter guard and with it the slot's reference,
        // so hold one of our own (only under `AsyncLocal::enter`, off the hot path).
        #[cfg(all(debug_assertions, feature = "tokio"))]
        foreign::check(raw & !TAGS);
        let ptr = (raw & !TAGS) as *const Header;
        // SAFETY: the slot owns a count on `ptr`, so it is alive now.
        let _hold = unsafe { NodeRef::clone_raw(ptr) };
        f(ptr)
    }
}

/// Takes an owned reference to the current frame, for a capture that may outlive this
/// thread's stack (see `node::capture`); `skip_private` leaves out the variables spawned
/// children do not inherit.
#[inline]
pub(crate) fn capture(skip_private: bool) -> Option<NodeRef> {
    // SAFETY: `with_current` keeps the current frame alive during the call, and it is this
    // thread's.
    with_current(|frame| unsafe { node::capture(frame, skip_private) })
}

/// Takes an owned reference to what a plain spawn on a hooked runtime inherits of the current
/// frame: the variables marked `Inherit::Everywhere` (see `node::capture_plain`).
#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
#[inline]
pub(crate) fn capture_plain() -> Option<NodeRef> {
    // SAFETY: `with_current` keeps the current frame alive during the call, and it is this
    // thread's.
    with_current(|frame| unsafe { node::capture_plain(frame) })
}

/// Takes an owned reference to the current frame as it is (without a leading guard marker),
/// for a new node's parent.
#[inline]
pub(crate) fn share() -> Option<NodeRef> {
    with_current(|frame| {
        // SAFETY: `with_current` keeps the frame alive during the call.
        let frame = unsafe { node::skip_markers(frame) };
        // SAFETY: as above; the current frame is this thread's.
        (!frame.is_null()).then(|| unsafe { node::share(frame) })
    })
}

/// Makes `frame` current until the returned guard is dropped. The caller must keep `frame`
/// alive until then, which every caller does by owning it in a stack frame that outlives the
/// guard (a `let` bound before the guard, or `self` while being polled).
#[inline]
pub(crate) fn enter_borrowed(frame: *const Header) -> Entered {
    debug_assert_eq!(frame as usize & OWNED, 0);
    let prev = CURRENT.with(|c| c.replace(frame as usize));
    Entered {
        prev,
        _not_send: PhantomData,
    }
}

/// Restores the previous frame on drop. `!Send`: it must be dropped on the thread that made it.
pub(crate) struct Entered {
    prev: usize,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        let replaced = CURRENT.with(|c| c.replace(self.prev));
        // The frame we restore may belong to an enter guard dropped while we were entered
        // (moved into this closure or future): unwound. An enter guard forgotten or moved while
        // we were entered leaves its frame in the slot: no longer current, its slot reference
        // is released, after the slot is restored (the value's destructor may read the
        // context) and after the unwinding.
        let unwind = self.prev & OWNED != 0;
        let release = replaced & OWNED != 0;
        if unwind || release {
            unwind_then_release(unwind, || {
                if release {
                    // Unless a copy, the one reference through which its guard's node could
                    // be made current again: the node is orphaned (its guard, exiting later,
                    // releases the frame it saved instead of parking it in the node, where a
                    // capture of the node would keep it alive).
                    node::release_parked(replaced);
                }
            });
        }
    }
}

// ===== enter guards =====

/// Enters `node`, a node made for this guard alone, with a count owned by the slot. Returns the
/// previous frame, as an owned reference (bit set) or null, for [`exit_owned`].
pub(crate) fn enter_owned(node: &NodeRef) -> usize {
    let raw = node.clone().into_raw() as usize | OWNED;
    CURRENT.with(|c| {
        let prev = c.replace(raw);
        if prev == 0 || prev & OWNED != 0 {
            // Null, or the slot's own reference, which moves into the guard.
            prev
        } else {
            // Borrowed from a construct that may be gone by the time this guard is dropped
            // (a guard held across `.await` in a `!Send` future): take a reference of our own,
            // marked as a copy (it never makes an enter guard's node current as that guard's).
            // SAFETY: the borrowed frame is this thread's current frame, alive now.
            unsafe { node::share(prev as *const Header) }.into_raw() as usize | OWNED | COPY
        }
    })
}

/// Leaves the frame of the guard that owns `node`, whose previous frame is `saved`.
///
/// When the guard's frame is current (guards dropped in order), the previous frame is
/// restored. Otherwise the guard was dropped out of order, or inside a construct that entered
/// another frame (`sync_scope`, `Snapshot::run`, a poll): `saved` is then parked in the node,
/// and whoever later makes the node current again (the construct restoring it, or the guard
/// entered after this one) finds it exited and restores `saved` instead ([`unwind_exited`]).
/// When nobody can any more (the node is orphaned), `saved` is released at once.
pub(crate) fn exit_owned(node: &NodeRef, saved: usize) {
    let ours = node.as_ptr() as usize | OWNED;
    let released = CURRENT.with(|c| {
        if c.get() == ours {
            c.set(saved);
            Some(ours)
        } else {
            None
        }
    });
    match released {
        Some(raw) => unwind_then_release(true, || {
            // The slot's count on our node, replaced above and no longer referenced: released
            // after the unwinding.
            // SAFETY: an owned slot value holds one count, ours to release now.
            drop(unsafe { NodeRef::from_raw((raw & !TAGS) as *const Header) });
        }),
        None => node.header().park_guard_saved(saved | EXITED),
    }
}

/// Unwinds exited guards' frames (when `unwind`), then runs `release`, each also when the
/// other panics (a value's destructor): the first panic goes on once both are done, and a
/// second one is dropped rather than aborting the process.
#[cold]
fn unwind_then_release(unwind: bool, release: impl FnOnce()) {
    let mut panicked = if unwind { unwind_exited() } else { None };
    if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(release)) {
        panicked.get_or_insert(payload);
    }
    if let Some(payload) = panicked {
        panic::resume_unwind(payload);
    }
}

/// While the current frame is the node of a guard that has exited, replaces it with the frame
/// that guard had saved. A destructor that panics (a value of a released node) does not stop
/// the unwinding: the first panic is returned once the slot holds a frame whose guard is live.
fn unwind_exited() -> Option<Box<dyn std::any::Any + Send>> {
    let mut panicked = None;
    loop {
        let released = CURRENT.with(|c| {
            let cur = c.get();
            // A copy is a construct's frame, not a guard's: it never exits.
            if cur & OWNED == 0 || cur & COPY != 0 {
                return None;
            }
            // SAFETY: an owned slot holds a count on this node.
            let header = unsafe { &*((cur & !TAGS) as *const Header) };
            let saved = header.take_guard_saved();
            if saved & EXITED == 0 {
                return None;
            }
            c.set(saved & !EXITED);
            Some(cur)
        });
        let Some(raw) = released else { break };
        // SAFETY: the slot's count on the exited guard's node, replaced above.
        let node = unsafe { NodeRef::from_raw((raw & !TAGS) as *const Header) };
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| drop(node))) {
            panicked.get_or_insert(payload);
        }
    }
    panicked
}

/// The debug-build check that an enter guard's binding is not seen from another task (a guard
/// held across an `.await` on a `current_thread` runtime or a `LocalSet`).
#[cfg(all(debug_assertions, feature = "tokio"))]
mod foreign {
    use std::{cell::RefCell, panic::Location};

    use crate::node::Header;

    struct Made {
        node_id: u64,
        task: Option<tokio::task::Id>,
        name: &'static str,
        at: &'static Location<'static>,
    }

    thread_local! {
        /// The live guards of this thread (guards are `!Send`), oldest first.
        static GUARDS: RefCell<Vec<Made>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn record(node_id: u64, name: &'static str, at: &'static Location<'static>) {
        let made = Made {
            node_id,
            task: tokio::task::try_id(),
            name,
            at,
        };
        let _ = GUARDS.try_with(|g| g.borrow_mut().push(made));
    }

    pub(super) fn forget(node_id: u64) {
        let _ = GUARDS.try_with(|g| {
            let mut guards = g.borrow_mut();
            if let Some(i) = guards.iter().rposition(|m| m.node_id == node_id) {
                guards.remove(i);
            }
        });
    }

    /// Called when the current frame is an enter guard's (owned) frame.
    #[cold]
    pub(super) fn check(node: usize) {
        // SAFETY: an owned slot holds a count on this node, so it is alive.
        let id = unsafe { &*(node as *const Header) }.id();
        let report = GUARDS
            .try_with(|g| {
                let guards = g.try_borrow().ok()?;
                let made = guards.iter().rev().find(|m| m.node_id == id)?;
                let now = tokio::task::try_id();
                (made.task != now).then(|| {
                    format!(
                        "contextflow: `{}` was bound by an EnterGuard made at {} in {}, and is \
                         visible in {}: a guard held across an `.await` (or forgotten) leaks its \
                         binding to every task polled on this thread; use `scope` instead",
                        made.name,
                        made.at,
                        task_name(made.task),
                        task_name(now),
                    )
                })
            })
            .ok()
            .flatten();
        if let Some(report) = report {
            if std::thread::panicking() {
                eprintln!("{report}");
            } else {
                panic!("{report}");
            }
        }
    }

    fn task_name(task: Option<tokio::task::Id>) -> String {
        match task {
            Some(id) => format!("tokio task {id}"),
            None => "code outside any tokio task".to_string(),
        }
    }
}
