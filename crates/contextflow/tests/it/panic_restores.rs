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
