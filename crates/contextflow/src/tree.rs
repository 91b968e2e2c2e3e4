//! Async ids and the task tree: which task is running ([`execution_id`]), which task started
//! it ([`trigger_id`]), and the tree of tasks a request has started ([`Root`]), readable and
//! printable while the request runs (Node's `executionAsyncId`, `triggerAsyncId` and
//! `async_hooks` resource tree, for tokio tasks).
//!
//! The tree records the tasks started under a [`Root`] scope through
//! [`contextflow::spawn`](crate::spawn) and [`spawn_in`](crate::spawn_in), and, on a runtime
//! with contextflow's hooks (feature `runtime-hooks`), through a plain `tokio::spawn`,
//! `JoinSet::spawn` or `Handle::spawn`. Outside a root, spawns record nothing and cost one
//! lookup more. Each node keeps at most [`MAX_CHILDREN`] children (the rest are counted), and
//! the tree at most [`MAX_DEPTH`] levels (a task deeper down is counted by its parent, and its
//! own children are not recorded), so a request that starts a million tasks, or a task that
//! re-spawns itself forever, does not keep a million nodes.
//!
//! ```
//! use contextflow::tree::{self, Root};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let root = Root::new("POST /orders");
//! root.scope(async {
//!     let job = contextflow::spawn(async {
//!         // Inside the task: its own id, and the id of the task that started it (none: the
//!         // request ran in `block_on` here, not in a task).
//!         (tree::execution_id().is_some(), tree::trigger_id())
//!     });
//!     assert_eq!(job.await.unwrap(), (true, None));
//! })
//! .await;
//! let tasks = root.tasks();
//! assert_eq!(tasks.len(), 1);
//! assert!(tasks[0].finished);
//! assert!(root.to_string().starts_with("POST /orders\n└── task "));
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    panic::Location,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use tokio::task::Id;

use crate::{AsyncLocal, Inherit};

/// The most children a node of the tree keeps; later ones are counted only.
pub const MAX_CHILDREN: usize = 256;

/// The most levels of tasks the tree keeps below its root; a task deeper down is counted by
/// its parent only (and its own children are not recorded). Walks of the tree recurse, so its
/// depth is what bounds their stack.
///
/// ```
/// assert_eq!(contextflow::tree::MAX_DEPTH, 64);
/// ```
pub const MAX_DEPTH: usize = 64;

/// The tree node of the code running now: the root, or the task it runs in. Flows everywhere,
/// and each recorded spawn rebinds it to the child's node.
static NODE: AsyncLocal<Arc<Node>> =
    AsyncLocal::named("contextflow.task").inherit(Inherit::Everywhere);

/// How a task in the tree was started.
///
/// ```
/// use contextflow::tree::SpawnedBy;
/// assert_eq!(SpawnedBy::Contextflow.to_string(), "contextflow::spawn");
/// assert_eq!(SpawnedBy::PlainSpawn.to_string(), "tokio::spawn");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpawnedBy {
    /// [`contextflow::spawn`](crate::spawn) or [`spawn_in`](crate::spawn_in).
    Contextflow,
    /// A plain `tokio::spawn`, `JoinSet::spawn` or `Handle::spawn` on a hooked runtime.
    PlainSpawn,
}

impl fmt::Display for SpawnedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpawnedBy::Contextflow => "contextflow::spawn",
            SpawnedBy::PlainSpawn => "tokio::spawn",
        })
    }
}

pub(crate) struct Node {
    /// The root's label; empty for a task.
    label: String,
    /// The task's id (unset for the root, and for a task until its spawn returns or it first
    /// runs).
    id: OnceLock<Id>,
    /// The task that spawned it, if it was spawned from inside a task.
    trigger: Option<Id>,
    /// Where it was spawned (None for the root).
    spawned_at: Option<(&'static Location<'static>, SpawnedBy)>,
    finished: AtomicBool,
    children: Mutex<Vec<Arc<Node>>>,
    /// Children not kept (past `MAX_CHILDREN`, or below `MAX_DEPTH`).
    not_kept: AtomicUsize,
    /// 0 for the root, 1 for a task it started, ...
    depth: usize,
    /// Whether the task holds its root's context (it was not started inside `suppress_flow`),
    /// for the leak check.
    #[cfg(feature = "diagnostics")]
    holds_context: bool,
}

impl Node {
    fn add_child(
        self: &Arc<Self>,
        id: Option<Id>,
        at: &'static Location<'static>,
        by: SpawnedBy,
    ) -> Arc<Node> {
        let child = Arc::new(Node {
            label: String::new(),
            id: id.map(OnceLock::from).unwrap_or_default(),
            trigger: tokio::task::try_id(),
            spawned_at: Some((at, by)),
            finished: AtomicBool::new(false),
            children: Mutex::new(Vec::new()),
            not_kept: AtomicUsize::new(0),
            depth: self.depth + 1,
            #[cfg(feature = "diagnostics")]
            holds_context: !crate::is_flow_suppressed(),
        });
        // A poisoned lock only means a panic while pushing; the list is intact.
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if children.len() < MAX_CHILDREN && child.depth <= MAX_DEPTH {
            children.push(child.clone());
        } else {
            self.not_kept.fetch_add(1, Ordering::Relaxed);
        }
        child
    }

    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }
}

/// Marks its node finished when dropped: when the task's future completes, or is dropped
/// unfinished (aborted, or never polled).
struct Finish(Arc<Node>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// For contextflow's spawn helpers: inside a root, records a child started at `at` and wraps
/// `fut` to run under it; returns the node, to be given the task id once spawned.
#[inline]
pub(crate) fn record_spawn<F>(
    at: &'static Location<'static>,
    fut: F,
) -> Result<(Arc<Node>, impl Future<Output = F::Output>), F>
where
    F: Future,
{
    // Inside `suppress_flow` a child starts empty: not even the task tree's own node.
    if crate::flow::is_flow_suppressed() {
        return Err(fut);
    }
    let Some(parent) = NODE.get() else {
        return Err(fut);
    };
    let child = parent.add_child(None, at, SpawnedBy::Contextflow);
    let finish = Finish(child.clone());
    let wrapped = NODE.scope(child.clone(), async move {
        let finish = finish;
        if let Some(id) = tokio::task::try_id() {
            let _ = finish.0.id.set(id);
        }
        fut.await
    });
    Ok((child, wrapped))
}

/// Gives a recorded child its task id (from the spawn's join handle).
pub(crate) fn set_id(node: &Node, id: Id) {
    let _ = node.id.set(id);
}

/// For the runtime hooks: inside a root, records the plain spawn of task `id` at `at`, and
/// runs `capture` with the child's node bound, so the task's frame carries it.
#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
pub(crate) fn record_plain_spawn<R>(
    id: Id,
    at: &'static Location<'static>,
    capture: impl FnOnce() -> R,
) -> (R, Option<Arc<Node>>) {
    match NODE.get() {
        None => (capture(), None),
        Some(parent) => {
            let child = parent.add_child(Some(id), at, SpawnedBy::PlainSpawn);
            (NODE.sync_scope(child.clone(), capture), Some(child))
        }
    }
}

/// The id of the tokio task running now (Node's `executionAsyncId`); `None` outside a task
/// (in `block_on`, on an OS thread, in a `spawn_blocking` closure).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(contextflow::tree::execution_id(), None); // block_on is not a task
/// let task = tokio::spawn(async { contextflow::tree::execution_id() });
/// let id = task.id();
/// assert_eq!(task.await.unwrap(), Some(id));
/// # }
/// ```
pub fn execution_id() -> Option<Id> {
    tokio::task::try_id()
}

/// The id of the task that started the running task (Node's `triggerAsyncId`), for a task
/// recorded in a [`Root`]'s tree; `None` when it was started from outside any task, or was not
/// recorded.
///
/// ```
/// use contextflow::tree::{self, Root};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (parent, trigger) = Root::new("job")
///     .scope(async {
///         contextflow::spawn(async {
///             let me = tree::execution_id();
///             let child = contextflow::spawn(async { tree::trigger_id() });
///             (me, child.await.unwrap())
///         })
///         .await
///         .unwrap()
///     })
///     .await;
/// assert_eq!(trigger, parent);
/// # }
/// ```
pub fn trigger_id() -> Option<Id> {
    let now = tokio::task::try_id()?;
    NODE.with(|node| {
        let node = node?;
        (node.id.get() == Some(&now)).then_some(node.trigger)?
    })
}

/// The root of a request's task tree: bind it with [`scope`](Root::scope) around the request,
/// read it while the request runs ([`Root::current`], [`tasks`](Root::tasks)) and print it
/// (`Display`). See the [module docs](self).
///
/// ```
/// use contextflow::tree::Root;
/// let root = Root::new("GET /health");
/// assert_eq!(root.to_string(), "GET /health\n");
/// ```
#[derive(Clone)]
pub struct Root {
    node: Arc<Node>,
}

/// One task of a tree, as listed by [`Root::tasks`].
///
/// ```
/// use contextflow::tree::{Root, SpawnedBy};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let root = Root::new("r");
/// let task = root.scope(async { contextflow::spawn(async {}) }).await;
/// let id = task.id();
/// task.await.unwrap();
/// let info = &root.tasks()[0];
/// assert_eq!((info.id, info.depth, info.spawned_by), (Some(id), 1, SpawnedBy::Contextflow));
/// assert!(info.spawned_at.file().ends_with(".rs"));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskInfo {
    /// The task's id (`None` only in the instant between its spawn and the spawn's return).
    pub id: Option<Id>,
    /// The task that spawned it, `None` if spawned from outside any task.
    pub trigger: Option<Id>,
    /// 1 for a task spawned by the request itself, 2 for one spawned by such a task, ...
    pub depth: usize,
    /// Where it was spawned.
    pub spawned_at: &'static Location<'static>,
    /// How it was spawned.
    pub spawned_by: SpawnedBy,
    /// Whether its future has completed or been dropped.
    pub finished: bool,
}

impl Root {
    /// A new, empty tree named `label` (shown on the first line when printed).
    ///
    /// ```
    /// let root = contextflow::tree::Root::new("nightly cleanup");
    /// assert!(root.tasks().is_empty());
    /// ```
    pub fn new(label: impl Into<String>) -> Root {
        Root {
            node: Arc::new(Node {
                label: label.into(),
                id: OnceLock::new(),
                trigger: None,
                spawned_at: None,
                finished: AtomicBool::new(false),
                children: Mutex::new(Vec::new()),
                not_kept: AtomicUsize::new(0),
                depth: 0,
                #[cfg(feature = "diagnostics")]
                holds_context: true,
            }),
        }
    }

    /// Runs `fut` under this root: the tasks it starts (and those they start) are recorded.
    ///
    /// With the feature `diagnostics`, when the scope ends (`fut` completes or is dropped) while
    /// tasks it started still hold its context, their spawn sites are reported (see
    /// `contextflow::diagnostics`).
    ///
    /// ```
    /// use contextflow::tree::Root;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let root = Root::new("r");
    /// root.scope(async { contextflow::spawn(async {}).await.unwrap() }).await;
    /// assert_eq!(root.tasks().len(), 1);
    /// # }
    /// ```
    pub fn scope<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        let scoped = ROOT.scope(self.node.clone(), NODE.scope(self.node.clone(), fut));
        #[cfg(feature = "diagnostics")]
        {
            leaks::checked(self.node.clone(), scoped)
        }
        #[cfg(not(feature = "diagnostics"))]
        {
            scoped
        }
    }

    /// The root of the tree the running code belongs to, if any: from anywhere inside a
    /// [`scope`](Root::scope), in a recorded task too.
    ///
    /// ```
    /// use contextflow::tree::Root;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert!(Root::current().is_none());
    /// let root = Root::new("r");
    /// let label = root
    ///     .scope(async { contextflow::spawn(async { Root::current().map(|r| r.to_string()) }) })
    ///     .await;
    /// assert_eq!(label.await.unwrap().unwrap().lines().next(), Some("r"));
    /// # }
    /// ```
    pub fn current() -> Option<Root> {
        // Nodes do not point up, so the root is bound beside them (`ROOT`).
        ROOT.get().map(|node| Root { node })
    }

    /// The recorded tasks, depth first in spawn order.
    ///
    /// ```
    /// use contextflow::tree::Root;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let root = Root::new("r");
    /// root.scope(async {
    ///     contextflow::spawn(async { contextflow::spawn(async {}).await.unwrap() }).await.unwrap()
    /// })
    /// .await;
    /// let depths: Vec<usize> = root.tasks().iter().map(|t| t.depth).collect();
    /// assert_eq!(depths, [1, 2]);
    /// # }
    /// ```
    pub fn tasks(&self) -> Vec<TaskInfo> {
        let mut out = Vec::new();
        collect(&self.node, 1, &mut out);
        out
    }
}

fn children_of(node: &Node) -> Vec<Arc<Node>> {
    node.children
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn collect(node: &Node, depth: usize, out: &mut Vec<TaskInfo>) {
    for child in children_of(node) {
        if let Some((at, by)) = child.spawned_at {
            out.push(TaskInfo {
                id: child.id.get().copied(),
                trigger: child.trigger,
                depth,
                spawned_at: at,
                spawned_by: by,
                finished: child.finished.load(Ordering::Acquire),
            });
        }
        collect(&child, depth + 1, out);
    }
}

/// The root node of the running code's tree, bound by [`Root::scope`] next to [`NODE`].
static ROOT: AsyncLocal<Arc<Node>> =
    AsyncLocal::named("contextflow.task_tree").inherit(Inherit::Everywhere);

/// Prints the tree, one task a line: its id, how and where it was spawned, and whether it has
/// finished.
///
/// ```
/// use contextflow::tree::Root;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let root = Root::new("POST /orders");
/// let id = root.scope(async {
///     let task = contextflow::spawn(async {});
///     let id = task.id();
///     task.await.unwrap();
///     id
/// })
/// .await;
/// let printed = root.to_string();
/// let line = printed.lines().nth(1).unwrap();
/// assert!(line.starts_with(&format!("└── task {id}  contextflow::spawn at ")), "{line}");
/// assert!(line.ends_with("  finished"), "{line}");
/// # }
/// ```
impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.node.label)?;
        render(&self.node, "", f)
    }
}

fn render(node: &Node, prefix: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let children = children_of(node);
    let not_kept = node.not_kept.load(Ordering::Relaxed);
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len() && not_kept == 0;
        let Some((at, by)) = child.spawned_at else {
            continue;
        };
        let id = child
            .id
            .get()
            .map_or_else(|| "?".to_string(), ToString::to_string);
        let state = if child.finished.load(Ordering::Acquire) {
            "finished"
        } else {
            "running"
        };
        writeln!(
            f,
            "{prefix}{}task {id}  {by} at {}:{}  {state}",
            if last { "└── " } else { "├── " },
            at.file(),
            at.line()
        )?;
        let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
        render(child, &deeper, f)?;
    }
    if not_kept > 0 {
        writeln!(f, "{prefix}└── … {not_kept} more tasks not recorded")?;
    }
    Ok(())
}

impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Root")
            .field("label", &self.node.label)
            .field("tasks", &self.tasks().len())
            .finish()
    }
}

/// The leak check of a root scope (feature `diagnostics`).
#[cfg(feature = "diagnostics")]
mod leaks {
    use std::{future::Future, sync::Arc, time::Duration};

    use super::{children_of, Node, SpawnedBy};
    use crate::diagnostics::{self, LeakedTask};

    /// How long the check waits for plain-spawned tasks to leave: tokio wakes a task's
    /// `JoinHandle` before it runs the terminate hook that drops the task's context, so a task
    /// the request has just awaited may still hold it for a moment on another worker.
    const PLAIN_GRACE: Duration = Duration::from_millis(100);

    /// `fut`, then the check (also when `fut` is dropped unfinished).
    pub(super) async fn checked<F: Future>(root: Arc<Node>, fut: F) -> F::Output {
        let check = Check(root);
        let out = fut.await;
        drop(check);
        out
    }

    struct Check(Arc<Node>);

    impl Drop for Check {
        fn drop(&mut self) {
            let mut running = holders(&self.0);
            let waits_for_plain = |running: &[LeakedTask]| {
                running.iter().any(|t| {
                    t.spawned_by == SpawnedBy::PlainSpawn
                        && diagnostics::leak_is_new(&self.0.label, t.spawned_at)
                })
            };
            if waits_for_plain(&running) {
                let start = std::time::Instant::now();
                while waits_for_plain(&running) && start.elapsed() < PLAIN_GRACE {
                    std::thread::sleep(Duration::from_millis(1));
                    running = holders(&self.0);
                }
            }
            if !running.is_empty() {
                diagnostics::report_leak(&self.0.label, running);
            }
        }
    }

    /// The unfinished tasks under `root` that hold its context, depth first.
    fn holders(root: &Node) -> Vec<LeakedTask> {
        let mut out = Vec::new();
        collect(root, &mut out);
        out
    }

    fn collect(node: &Node, out: &mut Vec<LeakedTask>) {
        for child in children_of(node) {
            if !child.holds_context {
                continue;
            }
            if let Some((at, by)) = child.spawned_at {
                if !child.finished.load(std::sync::atomic::Ordering::Acquire) {
                    out.push(LeakedTask {
                        id: child.id.get().copied(),
                        spawned_by: by,
                        spawned_at: at,
                    });
                }
            }
            collect(&child, out);
        }
    }
}
