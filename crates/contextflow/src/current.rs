//! The current frame of each thread, and the one way to change it.
//!
//! `CURRENT` holds a pointer to the innermost node of the current frame (null when nothing is
//! set), with the low bit telling who keeps that node alive:
//!
//! - bit clear (*borrowed*): a construct on this thread's stack owns the node and restores the
//!   previous value before it goes away: a scope future being polled, `sync_scope`,
//!   `Snapshot::run`. This is the hot path: entering and leaving cost one thread-local write
//!   each and no reference count.
//! - bit set (*owned*): the slot itself owns one reference. Only `AsyncLocal::enter` puts an
//!   owned frame there, because its guard can outlive the stack frame that created it.
//!
//! Every change goes through [`Entered`] (borrowed, strictly nested) or the enter-guard stack
//! (owned, tolerant of out-of-order drops); both restore on drop, so a panic, an early return or
//! a dropped future always puts back the previous frame.

use std::{
    cell::{Cell, RefCell},
    marker::PhantomData,
};

use crate::node::{self, Header, NodeRef};

const OWNED: usize = 1;

thread_local! {
    // A `const` initializer and no destructor: the compiler makes this a plain TLS slot, and
    // access never fails, even during thread teardown.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    // Enter guards in the order they were entered on this thread (see `EnterGuard`).
    static GUARDS: RefCell<GuardStack> = const { RefCell::new(GuardStack { records: Vec::new(), next_id: 0 }) };
}

/// The current frame's innermost node, or null. Whether it is borrowed or owned, it stays alive
/// at least until the current frame changes.
#[inline]
pub(crate) fn current_ptr() -> *const Header {
    (CURRENT.with(Cell::get) & !OWNED) as *const Header
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
        let ptr = (raw & !OWNED) as *const Header;
        // SAFETY: the slot owns a count on `ptr`, so it is alive now.
        let _hold = unsafe { NodeRef::clone_raw(ptr) };
        f(ptr)
    }
}

/// Takes an owned reference to the current frame.
#[inline]
pub(crate) fn capture() -> Option<NodeRef> {
    let ptr = current_ptr();
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the current frame is alive (see `current_ptr`) and this thread's.
        Some(unsafe { node::share(ptr) })
    }
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
        if replaced & OWNED != 0 {
            // An enter guard was forgotten or moved while we were entered; its frame is no
            // longer current, so release the slot's reference (after the slot is restored, in
            // case the value's destructor reads the context).
            // SAFETY: an owned slot carries one count, which is ours to release now.
            drop(unsafe { NodeRef::from_raw((replaced & !OWNED) as *const Header) });
        }
    }
}

// ===== enter guards =====

struct GuardStack {
    records: Vec<Record>,
    next_id: u64,
}

struct Record {
    id: u64,
    /// The frame this guard entered.
    node: *const Header,
    /// The frame that was current before, owned (bit set) or null.
    saved: usize,
    /// Dropped out of order; unwound when the guards entered after it are gone.
    dead: bool,
}

/// Enters `frame` (`None`: the empty frame) with an owned reference; returns the guard id for
/// [`exit_owned`].
pub(crate) fn enter_owned(frame: Option<NodeRef>) -> u64 {
    let node_ptr = frame.map_or(std::ptr::null(), NodeRef::into_raw);
    let raw = if node_ptr.is_null() {
        0
    } else {
        node_ptr as usize | OWNED
    };
    let saved = CURRENT.with(|c| {
        let prev = c.replace(raw);
        if prev == 0 || prev & OWNED != 0 {
            // Null, or the slot's own reference, which moves into the record.
            prev
        } else {
            // Borrowed from a construct that may be gone by the time this guard is dropped
            // (a guard held across `.await` in a `!Send` future): take a reference of our own.
            // SAFETY: the borrowed frame is alive now (its owner is on this stack).
            unsafe { node::share(prev as *const Header) }.into_raw() as usize | OWNED
        }
    });
    // `try_with` fails only while this thread's locals are being destroyed; the frame then
    // stays entered until the thread is gone, which is all a guard could promise there anyway.
    GUARDS
        .try_with(|g| {
            // Cannot panic: no code runs while the stack is borrowed (releases happen after).
            let mut g = g.borrow_mut();
            let id = g.next_id;
            g.next_id += 1;
            g.records.push(Record {
                id,
                node: node_ptr,
                saved,
                dead: false,
            });
            id
        })
        .unwrap_or(u64::MAX)
}

/// Leaves the frame entered by guard `id`. In order, this restores the previous frame. Out of
/// order (a guard dropped while one entered after it is still alive), the record is marked and
/// unwound when the later guards go, so the final frame is the one before the first guard.
pub(crate) fn exit_owned(id: u64) {
    let mut release: Vec<usize> = Vec::new();
    let _ = GUARDS.try_with(|g| {
        // Cannot panic: no code runs while the stack is borrowed (releases happen after).
        let mut g = g.borrow_mut();
        let Some(pos) = g.records.iter().rposition(|r| r.id == id) else {
            return;
        };
        if pos + 1 != g.records.len() {
            g.records[pos].dead = true;
            return;
        }
        while let Some(mut record) = g.records.pop() {
            // Moved out, so that the record's `Drop` has nothing left to release.
            let saved = std::mem::take(&mut record.saved);
            CURRENT.with(|c| {
                let cur = c.get();
                if cur & !OWNED == record.node as usize {
                    c.set(saved);
                    release.push(cur);
                } else {
                    // The guard's frame is no longer current (it was held across a poll that
                    // restored something else): leave the current frame alone.
                    release.push(saved);
                }
            });
            if !g.records.last().is_some_and(|r| r.dead) {
                break;
            }
        }
    });
    for raw in release {
        if raw & OWNED != 0 {
            // SAFETY: each released value is a reference that the slot or a record owned and
            // that nothing refers to any more.
            drop(unsafe { NodeRef::from_raw((raw & !OWNED) as *const Header) });
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // Reached with a reference only when the thread exits while a guard is still entered
        // (it was forgotten): release the frame it saved rather than leak it.
        if self.saved & OWNED != 0 {
            // SAFETY: the record owns this count; `exit_owned` zeroes `saved` when it moves
            // the count elsewhere.
            drop(unsafe { NodeRef::from_raw((self.saved & !OWNED) as *const Header) });
        }
    }
}
