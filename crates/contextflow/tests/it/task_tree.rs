//! `contextflow::tree`: execution and trigger ids, and the task tree of a root scope, read while
//! the request runs and printed.

use contextflow::tree::{self, Root, SpawnedBy, MAX_CHILDREN, MAX_DEPTH};

on_both_runtimes! {
    nested_spawns_record_ids_triggers_and_depth => nested_spawns_record_ids_triggers_and_depth;
    the_tree_is_readable_while_tasks_run => the_tree_is_readable_while_tasks_run;
    an_aborted_task_is_finished => an_aborted_task_is_finished;
    outside_a_root_nothing_is_recorded => outside_a_root_nothing_is_recorded;
    children_past_the_bound_are_counted => children_past_the_bound_are_counted;
    a_task_that_respawns_itself_keeps_the_tree_bounded => a_task_that_respawns_itself_keeps_the_tree_bounded;
}

async fn nested_spawns_record_ids_triggers_and_depth() {
    let root = Root::new("POST /orders");
    let (outer_id, inner_id, set_id, seen) = root
        .scope(async {
            let outer = contextflow::spawn(async {
                let me = tree::execution_id().unwrap();
                let inner = contextflow::spawn(async {
                    (tree::execution_id().unwrap(), tree::trigger_id())
                });
                let inner_id = inner.id();
                let (inner_seen, inner_trigger) = inner.await.unwrap();
                assert_eq!(inner_seen, inner_id);
                (me, inner_id, inner_trigger)
            });
            let outer_id = outer.id();
            let mut set = tokio::task::JoinSet::new();
            let set_id = contextflow::spawn_in(&mut set, async { tree::trigger_id() }).id();
            assert_eq!(set.join_next().await.unwrap().unwrap(), None);
            let (me, inner_id, inner_trigger) = outer.await.unwrap();
            assert_eq!(me, outer_id);
            (outer_id, inner_id, set_id, inner_trigger)
        })
        .await;
    assert_eq!(
        seen,
        Some(outer_id),
        "the inner task's trigger is the outer task"
    );
    let tasks = root.tasks();
    let summary: Vec<_> = tasks
        .iter()
        .map(|t| (t.id, t.trigger, t.depth, t.spawned_by, t.finished))
        .collect();
    assert_eq!(
        summary,
        [
            (Some(outer_id), None, 1, SpawnedBy::Contextflow, true),
            (
                Some(inner_id),
                Some(outer_id),
                2,
                SpawnedBy::Contextflow,
                true
            ),
            (Some(set_id), None, 1, SpawnedBy::Contextflow, true),
        ]
    );
    assert!(tasks
        .iter()
        .all(|t| t.spawned_at.file().ends_with("task_tree.rs")));
    let here = file!();
    let lines = |t: &tree::TaskInfo| format!("{here}:{}", t.spawned_at.line());
    assert_eq!(
        root.to_string(),
        format!(
            "POST /orders\n\
             ├── task {outer_id}  contextflow::spawn at {}  finished\n\
             │   └── task {inner_id}  contextflow::spawn at {}  finished\n\
             └── task {set_id}  contextflow::spawn at {}  finished\n",
            lines(&tasks[0]),
            lines(&tasks[1]),
            lines(&tasks[2]),
        )
    );
}

// The root scope hands the join handle out on purpose, to await it outside.
#[allow(clippy::async_yields_async)]
async fn the_tree_is_readable_while_tasks_run() {
    let root = Root::new("request");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = root
        .scope(async {
            contextflow::spawn(async {
                let _ = rx.await;
                Root::current().map(|r| r.tasks().len())
            })
        })
        .await;
    let id = task.id();
    let running = root.tasks();
    assert_eq!((running[0].id, running[0].finished), (Some(id), false));
    assert!(root
        .to_string()
        .lines()
        .nth(1)
        .unwrap()
        .ends_with("  running"));
    tx.send(()).unwrap();
    assert_eq!(task.await.unwrap(), Some(1), "the task reads its own tree");
    assert!(root.tasks()[0].finished);
}

// The root scope hands the join handle out on purpose, to await it outside.
#[allow(clippy::async_yields_async)]
async fn an_aborted_task_is_finished() {
    let root = Root::new("request");
    let task = root
        .scope(async { contextflow::spawn(std::future::pending::<()>()) })
        .await;
    tokio::task::yield_now().await;
    assert!(!root.tasks()[0].finished);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(root.tasks()[0].finished);
}

async fn outside_a_root_nothing_is_recorded() {
    let got = contextflow::spawn(async { (tree::execution_id().is_some(), tree::trigger_id()) })
        .await
        .unwrap();
    assert_eq!(got, (true, None));
    assert!(Root::current().is_none());
}

async fn children_past_the_bound_are_counted() {
    let root = Root::new("fan-out");
    root.scope(async {
        let tasks: Vec<_> = (0..MAX_CHILDREN + 5)
            .map(|_| contextflow::spawn(async {}))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    assert_eq!(root.tasks().len(), MAX_CHILDREN);
    assert_eq!(
        root.to_string().lines().last(),
        Some("└── … 5 more tasks not recorded")
    );
}

/// Each generation starts the next and ends: a chain as deep as it runs long.
fn generation(left: u32, done: tokio::sync::oneshot::Sender<()>) {
    if left == 0 {
        let _ = done.send(());
        return;
    }
    drop(contextflow::spawn(
        async move { generation(left - 1, done) },
    ));
}

/// A task that re-spawns itself (a poller, a retry loop) under a root: the tree keeps
/// `MAX_DEPTH` levels of it, not one per generation, and reading, printing and dropping the
/// tree stay shallow.
async fn a_task_that_respawns_itself_keeps_the_tree_bounded() {
    let root = Root::new("poller");
    let (done, finished) = tokio::sync::oneshot::channel();
    root.scope(async move {
        generation(20_000, done);
        finished.await.unwrap();
    })
    .await;
    let tasks = root.tasks();
    assert_eq!(tasks.len(), MAX_DEPTH);
    assert_eq!(tasks.iter().map(|t| t.depth).max(), Some(MAX_DEPTH));
    assert!(
        root.to_string().contains("… 1 more tasks not recorded"),
        "{root}"
    );
    drop(root);
}
