//! Frames as immutable, reference-counted chains of bindings.
//!
//! A frame is a pointer to the innermost [`Header`] of a singly linked chain; each header
//! binds one variable (by `key`) and owns a reference to its parent. Entering a scope
//! allocates one node whose parent is the current frame, so entry is O(1) whatever the
//! number of variables already set, and capturing a frame is one reference-count increment.
//! Lookup walks the chain from the innermost binding, so the innermost scope wins.
//!
//! Two kinds of node exist:
//! - a *value node* (`ValueNode<T>`) stores the value inline, in the same allocation;
//! - an *alias node* (`AliasNode`) re-binds a value that lives in another value node under a
//!   different parent. Scope futures use aliases when they are polled under a new frame, and
//!   inheritable captures use them to rebuild a chain without the non-inherited bindings.
//!
//! A value node therefore has two counts, like `Arc`'s strong and weak: `refs` counts
//! references to the *link* (lookups through it, its parent), `value_refs` counts holders of
//! the *value* (the node itself plus every alias). When the link count reaches zero the
//! parent is released at once (so a database transaction bound deeper in the chain is not kept
//! alive by an alias of an unrelated value), and the value is dropped when the last alias goes.
//!
//! This file is the nodes' layout and life: their construction, their counts and the release
//! of a chain. The logic over chains (lookups, the flags and key filter a node takes from its
//! parent, captures that leave bindings out) is in `node/chain.rs`, the per-thread lookup cache
//! and frame ids in `node/cache.rs`, the block cache in `node/pool.rs`. With `current.rs` (the
//! thread-local slot), this is most of the crate's `unsafe` code; it is covered by the loom
//! models in `node/loom_tests.rs` (the counts) and by the whole test suite run under valgrind
//! in a build without the block cache (`--cfg contextflow_no_pool`), where a freed node is
//! freed memory to valgrind.

use std::{
    alloc::{alloc, dealloc, handle_alloc_error, Layout},
    mem::{self, ManuallyDrop},
    panic::{self, AssertUnwindSafe},
    ptr::{self, NonNull},
};

use crate::{
    loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Inherit,
};

#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
pub(crate) use self::chain::capture_plain;
use self::chain::chain_flags;
pub(crate) use self::chain::{capture, lookup, skip_markers};

/// Bit set on an inheritable binding.
const INHERIT: u8 = 0b01;
/// Bit set when this node or any ancestor is *not* inheritable, so that an inheritable
/// capture knows in O(1) whether it can share the chain as it is.
const CHAIN_HAS_PRIVATE: u8 = 0b10;
/// Bit set when this node or an ancestor may rebind a variable already bound below it (its
/// key's bit was already in its parent's `mask`), so that a capture knows in O(1) whether the
/// chain may hold shadowed values that no lookup can reach.
const MAYBE_SHADOW: u8 = 0b100;
/// Bit set on a node that is not a binding users can see: carried values (`carry.rs`).
const HIDDEN: u8 = 0b1000;
/// Bit set on a node that binds its variable to *nothing* (`AsyncLocal::sync_unset`): lookups
/// stop there and find no value.
const UNSET: u8 = 0b1_0000;
/// Bit set on a binding that plain spawns on a hooked runtime inherit too
/// ([`Inherit::Everywhere`]); always with `INHERIT`.
const PLAIN: u8 = 0b10_0000;
/// Bit set when this node or any ancestor lacks `PLAIN`, so that a plain spawn's capture knows
/// in O(1) whether it can share the chain as it is.
const CHAIN_HAS_NON_PLAIN: u8 = 0b100_0000;

/// A binding's own inheritance bits.
#[inline]
fn inherit_flags(inherit: Inherit) -> u8 {
    match inherit {
        Inherit::Never => 0,
        Inherit::Always => INHERIT,
        Inherit::Everywhere => INHERIT | PLAIN,
    }
}

/// The key of guard marker nodes: never a variable's key (those start at 1).
const MARKER_KEY: usize = 0;

/// Refcounts past this are treated as a leak loop and abort, as `Arc` does.
const MAX_REFCOUNT: usize = isize::MAX as usize;

/// The part of every node that lookups read. `#[repr(C)]` so that a `*const Header` is also a
/// pointer to the node that starts with it.
#[repr(C)]
pub(crate) struct Header {
    /// References to this link: `NodeRef`s and child nodes' `parent` fields.
    refs: AtomicUsize,
    /// The variable this node binds.
    pub(crate) key: usize,
    /// Unique for the life of the process and never reused (see `cache.rs`): names this node,
    /// and the frame it tops, in the per-thread lookup cache. 0 until first asked for
    /// ([`Header::id`]), so that making a node costs nothing for it.
    id: AtomicU64,
    /// A 64-bit Bloom filter of the keys bound in this node's chain (bit `key % 64`), so that a
    /// new binding knows in O(1) whether it may shadow one below it.
    mask: u64,
    /// Points at the bound `T`, inside `owner`.
    value: NonNull<()>,
    /// The value node that owns the value: this node itself, or the aliased node.
    owner: NonNull<ValueHead>,
    /// The enclosing frame; `None` at the root. Taken when the link count reaches zero.
    parent: Option<NodeRef>,
    /// `INHERIT`, `CHAIN_HAS_PRIVATE`, `MAYBE_SHADOW`, `HIDDEN`, `UNSET`.
    flags: u8,
    /// Set while `parent` is *borrowed*: it holds no count, because this node was made by
    /// `sync_scope` and cannot outlive its parent while nobody else refers to it. Cleared (the
    /// parent then gets its count) by [`share`] before the node is ever shared. While set, the
    /// node is reachable only from the thread that made it.
    borrowed: AtomicBool,
    /// For the node of an enter guard that was dropped while its frame was not current: the
    /// frame to restore instead of this one (see `current::exit_owned`), owned. Otherwise 0.
    guard_saved: AtomicUsize,
    /// The variable's name, for `Debug`.
    pub(crate) name: &'static str,
    /// Called once the link count reaches zero, depending on the node kind: releases the
    /// node's hold on its value and, for an alias, frees the alias. The parent has already been
    /// taken out.
    release_link: unsafe fn(NonNull<Header>),
    /// Value-type operations, shared by a value node and its aliases.
    vtable: &'static VTable,
    /// Where the binding was made (feature `diagnostics`; a zero-sized type without it).
    pub(crate) site: Site,
}

/// Where a binding or a spawn was made, for diagnostics: the caller's source location with the
/// feature `diagnostics`, and a zero-sized type with no code behind it without the feature.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Site {
    #[cfg(feature = "diagnostics")]
    at: Option<&'static std::panic::Location<'static>>,
}

impl Site {
    /// No known place (internal nodes).
    pub(crate) const NONE: Site = Site {
        #[cfg(feature = "diagnostics")]
        at: None,
    };

    /// The location of the caller of the `#[track_caller]` function that calls this (with the
    /// feature; otherwise nothing).
    #[cfg_attr(feature = "diagnostics", track_caller)]
    #[inline(always)]
    pub(crate) fn caller() -> Site {
        Site {
            #[cfg(feature = "diagnostics")]
            at: Some(std::panic::Location::caller()),
        }
    }

    /// The recorded location, if any.
    #[cfg(feature = "diagnostics")]
    pub(crate) fn location(self) -> Option<&'static std::panic::Location<'static>> {
        self.at
    }

    /// A site for a known location.
    #[cfg(feature = "diagnostics")]
    pub(crate) fn at(at: &'static std::panic::Location<'static>) -> Site {
        Site { at: Some(at) }
    }
}

struct VTable {
    /// Called once the value count reaches zero: drops the value and frees the value node.
    release_value: unsafe fn(NonNull<ValueHead>),
    /// `std::any::type_name` of the value, for `Debug`.
    type_name: fn() -> &'static str,
}

/// The first part of a value node: a header plus the count of value holders.
#[repr(C)]
struct ValueHead {
    header: Header,
    value_refs: AtomicUsize,
}

#[repr(C)]
struct ValueNode<T> {
    head: ValueHead,
    value: T,
}

#[repr(C)]
struct AliasNode {
    header: Header,
}

/// An owned reference to a node (one count of `refs`). `Send + Sync`: values are required to
/// be `Send + Sync` by `AsyncLocal`, and the counts are atomic.
pub(crate) struct NodeRef {
    ptr: NonNull<Header>,
}

// SAFETY: a node is immutable after construction except for its atomic counts and the parent
// slot, which is only touched by whoever brings the link count to zero (exclusive access).
// Every value stored in a node is `Send + Sync` (bound on `AsyncLocal<T>`).
unsafe impl Send for NodeRef {}
// SAFETY: as above; shared access only reads immutable fields or uses atomics.
unsafe impl Sync for NodeRef {}

// ===== impl NodeRef =====

impl NodeRef {
    /// Allocates a value node binding `key` to `value` under `parent` (no site: the loom
    /// models' nodes).
    #[cfg(all(test, loom))]
    pub(crate) fn new_value<T: Send + Sync + 'static>(
        parent: Option<NodeRef>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        value: T,
    ) -> NodeRef {
        Self::value_node(
            parent,
            false,
            key,
            name,
            inherit_flags(inherit),
            value,
            Site::NONE,
        )
    }

    /// [`new_value`](Self::new_value) for a binding made at `site` (a scope).
    #[inline]
    pub(crate) fn new_value_at<T: Send + Sync + 'static>(
        parent: Option<NodeRef>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        value: T,
        site: Site,
    ) -> NodeRef {
        Self::value_node(
            parent,
            false,
            key,
            name,
            inherit_flags(inherit),
            value,
            site,
        )
    }

    /// Allocates a node that binds `key` to nothing under `parent`: lookups of `key` stop here
    /// and find no value, whatever is bound below.
    pub(crate) fn new_unset(
        parent: Option<NodeRef>,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        site: Site,
    ) -> NodeRef {
        let flags = UNSET | inherit_flags(inherit);
        Self::value_node(parent, false, key, name, flags, (), site)
    }

    /// Allocates a hidden node (not a user binding: `Debug`, `is_empty` and lookups of user
    /// variables skip it) holding `value` under `parent`. Used for carried values.
    pub(crate) fn new_hidden<T: Send + Sync + 'static>(
        parent: Option<NodeRef>,
        key: usize,
        value: T,
    ) -> NodeRef {
        Self::value_node(
            parent,
            false,
            key,
            "",
            HIDDEN | INHERIT | PLAIN,
            value,
            Site::NONE,
        )
    }

    /// Allocates a node that binds nothing, for an enter guard that enters an existing frame
    /// (`Snapshot::enter`): each guard needs a node of its own to be told apart.
    pub(crate) fn new_marker(parent: Option<NodeRef>) -> NodeRef {
        let flags = INHERIT | PLAIN;
        Self::value_node(parent, false, MARKER_KEY, "", flags, (), Site::NONE)
    }

    /// Allocates a value node under `parent` *without* taking a count on it: the fast path of
    /// `sync_scope`, which costs no atomic read-modify-write unless the node gets shared.
    ///
    /// # Safety
    /// `parent` must be null or a live node that stays alive at least as long as the returned
    /// reference is the only one (until it is dropped or passed to [`share`]), and the returned
    /// node must not leave this thread before [`share`] has been called on it.
    pub(crate) unsafe fn new_value_borrowing<T: Send + Sync + 'static>(
        parent: *const Header,
        key: usize,
        name: &'static str,
        inherit: Inherit,
        value: T,
        site: Site,
    ) -> NodeRef {
        // SAFETY: the count is not taken: `borrowed` below tells `Drop` and `share` so.
        let parent = (!parent.is_null()).then(|| unsafe { NodeRef::from_raw(parent) });
        let borrowed = parent.is_some();
        let flags = inherit_flags(inherit);
        Self::value_node(parent, borrowed, key, name, flags, value, site)
    }

    fn value_node<T: Send + Sync + 'static>(
        parent: Option<NodeRef>,
        borrowed: bool,
        key: usize,
        name: &'static str,
        own_flags: u8,
        value: T,
        site: Site,
    ) -> NodeRef {
        let (flags, mask) = chain_flags(key, own_flags, parent.as_ref());
        let raw = ValueNode::<T>::alloc();
        // SAFETY: `raw` is a fresh allocation with the layout of `ValueNode<T>` (see `alloc`).
        // Every field is written in place, before anyone else can see the node (building the
        // node on the stack and copying it costs store-forwarding stalls on the hot path).
        unsafe {
            let head = ptr::addr_of_mut!((*raw).head);
            let header = ptr::addr_of_mut!((*head).header);
            ptr::addr_of_mut!((*raw).value).write(value);
            header.write(Header {
                refs: AtomicUsize::new(1),
                key,
                id: AtomicU64::new(0),
                mask,
                value: NonNull::new_unchecked(ptr::addr_of_mut!((*raw).value)).cast(),
                owner: NonNull::new_unchecked(head),
                parent,
                flags,
                borrowed: AtomicBool::new(borrowed),
                guard_saved: AtomicUsize::new(0),
                name,
                release_link: release_value_link,
                vtable: &ValueNode::<T>::VTABLE,
                site,
            });
            ptr::addr_of_mut!((*head).value_refs).write(AtomicUsize::new(1));
            NodeRef {
                ptr: NonNull::new_unchecked(raw.cast()),
            }
        }
    }

    /// Allocates an alias of `binding`'s value under `parent`: same variable, same value
    /// (shared, not cloned), different enclosing frame.
    pub(crate) fn new_alias(binding: &Header, parent: Option<NodeRef>) -> NodeRef {
        let owner = binding.owner;
        // SAFETY: `binding` is a live header, so its owner value node is alive (the header
        // holds one value count). Incrementing needs no ordering, as for `Arc::clone`.
        let old = unsafe { owner.as_ref() }
            .value_refs
            .fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFCOUNT {
            std::process::abort();
        }
        let (flags, mask) = chain_flags(
            binding.key,
            binding.flags & (INHERIT | PLAIN | HIDDEN | UNSET),
            parent.as_ref(),
        );
        const { assert!(pool::fits(Layout::new::<AliasNode>())) };
        let raw = pool::alloc_block().cast::<AliasNode>();
        // SAFETY: a fresh block, large and aligned enough for an `AliasNode` (asserted above).
        unsafe {
            raw.write(AliasNode {
                header: Header {
                    refs: AtomicUsize::new(1),
                    key: binding.key,
                    id: AtomicU64::new(0),
                    mask,
                    value: binding.value,
                    owner,
                    flags,
                    borrowed: AtomicBool::new(false),
                    guard_saved: AtomicUsize::new(0),
                    parent,
                    name: binding.name,
                    release_link: release_alias_link,
                    vtable: binding.vtable,
                    site: binding.site,
                },
            });
            NodeRef {
                ptr: NonNull::new_unchecked(raw.cast()),
            }
        }
    }

    /// Takes the value back out of a binding node that nothing else refers to (no other
    /// reference to the node, no other node sharing its value), freeing the node; otherwise
    /// gives the node back. The node is the value node itself, or an alias of it whose value
    /// node nothing links to any more (a scope re-framed under another parent: its first node
    /// was released, and only the alias holds the value).
    ///
    /// # Safety
    /// `self` must be a binding of a `T` (a value node made by `new_value` with a `T`, or an
    /// alias of one), not an unset or hidden node.
    pub(crate) unsafe fn try_take<T: Send + Sync + 'static>(self) -> Result<T, NodeRef> {
        let header = self.header();
        let owner = header.owner.as_ptr();
        // SAFETY: our count keeps the value node alive.
        let value_refs = unsafe { &(*owner).value_refs };
        // Acquire, as in `Drop`: other owners' uses of the node happen-before our taking it.
        // A value node's own link holds a value count while it is linked, so an alias that
        // sees a value count of 1 (its own) knows its value node is linked from nowhere.
        if header.is_unset()
            || header.borrowed.load(Ordering::Relaxed)
            || header.refs.load(Ordering::Acquire) != 1
            || value_refs.load(Ordering::Acquire) != 1
        {
            return Err(self);
        }
        let this = ManuallyDrop::new(self);
        let node = this.ptr.as_ptr();
        let is_alias = owner.cast::<Header>() != node;
        let raw = owner.cast::<ValueNode<T>>();
        // SAFETY: both counts are ours alone, so nobody else can reach either block: move the
        // value out of the value node and free it without dropping the moved value; free the
        // alias, if the node is one (its fields need no drop; the value node's parent was
        // taken when its link count reached zero). The parent is released last, when nothing
        // is left half-freed, since its values' destructors may panic. The node type matches
        // by the caller's contract.
        unsafe {
            debug_assert!(!is_alias || (*raw).head.header.parent.is_none());
            // Released last, after the parent: a frame parked by an exited guard.
            let parked = (*node).guard_saved.load(Ordering::Relaxed);
            let parent = (*node).parent.take();
            let value = ptr::read(ptr::addr_of!((*raw).value));
            if ValueNode::<T>::POOLED {
                pool::free_block(raw.cast());
            } else {
                dealloc(raw.cast(), Layout::new::<ValueNode<T>>());
            }
            if is_alias {
                pool::free_block(node.cast());
            }
            release_then_parked(move || drop(parent), parked);
            Ok(value)
        }
    }

    /// Releases a value node made for a `T` by `sync_scope`: when nothing else refers to it
    /// (the common case: nothing captured it), drops the value and frees the block directly,
    /// with no indirect call; otherwise releases it as `Drop` does.
    ///
    /// # Safety
    /// `self` must be a value node made for a `T` (by `new_value_borrowing` with a `T`).
    #[inline]
    pub(crate) unsafe fn release_value_node<T: Send + Sync + 'static>(self) {
        let header = self.header();
        // SAFETY: our count keeps the value node (this node) alive.
        let value_refs = unsafe { &(*header.owner.as_ptr()).value_refs };
        // Acquire, as in `Drop`: other owners' uses of the node happen-before we free it.
        if header.refs.load(Ordering::Acquire) != 1
            || value_refs.load(Ordering::Acquire) != 1
            || header.guard_saved.load(Ordering::Relaxed) != 0
        {
            return drop(self);
        }
        let this = ManuallyDrop::new(self);
        let raw = this.ptr.as_ptr().cast::<ValueNode<T>>();
        // SAFETY: both counts are ours alone, so nobody else can reach the node. A borrowed
        // parent holds no count; a counted one (the node was shared, then released by the
        // sharers) is released normally. The node type matches by the caller's contract.
        unsafe {
            let parent = (*raw).head.header.parent.take();
            // The value first, then the block (also when its destructor panics), then the
            // parent, as `Drop` does: a parent released first whose values' destructor panics
            // would leak this value.
            let drop_value = || {
                let _free = FreeOnDrop(raw);
                ptr::drop_in_place(ptr::addr_of_mut!((*raw).value));
            };
            match parent {
                Some(parent) if !(*raw).head.header.borrowed.load(Ordering::Relaxed) => {
                    // A panic of the value's destructor waits until the parent is released, so
                    // that a second one there does not abort the process.
                    let dropped = panic::catch_unwind(AssertUnwindSafe(drop_value));
                    drop(parent);
                    if let Err(payload) = dropped {
                        panic::resume_unwind(payload);
                    }
                }
                // A borrowed parent holds no count: nothing to release.
                parent => {
                    mem::forget(parent);
                    drop_value();
                }
            }
        }
    }

    /// The raw pointer, for the thread-local slot. Ownership stays with `self`.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *const Header {
        self.ptr.as_ptr()
    }

    #[inline]
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: `self` owns a link count, so the header is alive.
        unsafe { self.ptr.as_ref() }
    }

    /// Gives up ownership without decrementing; pair with [`NodeRef::from_raw`].
    #[inline]
    pub(crate) fn into_raw(self) -> *const Header {
        ManuallyDrop::new(self).ptr.as_ptr()
    }

    /// Takes back ownership of a count given up by [`NodeRef::into_raw`] (or by
    /// [`NodeRef::clone_raw`]).
    ///
    /// # Safety
    /// `ptr` must be non-null and carry one link count that the caller owns.
    #[inline]
    pub(crate) unsafe fn from_raw(ptr: *const Header) -> NodeRef {
        NodeRef {
            // SAFETY: non-null by the caller's contract.
            ptr: unsafe { NonNull::new_unchecked(ptr as *mut Header) },
        }
    }

    /// Takes a new link count on a node the caller knows to be alive.
    ///
    /// # Safety
    /// `ptr` must be non-null and point to a live node for the duration of the call.
    #[inline]
    pub(crate) unsafe fn clone_raw(ptr: *const Header) -> NodeRef {
        // SAFETY: alive by the caller's contract.
        let header = unsafe { &*ptr };
        let old = header.refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFCOUNT {
            std::process::abort();
        }
        // SAFETY: we just took the count we hand out; non-null by contract.
        unsafe { NodeRef::from_raw(ptr) }
    }
}

/// Takes a new count on a node of the current frame, first giving every `sync_scope` node on
/// the way down whose parent is still borrowed a counted parent, so that the returned reference
/// may outlive the `sync_scope` calls and travel to other threads.
///
/// # Safety
/// `ptr` must be non-null, point to a live node, and be called on the thread that made any
/// node of its chain that still has a borrowed parent (true of the current frame).
#[inline]
pub(crate) unsafe fn share(ptr: *const Header) -> NodeRef {
    let mut node = ptr;
    while !node.is_null() {
        // SAFETY: a live chain by the caller's contract.
        let header = unsafe { &*node };
        // Relaxed: the flag is only ever set or cleared on this thread (see `borrowed`).
        if !header.borrowed.load(Ordering::Relaxed) {
            break;
        }
        let parent = header.parent_ptr();
        // SAFETY: a borrowed parent is alive while its child is (the contract of
        // `new_value_borrowing`); the count taken here is the one `parent` now owns.
        mem::forget(unsafe { NodeRef::clone_raw(parent) });
        header.borrowed.store(false, Ordering::Relaxed);
        node = parent;
    }
    // SAFETY: alive by the caller's contract.
    unsafe { NodeRef::clone_raw(ptr) }
}

impl Clone for NodeRef {
    #[inline]
    fn clone(&self) -> NodeRef {
        // SAFETY: `self` keeps the node alive during the call.
        unsafe { NodeRef::clone_raw(self.as_ptr()) }
    }
}

impl Drop for NodeRef {
    fn drop(&mut self) {
        // Release the chain iteratively: a deep chain (a recursive function that opens a
        // scope per level) must not overflow the stack when its last owner goes away.
        let mut next = Some(self.ptr);
        while let Some(ptr) = next.take() {
            // SAFETY: we own one link count on `ptr`, so it is alive until we drop it.
            let header = unsafe { ptr.as_ref() };
            // A count of 1 is ours alone, and nobody can take a new one without a count or a
            // live parent link of their own: free without a read-modify-write. The Acquire load
            // pairs with the Release decrements of former owners, as the fence below does.
            if header.refs.load(Ordering::Acquire) != 1 {
                // Release/Acquire as in `Arc::drop`: every use of the node by other owners
                // happens-before the deallocation below.
                if header.refs.fetch_sub(1, Ordering::Release) != 1 {
                    return;
                }
                fence(Ordering::Acquire);
            }
            // An exited guard's node that nobody restored: the frame it parked is released
            // after the node, so that a panicking destructor there cannot leak this node and
            // its chain.
            let parked = header.guard_saved.load(Ordering::Relaxed);
            let release_link = header.release_link;
            // SAFETY: the count reached zero, so we are the only one with access; the parent
            // slot is taken exactly once, here.
            let parent = unsafe { (*ptr.as_ptr()).parent.take() };
            if header.borrowed.load(Ordering::Relaxed) {
                // A borrowed parent holds no count: nothing to release.
                mem::forget(parent);
                // SAFETY: as below.
                release_then_parked(|| unsafe { release_link(ptr) }, parked);
                return;
            }
            // SAFETY: `release_link` matches the node kind (set at construction) and is
            // called once, after the link count reached zero.
            release_then_parked(|| unsafe { release_link(ptr) }, parked);
            next = parent.map(|p| ManuallyDrop::new(p).ptr);
        }
    }
}

impl Header {
    /// This node's id, unique for the life of the process; assigned on first use.
    #[inline]
    pub(crate) fn id(&self) -> u64 {
        // Relaxed: the id is a plain label; agreement only needs the compare-exchange.
        match self.id.load(Ordering::Relaxed) {
            0 => cache::assign_id(&self.id),
            id => id,
        }
    }

    /// Whether this node binds its variable to nothing (see [`NodeRef::new_unset`]).
    #[inline]
    pub(crate) fn is_unset(&self) -> bool {
        self.flags & UNSET != 0
    }

    /// Whether this node is hidden from users (a carried value).
    #[inline]
    pub(crate) fn is_hidden(&self) -> bool {
        self.flags & HIDDEN != 0
    }

    /// Parks the frame an exited guard should restore (see `current::exit_owned`), unless
    /// the node is orphaned (nobody will make it current again to restore it): then the frame
    /// is released at once, and so nothing holding this node (a capture of its frame) keeps
    /// it, and what it holds, alive.
    pub(crate) fn park_guard_saved(&self, saved: usize) {
        // AcqRel: the word is also written by whoever orphans the node, possibly on another
        // thread (releasing the parked frame of a node it dropped last); a parked frame is
        // read back on this thread, or by the last owner after the Release/Acquire of the
        // link count.
        let mut current = self.guard_saved.load(Ordering::Acquire);
        loop {
            if current == ORPHANED {
                return release_parked(saved);
            }
            match self.guard_saved.compare_exchange(
                current,
                saved,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(old) => return release_parked(old),
                Err(now) => current = now,
            }
        }
    }

    /// Marks the node orphaned: the slot's reference to this guard's node is released without
    /// the node being made current again, so nobody will restore the frame its guard saved.
    /// A frame already parked is released now; one parked later is released at once.
    pub(crate) fn orphan(&self) {
        release_parked(self.guard_saved.swap(ORPHANED, Ordering::AcqRel));
    }

    /// Takes the parked frame, 0 if none.
    pub(crate) fn take_guard_saved(&self) -> usize {
        self.guard_saved.swap(0, Ordering::Relaxed)
    }

    /// Whether this binding crosses contextflow's spawns (not [`Inherit::Never`]).
    #[cfg(feature = "diagnostics")]
    pub(crate) fn is_inherited(&self) -> bool {
        self.flags & INHERIT != 0
    }

    /// Whether this binding crosses plain spawns on a hooked runtime ([`Inherit::Everywhere`]).
    #[cfg(feature = "diagnostics")]
    pub(crate) fn is_plain(&self) -> bool {
        self.flags & PLAIN != 0
    }

    /// Whether this node is a guard marker, which binds nothing.
    #[inline]
    pub(crate) fn is_marker(&self) -> bool {
        self.key == MARKER_KEY
    }

    /// The parent frame, null at the root.
    #[inline]
    pub(crate) fn parent_ptr(&self) -> *const Header {
        self.parent.as_ref().map_or(ptr::null(), NodeRef::as_ptr)
    }

    pub(crate) fn type_name(&self) -> &'static str {
        (self.vtable.type_name)()
    }

    /// A pointer to the value, whatever its type.
    #[inline]
    pub(crate) fn value_ptr(&self) -> *const () {
        self.value.as_ptr()
    }

    /// The value, as a `T`.
    ///
    /// # Safety
    /// `T` must be the type the node was created with, i.e. the type of the variable whose
    /// key this header carries (keys are unique per `AsyncLocal<T>` instance).
    #[inline]
    pub(crate) unsafe fn value<T>(&self) -> &T {
        // SAFETY: by the caller's contract `value` points at a live `T` (kept alive by the
        // value count that this header holds).
        unsafe { self.value.cast::<T>().as_ref() }
    }
}

/// Runs `release`, then releases the frame parked in `parked` (see [`release_parked`]), also
/// when `release` panics: that panic waits until the parked frame is released, so that a
/// second one there does not abort the process, and nothing is leaked.
#[inline]
fn release_then_parked(release: impl FnOnce(), parked: usize) {
    if parked == 0 {
        release();
    } else {
        release_then_parked_cold(release, parked);
    }
}

#[cold]
fn release_then_parked_cold(release: impl FnOnce(), parked: usize) {
    let released = panic::catch_unwind(AssertUnwindSafe(release));
    release_parked(parked);
    if let Err(payload) = released {
        panic::resume_unwind(payload);
    }
}

/// In a slot value (the current frame, or a frame an enter guard saved): the slot owns a
/// count on the node.
pub(crate) const OWNED: usize = 0b001;

/// In a `guard_saved` word: the guard has exited, and the rest of the word is the frame to
/// restore instead of the node's.
pub(crate) const EXITED: usize = 0b010;

/// In an owned slot value: the count is a copy taken of a frame a construct borrowed (see
/// `current::enter_owned`), not the one reference through which an enter guard's node is
/// made current and restored.
pub(crate) const COPY: usize = 0b100;

/// The tag bits of slot values and `guard_saved` words (nodes are aligned to 8 bytes).
pub(crate) const TAGS: usize = OWNED | EXITED | COPY;

/// A whole `guard_saved` word: the node is orphaned (see [`Header::orphan`]). No parked word
/// equals it: `COPY` comes with `OWNED` and a pointer.
pub(crate) const ORPHANED: usize = COPY;

/// Releases the owned frame in a parked `guard_saved` word, if any (see the tags above). The
/// parked frame, unless a copy, is the one reference through which an enter guard's node was
/// to be made current again: released unrestored, that node is orphaned first.
pub(crate) fn release_parked(parked: usize) {
    let frame = parked & !TAGS;
    if parked & OWNED != 0 && frame != 0 {
        // SAFETY: a parked frame is an owned count that nothing else refers to.
        let frame = unsafe { NodeRef::from_raw(frame as *const Header) };
        if parked & COPY == 0 {
            frame.header().orphan();
        }
        drop(frame);
    }
}

// ===== node kinds =====

impl<T: Send + Sync + 'static> ValueNode<T> {
    const VTABLE: VTable = VTable {
        release_value: Self::release_value,
        type_name: std::any::type_name::<T>,
    };

    /// Whether this node type is allocated from the per-thread pool.
    const POOLED: bool = pool::fits(Layout::new::<ValueNode<T>>());

    /// Uninitialized memory for one node. Never null.
    fn alloc() -> *mut ValueNode<T> {
        if Self::POOLED {
            return pool::alloc_block().cast();
        }
        let layout = Layout::new::<ValueNode<T>>();
        // SAFETY: a node has a non-zero size (its header).
        let raw = unsafe { alloc(layout) };
        if raw.is_null() {
            handle_alloc_error(layout);
        }
        raw.cast()
    }

    /// # Safety
    /// `head` must be the head of a `ValueNode<T>` whose value count just reached zero.
    unsafe fn release_value(head: NonNull<ValueHead>) {
        let raw = head.as_ptr().cast::<ValueNode<T>>();
        // SAFETY: allocated by `ValueNode::<T>::alloc` and initialized in `value_node` (the head
        // is at offset 0 thanks to `#[repr(C)]`), and this is the last holder. The parent was
        // taken when the link count reached zero, so this drops only the value.
        unsafe {
            // Freed after the value is dropped, also when its destructor panics.
            let _free = FreeOnDrop(raw);
            ptr::drop_in_place(raw);
        }
    }
}

/// Frees a value node's memory when dropped: after its value is dropped, also when the value's
/// destructor panics (the block would leak otherwise).
struct FreeOnDrop<T: Send + Sync + 'static>(*mut ValueNode<T>);

impl<T: Send + Sync + 'static> Drop for FreeOnDrop<T> {
    fn drop(&mut self) {
        // SAFETY: made only in `release_value` and `release_value_node`, on a node allocated
        // by `ValueNode::<T>::alloc` whose value is being dropped by its last holder; freed
        // once, here, and not used after.
        unsafe {
            if ValueNode::<T>::POOLED {
                pool::free_block(self.0.cast());
            } else {
                dealloc(self.0.cast(), Layout::new::<ValueNode<T>>());
            }
        }
    }
}

/// `release_link` of a value node: gives up the node's own value count.
///
/// # Safety
/// `ptr` must be a value node whose link count just reached zero.
unsafe fn release_value_link(ptr: NonNull<Header>) {
    // SAFETY: a value node's header is the start of its `ValueHead`.
    unsafe { release_value_count(ptr.cast::<ValueHead>(), ptr.as_ref().vtable) }
}

/// `release_link` of an alias node: gives up its value count and frees the alias.
///
/// # Safety
/// `ptr` must be an alias node whose link count just reached zero.
unsafe fn release_alias_link(ptr: NonNull<Header>) {
    let raw = ptr.as_ptr().cast::<AliasNode>();
    // SAFETY: allocated from the pool in `new_alias`; the parent was already taken, and the
    // other fields need no drop.
    let (owner, vtable) = unsafe { ((*raw).header.owner, (*raw).header.vtable) };
    // SAFETY: as above; the block is not used again.
    unsafe { pool::free_block(raw.cast()) };
    // SAFETY: the alias held one value count on `owner`, given up here exactly once.
    unsafe { release_value_count(owner, vtable) }
}

/// # Safety
/// The caller must own one value count on `owner`.
unsafe fn release_value_count(owner: NonNull<ValueHead>, vtable: &'static VTable) {
    // SAFETY: our value count keeps the value node allocated.
    let head = unsafe { owner.as_ref() };
    // As in `NodeRef::drop`: a count of 1 is ours alone.
    let last = head.value_refs.load(Ordering::Acquire) == 1
        || head.value_refs.fetch_sub(1, Ordering::Release) == 1;
    if last {
        fence(Ordering::Acquire);
        // SAFETY: the value count reached zero: we are the last holder.
        unsafe { (vtable.release_value)(owner) };
    }
}

pub(crate) mod cache;
mod chain;
mod pool;

#[cfg(all(test, loom))]
mod loom_tests;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{pool, AliasNode, ValueHead, ValueNode};
    use std::{alloc::Layout, mem::size_of};

    /// Keeps the sizes quoted in `pool.rs` true (64-bit targets).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn node_sizes() {
        // The feature `diagnostics` adds the binding's site (one pointer); without it the
        // site is zero-sized.
        let head = if cfg!(feature = "diagnostics") {
            120
        } else {
            112
        };
        assert_eq!(size_of::<ValueHead>(), head, "value node head");
        assert!(pool::fits(Layout::new::<AliasNode>()));
        assert!(pool::fits(Layout::new::<ValueNode<[u64; 2]>>()));
        // OpenTelemetry's `Context`, which every request that `contextflow-otel` carries
        // binds, is 24 bytes; a `String` too.
        assert!(pool::fits(Layout::new::<ValueNode<[u64; 4]>>()));
        #[cfg(not(feature = "diagnostics"))]
        assert!(!pool::fits(Layout::new::<ValueNode<[u64; 5]>>()));
        #[cfg(feature = "diagnostics")]
        assert!(!pool::fits(Layout::new::<ValueNode<[u64; 6]>>()));
    }
}
