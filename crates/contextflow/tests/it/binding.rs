//! `Binding`: a binding run again and again over the caller's frame, as a middleware enters a
//! request's bindings in its `call`, in each poll and in a response body.

use std::{
    panic::{self, AssertUnwindSafe},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use contextflow::{AsyncLocal, Binding, Inherit, Snapshot};

static OUTER: AsyncLocal<&'static str> = AsyncLocal::named("outer");
static REQUEST_ID: AsyncLocal<&'static str> = AsyncLocal::named("request_id");
static TRACE: AsyncLocal<u64> = AsyncLocal::named("trace");
static PRIVATE: AsyncLocal<u64> = AsyncLocal::named("private").inherit(Inherit::Never);

/// Counts the values dropped, to see that a binding's value is never cloned nor leaked.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

static COUNTED: AsyncLocal<Counted> = AsyncLocal::named("counted");

#[test]
fn layers_over_the_callers_frame_each_run() {
    let mut id = Binding::new(&REQUEST_ID, "req-1");
    let mut trace = Binding::new(&TRACE, 7);
    let mut both = || id.run(|| trace.run(|| (OUTER.get(), REQUEST_ID.get(), TRACE.get())));
    assert_eq!(both(), (None, Some("req-1"), Some(7)));
    // Under another frame: that frame's bindings are seen, the old one's are not kept.
    let seen = OUTER.sync_scope("first", &mut both);
    assert_eq!(seen, (Some("first"), Some("req-1"), Some(7)));
    let seen = OUTER.sync_scope("second", &mut both);
    assert_eq!(seen, (Some("second"), Some("req-1"), Some(7)));
    assert_eq!(
        both(),
        (None, Some("req-1"), Some(7)),
        "back to no outer frame"
    );
    assert_eq!((REQUEST_ID.get(), TRACE.get()), (None, None), "restored");
}

#[test]
fn inner_bindings_shadow_outer_ones() {
    let mut id = Binding::new(&REQUEST_ID, "inner");
    let seen = REQUEST_ID.sync_scope("outer", || id.run(|| REQUEST_ID.get()));
    assert_eq!(seen, Some("inner"));
    // A capture leaves the shadowed outer value out, as for scopes.
    let snapshot = REQUEST_ID.sync_scope("outer", || id.run(Snapshot::capture));
    assert_eq!(snapshot.get(&REQUEST_ID), Some("inner"));
}

#[test]
fn a_capture_inside_outlives_the_binding_and_its_caller() {
    let mut id = Binding::new(&REQUEST_ID, "req-2");
    let snapshot = OUTER.sync_scope("outer", || id.run(Snapshot::capture));
    drop(id);
    assert_eq!(snapshot.get(&REQUEST_ID), Some("req-2"));
    assert_eq!(snapshot.get(&OUTER), Some("outer"));
    let child = std::thread::spawn(move || snapshot.run(|| (OUTER.get(), REQUEST_ID.get())));
    assert_eq!(child.join().unwrap(), (Some("outer"), Some("req-2")));
}

#[test]
fn a_panic_restores_the_frame() {
    let mut id = Binding::new(&REQUEST_ID, "req-3");
    let caught = panic::catch_unwind(AssertUnwindSafe(|| {
        id.run(|| {
            assert_eq!(REQUEST_ID.get(), Some("req-3"));
            panic!("boom");
        })
    }));
    assert!(caught.is_err());
    assert_eq!(REQUEST_ID.get(), None);
    assert_eq!(id.run(|| REQUEST_ID.get()), Some("req-3"), "still usable");
}

#[test]
fn the_value_is_dropped_once_and_never_cloned() {
    let drops = Arc::new(AtomicUsize::new(0));
    let mut counted = Binding::new(&COUNTED, Counted(drops.clone()));
    for _ in 0..3 {
        counted.run(|| assert!(COUNTED.is_set()));
        OUTER.sync_scope("re-parented", || counted.run(|| assert!(COUNTED.is_set())));
    }
    let snapshot = counted.run(Snapshot::capture);
    drop(counted);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "the snapshot holds it");
    drop(snapshot);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[test]
fn an_inheritance_policy_is_kept() {
    let mut private = Binding::new(&PRIVATE, 5);
    let mut id = Binding::new(&REQUEST_ID, "req-4");
    let (all, inherited) = private.run(|| {
        id.run(|| {
            (
                Snapshot::capture(),
                contextflow::thread::spawn(|| (PRIVATE.get(), REQUEST_ID.get())),
            )
        })
    });
    assert_eq!(all.get(&PRIVATE), Some(5));
    assert_eq!(inherited.join().unwrap(), (None, Some("req-4")));
}

#[test]
fn moves_between_threads() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    let mut id = Binding::new(&REQUEST_ID, "req-5");
    assert_send_sync(&id);
    assert_eq!(id.run(|| REQUEST_ID.get()), Some("req-5"));
    let other = std::thread::spawn(move || {
        let seen = OUTER.sync_scope("there", || id.run(|| (OUTER.get(), REQUEST_ID.get())));
        (seen, id)
    });
    let (seen, mut id) = other.join().unwrap();
    assert_eq!(seen, (Some("there"), Some("req-5")));
    assert_eq!(
        id.run(|| (OUTER.get(), REQUEST_ID.get())),
        (None, Some("req-5"))
    );
}

#[test]
fn under_an_enter_guard() {
    let mut id = Binding::new(&REQUEST_ID, "req-6");
    let guard = OUTER.enter("guarded");
    let seen = id.run(|| (OUTER.get(), REQUEST_ID.get()));
    drop(guard);
    assert_eq!(seen, (Some("guarded"), Some("req-6")));
    assert_eq!(
        id.run(|| (OUTER.get(), REQUEST_ID.get())),
        (None, Some("req-6"))
    );
}
