//! A registered carrier's captured values do not pile up across generations of a task that
//! respawns itself. Its own binary: the carrier is process-wide and captures at every capture,
//! so any other test in the same process would add to the live count (issue 14: this test was
//! flaky when it shared a binary).

use std::sync::atomic::{AtomicUsize, Ordering};

use contextflow::carry::{self, Carrier};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static MAX_LIVE: AtomicUsize = AtomicUsize::new(0);
static CAPTURES: AtomicUsize = AtomicUsize::new(0);

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
        CAPTURES.fetch_add(1, Ordering::SeqCst);
        let live = LIVE.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_LIVE.fetch_max(live, Ordering::SeqCst);
        Some(Counted)
    }
    fn enter(&self, _: &Counted, f: &mut dyn FnMut()) {
        f()
    }
}

type Done = tokio::sync::oneshot::Sender<()>;

fn generation(
    n: u32,
    done: Done,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        if n == 0 {
            let _ = done.send(());
            return;
        }
        // Each generation hands over to the next and finishes (a self-rescheduling job).
        drop(contextflow::spawn(generation(n - 1, done)));
    })
}

#[test]
fn carried_values_do_not_pile_up_across_generations() {
    assert!(carry::register(CountingCarrier), "the only registration");
    for flavor in ["current_thread", "multi_thread"] {
        let rt = match flavor {
            "current_thread" => tokio::runtime::Builder::new_current_thread().build(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build(),
        }
        .unwrap();
        MAX_LIVE.store(0, Ordering::SeqCst);
        CAPTURES.store(0, Ordering::SeqCst);
        rt.block_on(async {
            let (done, finished) = tokio::sync::oneshot::channel();
            drop(contextflow::spawn(generation(2_000, done)));
            finished.await.unwrap();
        });
        drop(rt);
        let max = MAX_LIVE.load(Ordering::SeqCst);
        let captures = CAPTURES.load(Ordering::SeqCst);
        // The first spawn and each of the 2,000 generations' (a carrier that stopped capturing
        // after the first would pass the bound below without testing it).
        assert!(
            captures >= 2_001,
            "{flavor}: the carrier captured at every spawn, {captures} captures"
        );
        assert!(
            max <= 6,
            "{flavor}: finished generations release their carried values, {max} alive at once"
        );
        assert_eq!(
            LIVE.load(Ordering::SeqCst),
            0,
            "{flavor}: all released at the end"
        );
    }
}
