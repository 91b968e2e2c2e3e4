use std::panic::{catch_unwind, AssertUnwindSafe};

use contextflow::{AsyncLocal, Snapshot};

static ID: AsyncLocal<u32> = AsyncLocal::named("id");

#[test]
fn panic_in_sync_scope_restores() {
    let r = catch_unwind(|| ID.sync_scope(1, || panic!("boom")));
    assert!(r.is_err());
    assert_eq!(ID.get(), None);
}

#[test]
fn panic_in_snapshot_run_restores() {
    let snap = ID.sync_scope(2, Snapshot::capture);
    ID.sync_scope(3, || {
        let r = catch_unwind(AssertUnwindSafe(|| snap.run(|| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(ID.get(), Some(3));
    });
}

#[test]
fn panic_in_poll_restores() {
    use std::future::Future;
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = Box::pin(ID.scope(4, async { panic!("boom") }));
    let r = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
    assert!(r.is_err());
    assert_eq!(ID.get(), None);
}

/// A value whose destructor panics (unless the thread is already unwinding).
struct PanicsOnDrop;
impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("destructor fails");
        }
    }
}
static FRAGILE: AsyncLocal<PanicsOnDrop> = AsyncLocal::named("fragile");

/// Records what `ID` is when it is dropped.
struct Probe(std::sync::Arc<std::sync::Mutex<Vec<Option<u32>>>>);
impl Drop for Probe {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(ID.get());
    }
}

/// A scope future of `ID = id` holding a [`Probe`] on `log`, polled once under a binding of
/// `FRAGILE`: that frame then lives on only in the future's binding.
fn scope_polled_under_fragile(
    id: u32,
    log: &std::sync::Arc<std::sync::Mutex<Vec<Option<u32>>>>,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()>>> {
    use std::future::Future;
    let probe = Probe(log.clone());
    let mut fut = Box::pin(ID.scope(id, async move {
        let _probe = probe;
        std::future::pending::<()>().await
    }));
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    FRAGILE.sync_scope(PanicsOnDrop, || {
        assert!(fut.as_mut().poll(&mut cx).is_pending())
    });
    fut
}

/// A scope future polled under one frame, then polled again where that frame is gone: moving
/// the binding under the new frame releases the old one, whose value's destructor panics. The
/// panic reaches the poller, and the future stays whole: its context, and its inner future
/// dropped inside it (before, the binding was left half-updated and the drop itself panicked).
#[test]
fn panicking_destructor_while_moving_a_scope_to_another_frame() {
    use std::future::Future;
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut fut = scope_polled_under_fragile(7, &log);
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let r = catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
    assert!(r.is_err(), "the destructor's panic reaches the poller");
    assert_eq!(ID.get(), None);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut);
    assert_eq!(*log.lock().unwrap(), vec![Some(7)]);
    assert_eq!(ID.get(), None);
}

/// As above, but the future is dropped (not polled) where the old frame is gone: the inner
/// future is still dropped inside the scope's context, and the old frame's panicking destructor
/// runs after it.
#[test]
fn panicking_destructor_while_dropping_a_scope_moved_to_another_frame() {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let fut = scope_polled_under_fragile(8, &log);
    let r = catch_unwind(AssertUnwindSafe(move || drop(fut)));
    assert!(r.is_err(), "the destructor's panic reaches the dropper");
    assert_eq!(*log.lock().unwrap(), vec![Some(8)]);
    assert_eq!(ID.get(), None);
}

async fn panicking_task_does_not_leak_into_next_task() {
    // Many panicking tasks and many probing tasks on the same workers: a probe that is not in
    // any scope must never see a value.
    let mut panics = Vec::new();
    let mut probes = Vec::new();
    for i in 0..200 {
        panics.push(tokio::spawn(ID.scope(i, async move {
            tokio::task::yield_now().await;
            if i % 2 == 0 {
                panic!("task {i} fails");
            }
        })));
        probes.push(tokio::spawn(async {
            tokio::task::yield_now().await;
            ID.get()
        }));
    }
    for (i, p) in panics.into_iter().enumerate() {
        match p.await {
            Err(err) => assert!(err.is_panic() && i % 2 == 0, "task {i}: {err}"),
            Ok(()) => assert!(i % 2 == 1, "task {i} was meant to panic"),
        }
    }
    for p in probes {
        assert_eq!(p.await.unwrap(), None);
    }
}

on_both_runtimes! {
    panicking_task_does_not_leak_into_next_task => panicking_task_does_not_leak_into_next_task;
}

/// Sets its flag when dropped.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A `sync_scope` whose node outlives the frame it was made under (a capture gave it a
/// counted parent, and that frame's guard was dropped inside): when the scope ends, the
/// parent's last release runs a destructor that panics. The scope's own value is still
/// dropped, not leaked with its node.
#[test]
fn a_panicking_parent_does_not_leak_a_sync_scope_value() {
    static HELD: AsyncLocal<DropFlag> = AsyncLocal::named("held");
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard = FRAGILE.enter(PanicsOnDrop);
    let flag = DropFlag(dropped.clone());
    let r = catch_unwind(AssertUnwindSafe(move || {
        HELD.sync_scope(flag, move || {
            let captured = Snapshot::capture();
            drop(guard);
            drop(captured);
        })
    }));
    assert!(r.is_err(), "the parent's destructor panicked");
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the scope's value was dropped"
    );
    assert!(!FRAGILE.with(|v| v.is_some()));
}

/// Panics in its destructor, also while the thread is already unwinding.
struct AlwaysPanics;
impl Drop for AlwaysPanics {
    fn drop(&mut self) {
        panic!("destructor fails");
    }
}

/// Two destructors that panic in one release (the scope's value, then its parent's): the
/// first panic waits until the parent is released, so the second does not abort the process
/// (a panic while unwinding), and one panic reaches the caller.
#[test]
fn two_panicking_destructors_in_one_release_do_not_abort() {
    static OUTER: AsyncLocal<AlwaysPanics> = AsyncLocal::named("outer");
    static INNER: AsyncLocal<AlwaysPanics> = AsyncLocal::named("inner");
    let guard = OUTER.enter(AlwaysPanics);
    let r = catch_unwind(AssertUnwindSafe(move || {
        INNER.sync_scope(AlwaysPanics, move || {
            let captured = Snapshot::capture();
            drop(guard);
            drop(captured);
        })
    }));
    assert!(r.is_err(), "a destructor's panic reached the caller");
    assert!(!OUTER.with(|v| v.is_some()));
    assert!(!INNER.with(|v| v.is_some()));
}
