use contextflow::{AsyncLocal, Inherit, Snapshot};

static REQ: AsyncLocal<String> = AsyncLocal::named("req");
static TX: AsyncLocal<&'static str> = AsyncLocal::named("tx").inherit(Inherit::Never);
static AFTER: AsyncLocal<u32> = AsyncLocal::named("after");

async fn spawn_inherits() {
    let seen = REQ
        .scope("r1".into(), async {
            let child = contextflow::spawn(async {
                tokio::task::yield_now().await;
                REQ.get()
            });
            child.await.unwrap()
        })
        .await;
    assert_eq!(seen.as_deref(), Some("r1"));
}

async fn spawn_blocking_inherits() {
    let seen = REQ
        .scope("r2".into(), async {
            contextflow::spawn_blocking(|| REQ.get()).await.unwrap()
        })
        .await;
    assert_eq!(seen.as_deref(), Some("r2"));
}

async fn thread_spawn_inherits() {
    let seen = REQ
        .scope("r3".into(), async {
            contextflow::thread::spawn(|| REQ.get()).join().unwrap()
        })
        .await;
    assert_eq!(seen.as_deref(), Some("r3"));
}

async fn plain_spawns_do_not_inherit() {
    REQ.scope("r4".into(), async {
        assert_eq!(tokio::spawn(async { REQ.get() }).await.unwrap(), None);
        assert_eq!(
            tokio::task::spawn_blocking(|| REQ.get()).await.unwrap(),
            None
        );
        assert_eq!(std::thread::spawn(|| REQ.get()).join().unwrap(), None);
    })
    .await;
}

async fn spawn_local_inherits() {
    let local = tokio::task::LocalSet::new();
    let seen = local
        .run_until(REQ.scope("r5".into(), async {
            contextflow::spawn_local(async { REQ.get() }).await.unwrap()
        }))
        .await;
    assert_eq!(seen.as_deref(), Some("r5"));
}

async fn never_inherited_variable_stays_behind() {
    let (req, tx, after) = REQ
        .scope("r6".into(), async {
            TX.scope("tx-1", async {
                AFTER
                    .scope(3, async {
                        assert_eq!(TX.get(), Some("tx-1"));
                        contextflow::spawn(async { (REQ.get(), TX.get(), AFTER.get()) })
                            .await
                            .unwrap()
                    })
                    .await
            })
            .await
        })
        .await;
    assert_eq!(req.as_deref(), Some("r6"), "bound before the tx: inherited");
    assert_eq!(tx, None, "the transaction never crosses a spawn");
    assert_eq!(after, Some(3), "bound after the tx: inherited");
}

async fn never_inherited_shadow_reveals_nothing_of_outer() {
    // A never-inherited TX that shadows an outer TX: the child sees neither (the shadow must
    // not reveal the outer binding), while an outer inheritable REQ, with both TX bindings
    // between it and the spawn, is visible.
    let seen = REQ
        .scope(
            "outer".into(),
            TX.scope(
                "tx-outer",
                TX.scope("tx", async {
                    contextflow::spawn_blocking(|| (TX.get(), REQ.get()))
                        .await
                        .unwrap()
                }),
            ),
        )
        .await;
    assert_eq!(seen, (None, Some("outer".to_string())));
}

async fn spawn_without_context_and_spawn_with() {
    REQ.scope("r7".into(), async {
        assert_eq!(
            contextflow::spawn_without_context(async { REQ.get() })
                .await
                .unwrap(),
            None
        );
        let other = REQ.sync_scope("other".into(), Snapshot::capture);
        assert_eq!(
            contextflow::spawn_with(other, async { REQ.get() })
                .await
                .unwrap()
                .as_deref(),
            Some("other")
        );
    })
    .await;
}

async fn child_rebinding_never_reaches_parent_or_sibling() {
    REQ.scope("parent".into(), async {
        let a = contextflow::spawn(REQ.scope("child-a".into(), async {
            tokio::task::yield_now().await;
            REQ.get()
        }));
        let b = contextflow::spawn(async {
            tokio::task::yield_now().await;
            REQ.get()
        });
        assert_eq!(a.await.unwrap().as_deref(), Some("child-a"));
        assert_eq!(b.await.unwrap().as_deref(), Some("parent"));
        assert_eq!(REQ.get().as_deref(), Some("parent"));
    })
    .await;
}

async fn join_set_spawn_inherits() {
    let mut set = tokio::task::JoinSet::new();
    REQ.scope("r8".into(), async {
        for _ in 0..4 {
            contextflow::spawn_in(&mut set, async { REQ.get() });
        }
    })
    .await;
    while let Some(seen) = set.join_next().await {
        assert_eq!(seen.unwrap().as_deref(), Some("r8"));
    }
}

on_both_runtimes! {
    spawn_inherits => spawn_inherits;
    spawn_blocking_inherits => spawn_blocking_inherits;
    thread_spawn_inherits => thread_spawn_inherits;
    plain_spawns_do_not_inherit => plain_spawns_do_not_inherit;
    spawn_local_inherits => spawn_local_inherits;
    never_inherited_variable_stays_behind => never_inherited_variable_stays_behind;
    never_inherited_shadow_reveals_nothing_of_outer => never_inherited_shadow_reveals_nothing_of_outer;
    spawn_without_context_and_spawn_with => spawn_without_context_and_spawn_with;
    child_rebinding_never_reaches_parent_or_sibling => child_rebinding_never_reaches_parent_or_sibling;
    join_set_spawn_inherits => join_set_spawn_inherits;
}

// Review finding: a scope future first polled inside a transaction's scope kept the
// transaction alive after that scope ended, and inside the child it was handed to.
async fn scope_future_does_not_keep_a_pollers_transaction_alive() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    struct Tx(Arc<AtomicBool>);
    impl Drop for Tx {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    static TXV: AsyncLocal<Tx> = AsyncLocal::named("tx").inherit(Inherit::Never);
    static ID: AsyncLocal<u32> = AsyncLocal::named("id");
    let dropped = Arc::new(AtomicBool::new(false));
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let mut work = Box::pin(ID.scope(1, async move {
        let _ = wait.await;
        (ID.get(), TXV.is_set())
    }));
    TXV.scope(Tx(dropped.clone()), async {
        let _ = futures_util::poll!(work.as_mut());
    })
    .await;
    // The child's first poll re-parents the scope under the child's frame: from then on the
    // transaction must be gone, long before the work finishes.
    let (ready, is_ready) = tokio::sync::oneshot::channel::<bool>();
    let flag = dropped.clone();
    let child = contextflow::spawn(async move {
        assert!(futures_util::poll!(work.as_mut()).is_pending());
        ready.send(flag.load(Ordering::SeqCst)).unwrap();
        work.await
    });
    assert!(
        is_ready.await.unwrap(),
        "the transaction is released once another frame polls the scope"
    );
    go.send(()).unwrap();
    assert_eq!(child.await.unwrap(), (Some(1), false));
}

on_both_runtimes! {
    scope_future_does_not_keep_a_pollers_transaction_alive => scope_future_does_not_keep_a_pollers_transaction_alive;
}

/// The holes the "What propagates" table names, pinned down: code tokio polls inside a scope is
/// not a child contextflow can keep the scope from. A plain task on a `current_thread` runtime
/// is polled by `block_on`, under the context around that call; a `LocalSet`'s tasks are polled
/// by whoever drives the set. Both see an `Inherit::Never` value set there; on a
/// `multi_thread` worker a plain task sees nothing.
#[test]
fn plain_tasks_see_the_context_where_tokio_polls_them() {
    let current = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let seen = TX.sync_scope("tx-1", || {
        current.block_on(async { tokio::spawn(async { TX.get() }).await.unwrap() })
    });
    assert_eq!(
        seen,
        Some("tx-1"),
        "current_thread: block_on's surroundings"
    );

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let seen = TX.sync_scope("tx-2", || {
        multi.block_on(async { tokio::spawn(async { TX.get() }).await.unwrap() })
    });
    assert_eq!(seen, None, "multi_thread: a worker's nothing");

    let local = tokio::task::LocalSet::new();
    let seen = current.block_on(TX.scope(
        "tx-3",
        local.run_until(async { tokio::task::spawn_local(async { TX.get() }).await.unwrap() }),
    ));
    assert_eq!(seen, Some("tx-3"), "LocalSet: whoever drives it");
}
