//! loom models of the node reference counts: link counts, value counts and the iterative
//! release of a chain, under every interleaving of two threads.

use loom::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use super::{inheritable, Header, NodeRef};

/// A value that counts its drops.
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn clone_and_drop_on_two_threads_drops_the_value_once() {
    loom::model(|| {
        let drops = Arc::new(AtomicUsize::new(0));
        let node = NodeRef::new_value(None, 1, "v", true, Counted(drops.clone()));
        let other = node.clone();
        let t = thread::spawn(move || {
            // SAFETY: `other` is alive, and key 1 was bound to a `Counted` above.
            let found = unsafe { Header::find(other.as_ptr(), 1) };
            // SAFETY: as above.
            let seen = found.map(|h| unsafe { h.value::<Counted>() }.0.clone());
            assert!(seen.is_some());
            drop(other);
        });
        drop(node);
        t.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn alias_keeps_the_value_but_releases_the_original_parent() {
    loom::model(|| {
        let parent_drops = Arc::new(AtomicUsize::new(0));
        let value_drops = Arc::new(AtomicUsize::new(0));
        let parent = NodeRef::new_value(None, 1, "parent", true, Counted(parent_drops.clone()));
        let node = NodeRef::new_value(Some(parent), 2, "v", true, Counted(value_drops.clone()));
        // Re-bind the value with no parent, on another thread, then drop the original there.
        let t = thread::spawn(move || {
            let alias = NodeRef::new_alias(node.header(), None);
            drop(node);
            alias
        });
        let alias = t.join().unwrap();
        assert_eq!(
            parent_drops.load(Ordering::SeqCst),
            1,
            "the original's parent is released"
        );
        assert_eq!(
            value_drops.load(Ordering::SeqCst),
            0,
            "the alias still holds the value"
        );
        let t = thread::spawn(move || drop(alias));
        t.join().unwrap();
        assert_eq!(value_drops.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn inheritable_capture_and_concurrent_release() {
    loom::model(|| {
        let tx_drops = Arc::new(AtomicUsize::new(0));
        let req_drops = Arc::new(AtomicUsize::new(0));
        let req = NodeRef::new_value(None, 1, "req", true, Counted(req_drops.clone()));
        let tx = NodeRef::new_value(Some(req), 2, "tx", false, Counted(tx_drops.clone()));
        let top = NodeRef::new_value(Some(tx), 3, "after", true, 3u8);
        // SAFETY: `top` is alive for the call.
        let child = unsafe { inheritable(top.as_ptr()) }.unwrap();
        let t = thread::spawn(move || {
            // SAFETY: `child` is alive; keys 1 and 3 hold a `Counted` and a `u8`.
            unsafe {
                assert!(Header::find(child.as_ptr(), 2).is_none());
                assert!(Header::find(child.as_ptr(), 1).is_some());
                assert_eq!(
                    Header::find(child.as_ptr(), 3).map(|h| *h.value::<u8>()),
                    Some(3)
                );
            }
            drop(child);
        });
        drop(top);
        t.join().unwrap();
        assert_eq!(tx_drops.load(Ordering::SeqCst), 1);
        assert_eq!(req_drops.load(Ordering::SeqCst), 1);
    });
}
