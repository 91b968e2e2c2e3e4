//! loom model of the carrier registry: a capture that reads the list while a registration
//! publishes a new one sees either the old list or the whole new one, never a torn list. The
//! list's entries are loom cells written by the publishing thread, so a reader that could see
//! the new pointer without the entries' writes (a `Relaxed` publish or load) is reported as a
//! data race.

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::{cell::UnsafeCell, sync::atomic::AtomicPtr, sync::Arc, thread};

use super::{publish, read};

/// The entries of `list` as `u32`s, read through loom.
fn entries(list: &[UnsafeCell<u32>]) -> Vec<u32> {
    // SAFETY: entries are written only before their list is published.
    list.iter()
        .map(|cell| cell.with(|v| unsafe { *v }))
        .collect()
}

/// A list whose entries are written, through loom, by the calling thread.
fn list(values: &[u32]) -> Vec<UnsafeCell<u32>> {
    values
        .iter()
        .map(|&v| {
            let cell = UnsafeCell::new(0);
            // SAFETY: the cell is not shared yet.
            cell.with_mut(|p| unsafe { *p = v });
            cell
        })
        .collect()
}

#[test]
fn a_reader_sees_the_old_or_the_whole_new_list() {
    static ITERATIONS: AtomicUsize = AtomicUsize::new(0);
    loom::model(|| {
        ITERATIONS.fetch_add(1, Ordering::Relaxed);
        let slot: Arc<AtomicPtr<Vec<UnsafeCell<u32>>>> =
            Arc::new(AtomicPtr::new(std::ptr::null_mut()));
        publish(&*slot, list(&[1]));
        let writer = {
            let slot = slot.clone();
            thread::spawn(move || publish(&*slot, list(&[1, 2, 3])))
        };
        let seen = entries(read(&*slot));
        assert!(seen == [1] || seen == [1, 2, 3], "torn list {seen:?}");
        writer.join().unwrap();
        assert_eq!(entries(read(&*slot)), [1, 2, 3]);
        // Lists are leaked on purpose in production (a reader may still hold an old one); free
        // the last one here, which nobody reads any more.
        // SAFETY: published by `publish` from `Box::into_raw`; no reader is left.
        drop(unsafe { Box::from_raw(slot.load(loom::sync::atomic::Ordering::SeqCst)) });
    });
    let n = ITERATIONS.load(Ordering::Relaxed);
    println!("loom carrier registry: {n} interleavings");
    assert!(n > 1, "the model explores more than one interleaving");
}
