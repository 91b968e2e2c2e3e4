//! A per-thread cache of node-sized blocks, so that entering a scope in steady state does not
//! reach the global allocator.
//!
//! Every node whose layout fits [`BLOCK`] is allocated as a whole block with that one layout,
//! which makes blocks interchangeable: a block freed on another thread (a snapshot dropped by a
//! spawned task) simply joins that thread's cache. Each cache holds at most [`MAX_CACHED`]
//! blocks (18 KiB) and returns them to the allocator when its thread exits.

use std::{
    alloc::{alloc, dealloc, handle_alloc_error, Layout},
    cell::Cell,
    ptr,
};

/// Size and alignment of a block. A value node's head is 112 bytes on 64-bit targets (checked
/// by `node::tests::node_sizes`), which leaves room for values up to 32 bytes (a `u64` id, an
/// `Arc`, a `&'static str`, a `String`, OpenTelemetry's 24-byte `Context`: the one value
/// every HTTP request binds); larger values are allocated at their exact size. Small blocks
/// keep the memory of many live tasks compact. The feature `diagnostics` adds one pointer to
/// the head (the binding's site), and 16 bytes to the block.
pub(super) const BLOCK: Layout = match Layout::from_size_align(
    if cfg!(feature = "diagnostics") {
        160
    } else {
        144
    },
    16,
) {
    Ok(layout) => layout,
    Err(_) => panic!("a valid layout"),
};

const MAX_CACHED: usize = 128;

/// Whether freed blocks are kept for reuse. Built with `--cfg contextflow_no_pool`, every
/// block goes back to the allocator when freed (and comes from it), so that valgrind sees a
/// node used after it was freed: a block in the cache is still allocated memory to it. CI
/// runs the core's tests under valgrind in that build.
const POOLED: bool = !cfg!(contextflow_no_pool);

/// Whether a value of layout `layout` is allocated from the pool.
pub(super) const fn fits(layout: Layout) -> bool {
    layout.size() <= BLOCK.size() && layout.align() <= BLOCK.align()
}

struct Cache {
    /// Singly linked through the first word of each free block.
    head: Cell<*mut u8>,
    len: Cell<usize>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        let mut block = self.head.replace(ptr::null_mut());
        while !block.is_null() {
            // SAFETY: every cached block starts with the pointer to the next one and was
            // allocated with `BLOCK`.
            unsafe {
                let next = block.cast::<*mut u8>().read();
                dealloc(block, BLOCK);
                block = next;
            }
        }
    }
}

thread_local! {
    static CACHE: Cache = const {
        Cache {
            head: Cell::new(ptr::null_mut()),
            len: Cell::new(0),
        }
    };
}

/// A block of layout [`BLOCK`], from this thread's cache or the allocator. Never null.
#[inline]
pub(super) fn alloc_block() -> *mut u8 {
    if !POOLED {
        return alloc_fresh();
    }
    let cached = CACHE
        .try_with(|c| {
            let block = c.head.get();
            if !block.is_null() {
                // SAFETY: a cached block starts with the pointer to the next one.
                c.head.set(unsafe { block.cast::<*mut u8>().read() });
                c.len.set(c.len.get() - 1);
            }
            block
        })
        .unwrap_or(ptr::null_mut());
    if !cached.is_null() {
        return cached;
    }
    alloc_fresh()
}

/// A block of layout [`BLOCK`] from the allocator. Never null.
fn alloc_fresh() -> *mut u8 {
    // SAFETY: `BLOCK` has a non-zero size.
    let block = unsafe { alloc(BLOCK) };
    if block.is_null() {
        handle_alloc_error(BLOCK);
    }
    block
}

/// Returns a block obtained from [`alloc_block`] (on any thread).
///
/// # Safety
/// `block` must come from [`alloc_block`], hold no live value, and not be used again.
#[inline]
pub(super) unsafe fn free_block(block: *mut u8) {
    let cached = POOLED
        && CACHE
            .try_with(|c| {
                if c.len.get() >= MAX_CACHED {
                    return false;
                }
                // SAFETY: the block is ours and at least a pointer in size and alignment.
                unsafe { block.cast::<*mut u8>().write(c.head.get()) };
                c.head.set(block);
                c.len.set(c.len.get() + 1);
                true
            })
            .unwrap_or(false);
    if !cached {
        // SAFETY: allocated with `BLOCK` (by the contract) and unused from now on.
        unsafe { dealloc(block, BLOCK) };
    }
}
