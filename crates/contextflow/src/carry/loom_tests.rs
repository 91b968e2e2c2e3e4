//! loom model of the carrier registry: a capture that reads the list while a registration
//! publishes a new one sees either the old list or the whole new one, never a torn list.

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::{sync::atomic::AtomicPtr, sync::Arc, thread};

use super::{publish, read};

#[test]
fn a_reader_sees_the_old_or_the_whole_new_list() {
    static ITERATIONS: AtomicUsize = AtomicUsize::new(0);
    loom::model(|| {
        ITERATIONS.fetch_add(1, Ordering::Relaxed);
        let slot: Arc<AtomicPtr<Vec<u32>>> = Arc::new(AtomicPtr::new(std::ptr::null_mut()));
        publish(&*slot, vec![1]);
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || publish(&*slot, vec![1, 2, 3]))
        };
        let seen = read(&*slot).to_vec();
        assert!(seen == [1] || seen == [1, 2, 3], "torn list {seen:?}");
        writer.join().unwrap();
        assert_eq!(read(&*slot), [1, 2, 3]);
        // Lists are leaked on purpose in production (a reader may still hold an old one); free
        // the last one here, which nobody reads any more.
        // SAFETY: published by `publish` from `Box::into_raw`; no reader is left.
        drop(unsafe { Box::from_raw(slot.load(loom::sync::atomic::Ordering::SeqCst)) });
    });
    let n = ITERATIONS.load(Ordering::Relaxed);
    println!("loom carrier registry: {n} interleavings");
    assert!(n > 1, "the model explores more than one interleaving");
}
