use contextflow::{AsyncLocal, Snapshot};

static A: AsyncLocal<u32> = AsyncLocal::named("a");
static B: AsyncLocal<u32> = AsyncLocal::named("b");

#[test]
fn guard_restores_on_drop() {
    {
        let _a = A.enter(1);
        assert_eq!(A.get(), Some(1));
        {
            let _a2 = A.enter(2);
            assert_eq!(A.get(), Some(2));
        }
        assert_eq!(A.get(), Some(1));
    }
    assert_eq!(A.get(), None);
}

#[test]
fn out_of_order_drop_is_tolerated() {
    let a = A.enter(1);
    let b = B.enter(2);
    drop(a); // out of order: b is still entered
    assert_eq!(B.get(), Some(2));
    drop(b);
    assert_eq!(A.get(), None, "both guards gone: back to the empty frame");
    assert_eq!(B.get(), None);
}

#[test]
fn guard_inside_sync_scope() {
    A.sync_scope(1, || {
        let g = B.enter(2);
        assert_eq!((A.get(), B.get()), (Some(1), Some(2)));
        drop(g);
        assert_eq!((A.get(), B.get()), (Some(1), None));
    });
}

#[test]
fn guard_moved_into_with_closure_keeps_value_alive() {
    let g = A.enter(5);
    // The closure drops the guard while holding a reference to the value.
    let seen = A.with(move |v| {
        drop(g);
        v.copied()
    });
    assert_eq!(seen, Some(5));
    assert_eq!(A.get(), None);
}

#[test]
fn snapshot_enter_guard() {
    let snap = A.sync_scope(9, Snapshot::capture);
    let g = snap.enter();
    assert_eq!(A.get(), Some(9));
    drop(g);
    assert_eq!(A.get(), None);
}

#[test]
fn forgotten_guard_inside_a_poll_does_not_outlive_the_poll() {
    use std::future::Future;
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = Box::pin(A.scope(1, async {
        std::mem::forget(B.enter(2));
        assert_eq!(B.get(), Some(2));
    }));
    assert!(fut.as_mut().poll(&mut cx).is_ready());
    assert_eq!(B.get(), None, "the poll restored the frame from before it");
}
