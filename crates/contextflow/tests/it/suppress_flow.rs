//! `suppress_flow`: inside it, nothing that starts a child inherits; the code inside still sees
//! the context, and everything is back to normal afterwards (also after a panic).

use contextflow::{AsyncLocal, FutureExt as _, Snapshot};

static REQUEST_ID: AsyncLocal<u32> = AsyncLocal::named("request_id");

on_both_runtimes! {
    spawns_inside_do_not_inherit => spawns_inside_do_not_inherit;
    spawns_after_inherit_again => spawns_after_inherit_again;
    spawns_inside_a_root_start_empty => spawns_inside_a_root_start_empty;
}

/// Under a `tree::Root`, a task spawned inside `suppress_flow` starts empty too: not a child of
/// the request in its task tree (it carried the tree's own node, and stayed in the request's
/// tree with everything it spawned in turn).
async fn spawns_inside_a_root_start_empty() {
    let root = contextflow::tree::Root::new("request");
    let (empty, trigger) = root
        .scope(async {
            let (spawned, set_spawned) = contextflow::suppress_flow(|| {
                let mut set = tokio::task::JoinSet::new();
                contextflow::spawn_in(&mut set, async { Snapshot::capture().is_empty() });
                (
                    contextflow::spawn(async {
                        (
                            Snapshot::capture().is_empty(),
                            contextflow::tree::trigger_id(),
                        )
                    }),
                    set,
                )
            });
            let mut set = set_spawned;
            let in_set = set.join_next().await.unwrap().unwrap();
            let (empty, trigger) = spawned.await.unwrap();
            (empty && in_set, trigger)
        })
        .await;
    assert!(empty, "a task spawned inside suppress_flow has a context");
    assert_eq!(trigger, None);
    assert!(root.tasks().is_empty(), "{:?}", root.tasks());
}

async fn spawns_inside_do_not_inherit() {
    let seen = REQUEST_ID
        .scope(1, async {
            let mut set = tokio::task::JoinSet::new();
            let (inside, spawned, blocking, thread, wrapped, bound) =
                contextflow::suppress_flow(|| {
                    contextflow::spawn_in(&mut set, async { REQUEST_ID.get() });
                    (
                        REQUEST_ID.get(),
                        contextflow::spawn(async { REQUEST_ID.get() }),
                        contextflow::spawn_blocking(|| REQUEST_ID.get()),
                        contextflow::thread::spawn(|| REQUEST_ID.get()),
                        tokio::spawn(async { REQUEST_ID.get() }.in_current_context()),
                        Snapshot::bind(|| REQUEST_ID.get()),
                    )
                });
            (
                inside,
                spawned.await.unwrap(),
                blocking.await.unwrap(),
                thread.join().unwrap(),
                wrapped.await.unwrap(),
                bound(),
                set.join_next().await.unwrap().unwrap(),
            )
        })
        .await;
    assert_eq!(seen, (Some(1), None, None, None, None, None, None));
}

async fn spawns_after_inherit_again() {
    let seen = REQUEST_ID
        .scope(2, async {
            contextflow::suppress_flow(|| contextflow::suppress_flow(|| {}));
            let panicked = std::panic::catch_unwind(|| {
                contextflow::suppress_flow(|| panic!("panics on purpose inside suppress_flow"))
            });
            assert!(panicked.is_err());
            assert!(!contextflow::is_flow_suppressed());
            contextflow::spawn(async { REQUEST_ID.get() })
                .await
                .unwrap()
        })
        .await;
    assert_eq!(seen, Some(2));
}

#[test]
fn an_explicit_full_capture_still_captures() {
    let snap = REQUEST_ID.sync_scope(3, || contextflow::suppress_flow(Snapshot::capture));
    assert_eq!(snap.get(&REQUEST_ID), Some(3));
    assert_eq!(
        REQUEST_ID
            .sync_scope(3, || contextflow::suppress_flow(
                Snapshot::capture_inheritable
            ))
            .get(&REQUEST_ID),
        None
    );
}

/// A full capture made inside `suppress_flow` keeps the context but not the suppression: code
/// run in it later (a stored snapshot, a task spawned with it) spawns children that inherit.
#[test]
fn a_full_capture_inside_does_not_carry_the_suppression() {
    let snap = REQUEST_ID.sync_scope(4, || contextflow::suppress_flow(Snapshot::capture));
    let (suppressed, child) = snap.run(|| {
        (
            contextflow::is_flow_suppressed(),
            Snapshot::capture_inheritable().get(&REQUEST_ID),
        )
    });
    assert!(!suppressed);
    assert_eq!(
        child,
        Some(4),
        "a child of code run in the snapshot inherits"
    );
    assert!(!format!("{snap:?}").contains("flow_suppressed"), "{snap:?}");
}

#[test]
fn code_run_in_another_frame_is_not_suppressed() {
    let (inside, other) = contextflow::suppress_flow(|| {
        (
            contextflow::is_flow_suppressed(),
            Snapshot::empty().run(contextflow::is_flow_suppressed),
        )
    });
    assert!(inside);
    assert!(!other);
}
