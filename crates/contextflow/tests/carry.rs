//! Carriers (process-global registration, hence a test binary of its own): a registered
//! carrier's value is captured at every contextflow spawn and entered around every poll.
//! Every test here registers the same `OtherCarrier`, whose state is thread-local, so they may
//! run in parallel; the test that counts live carried values has a binary of its own
//! (`carry_generations.rs`).

use std::{
    cell::Cell,
    sync::atomic::{AtomicUsize, Ordering},
};

use contextflow::{
    carry::{self, Carrier},
    AsyncLocal, FutureExt, Snapshot,
};

thread_local! {
    /// Stands for another library's thread-local "current" (a tracing span, an OTel context).
    static OTHER: Cell<u32> = const { Cell::new(0) };
}

static ENTERS: AtomicUsize = AtomicUsize::new(0);
static REQ: AsyncLocal<u32> = AsyncLocal::named("req");

struct OtherCarrier;

impl Carrier for OtherCarrier {
    type Value = u32;
    fn capture(&self) -> Option<u32> {
        Some(OTHER.with(Cell::get)).filter(|v| *v != 0)
    }
    fn enter(&self, value: &u32, f: &mut dyn FnMut()) {
        ENTERS.fetch_add(1, Ordering::Relaxed);
        let prev = OTHER.with(|o| o.replace(*value));
        // Restore even if `f` panics, as a real carrier must.
        struct Restore(u32);
        impl Drop for Restore {
            fn drop(&mut self) {
                OTHER.with(|o| o.set(self.0));
            }
        }
        let _restore = Restore(prev);
        f();
    }
}

/// Registers `OtherCarrier` once for the whole binary; the first registration must succeed.
fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| assert!(carry::register(OtherCarrier), "first registration"));
    assert!(carry::is_active());
    assert!(carry::is_registered::<OtherCarrier>());
}

/// Sets `OTHER` for the duration of `f` on this thread, the way the other library would.
fn with_other<R>(v: u32, f: impl FnOnce() -> R) -> R {
    let prev = OTHER.with(|o| o.replace(v));
    let r = f();
    OTHER.with(|o| o.set(prev));
    r
}

async fn spawned_children_see_the_carried_value() {
    install();
    let (task, blocking, thread, wrapped) = with_other(7, || {
        REQ.sync_scope(1, || {
            (
                contextflow::spawn(async {
                    tokio::task::yield_now().await;
                    (OTHER.with(Cell::get), REQ.get())
                }),
                contextflow::spawn_blocking(|| OTHER.with(Cell::get)),
                contextflow::thread::spawn(|| OTHER.with(Cell::get)),
                tokio::spawn(async { OTHER.with(Cell::get) }.in_current_context()),
            )
        })
    });
    assert_eq!(task.await.unwrap(), (7, Some(1)));
    assert_eq!(blocking.await.unwrap(), 7);
    assert_eq!(thread.join().unwrap(), 7);
    assert_eq!(wrapped.await.unwrap(), 7);
    assert_eq!(OTHER.with(Cell::get), 0, "nothing leaks onto this thread");
}

async fn nothing_is_carried_when_nothing_is_current() {
    install();
    let seen = contextflow::spawn(async { OTHER.with(Cell::get) })
        .await
        .unwrap();
    assert_eq!(seen, 0);
}

async fn the_carrier_wraps_every_poll() {
    install();
    let before = ENTERS.load(Ordering::Relaxed);
    let fut = with_other(3, || {
        async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
                assert_eq!(OTHER.with(Cell::get), 3);
            }
        }
        .in_current_context()
    });
    fut.await;
    // 5 polls at least (4 yields), each inside the carrier; other tests may add more.
    assert!(ENTERS.load(Ordering::Relaxed) - before >= 5);
}

#[test]
fn snapshot_run_and_bind_enter_the_carried_value() {
    install();
    let snap = with_other(9, Snapshot::capture_inheritable);
    assert_eq!(snap.run(|| OTHER.with(Cell::get)), 9);
    let cb = with_other(4, || Snapshot::bind(|| OTHER.with(Cell::get)));
    assert_eq!(cb(), 4);
    assert_eq!(OTHER.with(Cell::get), 0);
}

// Issue 8: the carried values were a hidden binding that showed in `Debug` and `is_empty`.
#[test]
fn carried_values_are_invisible() {
    install();
    let snap = with_other(9, Snapshot::capture_inheritable);
    assert_eq!(snap.run(|| OTHER.with(Cell::get)), 9, "it does carry");
    assert_eq!(
        format!("{snap:?}"),
        "Snapshot",
        "no hidden binding in Debug"
    );
    assert!(snap.is_empty(), "no variable is set");
    let with_req = with_other(9, || REQ.sync_scope(3, Snapshot::capture));
    assert_eq!(format!("{with_req:?}"), "Snapshot { req: u32 }");
    // Entering the snapshot with a guard shows the variables only.
    let guard = with_req.enter();
    assert_eq!(REQ.get(), Some(3));
    assert_eq!(
        format!("{:?}", Snapshot::capture()),
        "Snapshot { req: u32 }"
    );
    drop(guard);
}

// Issue 8: `Snapshot::capture` did not carry, so `spawn_with(Snapshot::capture(), ..)` lost
// the tracing span.
async fn spawn_with_a_full_capture_carries() {
    install();
    let snap = with_other(11, Snapshot::capture);
    let seen = contextflow::spawn_with(snap, async {
        tokio::task::yield_now().await;
        OTHER.with(Cell::get)
    });
    assert_eq!(seen.await.unwrap(), 11);
}

// Issue 8: a capture inside a spawned task re-captured the carried values on top of the old
// ones; the carried values of the task's own snapshot are entered, never buried in a frame.
async fn captures_inside_a_carried_task_replace_the_carried_values() {
    install();
    let child = with_other(5, || {
        contextflow::spawn(async {
            let inner = REQ.sync_scope(1, || with_other(6, Snapshot::capture));
            (
                OTHER.with(Cell::get),
                inner.run(|| OTHER.with(Cell::get)),
                inner,
            )
        })
    });
    let (outer, inner, snap) = child.await.unwrap();
    assert_eq!((outer, inner), (5, 6));
    assert_eq!(format!("{snap:?}"), "Snapshot { req: u32 }");
}

#[test]
fn a_panic_inside_the_carried_context_restores_both() {
    install();
    let snap = with_other(5, || REQ.sync_scope(2, Snapshot::capture_inheritable));
    let r = std::panic::catch_unwind(|| snap.run(|| panic!("boom")));
    assert!(r.is_err());
    assert_eq!((OTHER.with(Cell::get), REQ.get()), (0, None));
}

#[test]
fn registering_twice_is_refused() {
    install();
    assert!(!carry::register(OtherCarrier));
}

thread_local! {
    /// Another library's "current", whose carrier can make "nothing" current.
    static CLEAR: Cell<u32> = const { Cell::new(0) };
}

struct ClearingCarrier;

impl Carrier for ClearingCarrier {
    type Value = u32;
    fn capture(&self) -> Option<u32> {
        Some(CLEAR.with(Cell::get)).filter(|v| *v != 0)
    }
    fn enter(&self, value: &u32, f: &mut dyn FnMut()) {
        struct Restore(u32);
        impl Drop for Restore {
            fn drop(&mut self) {
                CLEAR.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CLEAR.with(|c| c.replace(*value)));
        f();
    }
    fn enter_none(&self, f: &mut dyn FnMut()) {
        self.enter(&0, f)
    }
}

fn install_clearing() {
    install();
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| assert!(carry::register(ClearingCarrier)));
}

fn with_clear<R>(v: u32, f: impl FnOnce() -> R) -> R {
    let prev = CLEAR.with(|c| c.replace(v));
    let r = f();
    CLEAR.with(|c| c.set(prev));
    r
}

fn both() -> (u32, u32) {
    (OTHER.with(Cell::get), CLEAR.with(Cell::get))
}

// Review finding: a snapshot that carried no value of a carrier left the running thread's
// value visible (another request's OpenTelemetry context, for a job a rayon worker stole).
#[test]
fn a_snapshot_without_a_carriers_value_enters_its_nothing() {
    install_clearing();
    let other_only = with_other(7, Snapshot::capture_inheritable);
    assert_eq!(with_clear(5, || other_only.run(both)), (7, 0));
    // `OtherCarrier` has no "nothing": the thread's value shows through, as before.
    let clear_only = with_clear(3, Snapshot::capture_inheritable);
    assert_eq!(
        with_other(9, || with_clear(5, || clear_only.run(both))),
        (9, 3)
    );
    let variables_only = REQ.sync_scope(2, Snapshot::capture_inheritable);
    assert_eq!(
        with_clear(5, || variables_only.run(|| (REQ.get(), both().1))),
        (Some(2), 0)
    );
    assert_eq!(with_clear(5, || Snapshot::empty().run(both)), (0, 0));
    let suppressed = with_clear(5, || {
        contextflow::suppress_flow(Snapshot::capture_inheritable)
    });
    assert_eq!(with_clear(6, || suppressed.run(both)), (0, 0));
    // And the thread's value is back afterwards.
    assert_eq!(
        with_clear(5, || {
            Snapshot::empty().run(|| ());
            both()
        }),
        (0, 5)
    );
}

async fn a_child_without_a_carriers_value_does_not_see_its_pollers() {
    install_clearing();
    let outer = with_clear(4, || {
        async {
            let inner = async {
                tokio::task::yield_now().await;
                CLEAR.with(Cell::get)
            }
            .with_snapshot(Snapshot::empty())
            .await;
            (CLEAR.with(Cell::get), inner)
        }
        .in_current_context()
    });
    assert_eq!(outer.await, (4, 0));
}

macro_rules! on_both_runtimes {
    ($($name:ident),*) => {$(
        mod $name {
            #[tokio::test(flavor = "current_thread")]
            async fn current_thread() {
                super::$name().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() {
                super::$name().await
            }
        }
    )*};
}

on_both_runtimes!(
    spawned_children_see_the_carried_value,
    nothing_is_carried_when_nothing_is_current,
    the_carrier_wraps_every_poll,
    spawn_with_a_full_capture_carries,
    captures_inside_a_carried_task_replace_the_carried_values,
    a_child_without_a_carriers_value_does_not_see_its_pollers
);

// Review finding: a carrier's capture ran under the registry lock, so registering from it
// deadlocked.
#[test]
fn a_carrier_may_register_another_while_capturing() {
    struct Other;
    impl Carrier for Other {
        type Value = ();
        fn capture(&self) -> Option<()> {
            None
        }
        fn enter(&self, _: &(), f: &mut dyn FnMut()) {
            f()
        }
    }
    static FROM_CAPTURE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    struct Lazy;
    impl Carrier for Lazy {
        type Value = ();
        fn capture(&self) -> Option<()> {
            if carry::register(Other) {
                FROM_CAPTURE.store(true, Ordering::SeqCst);
            }
            None
        }
        fn enter(&self, _: &(), f: &mut dyn FnMut()) {
            f()
        }
    }
    assert!(carry::register(Lazy));
    drop(Snapshot::capture_inheritable());
    assert!(
        FROM_CAPTURE.load(Ordering::SeqCst),
        "registered from inside a capture (this one or another test's)"
    );
    assert!(!carry::register(Other), "already registered");
}

thread_local! {
    /// Whether `PanickyCarrier` captures a value on this thread.
    static PANICKY_CAPTURES: Cell<bool> = const { Cell::new(false) };
    /// Whether `PanickyCarrier::enter` panics on this thread.
    static PANICKY_ARMED: Cell<bool> = const { Cell::new(false) };
}

/// A carrier whose `enter` panics before calling `f` (a subscriber's `on_enter` that panics),
/// when armed on this thread; it captures only where asked, so other tests never meet it.
struct PanickyCarrier;

impl Carrier for PanickyCarrier {
    type Value = ();
    fn capture(&self) -> Option<()> {
        PANICKY_CAPTURES.with(Cell::get).then_some(())
    }
    fn enter(&self, _: &(), f: &mut dyn FnMut()) {
        assert!(!PANICKY_ARMED.with(Cell::get), "the carrier's enter panics");
        f();
    }
}

/// Review finding: `WithContext`'s drop ran the inner future's drop inside the carriers; one
/// that panicked before calling it leaked the future, and everything it owned (values, a
/// transaction handle, a task-tree guard), for the life of the process.
#[test]
fn a_carrier_that_panics_in_a_drop_does_not_leak_the_future() {
    use std::{
        future::Future as _,
        sync::{atomic::AtomicBool, Arc},
        task::{Context, Poll, Waker},
    };
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| assert!(carry::register(PanickyCarrier)));

    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let owned = SetOnDrop(dropped.clone());
    PANICKY_CAPTURES.with(|c| c.set(true));
    let mut fut = Box::pin(
        async move {
            let _owned = owned;
            std::future::pending::<()>().await
        }
        .in_current_context(),
    );
    PANICKY_CAPTURES.with(|c| c.set(false));
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(fut.as_mut().poll(&mut cx), Poll::Pending);
    PANICKY_ARMED.with(|a| a.set(true));
    let dropping = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(fut)));
    PANICKY_ARMED.with(|a| a.set(false));
    assert!(dropping.is_err(), "the carrier's panic reaches the dropper");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the inner future was dropped"
    );
}
