use contextflow::{AsyncLocal, Snapshot};

static A: AsyncLocal<u32> = AsyncLocal::named("a");
static B: AsyncLocal<String> = AsyncLocal::named("b");

#[test]
fn immutable_after_capture() {
    let snap = A.sync_scope(1, Snapshot::capture);
    let later = A.sync_scope(2, || {
        B.sync_scope("x".into(), || (snap.get(&A), snap.get(&B)))
    });
    assert_eq!(later, (Some(1), None));
}

#[test]
fn empty_and_run_replace_the_current_context() {
    A.sync_scope(1, || {
        assert!(Snapshot::empty().run(|| !A.is_set()));
        let other = B.sync_scope("b".into(), || Snapshot::empty().run(Snapshot::capture));
        assert!(other.is_empty());
    });
}

#[test]
fn runs_on_any_thread() {
    let snap = A.sync_scope(5, || B.sync_scope("five".into(), Snapshot::capture));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let snap = snap.clone();
            std::thread::spawn(move || snap.run(|| (A.get(), B.get())))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), (Some(5), Some("five".into())));
    }
}

#[test]
fn debug_names_variables_innermost_first_once() {
    let dbg = A.sync_scope(1, || {
        B.sync_scope("x".into(), || {
            A.sync_scope(2, || format!("{:?}", Snapshot::capture()))
        })
    });
    assert_eq!(dbg, "Snapshot { a: u32, b: alloc::string::String }");
    assert_eq!(format!("{:?}", Snapshot::empty()), "Snapshot");
}

#[test]
fn bind_captures_at_call() {
    let cb = A.sync_scope(3, || Snapshot::bind(|| A.get()));
    assert_eq!(A.sync_scope(4, cb), Some(3));
    let f = A.sync_scope(6, || Snapshot::bind_fn(|x: u32| A.get().map(|a| a + x)));
    assert_eq!(f(1), Some(7));
    assert_eq!(A.get(), None);
}

#[test]
fn capture_inside_nested_sync_scopes_outlives_them() {
    // The inner `sync_scope` nodes borrow their parents until something captures them; the
    // capture must give the whole chain counted parents before the scopes unwind.
    static C: AsyncLocal<Vec<u8>> = AsyncLocal::named("c");
    let (snap, bound_fn) = A.sync_scope(1, || {
        B.sync_scope("two".into(), || {
            C.sync_scope(vec![3; 64], || {
                (Snapshot::capture(), Snapshot::bind(|| (A.get(), B.get())))
            })
        })
    });
    assert_eq!((A.get(), B.get(), C.get()), (None, None, None));
    let seen = std::thread::spawn(move || {
        (
            snap.get(&A),
            snap.get(&B),
            snap.with(&C, |c| c.map(|c| c.len())),
            bound_fn(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(
        seen,
        (
            Some(1),
            Some("two".into()),
            Some(64),
            (Some(1), Some("two".into()))
        )
    );
}
