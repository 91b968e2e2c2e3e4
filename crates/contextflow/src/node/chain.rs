//! Chain logic: reading and reshaping the chains that `node.rs` lays out. Lookups
//! ([`lookup`], [`Header::find`]), the filter and flags a new node takes from its parent
//! (`chain_flags`), and the captures that leave shadowed and private bindings out
//! ([`capture`]).

use std::ptr;

use super::{
    cache, share, Header, NodeRef, CHAIN_HAS_NON_PLAIN, CHAIN_HAS_PRIVATE, HIDDEN, INHERIT,
    MARKER_KEY, MAYBE_SHADOW, PLAIN,
};

impl Header {
    /// Finds the innermost binding of `key` in the chain that starts at `frame`.
    ///
    /// # Safety
    /// `frame` must be null or point to a live node.
    #[inline]
    pub(crate) unsafe fn find(mut frame: *const Header, key: usize) -> Option<&'static Header> {
        while !frame.is_null() {
            // SAFETY: `frame` is live by the caller's contract, and each live node keeps its
            // parent alive. The `'static` lifetime is narrowed by every caller to the time the
            // frame is known to stay alive.
            let header = unsafe { &*frame };
            if header.key == key {
                return (!header.is_unset()).then_some(header);
            }
            frame = header.parent.as_ref().map_or(ptr::null(), NodeRef::as_ptr);
        }
        None
    }
}

/// The binding of `key` in the frame at `frame` (null: the empty frame): O(1) when it is the
/// innermost binding, and through the per-thread cache otherwise.
///
/// # Safety
/// `frame` must be null or point to a live node that stays alive while the result is used.
#[inline]
pub(crate) unsafe fn lookup(frame: *const Header, key: usize) -> Option<&'static Header> {
    // SAFETY: live by the caller's contract.
    let top = unsafe { frame.as_ref() }?;
    if top.key == key {
        return (!top.is_unset()).then_some(top);
    }
    // SAFETY: live by the caller's contract.
    unsafe { cache::lookup(top, key) }
}

/// Takes an owned reference to the frame at `frame` (null gives `None`) for a capture that
/// may outlive this thread's stack: a snapshot, or (with `skip_private`) a spawned child, which
/// does not get the bindings of variables that are not inherited.
///
/// A captured frame never keeps a value that no lookup can reach: bindings shadowed by a later
/// binding of the same variable (and, with `skip_private`, non-inherited ones) are left out.
/// O(1) when the chain's flags say there is nothing to leave out (no variable bound twice, no
/// private binding); otherwise O(nodes down to the deepest binding left out), and only the
/// bindings above that one are rebuilt (as aliases sharing their values).
///
/// # Safety
/// `frame` must be null or point to a live node of this thread's current frame.
pub(crate) unsafe fn capture(frame: *const Header, skip_private: bool) -> Option<NodeRef> {
    // SAFETY: the caller's contract.
    unsafe { capture_keeping(frame, if skip_private { INHERIT } else { 0 }) }
}

/// [`capture`] for a plain spawn on a hooked runtime: keeps only the bindings marked
/// [`Inherit::Everywhere`].
///
/// # Safety
/// As [`capture`].
#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
pub(crate) unsafe fn capture_plain(frame: *const Header) -> Option<NodeRef> {
    // SAFETY: the caller's contract.
    unsafe { capture_keeping(frame, INHERIT | PLAIN) }
}

/// [`capture`], keeping only the bindings with all of `required`'s bits (`INHERIT`, `PLAIN`).
///
/// # Safety
/// As [`capture`].
unsafe fn capture_keeping(frame: *const Header, required: u8) -> Option<NodeRef> {
    // SAFETY: live by the caller's contract.
    let frame = unsafe { skip_markers(frame) };
    if frame.is_null() {
        return None;
    }
    // SAFETY: live by the caller's contract.
    let top = unsafe { &*frame };
    let mut flags_to_check = MAYBE_SHADOW;
    if required & INHERIT != 0 {
        flags_to_check |= CHAIN_HAS_PRIVATE;
    }
    if required & PLAIN != 0 {
        flags_to_check |= CHAIN_HAS_NON_PLAIN;
    }
    if top.flags & flags_to_check == 0 {
        // SAFETY: live by the caller's contract.
        return Some(unsafe { share(frame) });
    }
    // Walk down, keeping the visible bindings (innermost first), until the rest of the chain
    // provably holds nothing to leave out.
    let mut kept: Vec<&Header> = Vec::new();
    let mut seen_keys: Vec<usize> = Vec::new();
    let mut seen_mask = 0u64;
    // `kept[..kept_above_drop]` are the bindings above the deepest one left out, and
    // `tail` the node right below it: the part shared as it is.
    let mut kept_above_drop = 0;
    let mut tail: *const Header = ptr::null();
    let mut dropped_any = false;
    let mut node = frame;
    while !node.is_null() {
        // SAFETY: every node of a live chain is live.
        let header = unsafe { &*node };
        if header.flags & flags_to_check == 0 && header.mask & seen_mask == 0 {
            // Nothing below is shadowed by what we saw, nor private, nor shadowed within.
            break;
        }
        let next = header.parent_ptr();
        if header.is_marker() || header.is_hidden() {
            node = next;
            continue;
        }
        let bit = key_bit(header.key);
        let shadowed = seen_mask & bit != 0 && seen_keys.contains(&header.key);
        let private = header.flags & required != required;
        if !shadowed {
            seen_keys.push(header.key);
            seen_mask |= bit;
        }
        if shadowed || private {
            dropped_any = true;
            kept_above_drop = kept.len();
            tail = next;
        } else {
            // Unset bindings are kept too: one may hide a binding of the shared tail.
            kept.push(header);
        }
        node = next;
    }
    if !dropped_any {
        // SAFETY: live by the caller's contract.
        return Some(unsafe { share(frame) });
    }
    let mut rebuilt = if tail.is_null() {
        None
    } else {
        // SAFETY: a node of a live chain.
        Some(unsafe { share(tail) })
    };
    for binding in kept[..kept_above_drop].iter().rev() {
        if binding.is_unset() && rebuilt.is_none() {
            // An unset binding with nothing below has nothing to hide.
            continue;
        }
        rebuilt = Some(NodeRef::new_alias(binding, rebuilt));
    }
    rebuilt
}

/// The Bloom bit of a variable key (none for markers).
#[inline]
fn key_bit(key: usize) -> u64 {
    if key == MARKER_KEY {
        0
    } else {
        1 << (key % 64)
    }
}

/// `frame` without the guard markers at its top, which bind nothing and must not make a
/// captured frame look non-empty.
///
/// # Safety
/// `frame` must be null or point to a live node.
#[inline]
pub(crate) unsafe fn skip_markers(mut frame: *const Header) -> *const Header {
    // SAFETY: a live chain by the caller's contract.
    while let Some(header) = unsafe { frame.as_ref() } {
        if !header.is_marker() {
            break;
        }
        frame = header.parent_ptr();
    }
    frame
}

/// The flags and key mask of a node binding `key` with its own `own_flags` under `parent`.
#[inline]
pub(super) fn chain_flags(key: usize, own_flags: u8, parent: Option<&NodeRef>) -> (u8, u64) {
    let (parent_flags, parent_mask) = parent.map_or((0, 0), |p| {
        let h = p.header();
        (h.flags, h.mask)
    });
    let mut flags =
        own_flags | (parent_flags & (CHAIN_HAS_PRIVATE | CHAIN_HAS_NON_PLAIN | MAYBE_SHADOW));
    if own_flags & INHERIT == 0 {
        flags |= CHAIN_HAS_PRIVATE;
    }
    if own_flags & PLAIN == 0 {
        flags |= CHAIN_HAS_NON_PLAIN;
    }
    let bit = if own_flags & HIDDEN != 0 {
        0
    } else {
        key_bit(key)
    };
    if parent_mask & bit != 0 {
        flags |= MAYBE_SHADOW;
    }
    (flags, parent_mask | bit)
}
