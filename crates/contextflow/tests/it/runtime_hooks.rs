//! `contextflow::runtime`: plain `tokio::spawn` inherits on a hooked runtime (feature
//! `runtime-hooks`, built with `RUSTFLAGS="--cfg tokio_unstable"`; CI has a step for it).
//! Without the cfg, installing the hooks is an error and nothing changes.

#[cfg(not(tokio_unstable))]
#[test]
fn install_without_tokio_unstable_is_an_error() {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    let err = contextflow::runtime::Hooks::new()
        .install(&mut builder)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "contextflow's runtime hooks need tokio's task hooks, which exist only when built with \
         RUSTFLAGS=\"--cfg tokio_unstable\"; without them a plain tokio::spawn does not inherit \
         the context (use contextflow::spawn)"
    );
    // The builder still builds an ordinary runtime.
    let rt = builder.build().unwrap();
    assert_eq!(
        rt.block_on(async { tokio::spawn(async { 1 }).await.unwrap() }),
        1
    );
}

#[cfg(tokio_unstable)]
mod hooked {
    use std::{
        panic::AssertUnwindSafe,
        sync::{Arc, Mutex},
    };

    use contextflow::{runtime::Installed, AsyncLocal, Inherit};
    use tokio::runtime::Runtime;

    /// Flows through plain spawns on a hooked runtime.
    static REQUEST_ID: AsyncLocal<u32> =
        AsyncLocal::named("request_id").inherit(Inherit::Everywhere);
    /// Flows through contextflow's spawns only (the default).
    static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");
    /// Never flows.
    static TX: AsyncLocal<u8> = AsyncLocal::named("tx").inherit(Inherit::Never);

    #[derive(Clone, Copy, Debug)]
    enum Flavor {
        CurrentThread,
        MultiThread,
    }
    const FLAVORS: [Flavor; 2] = [Flavor::CurrentThread, Flavor::MultiThread];

    fn hooked(flavor: Flavor) -> (Runtime, Installed) {
        let mut builder = match flavor {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Flavor::MultiThread => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(2);
                b
            }
        };
        builder.enable_all();
        let installed = contextflow::runtime::Hooks::new()
            .install(&mut builder)
            .expect("built with --cfg tokio_unstable");
        (builder.build().unwrap(), installed)
    }

    /// What a task sees of the three variables.
    fn seen() -> (Option<u32>, Option<&'static str>, Option<u8>) {
        (REQUEST_ID.get(), TENANT.get(), TX.get())
    }

    /// Runs `fut` inside a request's bindings of all three variables.
    async fn in_request<F: std::future::Future>(id: u32, fut: F) -> F::Output {
        REQUEST_ID
            .scope(id, TENANT.scope("acme", TX.scope(1, fut)))
            .await
    }

    #[test]
    fn plain_spawn_inherits_by_policy() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let got = rt.block_on(in_request(7, async {
                let plain = tokio::spawn(async {
                    tokio::task::yield_now().await;
                    seen()
                });
                let explicit = contextflow::spawn(async {
                    tokio::task::yield_now().await;
                    seen()
                });
                (plain.await.unwrap(), explicit.await.unwrap())
            }));
            assert_eq!(got.0, (Some(7), None, None), "{flavor:?}: plain spawn");
            assert_eq!(
                got.1,
                (Some(7), Some("acme"), None),
                "{flavor:?}: contextflow::spawn"
            );
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    /// Spawning through a `Handle` of a runtime that is shut down: tokio shuts the task down
    /// inside the spawn (terminate hook first, spawn hook after), so the hooks must not keep an
    /// entry for it, or every such spawn would leak one with its request's frame.
    #[test]
    fn spawns_on_a_shut_down_runtime_leave_no_entry() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let handle = rt.handle().clone();
            drop(rt);
            for i in 0..100 {
                REQUEST_ID.sync_scope(i, || drop(handle.spawn(async {})));
            }
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn nested_plain_spawns_inherit() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let got = rt.block_on(in_request(8, async {
                tokio::spawn(async {
                    let grandchild = REQUEST_ID.sync_scope(9, || {
                        tokio::spawn(async {
                            tokio::task::yield_now().await;
                            tokio::spawn(async { REQUEST_ID.get() }).await.unwrap()
                        })
                    });
                    (REQUEST_ID.get(), grandchild.await.unwrap())
                })
                .await
                .unwrap()
            }));
            assert_eq!(got, (Some(8), Some(9)), "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn joinset_spawn_inherits() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let mut got = rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for id in 0..8u32 {
                    REQUEST_ID.sync_scope(id, || {
                        set.spawn(async move {
                            tokio::task::yield_now().await;
                            (id, REQUEST_ID.get())
                        });
                    });
                }
                set.join_all().await
            });
            got.sort_unstable();
            let want: Vec<_> = (0..8).map(|id| (id, Some(id))).collect();
            assert_eq!(got, want, "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn handle_spawn_from_an_os_thread_inherits_that_threads_context() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let handle = rt.handle().clone();
            let task = std::thread::spawn(move || {
                REQUEST_ID.sync_scope(11, || handle.spawn(async { REQUEST_ID.get() }))
            })
            .join()
            .unwrap();
            // The thread driving the runtime has a context of its own: the task does not see it.
            let got = REQUEST_ID.sync_scope(99, || rt.block_on(task)).unwrap();
            assert_eq!(got, Some(11), "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn a_task_without_context_does_not_see_the_driving_threads_context() {
        for flavor in FLAVORS {
            let (rt, _installed) = hooked(flavor);
            let task = rt.spawn(async { REQUEST_ID.get() });
            let got = REQUEST_ID.sync_scope(5, || rt.block_on(task)).unwrap();
            assert_eq!(got, None, "{flavor:?}");
        }
    }

    /// Many tasks with different ids, each yielding many times, so that on the `multi_thread`
    /// runtime some are stolen and polled on both workers: each sees its own id at every poll.
    /// Whether tokio moves a task is not under the test's control, so on `multi_thread` it runs
    /// rounds (at most 50) until at least one task was polled on two threads.
    #[test]
    fn migrating_between_workers_keeps_each_tasks_context() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let mut migrated = 0;
            for _round in 0..50 {
                let (wrong, moved) = rt.block_on(async {
                    let mut tasks = Vec::new();
                    for id in 0..64u32 {
                        let task = REQUEST_ID.sync_scope(id, || {
                            tokio::spawn(async move {
                                let mut wrong = 0;
                                let mut threads = std::collections::HashSet::new();
                                for _ in 0..50 {
                                    threads.insert(std::thread::current().id());
                                    if REQUEST_ID.get() != Some(id) {
                                        wrong += 1;
                                    }
                                    tokio::task::yield_now().await;
                                }
                                (wrong, threads.len() > 1)
                            })
                        });
                        tasks.push(task);
                    }
                    let (mut wrong, mut moved) = (0, 0);
                    for task in tasks {
                        let (w, m) = task.await.unwrap();
                        wrong += w;
                        moved += usize::from(m);
                    }
                    (wrong, moved)
                });
                assert_eq!(wrong, 0, "{flavor:?}");
                migrated += moved;
                if migrated > 0 || matches!(flavor, Flavor::CurrentThread) {
                    break;
                }
            }
            if matches!(flavor, Flavor::MultiThread) {
                assert!(migrated > 0, "no task ever moved between workers");
            } else {
                assert_eq!(migrated, 0, "one thread");
            }
            // Between polls, a worker has no context left over.
            let after = rt.block_on(async { tokio::spawn(async { REQUEST_ID.get() }).await });
            assert_eq!(after.unwrap(), None, "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    /// Records what its destructor saw.
    struct OnDrop(Arc<Mutex<Option<Option<u32>>>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(REQUEST_ID.get());
        }
    }

    #[test]
    fn an_aborted_task_is_dropped_in_its_context_and_leaves_the_map() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let dropped = Arc::new(Mutex::new(None));
            let guard = OnDrop(dropped.clone());
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let task = REQUEST_ID.sync_scope(21, || {
                rt.spawn(async move {
                    let _guard = guard;
                    started_tx.send(()).unwrap();
                    std::future::pending::<()>().await
                })
            });
            rt.block_on(started_rx).unwrap();
            assert_eq!(installed.tasks_with_context(), 1, "{flavor:?}");
            task.abort();
            let err = rt.block_on(task).unwrap_err();
            assert!(err.is_cancelled(), "{flavor:?}");
            assert_eq!(*dropped.lock().unwrap(), Some(Some(21)), "{flavor:?}");
            // On `current_thread` the entry goes within the poll that ends the task; a
            // `multi_thread` worker removes it just after the join handle is told, so wait for
            // the workers to stop.
            if let Flavor::CurrentThread = flavor {
                assert_eq!(installed.tasks_with_context(), 0);
            }
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn a_panicking_task_restores_the_workers_context_and_leaves_the_map() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let got = rt.block_on(async {
                let panicked = REQUEST_ID.sync_scope(3, || {
                    tokio::spawn(async {
                        assert_eq!(REQUEST_ID.get(), Some(3));
                        panic!("task panics on purpose");
                    })
                });
                let err = panicked.await.unwrap_err();
                assert!(err.is_panic());
                // Many tasks after it: none sees the panicked task's context.
                let mut seen = Vec::new();
                for _ in 0..16 {
                    seen.push(tokio::spawn(async { REQUEST_ID.get() }).await.unwrap());
                }
                seen
            });
            assert!(got.iter().all(Option::is_none), "{flavor:?}: {got:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn tasks_left_at_shutdown_leave_with_the_runtime() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            rt.block_on(async {
                for id in 0..10 {
                    REQUEST_ID.sync_scope(id, || tokio::spawn(std::future::pending::<()>()));
                }
                tokio::task::yield_now().await;
            });
            assert_eq!(installed.tasks_with_context(), 10, "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn user_hooks_are_chained_and_see_the_tasks_context() {
        let before = Arc::new(Mutex::new(Vec::new()));
        let after = Arc::new(Mutex::new(Vec::new()));
        let (b, a) = (before.clone(), after.clone());
        let mut builder = tokio::runtime::Builder::new_current_thread();
        let installed = contextflow::runtime::Hooks::new()
            .on_before_task_poll(move |_| b.lock().unwrap().push(REQUEST_ID.get()))
            .on_after_task_poll(move |_| a.lock().unwrap().push(REQUEST_ID.get()))
            .install(&mut builder)
            .unwrap();
        let rt = builder.build().unwrap();
        rt.block_on(REQUEST_ID.scope(4, async {
            tokio::spawn(async {}).await.unwrap();
        }));
        assert_eq!(*before.lock().unwrap(), [Some(4)]);
        assert_eq!(*after.lock().unwrap(), [Some(4)]);
        drop(rt);
        assert_eq!(installed.tasks_with_context(), 0);
    }

    #[test]
    fn a_panicking_user_hook_still_restores_the_context() {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        contextflow::runtime::Hooks::new()
            .on_task_terminate(|_| panic!("terminate hook panics on purpose"))
            .on_after_task_poll(|_| {
                if REQUEST_ID.get() == Some(13) {
                    panic!("after-poll hook panics on purpose");
                }
            })
            .install(&mut builder)
            .unwrap();
        let rt = builder.build().unwrap();
        let task = REQUEST_ID.sync_scope(13, || rt.spawn(async {}));
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(task)));
        assert!(res.is_err(), "the hook's panic reaches block_on");
        assert_eq!(REQUEST_ID.get(), None, "the task's context was left");
    }

    #[test]
    fn plain_spawns_inside_suppress_flow_do_not_inherit() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let (inside, after) = rt.block_on(in_request(12, async {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let inside = contextflow::suppress_flow(|| {
                    tokio::spawn(async move {
                        let _ = rx.await;
                        REQUEST_ID.get()
                    })
                });
                // Nothing was captured for it.
                assert_eq!(installed.tasks_with_context(), 0);
                tx.send(()).unwrap();
                let after = tokio::spawn(async { REQUEST_ID.get() });
                (inside.await.unwrap(), after.await.unwrap())
            }));
            assert_eq!((inside, after), (None, Some(12)), "{flavor:?}");
        }
    }

    #[test]
    fn plain_spawns_are_recorded_in_the_task_tree() {
        use contextflow::tree::{self, Root, SpawnedBy};
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let root = Root::new("request");
            let (outer, inner, trigger) = rt.block_on(root.scope(async {
                let outer = tokio::spawn(async {
                    let inner = tokio::spawn(async { tree::trigger_id() });
                    let id = inner.id();
                    (id, inner.await.unwrap())
                });
                let outer_id = outer.id();
                let (inner_id, trigger) = outer.await.unwrap();
                (outer_id, inner_id, trigger)
            }));
            assert_eq!(trigger, Some(outer), "{flavor:?}");
            drop(rt);
            let got: Vec<_> = root
                .tasks()
                .iter()
                .map(|t| (t.id, t.trigger, t.depth, t.spawned_by, t.finished))
                .collect();
            assert_eq!(
                got,
                [
                    (Some(outer), None, 1, SpawnedBy::PlainSpawn, true),
                    (Some(inner), Some(outer), 2, SpawnedBy::PlainSpawn, true),
                ],
                "{flavor:?}"
            );
            assert!(root
                .to_string()
                .contains(&format!("task {inner}  tokio::spawn at ")));
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    // ===== holes: where tokio runs no hook, tasks behave as on an ordinary runtime =====

    #[test]
    fn hole_spawn_blocking_does_not_inherit() {
        for flavor in FLAVORS {
            let (rt, installed) = hooked(flavor);
            let got = rt.block_on(in_request(1, async {
                let plain = tokio::task::spawn_blocking(|| REQUEST_ID.get());
                let explicit = contextflow::spawn_blocking(|| REQUEST_ID.get());
                (plain.await.unwrap(), explicit.await.unwrap())
            }));
            assert_eq!(got, (None, Some(1)), "{flavor:?}");
            drop(rt);
            assert_eq!(installed.tasks_with_context(), 0, "{flavor:?}");
        }
    }

    #[test]
    fn hole_local_set_does_not_inherit() {
        let (rt, installed) = hooked(Flavor::CurrentThread);
        let local = tokio::task::LocalSet::new();
        let got = local.block_on(
            &rt,
            in_request(2, async {
                let plain = tokio::task::spawn_local(async { REQUEST_ID.get() });
                let explicit = contextflow::spawn_local(async { REQUEST_ID.get() });
                (plain.await.unwrap(), explicit.await.unwrap())
            }),
        );
        assert_eq!(got, (None, Some(2)));
        drop(rt);
        assert_eq!(installed.tasks_with_context(), 0);
    }

    #[test]
    fn hole_block_on_root_is_not_a_task() {
        for flavor in FLAVORS {
            let (rt, _installed) = hooked(flavor);
            // The root future sees the calling thread's context, as on any runtime; it has no
            // task id, so no hook ever runs for it.
            let got = REQUEST_ID.sync_scope(6, || {
                rt.block_on(async { (REQUEST_ID.get(), tokio::task::try_id().is_some()) })
            });
            assert_eq!(got, (Some(6), false), "{flavor:?}");
        }
    }
}
