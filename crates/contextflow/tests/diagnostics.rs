//! `contextflow::diagnostics` (feature `diagnostics`): reads of variables that a spawn dropped,
//! and root scopes that end while their tasks still hold their context, reported with their
//! sites. Its own binary: the sink is process-wide (every report of this process lands in one
//! list, and each test picks its own by its variables' and roots' unique names). The hooked
//! runtime's tests need `RUSTFLAGS="--cfg tokio_unstable"` (CI's unstable step runs them).

use std::sync::{Mutex, OnceLock};

use contextflow::{diagnostics, tree::Root, AsyncLocal, Inherit, Snapshot};

type Var = AsyncLocal<&'static str>;

/// Every report of this process, as text.
fn reports() -> &'static Mutex<Vec<String>> {
    static REPORTS: OnceLock<&'static Mutex<Vec<String>>> = OnceLock::new();
    REPORTS.get_or_init(|| {
        let list: &'static Mutex<Vec<String>> = Box::leak(Box::default());
        diagnostics::set_sink(move |r| list.lock().unwrap().push(r.to_string()));
        list
    })
}

/// The reports about variable `name` (that start with it).
fn reports_on(name: &str) -> Vec<String> {
    let prefix = format!("{name} read at ");
    reports()
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .cloned()
        .collect()
}

/// The leak reports of the root labelled `label`.
fn leaks_of(label: &str) -> Vec<String> {
    let prefix = format!("tree::Root {label:?} ended");
    reports()
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with(&prefix))
        .cloned()
        .collect()
}

fn at(line: u32) -> String {
    format!("{}:{line}", file!())
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().unwrap()
}

/// Runs `fut` in a task of `rt` (as a request's handler runs), to its end.
fn in_task(
    rt: tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) {
    rt.block_on(async { tokio::spawn(fut).await.unwrap() });
}

/// Runs `body` in a task of a `current_thread` and of a 2-worker `multi_thread` runtime, each
/// time with a variable of its own (reports are once per read site and variable), named
/// `<name>_ct` and `<name>_mt`.
macro_rules! on_both_runtimes {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            static CT: crate::Var = crate::Var::named(concat!(stringify!($name), "_ct"));
            static MT: crate::Var = crate::Var::named(concat!(stringify!($name), "_mt"));
            #[test]
            fn current_thread() {
                crate::in_task(crate::runtime(false), super::$body(&CT));
            }
            #[test]
            fn multi_thread() {
                crate::in_task(crate::runtime(true), super::$body(&MT));
            }
        }
    )*};
}

on_both_runtimes! {
    spawn_without_context_reports_the_read => spawn_without_context_reports_the_read;
    suppress_flow_reports_the_read => suppress_flow_reports_the_read;
    each_read_site_reports_once => each_read_site_reports_once;
    a_variable_set_in_the_task_is_not_reported => a_variable_set_in_the_task_is_not_reported;
    never_variables_are_not_reported => never_variables_are_not_reported;
    the_loss_follows_inheriting_spawns => the_loss_follows_inheriting_spawns;
    a_root_that_ends_with_running_tasks_reports_them => a_root_that_ends_with_running_tasks_reports_them;
    a_dropped_root_reports_its_running_tasks => a_dropped_root_reports_its_running_tasks;
    a_root_whose_tasks_finished_reports_nothing => a_root_whose_tasks_finished_reports_nothing;
}

async fn spawn_without_context_reports_the_read(var: &'static Var) {
    reports();
    let bound = line!() + 1;
    let spawned = var.scope("acme", async {
        let spawn_line = line!() + 1;
        let job = contextflow::spawn_without_context(async move {
            let read = line!() + 1;
            let seen = var.get();
            (
                seen,
                read,
                Snapshot::capture().is_empty(),
                format!("{:?}", Snapshot::capture()),
            )
        });
        (job, spawn_line)
    });
    let (job, spawn_line) = spawned.await;
    let (seen, read, empty, debug) = job.await.unwrap();
    assert_eq!(seen, None);
    // The record of the loss is no binding.
    assert!(empty);
    assert_eq!(debug, "Snapshot");
    let name = var.name();
    assert_eq!(
        reports_on(name),
        [format!(
            "{name} read at {} is unset: this task was started by \
             contextflow::spawn_without_context at {} from a task where {name} was set (at {}); \
             it starts from nothing",
            at(read),
            at(spawn_line),
            at(bound)
        )]
    );
}

async fn suppress_flow_reports_the_read(var: &'static Var) {
    reports();
    let bound = line!() + 1;
    let request = var.scope("acme", async {
        let suppress_line = line!() + 1;
        contextflow::suppress_flow(|| {
            let spawn_line = line!() + 1;
            let job = contextflow::spawn(async move { (var.get(), line!()) });
            (job, spawn_line, suppress_line)
        })
    });
    let (job, spawn_line, suppress_line) = request.await;
    let (seen, read) = job.await.unwrap();
    assert_eq!(seen, None);
    let name = var.name();
    assert_eq!(
        reports_on(name),
        [format!(
            "{name} read at {} is unset: this code was started at {} inside suppress_flow (at \
             {}) from a task where {name} was set (at {}); nothing flows from inside \
             suppress_flow",
            at(read),
            at(spawn_line),
            at(suppress_line),
            at(bound)
        )]
    );
}

async fn each_read_site_reports_once(var: &'static Var) {
    reports();
    let job = var.sync_scope("acme", || {
        contextflow::spawn_without_context(async move {
            let mut lines = Vec::new();
            for _ in 0..3 {
                lines.push(line!() + 1);
                assert_eq!(var.get(), None);
            }
            // A second site, through `with`.
            lines.push(line!() + 1);
            assert!(var.with(|v| v.is_none()));
            lines
        })
    });
    let lines = job.await.unwrap();
    let reads: Vec<String> = reports_on(var.name())
        .iter()
        .map(|r| r.split(" is unset").next().unwrap().to_string())
        .collect();
    let name = var.name();
    assert_eq!(
        reads,
        [
            format!("{name} read at {}", at(lines[0])),
            format!("{name} read at {}", at(lines[3]))
        ]
    );
}

async fn a_variable_set_in_the_task_is_not_reported(var: &'static Var) {
    reports();
    // Never set in the spawner: nothing was lost.
    let job = contextflow::spawn_without_context(async move { var.get() });
    assert_eq!(job.await.unwrap(), None);
    // Bound again inside the task: found, nothing to report.
    let job = var.sync_scope("acme", || {
        contextflow::spawn_without_context(
            async move { var.scope("inner", async { var.get() }).await },
        )
    });
    assert_eq!(job.await.unwrap(), Some("inner"));
    assert!(reports_on(var.name()).is_empty());
}

async fn never_variables_are_not_reported(var: &'static Var) {
    static TX_CT: AsyncLocal<u8> = AsyncLocal::named("never_tx_ct").inherit(Inherit::Never);
    static TX_MT: AsyncLocal<u8> = AsyncLocal::named("never_tx_mt").inherit(Inherit::Never);
    reports();
    let tx = if var.name().ends_with("_ct") {
        &TX_CT
    } else {
        &TX_MT
    };
    // `Inherit::Never` stays with its code by design: a spawn that leaves it out loses nothing.
    let job = tx.sync_scope(1, || contextflow::spawn(async { tx.get() }));
    assert_eq!(job.await.unwrap(), None);
    let job = tx.sync_scope(1, || contextflow::spawn_without_context(async { tx.get() }));
    assert_eq!(job.await.unwrap(), None);
    assert!(reports_on(tx.name()).is_empty());
}

async fn the_loss_follows_inheriting_spawns(var: &'static Var) {
    reports();
    let request = var.scope("acme", async {
        let spawn_line = line!() + 1;
        let job = contextflow::spawn_without_context(async move {
            // A grandchild through an inheriting spawn: the variable was lost one level up.
            let grandchild = contextflow::spawn(async move { (var.get(), line!()) });
            grandchild.await.unwrap()
        });
        (job, spawn_line)
    });
    let (job, spawn_line) = request.await;
    let (seen, read) = job.await.unwrap();
    assert_eq!(seen, None);
    let reports = reports_on(var.name());
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].starts_with(&format!(
            "{} read at {} is unset: this task was started by \
             contextflow::spawn_without_context at {} ",
            var.name(),
            at(read),
            at(spawn_line)
        )),
        "{}",
        reports[0]
    );
}

async fn a_root_that_ends_with_running_tasks_reports_them(var: &'static Var) {
    reports();
    let label = format!("leak {}", var.name());
    let root = Root::new(label.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (running, spawn_line) = root
        .scope(async {
            // Awaited: finished, not reported.
            contextflow::spawn(async {}).await.unwrap();
            // Started inside `suppress_flow`: does not hold the root's context.
            let (_keep, quiet) = tokio::sync::oneshot::channel::<()>();
            let quiet = contextflow::suppress_flow(|| contextflow::spawn(quiet));
            drop(quiet);
            let spawn_line = line!() + 1;
            let running = contextflow::spawn(async move {
                let _ = rx.await;
                let _ = done_tx.send(());
            });
            (running, spawn_line)
        })
        .await;
    let id = running.id();
    assert_eq!(
        leaks_of(&label),
        [format!(
            "tree::Root {label:?} ended while 1 task still holds its context:\n  task {id} \
             started by contextflow::spawn at {}",
            at(spawn_line)
        )]
    );
    tx.send(()).unwrap();
    done_rx.await.unwrap();
    running.await.unwrap();
}

async fn a_dropped_root_reports_its_running_tasks(var: &'static Var) {
    reports();
    let label = format!("dropped {}", var.name());
    let root = Root::new(label.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<tokio::task::JoinHandle<()>>();
    let request = root.scope(async move {
        let task = contextflow::spawn(std::future::pending::<()>());
        tx.send(task).unwrap();
        std::future::pending::<()>().await;
    });
    // Cancelled (a client disconnect): the check runs when the request's future is dropped.
    let cancelled = tokio::time::timeout(std::time::Duration::from_millis(1), request).await;
    assert!(cancelled.is_err());
    let task = rx.await.unwrap();
    let leaks = leaks_of(&label);
    assert_eq!(leaks.len(), 1, "{leaks:?}");
    assert!(leaks[0].contains(&format!(
        "task {} started by contextflow::spawn at ",
        task.id()
    )));
    task.abort();
}

async fn a_root_whose_tasks_finished_reports_nothing(var: &'static Var) {
    reports();
    let label = format!("clean {}", var.name());
    let root = Root::new(label.clone());
    root.scope(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            contextflow::spawn_in(&mut set, async { tokio::task::yield_now().await });
        }
        while set.join_next().await.is_some() {}
        let aborted = contextflow::spawn(std::future::pending::<()>());
        aborted.abort();
        assert!(aborted.await.unwrap_err().is_cancelled());
    })
    .await;
    assert!(leaks_of(&label).is_empty(), "{:?}", leaks_of(&label));
}

/// An OS thread started inside `suppress_flow` from outside any task.
#[test]
fn a_thread_started_inside_suppress_flow_reports_the_read() {
    static VAR: Var = Var::named("thread_suppressed");
    reports();
    let bound = line!() + 1;
    let (handle, spawn_line, suppress_line) = VAR.sync_scope("acme", || {
        let suppress_line = line!() + 1;
        contextflow::suppress_flow(|| {
            let spawn_line = line!() + 1;
            let handle = contextflow::thread::spawn(|| (VAR.get(), line!()));
            (handle, spawn_line, suppress_line)
        })
    });
    let (seen, read) = handle.join().unwrap();
    assert_eq!(seen, None);
    assert_eq!(
        reports_on(VAR.name()),
        [format!(
            "thread_suppressed read at {} is unset: this code was started at {} inside \
             suppress_flow (at {}) from outside any task, in code where thread_suppressed was \
             set (at {}); nothing flows from inside suppress_flow",
            at(read),
            at(spawn_line),
            at(suppress_line),
            at(bound)
        )]
    );
}

/// An unnamed variable is named by its type.
#[test]
fn an_unnamed_variable_is_named_by_its_type() {
    static VAR: AsyncLocal<(u8, u16)> = AsyncLocal::new();
    reports();
    let handle = VAR.sync_scope((1, 2), || {
        contextflow::suppress_flow(|| contextflow::thread::spawn(|| VAR.get()))
    });
    assert_eq!(handle.join().unwrap(), None);
    let all = reports().lock().unwrap().clone();
    assert!(
        all.iter()
            .any(|r| r.starts_with("an unnamed AsyncLocal<(u8, u16)> read at ")),
        "{all:?}"
    );
}

/// Code that keeps starting work through lossy captures, each generation inside the last
/// one's context (a task that re-spawns itself): the loss records it leaves behind stay
/// bounded, and dropping the last context does not overflow the stack.
#[test]
fn a_long_chain_of_lossy_captures_stays_bounded() {
    static GENERATION: AsyncLocal<u32> = AsyncLocal::named("generation");
    reports();
    // On a small stack: a recursive drop of one record per generation would overflow it.
    let ended = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let mut snap = Snapshot::empty();
            for generation in 0..100_000 {
                snap = snap.run(|| {
                    GENERATION.sync_scope(generation, || {
                        contextflow::suppress_flow(Snapshot::capture_inheritable)
                    })
                });
            }
            // The newest generation still knows what its own spawn dropped.
            let unset = snap.run(|| GENERATION.get());
            drop(snap);
            unset
        })
        .unwrap()
        .join();
    assert_eq!(ended.expect("no stack overflow, no panic"), None);
}

#[test]
fn the_mode_is_report_by_default() {
    assert_eq!(diagnostics::mode(), diagnostics::Mode::Report);
}

#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
mod hooked {
    //! On a runtime with contextflow's hooks, plain spawns drop the variables that are not
    //! `Inherit::Everywhere`: a read of one in the spawned task is reported.

    use contextflow::{tree::Root, AsyncLocal, Inherit};

    use super::{at, leaks_of, reports, reports_on, Var};

    static REQUEST_ID: AsyncLocal<u32> =
        AsyncLocal::named("hooked_request_id").inherit(Inherit::Everywhere);

    fn hooked(multi_thread: bool) -> tokio::runtime::Runtime {
        let mut builder = if multi_thread {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        } else {
            tokio::runtime::Builder::new_current_thread()
        };
        builder.enable_all();
        contextflow::runtime::Hooks::new()
            .install(&mut builder)
            .expect("built with --cfg tokio_unstable");
        builder.build().unwrap()
    }

    macro_rules! on_both_hooked {
        ($($name:ident => $body:ident;)*) => {$(
            mod $name {
                static CT: crate::Var = crate::Var::named(concat!(stringify!($name), "_ct"));
                static MT: crate::Var = crate::Var::named(concat!(stringify!($name), "_mt"));
                #[test]
                fn current_thread() {
                    crate::in_task(super::hooked(false), super::$body(&CT));
                }
                #[test]
                fn multi_thread() {
                    crate::in_task(super::hooked(true), super::$body(&MT));
                }
            }
        )*};
    }

    on_both_hooked! {
        a_plain_spawn_reports_the_tenant => a_plain_spawn_reports_the_tenant;
        nested_plain_spawns_name_the_first_loss => nested_plain_spawns_name_the_first_loss;
        joinset_spawn_reports => joinset_spawn_reports;
        a_plain_spawn_inside_suppress_flow_reports => a_plain_spawn_inside_suppress_flow_reports;
        a_root_reports_its_running_plain_tasks => a_root_reports_its_running_plain_tasks;
    }

    async fn a_plain_spawn_reports_the_tenant(var: &'static Var) {
        reports();
        let bound = line!() + 1;
        let request = var.scope("acme", async {
            let spawn_line = line!() + 1;
            let task = tokio::spawn(async move {
                tokio::task::yield_now().await;
                (REQUEST_ID.get(), var.get(), line!())
            });
            (task, spawn_line)
        });
        let (task, spawn_line) = REQUEST_ID.scope(7, request).await;
        let (id, tenant, read) = task.await.unwrap();
        assert_eq!((id, tenant), (Some(7), None));
        let name = var.name();
        assert_eq!(
            reports_on(name),
            [format!(
                "{name} read at {} is unset: this task was started by plain tokio::spawn at {} \
                 from a task where {name} was set (at {}); plain spawns carry only variables \
                 marked Inherit::Everywhere",
                at(read),
                at(spawn_line),
                at(bound)
            )]
        );
        // The variable that flows is not reported.
        assert!(reports_on(REQUEST_ID.name()).is_empty());
    }

    async fn nested_plain_spawns_name_the_first_loss(var: &'static Var) {
        reports();
        let request = var.scope("acme", async {
            let spawn_line = line!() + 1;
            let task = tokio::spawn(async move {
                let grandchild = tokio::spawn(async move { (var.get(), line!()) });
                grandchild.await.unwrap()
            });
            (task, spawn_line)
        });
        let (task, spawn_line) = request.await;
        let (seen, read) = task.await.unwrap();
        assert_eq!(seen, None);
        let reports = reports_on(var.name());
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(
            reports[0].starts_with(&format!(
                "{} read at {} is unset: this task was started by plain tokio::spawn at {} ",
                var.name(),
                at(read),
                at(spawn_line)
            )),
            "{}",
            reports[0]
        );
    }

    async fn joinset_spawn_reports(var: &'static Var) {
        reports();
        let mut set = tokio::task::JoinSet::new();
        let spawn_line = var.sync_scope("acme", || {
            let spawn_line = line!() + 1;
            set.spawn(async move { (var.get(), line!()) });
            spawn_line
        });
        let (seen, read) = set.join_next().await.unwrap().unwrap();
        assert_eq!(seen, None);
        let reports = reports_on(var.name());
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(
            reports[0].starts_with(&format!(
                "{} read at {} is unset: this task was started by plain tokio::spawn at {} ",
                var.name(),
                at(read),
                at(spawn_line)
            )),
            "{}",
            reports[0]
        );
    }

    async fn a_plain_spawn_inside_suppress_flow_reports(var: &'static Var) {
        reports();
        let bound = line!() + 1;
        let request = var.scope("acme", async {
            let suppress_line = line!() + 1;
            contextflow::suppress_flow(|| {
                let spawn_line = line!() + 1;
                let task = tokio::spawn(async move { (var.get(), line!()) });
                (task, spawn_line, suppress_line)
            })
        });
        let (task, spawn_line, suppress_line) = request.await;
        let (seen, read) = task.await.unwrap();
        assert_eq!(seen, None);
        let name = var.name();
        assert_eq!(
            reports_on(name),
            [format!(
                "{name} read at {} is unset: this task was started by plain tokio::spawn at {} \
                 inside suppress_flow (at {}) from a task where {name} was set (at {}); \
                 nothing flows from inside suppress_flow",
                at(read),
                at(spawn_line),
                at(suppress_line),
                at(bound)
            )]
        );
    }

    async fn a_root_reports_its_running_plain_tasks(var: &'static Var) {
        reports();
        let label = format!("plain leak {}", var.name());
        let root = Root::new(label.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (running, spawn_line) = root
            .scope(async {
                // Awaited: finished (perhaps a moment after the join), not reported.
                tokio::spawn(async {}).await.unwrap();
                let spawn_line = line!() + 1;
                let running = tokio::spawn(async move {
                    let _ = rx.await;
                });
                (running, spawn_line)
            })
            .await;
        let id = running.id();
        assert_eq!(
            leaks_of(&label),
            [format!(
                "tree::Root {label:?} ended while 1 task still holds its context:\n  task {id} \
                 started by tokio::spawn at {}",
                at(spawn_line)
            )]
        );
        tx.send(()).unwrap();
        running.await.unwrap();
    }
}
