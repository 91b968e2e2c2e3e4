use contextflow::{AsyncLocal, Snapshot};

static A: AsyncLocal<String> = AsyncLocal::named("a");
static B: AsyncLocal<u64> = AsyncLocal::named("b");

#[test]
fn unset_reads_none() {
    assert_eq!(A.get(), None);
    assert!(!A.is_set());
    assert!(A.with(|v| v.is_none()));
}

#[test]
fn sync_scope_binds_and_restores() {
    A.sync_scope("x".into(), || {
        assert_eq!(A.get().as_deref(), Some("x"));
        assert_eq!(B.get(), None);
        B.sync_scope(2, || {
            assert_eq!(A.get().as_deref(), Some("x"));
            assert_eq!(B.get(), Some(2));
        });
        assert_eq!(B.get(), None);
    });
    assert_eq!(A.get(), None);
}

#[test]
fn innermost_scope_wins() {
    let seen = A.sync_scope("outer".into(), || {
        A.sync_scope("inner".into(), || A.get()).zip(A.get())
    });
    assert_eq!(seen, Some(("inner".to_string(), "outer".to_string())));
}

#[test]
fn names_and_debug() {
    assert_eq!(A.name(), "a");
    static UNNAMED: AsyncLocal<()> = AsyncLocal::new();
    assert_eq!(UNNAMED.name(), "");
    let dbg = format!("{A:?}");
    assert!(
        dbg.contains("\"a\"") && dbg.contains("is_set: false"),
        "{dbg}"
    );
}

#[test]
fn forty_independent_variables() {
    let vars: Vec<AsyncLocal<usize>> = (0..40).map(|_| AsyncLocal::new()).collect();
    fn nest(vars: &[AsyncLocal<usize>], i: usize) {
        if i == vars.len() {
            for (j, var) in vars.iter().enumerate() {
                assert_eq!(var.get(), Some(j * 10), "variable {j}");
            }
            return;
        }
        vars[i].sync_scope(i * 10, || nest(vars, i + 1));
    }
    nest(&vars, 0);
    assert!(vars.iter().all(|v| !v.is_set()));
}

#[test]
fn non_static_instances_are_distinct_variables() {
    let one: AsyncLocal<u8> = AsyncLocal::new();
    let two: AsyncLocal<u8> = AsyncLocal::new();
    one.sync_scope(1, || {
        assert_eq!(one.get(), Some(1));
        assert_eq!(two.get(), None);
    });
}

#[test]
fn a_dropped_instance_never_aliases_a_new_one() {
    // A snapshot outlives the variable; a new variable (maybe at the same address) must not see
    // the old binding.
    let snap = {
        let var: AsyncLocal<u64> = AsyncLocal::new();
        var.sync_scope(7, Snapshot::capture)
    };
    let fresh: AsyncLocal<u64> = AsyncLocal::new();
    assert_eq!(snap.get(&fresh), None);
    snap.run(|| assert_eq!(fresh.get(), None));
}

#[test]
fn values_are_shared_not_cloned() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AsyncLocal<AtomicUsize> = AsyncLocal::new();
    let snap = COUNTER.sync_scope(AtomicUsize::new(0), || {
        COUNTER.with(|c| c.unwrap().fetch_add(1, Ordering::SeqCst));
        Snapshot::capture()
    });
    snap.with(&COUNTER, |c| c.unwrap().fetch_add(1, Ordering::SeqCst));
    assert_eq!(
        snap.with(&COUNTER, |c| c.unwrap().load(Ordering::SeqCst)),
        2
    );
}

#[test]
fn deep_nesting_does_not_overflow_on_release() {
    static DEPTH: AsyncLocal<usize> = AsyncLocal::new();
    // Build a 200k-deep chain through enter guards, keep only a snapshot of it, drop it.
    let snap = {
        let mut guards = Vec::new();
        for i in 0..200_000 {
            guards.push(DEPTH.enter(i));
        }
        let snap = Snapshot::capture();
        while let Some(g) = guards.pop() {
            drop(g);
        }
        snap
    };
    assert_eq!(snap.get(&DEPTH), Some(199_999));
    drop(snap);
    assert!(!DEPTH.is_set());
}

async fn scope_across_awaits() {
    let out = A
        .scope("req".into(), async {
            let mut seen = Vec::new();
            for _ in 0..5 {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                seen.push(A.get());
            }
            seen
        })
        .await;
    assert!(out.iter().all(|v| v.as_deref() == Some("req")));
    assert_eq!(A.get(), None);
}

async fn scope_sees_the_pollers_frame() {
    // Context belongs to the poll: a scope created outside, awaited inside another scope,
    // sees both bindings.
    let fut = B.scope(2, async { (A.get(), B.get()) });
    let seen = A.scope("outer".into(), fut).await;
    assert_eq!(seen, (Some("outer".to_string()), Some(2)));
}

on_both_runtimes! {
    scope_across_awaits => scope_across_awaits;
    scope_sees_the_pollers_frame => scope_sees_the_pollers_frame;
}
