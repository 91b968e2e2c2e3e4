//! What Node and TC39 users reach for (issue 8): a default value, a variable unset for a
//! closure or a future, the value taken back out of a scope; and the handles of the spawn
//! helpers (issue 14).

use std::{
    future::Future,
    pin::pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use contextflow::{AsyncLocal, Snapshot};

static TENANT: AsyncLocal<String> =
    AsyncLocal::named("tenant").default_value(|| "public".to_string());
static REQ: AsyncLocal<u32> = AsyncLocal::named("req");
static LOG: AsyncLocal<Mutex<Vec<u32>>> = AsyncLocal::named("log");

#[test]
fn default_value_is_read_where_nothing_is_bound() {
    assert_eq!(TENANT.get().as_deref(), Some("public"));
    assert!(!TENANT.is_set(), "a default is not a binding");
    let bound = TENANT.sync_scope("acme".into(), || (TENANT.get(), TENANT.is_set()));
    assert_eq!(bound, (Some("acme".into()), true));
    assert_eq!(Snapshot::empty().get(&TENANT).as_deref(), Some("public"));
    assert_eq!(REQ.get(), None, "no default: None");
}

#[test]
fn sync_unset_hides_one_variable_and_restores_it() {
    let seen = REQ.sync_scope(1, || {
        TENANT.sync_scope("acme".into(), || {
            let inside = TENANT.sync_unset(|| (TENANT.is_set(), TENANT.get(), REQ.get()));
            (inside, TENANT.get())
        })
    });
    assert_eq!(
        seen,
        ((false, Some("public".into()), Some(1)), Some("acme".into()))
    );
    // A snapshot taken inside does not see it either.
    let snap = REQ.sync_scope(2, || REQ.sync_unset(Snapshot::capture));
    assert_eq!(snap.get(&REQ), None);
    assert_eq!(format!("{snap:?}"), "Snapshot");
}

async fn unset_hides_one_variable_from_a_future_and_its_children() {
    let seen = REQ
        .scope(1, async {
            REQ.unset(async {
                tokio::task::yield_now().await;
                let child = contextflow::spawn(async { REQ.get() });
                (REQ.get(), child.await.unwrap())
            })
            .await
        })
        .await;
    assert_eq!(seen, (None, None));
}

async fn take_value_gives_the_value_back() {
    let mut fut = pin!(LOG.scope(Mutex::new(Vec::new()), async {
        for i in 0..3 {
            tokio::task::yield_now().await;
            LOG.with(|log| log.unwrap().lock().unwrap().push(i));
        }
    }));
    fut.as_mut().await;
    let log = fut.as_mut().take_value().expect("not shared");
    assert_eq!(log.into_inner().unwrap(), [0, 1, 2]);
    assert!(fut.as_mut().take_value().is_none(), "taken already");
}

async fn take_value_refuses_while_a_snapshot_shares_it() {
    let snap = Arc::new(Mutex::new(None));
    let keep = snap.clone();
    let mut fut = pin!(REQ.scope(5, async move {
        *keep.lock().unwrap() = Some(Snapshot::capture());
    }));
    fut.as_mut().await;
    assert_eq!(fut.as_mut().take_value(), None, "a snapshot still holds it");
    let snapshot = snap.lock().unwrap().take().unwrap();
    assert_eq!(
        snapshot.get(&REQ),
        Some(5),
        "and the snapshot still reads it"
    );
    drop(snapshot);
    assert_eq!(
        fut.as_mut().take_value(),
        Some(5),
        "free once the snapshot is gone"
    );
}

/// Counts the drops of its values.
struct Counted(Arc<std::sync::atomic::AtomicUsize>, u32);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

static COUNTED: AsyncLocal<Counted> = AsyncLocal::named("counted");

// Review finding: a scope polled under another frame than its first (re-framed: its binding
// node rebuilt under the new parent, sharing the value) refused to give the value back, though
// nothing else shared it.
#[test]
fn take_value_after_the_scope_was_polled_under_another_frame() {
    let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    // The inner future captures a snapshot while `capture` is set.
    let capture = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let captured = Arc::new(Mutex::new(None));
    let (flag, slot) = (capture.clone(), captured.clone());
    let mut fut = pin!(COUNTED.scope(
        Counted(drops.clone(), 7),
        std::future::poll_fn(move |_| {
            assert_eq!(COUNTED.with(|c| c.map(|c| c.1)), Some(7));
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                *slot.lock().unwrap() = Some(Snapshot::capture());
            }
            Poll::<()>::Pending
        })
    ));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    // Polled under another frame, twice (an alias of an alias).
    REQ.sync_scope(1, || assert!(fut.as_mut().poll(&mut cx).is_pending()));
    REQ.sync_scope(2, || assert!(fut.as_mut().poll(&mut cx).is_pending()));
    // A snapshot taken inside the re-framed scope shares the value: refused while it lives.
    capture.store(true, std::sync::atomic::Ordering::SeqCst);
    REQ.sync_scope(3, || assert!(fut.as_mut().poll(&mut cx).is_pending()));
    capture.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(fut.as_mut().take_value().is_none(), "a snapshot shares it");
    let inside = captured.lock().unwrap().take().unwrap();
    assert_eq!(inside.get(&REQ), Some(3));
    assert_eq!(inside.with(&COUNTED, |c| c.map(|c| c.1)), Some(7));
    drop(inside);
    // Nothing shares it now: the value comes back, once, and is dropped once.
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
    let value = fut
        .as_mut()
        .take_value()
        .expect("nothing else shares the value");
    assert_eq!(value.1, 7);
    assert!(fut.as_mut().take_value().is_none(), "taken already");
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(value);
    assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
}

static BIG: AsyncLocal<[u64; 64]> = AsyncLocal::named("big");

/// The same after a re-frame, for a value too large for the node pool (its value node comes
/// from the allocator, the alias from the pool).
#[test]
fn take_value_after_a_re_frame_of_a_large_value() {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(BIG.scope(
        [7; 64],
        std::future::poll_fn(|_| {
            assert_eq!(BIG.with(|v| v.map(|v| v[63])), Some(7));
            Poll::<()>::Pending
        })
    ));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    REQ.sync_scope(1, || assert!(fut.as_mut().poll(&mut cx).is_pending()));
    REQ.sync_scope(2, || assert!(fut.as_mut().poll(&mut cx).is_pending()));
    assert_eq!(fut.as_mut().take_value(), Some([7; 64]));
    assert_eq!(fut.as_mut().take_value(), None);
}

/// A snapshot taken under the first frame holds the first node, which holds the value: refused
/// until it is dropped, then given back.
#[test]
fn take_value_after_a_re_frame_waits_for_a_snapshot_of_the_first_frame() {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let snapshot = Arc::new(Mutex::new(None));
    let keep = snapshot.clone();
    let mut fut = pin!(REQ.scope(
        11,
        std::future::poll_fn(move |_| {
            keep.lock().unwrap().get_or_insert_with(Snapshot::capture);
            Poll::<()>::Pending
        })
    ));
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    LOG.sync_scope(Mutex::default(), || {
        assert!(fut.as_mut().poll(&mut cx).is_pending())
    });
    assert_eq!(
        fut.as_mut().take_value(),
        None,
        "the first frame's snapshot shares it"
    );
    let first = snapshot.lock().unwrap().take().unwrap();
    assert_eq!(first.get(&REQ), Some(11));
    drop(first);
    assert_eq!(fut.as_mut().take_value(), Some(11));
}

#[test]
fn take_value_before_the_first_poll_and_polling_afterwards() {
    let mut fut = pin!(REQ.scope(9, async { REQ.get() }));
    assert_eq!(fut.as_mut().take_value(), Some(9));
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let seen = REQ.sync_scope(1, || fut.as_mut().poll(&mut cx));
    assert_eq!(
        seen,
        Poll::Ready(Some(1)),
        "binds nothing: the poller's value"
    );
}

// Issue 14: `spawn_in`'s abort handle had no test.
async fn spawn_in_abort_handle_cancels_the_task_inside_its_context() {
    struct Probe(Arc<Mutex<Option<Option<u32>>>>);
    impl Drop for Probe {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(REQ.get());
        }
    }
    let dropped_with = Arc::new(Mutex::new(None));
    let probe = Probe(dropped_with.clone());
    let mut set = tokio::task::JoinSet::new();
    let (started, is_started) = tokio::sync::oneshot::channel();
    let abort = REQ.sync_scope(8, || {
        contextflow::spawn_in(&mut set, async move {
            let _probe = probe;
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        })
    });
    is_started.await.unwrap();
    assert!(!abort.is_finished());
    abort.abort();
    let joined = set.join_next().await.unwrap();
    assert!(joined.unwrap_err().is_cancelled());
    assert_eq!(
        *dropped_with.lock().unwrap(),
        Some(Some(8)),
        "the aborted task's destructors ran inside its context"
    );
}

on_both_runtimes! {
    unset_hides_one_variable_from_a_future_and_its_children => unset_hides_one_variable_from_a_future_and_its_children;
    take_value_gives_the_value_back => take_value_gives_the_value_back;
    take_value_refuses_while_a_snapshot_shares_it => take_value_refuses_while_a_snapshot_shares_it;
    spawn_in_abort_handle_cancels_the_task_inside_its_context => spawn_in_abort_handle_cancels_the_task_inside_its_context;
}
