//! Carriers (process-global registration, hence a test binary of its own): a registered
//! carrier's value is captured at every contextflow spawn and entered around every poll.

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

fn install() {
    let _ = carry::register(OtherCarrier);
    assert!(carry::is_active());
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
    assert!(
        format!("{snap:?}").contains("contextflow.carried"),
        "the Debug view names the hidden binding"
    );
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
    the_carrier_wraps_every_poll
);

// Review finding: each inheriting capture stacked a new carried node on top of the previous
// one, so a task that respawns itself kept every generation's carried values alive.
#[tokio::test(flavor = "current_thread")]
async fn carried_values_do_not_pile_up_across_generations() {
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }
    struct CountingCarrier;
    impl Carrier for CountingCarrier {
        type Value = Counted;
        fn capture(&self) -> Option<Counted> {
            LIVE.fetch_add(1, Ordering::SeqCst);
            Some(Counted)
        }
        fn enter(&self, _: &Counted, f: &mut dyn FnMut()) {
            f()
        }
    }
    install();
    let _ = carry::register(CountingCarrier);
    type Done = tokio::sync::oneshot::Sender<usize>;
    fn generation(
        n: u32,
        done: Done,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            if n == 0 {
                let _ = done.send(LIVE.load(Ordering::SeqCst));
                return;
            }
            // Each generation hands over to the next and finishes (a self-rescheduling job).
            drop(contextflow::spawn(generation(n - 1, done)));
        })
    }
    let (done, result) = tokio::sync::oneshot::channel();
    drop(contextflow::spawn(generation(200, done)));
    let alive = result.await.unwrap();
    assert!(
        alive <= 3,
        "finished generations release their carried values: {alive} still alive"
    );
}

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
    struct Lazy;
    impl Carrier for Lazy {
        type Value = ();
        fn capture(&self) -> Option<()> {
            let _ = carry::register(Other);
            None
        }
        fn enter(&self, _: &(), f: &mut dyn FnMut()) {
            f()
        }
    }
    let _ = carry::register(Lazy);
    let _ = Snapshot::capture_inheritable();
    assert!(
        !carry::register(Other),
        "registered from inside the capture"
    );
}
