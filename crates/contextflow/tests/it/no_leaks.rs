//! A frame never keeps a value that no lookup can reach (issue 8): rebinding a variable and
//! respawning, generation after generation, keeps a handful of values alive, not one per
//! generation, and what was bound before the generations stays visible.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use contextflow::{AsyncLocal, Inherit, Snapshot};

/// Counts its live instances in a counter of its own (no statics: tests run in parallel).
struct Counted(Arc<AtomicUsize>);
impl Counted {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Counted(live.clone())
    }
}
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

static GENERATION: AsyncLocal<Counted> = AsyncLocal::named("generation");
static OUTER: AsyncLocal<String> = AsyncLocal::named("outer");
static PRIVATE: AsyncLocal<Counted> = AsyncLocal::named("private").inherit(Inherit::Never);

const GENERATIONS: u32 = 10_000;

struct Probe {
    live: Arc<AtomicUsize>,
    max_live: Arc<AtomicUsize>,
    done: tokio::sync::oneshot::Sender<Option<String>>,
}

/// One generation: binds a fresh value, spawns the next generation from inside that scope
/// (a scheduler loop, a retry chain, a poller), and finishes.
fn generation(n: u32, probe: Probe) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let value = Counted::new(&probe.live);
    Box::pin(GENERATION.scope(value, async move {
        let live = probe.live.load(Ordering::SeqCst);
        probe.max_live.fetch_max(live, Ordering::SeqCst);
        if n == 0 {
            let _ = probe.done.send(OUTER.get());
            return;
        }
        drop(contextflow::spawn(generation(n - 1, probe)));
    }))
}

async fn rebind_and_respawn_keeps_a_handful_of_values() {
    let live = Arc::new(AtomicUsize::new(0));
    let max_live = Arc::new(AtomicUsize::new(0));
    let (done, outer) = tokio::sync::oneshot::channel();
    let probe = Probe {
        live: live.clone(),
        max_live: max_live.clone(),
        done,
    };
    OUTER
        .scope("bound before the generations".into(), async move {
            drop(contextflow::spawn(generation(GENERATIONS, probe)));
        })
        .await;
    assert_eq!(
        outer.await.unwrap().as_deref(),
        Some("bound before the generations"),
        "an outer binding survives 10,000 rebinding generations"
    );
    let max = max_live.load(Ordering::SeqCst);
    // Before the fix every generation's value stayed alive: 10,001 at the end.
    assert!(
        (1..=8).contains(&max),
        "at most a handful of generation values alive at once, saw {max}"
    );
}

on_both_runtimes! {
    rebind_and_respawn_keeps_a_handful_of_values => rebind_and_respawn_keeps_a_handful_of_values;
}

#[test]
fn snapshot_of_a_snapshot_does_not_keep_shadowed_values() {
    let live = Arc::new(AtomicUsize::new(0));
    let mut snap = OUTER.sync_scope("outer".into(), Snapshot::capture);
    for _ in 0..GENERATIONS {
        snap = snap.run(|| GENERATION.sync_scope(Counted::new(&live), Snapshot::capture));
        assert_eq!(
            live.load(Ordering::SeqCst),
            1,
            "only the newest value is reachable"
        );
    }
    assert_eq!(snap.get(&OUTER).as_deref(), Some("outer"));
    assert!(snap.with(&GENERATION, |g| g.is_some()));
    drop(snap);
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

#[test]
fn nested_rebinding_captures_only_the_innermost_value() {
    let live = Arc::new(AtomicUsize::new(0));
    let snap = GENERATION.sync_scope(Counted::new(&live), || {
        GENERATION.sync_scope(Counted::new(&live), || {
            GENERATION.sync_scope(Counted::new(&live), Snapshot::capture)
        })
    });
    assert_eq!(
        live.load(Ordering::SeqCst),
        1,
        "the two shadowed values are gone"
    );
    assert!(snap.with(&GENERATION, |g| g.is_some()));
}

#[test]
fn inheritable_capture_drops_private_values_under_rebinding() {
    let live = Arc::new(AtomicUsize::new(0));
    let private = Arc::new(AtomicUsize::new(0));
    let snap = OUTER.sync_scope("o".into(), || {
        PRIVATE.sync_scope(Counted::new(&private), || {
            GENERATION.sync_scope(Counted::new(&live), || {
                GENERATION.sync_scope(Counted::new(&live), Snapshot::capture_inheritable)
            })
        })
    });
    assert_eq!(private.load(Ordering::SeqCst), 0, "never inherited");
    assert_eq!(live.load(Ordering::SeqCst), 1, "shadowed value gone");
    assert_eq!(snap.get(&OUTER).as_deref(), Some("o"));
    assert!(!snap.with(&PRIVATE, |p| p.is_some()));
}

#[test]
fn many_variables_and_rebinding_keep_every_visible_value() {
    // More variables than the 64-bit filter that detects rebinding has bits: lookups through a
    // compacted frame must still find every variable, and the innermost value of each.
    let vars: Vec<AsyncLocal<usize>> = (0..100).map(|_| AsyncLocal::new()).collect();
    fn nest(vars: &[AsyncLocal<usize>], i: usize, round: usize) -> Snapshot {
        if i == vars.len() {
            return Snapshot::capture();
        }
        vars[i].sync_scope(i + round, || nest(vars, i + 1, round))
    }
    let first = nest(&vars, 0, 0);
    let second = first.run(|| nest(&vars, 0, 1000));
    for (i, var) in vars.iter().enumerate() {
        assert_eq!(first.get(var), Some(i));
        assert_eq!(second.get(var), Some(i + 1000), "variable {i}");
    }
}

/// A guard of `Snapshot::enter` dropped out of order parks the frame it saved (here the one
/// holding a private value) in its marker node. A binding made while that marker was current
/// must not chain through the marker: a capture of it would keep the saved frame, and the
/// private value, alive for as long as the capture lives (a thread spawned there, for its
/// whole life), where no lookup can reach it.
#[test]
fn a_binding_over_an_escaped_guard_does_not_keep_what_the_guard_saved() {
    static OTHER: AsyncLocal<u32> = AsyncLocal::named("other");
    let live = Arc::new(AtomicUsize::new(0));
    let empty = Snapshot::empty();
    let (guard, child) = PRIVATE.sync_scope(Counted::new(&live), || {
        let guard = empty.enter();
        (guard, OTHER.sync_scope(1, Snapshot::capture_inheritable))
    });
    drop(guard);
    assert_eq!(child.get(&OTHER), Some(1));
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "the private value is dropped once its scope ends"
    );
    drop(child);
}

/// Review finding: the same through an enter guard made over the escaped `Snapshot::enter`
/// guard. The guard's node saved the marker's frame, and parked it there when the guard was
/// dropped out of order; a capture of the guard's frame then kept the marker, the frame the
/// marker parked, and the private value, alive for the capture's whole life.
#[test]
fn a_guard_over_an_escaped_guard_does_not_keep_what_the_guard_saved() {
    static OTHER: AsyncLocal<u32> = AsyncLocal::named("other");
    let live = Arc::new(AtomicUsize::new(0));
    let (marker, guard, child) = PRIVATE.sync_scope(Counted::new(&live), || {
        let marker = Snapshot::empty().enter();
        let guard = OTHER.enter(1);
        (marker, guard, Snapshot::capture_inheritable())
    });
    drop(guard);
    drop(marker);
    assert_eq!(child.get(&OTHER), Some(1));
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "the private value is dropped once its scope and the guards end"
    );
    drop(child);
}

/// The same through a `Binding` (what `scope`'s futures and middleware use).
#[test]
fn a_binding_entered_over_an_escaped_guard_does_not_keep_what_the_guard_saved() {
    static OTHER: AsyncLocal<u32> = AsyncLocal::named("other");
    let live = Arc::new(AtomicUsize::new(0));
    let empty = Snapshot::empty();
    let mut binding = contextflow::Binding::new(&OTHER, 1);
    let (guard, child) = PRIVATE.sync_scope(Counted::new(&live), || {
        let guard = empty.enter();
        (guard, binding.run(Snapshot::capture_inheritable))
    });
    drop(guard);
    assert_eq!(child.get(&OTHER), Some(1));
    assert_eq!(live.load(Ordering::SeqCst), 0);
    drop((child, binding));
}
