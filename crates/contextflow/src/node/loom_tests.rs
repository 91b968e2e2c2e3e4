//! loom models of the node protocols: link and value counts, the iterative release of a chain,
//! `share` of a `sync_scope` node (borrowed parent) racing a release on another thread, the
//! capture that leaves shadowed and private bindings out, the parked frame of an enter guard,
//! and frame id reservation. Each model counts the interleavings it explores and prints them.

use std::sync::atomic::{AtomicUsize as StdCounter, Ordering as StdOrdering};

use loom::{
    cell::UnsafeCell,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use super::{cache, capture, share, Header, NodeRef, Site, EXITED, OWNED, TAGS};
use crate::Inherit;

/// A value that counts its drops, with a payload that the models' threads read and the
/// destructor writes, both through loom's `UnsafeCell`: a read on one thread that is not
/// ordered before the drop on another (a release count weakened to `Relaxed`, a missing
/// `Acquire` fence) is a data race, which loom reports. Without it the models would only count
/// drops, and pass with the orderings weakened.
struct Counted {
    drops: Arc<AtomicUsize>,
    payload: UnsafeCell<u64>,
}

// SAFETY: the payload is read through shared references and written only by the destructor,
// which runs once nothing else can reach the value: exactly what the models check (loom
// reports a read that races the write).
unsafe impl Sync for Counted {}

impl Counted {
    fn new(drops: Arc<AtomicUsize>) -> Self {
        Counted::valued(drops, 7)
    }

    fn valued(drops: Arc<AtomicUsize>, value: u64) -> Self {
        Counted {
            drops,
            payload: UnsafeCell::new(value),
        }
    }

    /// Reads the payload (a racing write is a loom failure).
    fn read(&self) -> u64 {
        // SAFETY: a plain read; loom checks it against the destructor's write.
        self.payload.with(|p| unsafe { *p })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: the only access.
        self.payload.with_mut(|p| unsafe { *p = 0 });
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs `model` under loom, then prints and checks the number of interleavings explored.
fn explore(name: &str, model: impl Fn() + Sync + Send + 'static) {
    // A std counter of this call's own (loom's types only work inside the model).
    let runs = std::sync::Arc::new(StdCounter::new(0));
    let counter = runs.clone();
    loom::model(move || {
        counter.fetch_add(1, StdOrdering::SeqCst);
        model()
    });
    let n = runs.load(StdOrdering::SeqCst);
    println!("loom {name}: {n} interleavings");
    assert!(n > 1, "{name}: explores more than one interleaving");
}

#[test]
fn clone_and_drop_on_two_threads_drops_the_value_once() {
    explore("clone and drop", || {
        let drops = Arc::new(AtomicUsize::new(0));
        let node = NodeRef::new_value(None, 2, "v", Inherit::Always, Counted::new(drops.clone()));
        let other = node.clone();
        let t = thread::spawn(move || {
            // SAFETY: `other` is alive, and key 2 was bound to a `Counted` above.
            let found = unsafe { Header::find(other.as_ptr(), 2) };
            // SAFETY: as above.
            let seen = found.map(|h| unsafe { h.value::<Counted>() }.read());
            assert_eq!(seen, Some(7));
            drop(other);
        });
        drop(node);
        t.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn alias_keeps_the_value_while_both_threads_release() {
    explore("alias and original released concurrently", || {
        let parent_drops = Arc::new(AtomicUsize::new(0));
        let value_drops = Arc::new(AtomicUsize::new(0));
        let parent = NodeRef::new_value(
            None,
            2,
            "parent",
            Inherit::Always,
            Counted::new(parent_drops.clone()),
        );
        let node = NodeRef::new_value(
            Some(parent),
            3,
            "v",
            Inherit::Always,
            Counted::new(value_drops.clone()),
        );
        // Re-bind the value with no parent, then release the original and the alias on two
        // threads at once: the value is dropped once, by whichever goes last.
        let alias = NodeRef::new_alias(node.header(), None);
        let t = thread::spawn(move || {
            // SAFETY: `node` is alive; keys 2 and 3 hold `Counted`s.
            unsafe {
                assert_eq!(
                    Header::find(node.as_ptr(), 2).map(|h| h.value::<Counted>().read()),
                    Some(7)
                );
                assert_eq!(
                    Header::find(node.as_ptr(), 3).map(|h| h.value::<Counted>().read()),
                    Some(7)
                );
            }
            drop(node)
        });
        // SAFETY: `alias` is alive; key 3 holds a `Counted`.
        let seen = unsafe { Header::find(alias.as_ptr(), 3).map(|h| h.value::<Counted>().read()) };
        assert_eq!(seen, Some(7));
        drop(alias);
        t.join().unwrap();
        assert_eq!(parent_drops.load(Ordering::SeqCst), 1);
        assert_eq!(value_drops.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn share_of_a_borrowed_node_races_a_release() {
    explore("share against a concurrent release", || {
        let drops = Arc::new(AtomicUsize::new(0));
        let root = NodeRef::new_value(
            None,
            2,
            "root",
            Inherit::Always,
            Counted::new(drops.clone()),
        );
        // A `sync_scope` node: borrows `root` (no count) while unshared.
        // SAFETY: `root` outlives `scoped` until `share` gives it a counted parent below.
        let scoped = unsafe {
            NodeRef::new_value_borrowing(
                root.as_ptr(),
                3,
                "scoped",
                Inherit::Always,
                Counted::new(drops.clone()),
                Site::NONE,
            )
        };
        // Another owner of `root` lets go while this thread shares the scoped node.
        let other_root = root.clone();
        let t0 = thread::spawn(move || {
            // SAFETY: `other_root` is alive; key 2 holds a `Counted`.
            let seen = unsafe { Header::find(other_root.as_ptr(), 2) }
                // SAFETY: as above.
                .map(|h| unsafe { h.value::<Counted>() }.read());
            assert_eq!(seen, Some(7));
            drop(other_root);
        });
        // SAFETY: `scoped` is alive and was made on this thread.
        let shared = unsafe { share(scoped.as_ptr()) };
        let t = thread::spawn(move || {
            // SAFETY: `shared` keeps the chain alive; keys 2 and 3 hold `Counted`s.
            unsafe {
                assert_eq!(
                    Header::find(shared.as_ptr(), 2).map(|h| h.value::<Counted>().read()),
                    Some(7)
                );
                assert_eq!(
                    Header::find(shared.as_ptr(), 3).map(|h| h.value::<Counted>().read()),
                    Some(7)
                );
            }
            drop(shared);
        });
        // The scope ends (through `sync_scope`'s typed release) and its parent's owner goes
        // away while the other thread still reads.
        // SAFETY: `scoped` was made with a `Counted`.
        unsafe { scoped.release_value_node::<Counted>() };
        drop(root);
        t.join().unwrap();
        t0.join().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            2,
            "both values dropped exactly once"
        );
    });
}

#[test]
fn capture_leaves_out_shadowed_and_private_bindings_under_a_concurrent_release() {
    explore("capture (shadow and private) and release", || {
        let tx_drops = Arc::new(AtomicUsize::new(0));
        let old_drops = Arc::new(AtomicUsize::new(0));
        let kept_drops = Arc::new(AtomicUsize::new(0));
        let req = NodeRef::new_value(
            None,
            2,
            "req",
            Inherit::Always,
            Counted::valued(kept_drops.clone(), 2),
        );
        let old = NodeRef::new_value(
            Some(req),
            4,
            "gen",
            Inherit::Always,
            Counted::new(old_drops.clone()),
        );
        let tx = NodeRef::new_value(
            Some(old),
            3,
            "tx",
            Inherit::Never,
            Counted::new(tx_drops.clone()),
        );
        let top = NodeRef::new_value(
            Some(tx),
            4,
            "gen",
            Inherit::Always,
            Counted::valued(kept_drops.clone(), 4),
        );
        // SAFETY: `top` is alive for the call.
        let child = unsafe { capture(top.as_ptr(), true) }.unwrap();
        let t = thread::spawn(move || {
            // SAFETY: `child` is alive; keys 2 and 4 hold `Counted`s in the rebuilt chain.
            unsafe {
                assert!(
                    Header::find(child.as_ptr(), 3).is_none(),
                    "private left out"
                );
                assert_eq!(
                    Header::find(child.as_ptr(), 4).map(|h| h.value::<Counted>().read()),
                    Some(4)
                );
                assert_eq!(
                    Header::find(child.as_ptr(), 2).map(|h| h.value::<Counted>().read()),
                    Some(2)
                );
            }
            drop(child);
        });
        drop(top);
        t.join().unwrap();
        assert_eq!(kept_drops.load(Ordering::SeqCst), 2);
        assert_eq!(tx_drops.load(Ordering::SeqCst), 1);
        assert_eq!(
            old_drops.load(Ordering::SeqCst),
            1,
            "the shadowed value is not kept"
        );
    });
}

#[test]
fn a_parked_guard_frame_is_released_once_by_the_last_owner() {
    // `take_back`: this thread takes the parked frame back before dropping its marker (the
    // frame is unwound), or leaves it parked, so that whichever thread drops the marker last
    // (this one or the other) releases it in `NodeRef::drop`. Without the second case the
    // release by the last owner on another thread was never reached.
    for take_back in [true, false] {
        let name = if take_back {
            "enter-guard marker parking, taken back"
        } else {
            "enter-guard marker parking, released by the last owner"
        };
        explore(name, move || {
            let drops = Arc::new(AtomicUsize::new(0));
            let saved = NodeRef::new_value(
                None,
                2,
                "saved",
                Inherit::Always,
                Counted::new(drops.clone()),
            );
            let marker = NodeRef::new_marker(None);
            let other = marker.clone();
            // The guard exits out of order: its saved frame (owned, bit 0) is parked in its
            // node.
            marker
                .header()
                .park_guard_saved(saved.into_raw() as usize | OWNED | EXITED);
            let t = thread::spawn(move || drop(other));
            if take_back {
                let taken = marker.header().take_guard_saved();
                assert_ne!(taken, 0, "parked here, taken only here");
                // SAFETY: the parked word owns one count on the frame.
                drop(unsafe { NodeRef::from_raw((taken & !TAGS) as *const Header) });
            }
            drop(marker);
            t.join().unwrap();
            assert_eq!(
                drops.load(Ordering::SeqCst),
                1,
                "the parked frame is released once"
            );
        });
    }
}

#[test]
fn an_orphaned_guard_node_releases_what_its_guard_saved_once() {
    // A guard's node `g` whose one slot reference is parked in another exited guard's marker,
    // released last on another thread (which orphans `g`), while this thread's guard of `g`
    // exits out of order and parks its saved frame in `g`: whichever comes second releases
    // the saved frame, once, and the other thread reads `g`'s parked word only through the
    // atomic word.
    explore("orphaned guard node against its guard's parking", || {
        let drops = Arc::new(AtomicUsize::new(0));
        let saved = NodeRef::new_value(
            None,
            2,
            "saved",
            Inherit::Always,
            Counted::new(drops.clone()),
        );
        let g = NodeRef::new_value(None, 3, "g", Inherit::Always, Counted::new(drops.clone()));
        let marker = NodeRef::new_marker(None);
        // `g`'s slot reference, parked in the marker as the frame its guard saved.
        marker
            .header()
            .park_guard_saved(g.clone().into_raw() as usize | OWNED | EXITED);
        let t = thread::spawn(move || drop(marker));
        g.header()
            .park_guard_saved(saved.into_raw() as usize | OWNED | EXITED);
        t.join().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the saved frame is released once g is orphaned, while g lives"
        );
        drop(g);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn id_blocks_never_overlap() {
    explore("frame id reservation", || {
        let next = Arc::new(AtomicU64::new(1));
        let t = {
            let next = next.clone();
            thread::spawn(move || cache::reserve(&*next))
        };
        let mine = cache::reserve(&*next);
        let theirs = t.join().unwrap();
        assert_ne!(mine, theirs);
        assert!(mine.abs_diff(theirs) >= 1 << 16, "blocks are disjoint");
    });
}

#[test]
fn racing_first_lookups_agree_on_a_nodes_id() {
    explore("lazy node id", || {
        let node = NodeRef::new_value(None, 2, "v", Inherit::Always, 1u8);
        let other = node.clone();
        let t = thread::spawn(move || other.header().id());
        let mine = node.header().id();
        let theirs = t.join().unwrap();
        assert_eq!(mine, theirs, "one id per node");
        assert_ne!(mine, 0);
        assert_eq!(node.header().id(), mine, "stable");
    });
}
