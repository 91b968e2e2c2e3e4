//! loom model of lazy key assignment: racing first uses agree on one key, and two variables
//! never share one.

use std::sync::atomic::{AtomicUsize as StdCounter, Ordering};

use loom::{sync::atomic::AtomicUsize, sync::Arc, thread};

use super::keys;

#[test]
fn racing_first_use_agrees_on_one_key() {
    static RUNS: StdCounter = StdCounter::new(0);
    loom::model(|| {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let next = Arc::new(AtomicUsize::new(2));
        let slot = Arc::new(AtomicUsize::new(0));
        let other = Arc::new(AtomicUsize::new(0));
        let t = {
            let (next, slot) = (next.clone(), slot.clone());
            thread::spawn(move || keys::assign(&*slot, &*next))
        };
        let mine = keys::assign(&*slot, &*next);
        let theirs = t.join().unwrap();
        assert_eq!(mine, theirs);
        assert_ne!(mine, 0);
        let different = keys::assign(&*other, &*next);
        assert_ne!(different, mine);
    });
    let n = RUNS.load(Ordering::SeqCst);
    println!("loom key assignment: {n} interleavings");
    assert!(n > 1);
}
