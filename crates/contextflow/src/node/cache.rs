//! Frame ids and the per-thread lookup cache that makes reads O(1) at any depth.
//!
//! Every node gets an id that is unique for the life of the process and never reused, the
//! first time one is needed (a lookup past the innermost binding): each thread takes ids from a
//! block of [`ID_BLOCK`] reserved with one atomic `fetch_add`, and a compare-exchange settles
//! two threads naming the same shared node at once. Making a node costs nothing for its id. A frame is named by the id of its innermost node,
//! and a frame never changes after it is made, so "variable `key` in frame `id`" always has the
//! same answer: the cache remembers it. An entry is used only while the frame it names is
//! current (or otherwise known to be alive, such as a snapshot being read), so the binding it
//! points to is alive too; an id that is never reused cannot name a freed frame's successor.

use std::cell::Cell;

use std::sync::atomic::AtomicU64;

use super::Header;

/// How many ids a thread reserves at once.
const ID_BLOCK: u64 = 1 << 16;

/// The next block of ids to hand out; 0 is never an id (an empty cache entry).
static NEXT_ID_BLOCK: AtomicU64 = AtomicU64::new(1);

/// Entries in the lookup cache (a power of two).
const SLOTS: usize = 64;

/// A cache entry: frame id, variable key, and the binding found (null: not set).
type Entry = (u64, usize, *const Header);

struct Local {
    /// The next id of this thread's block, and the end of the block.
    ids: Cell<(u64, u64)>,
    entries: [Cell<Entry>; SLOTS],
}

thread_local! {
    // `const` and no destructor: access never fails, even during thread teardown.
    static LOCAL: Local = const {
        Local {
            ids: Cell::new((0, 0)),
            entries: [const { Cell::new((0, 0, std::ptr::null())) }; SLOTS],
        }
    };
}

/// A fresh node id, never 0 and never handed out before.
#[inline]
pub(crate) fn next_id() -> u64 {
    LOCAL.with(|l| {
        let (next, end) = l.ids.get();
        if next != end {
            l.ids.set((next + 1, end));
            return next;
        }
        let start = reserve(&NEXT_ID_BLOCK);
        l.ids.set((start + 1, start + ID_BLOCK));
        start
    })
}

/// Gives the node whose id slot is `slot` a fresh id unless another thread got there first, in
/// which case everyone uses the winner's. Called on first use only.
#[cold]
pub(crate) fn assign_id<A: IdSlot>(slot: &A) -> u64 {
    let fresh = next_id();
    match slot.cas_relaxed(0, fresh) {
        Ok(_) => fresh,
        Err(existing) => existing,
    }
}

/// The compare-exchange of a node's id slot, so that the loom model checks this code.
pub(crate) trait IdSlot {
    fn cas_relaxed(&self, current: u64, new: u64) -> Result<u64, u64>;
}

/// The one atomic operation id reservation needs, so that the loom model checks this code.
pub(crate) trait FetchAdd {
    fn fetch_add_relaxed(&self, n: u64) -> u64;
}

/// One body for std's atomic and loom's (whose `Ordering` is std's), so that the loom models
/// check the operations that ship.
macro_rules! id_atomic {
    ($atomic:ty) => {
        impl IdSlot for $atomic {
            fn cas_relaxed(&self, current: u64, new: u64) -> Result<u64, u64> {
                use std::sync::atomic::Ordering::Relaxed;
                self.compare_exchange(current, new, Relaxed, Relaxed)
            }
        }

        impl FetchAdd for $atomic {
            fn fetch_add_relaxed(&self, n: u64) -> u64 {
                self.fetch_add(n, std::sync::atomic::Ordering::Relaxed)
            }
        }
    };
}

id_atomic!(AtomicU64);
#[cfg(all(test, loom))]
id_atomic!(loom::sync::atomic::AtomicU64);

/// Reserves a block of [`ID_BLOCK`] ids from `next`; blocks never overlap.
#[cold]
pub(crate) fn reserve<A: FetchAdd>(next: &A) -> u64 {
    // Relaxed: ids are plain numbers; uniqueness only needs the read-modify-write to be atomic.
    let start = next.fetch_add_relaxed(ID_BLOCK);
    if start > u64::MAX - 2 * ID_BLOCK {
        // 2^64 ids cannot be used up in practice; refuse to wrap around to reused ids.
        std::process::abort();
    }
    start
}

/// The binding of `key` in the frame whose innermost node is `top`, through the cache.
///
/// # Safety
/// `top` must be a live node, and stay alive while the returned reference is used.
#[inline]
pub(crate) unsafe fn lookup(top: &Header, key: usize) -> Option<&'static Header> {
    let id = top.id();
    let slot = slot(id, key);
    let hit = LOCAL.with(|l| {
        let entry = l.entries[slot].get();
        (entry.0 == id && entry.1 == key).then_some(entry.2)
    });
    let found = match hit {
        // SAFETY: the entry was filled by a lookup in the frame named `id`, which is `top`'s
        // (ids are never reused); frames never change and `top` is alive, so the binding is.
        Some(found) => return unsafe { found.as_ref() },
        // SAFETY: `top` is alive by the caller's contract.
        None => unsafe { Header::find(top, key) },
    };
    let ptr = found.map_or(std::ptr::null(), |h| h as *const Header);
    LOCAL.with(|l| l.entries[slot].set((id, key, ptr)));
    found
}

#[inline]
fn slot(id: u64, key: usize) -> usize {
    // Multiplicative hashing of the frame id, so that the frames of tasks interleaved on one
    // thread spread over the slots.
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize ^ key) & (SLOTS - 1)
}
