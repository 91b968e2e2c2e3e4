//! "Why is my context missing?", answered by the library (feature `diagnostics`).
//!
//! With the feature on, every binding records where it was made (the caller of
//! [`scope`](crate::AsyncLocal::scope), [`sync_scope`](crate::AsyncLocal::sync_scope),
//! [`enter`](crate::AsyncLocal::enter), ...), and every spawn that drops bindings the spawner
//! had records what it dropped and where: a plain `tokio::spawn` on a runtime with
//! contextflow's hooks (`contextflow::runtime`), which carries only
//! [`Inherit::Everywhere`] variables;
//! [`spawn_without_context`](crate::spawn_without_context); and every spawn or capture inside
//! [`suppress_flow`](crate::suppress_flow). Then:
//!
//! - **a read that finds nothing** ([`AsyncLocal::get`](crate::AsyncLocal::get) or
//!   [`with`](crate::AsyncLocal::with)) in code whose context lost that variable on the way is
//!   reported once per read site and variable (past 4,096 such pairs, once per read site),
//!   naming the variable, the read site, the spawn site
//!   where the context was dropped and where the variable had been set ([`LostContext`]):
//!
//!   ```text
//!   tenant read at src/repo.rs:42 is unset: this task was started by plain tokio::spawn at
//!   src/service.rs:88 from a task where tenant was set (at src/http.rs:17); plain spawns carry
//!   only variables marked Inherit::Everywhere
//!   ```
//!
//! - **a leak check** in the spirit of OpenTelemetry Java's strict context mode: when a
//!   [`tree::Root`](crate::tree::Root) scope ends (completes or is dropped) while tasks it
//!   started still hold its context, their spawn sites are reported ([`Leak`]), once per root
//!   label and spawn site (past 1,024 such pairs, once per spawn site: labels made per request
//!   do not grow the record without bound).
//!
//! Reports go to a [sink](set_sink) (standard error by default: the core does not log); in
//! [`Mode::Panic`] (for test suites) each report is also a panic where it is detected: in the
//! task that read the variable, or where the root scope ended.
//!
//! A plain `tokio::spawn` on a runtime *without* contextflow's hooks leaves no trace that
//! contextflow could see: the task simply starts empty. Build the runtime with
//! `contextflow::runtime::Hooks` (feature `runtime-hooks`) to have those spawns reported too.
//!
//! Without the feature none of this exists: no field in a node, no argument, no branch; the
//! `contextflow-bench` crate's `diag` rows compare the hot paths of both builds.
//!
//! Variables whose name starts with `contextflow.` are contextflow's own (the task tree, flow
//! suppression) and are never reported.
//!
//! ```
//! use contextflow::{diagnostics, AsyncLocal};
//! use std::sync::{Arc, Mutex};
//! static TENANT: AsyncLocal<&str> = AsyncLocal::named("tenant");
//!
//! let reports = Arc::new(Mutex::new(Vec::new()));
//! let sink = reports.clone();
//! diagnostics::set_sink(move |report| sink.lock().unwrap().push(report.to_string()));
//!
//! # #[cfg(feature = "tokio")]
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let job = TENANT.sync_scope("acme", || {
//!     contextflow::spawn_without_context(async { TENANT.get() })
//! });
//! assert_eq!(job.await.unwrap(), None);
//! # });
//! # #[cfg(feature = "tokio")]
//! assert!(reports.lock().unwrap()[0].contains(
//!     "is unset: this task was started by contextflow::spawn_without_context at "
//! ));
//! diagnostics::reset_sink();
//! ```

use std::{
    cell::Cell,
    collections::HashSet,
    fmt,
    panic::Location,
    sync::{Arc, Mutex, RwLock},
};

use crate::{
    current,
    node::{self, Header, NodeRef, Site},
    AsyncLocal, Inherit,
};

/// What to do with a report once the sink has seen it.
///
/// ```
/// use contextflow::diagnostics::{self, Mode};
/// assert_eq!(diagnostics::mode(), Mode::Report);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Give each report to the sink (the default).
    #[default]
    Report,
    /// Give each report to the sink, then panic with its text where it was detected (not while
    /// the thread is already panicking): for test suites, where a lost context must fail.
    Panic,
}

/// A finding of the diagnostics: a read that lost its context, or a root scope that ended while
/// tasks still held its context. `Display` gives the text the default sink prints.
///
/// ```
/// use contextflow::diagnostics::Report;
/// fn describe(report: &Report) -> String {
///     match report {
///         Report::LostContext(lost) => format!("lost {}", lost.variable),
///         other => other.to_string(),
///     }
/// }
/// # let _ = describe;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Report {
    /// A read found nothing where a spawn had dropped the variable.
    LostContext(LostContext),
    /// A root scope ended while tasks it started still held its context.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    Leak(Leak),
}

/// A read of an unset variable in code whose context had lost it ([`Report::LostContext`]).
///
/// ```
/// use contextflow::diagnostics::{LostBy, LostContext};
/// fn spawn_site(lost: &LostContext) -> String {
///     match lost.lost_by {
///         LostBy::PlainSpawn => format!("plain tokio::spawn at {}", lost.spawned_at),
///         _ => lost.spawned_at.to_string(),
///     }
/// }
/// # let _ = spawn_site;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LostContext {
    /// The variable's name (`an unnamed AsyncLocal<T>` when it has none).
    pub variable: String,
    /// Where it was read.
    pub read_at: &'static Location<'static>,
    /// How the context was dropped.
    pub lost_by: LostBy,
    /// Where: the spawn (or capture) that dropped it.
    pub spawned_at: &'static Location<'static>,
    /// The [`suppress_flow`](crate::suppress_flow) call the spawn was made in, if any.
    pub suppressed_at: Option<&'static Location<'static>>,
    /// Where the variable had been set in the spawner's context.
    pub bound_at: Option<&'static Location<'static>>,
    /// Whether the spawner was a tokio task (otherwise: code outside any task, on some thread).
    pub spawner_was_task: bool,
}

/// How a context was dropped (see [`LostContext`]).
///
/// ```
/// use contextflow::diagnostics::LostBy;
/// assert_ne!(LostBy::PlainSpawn, LostBy::SpawnWithoutContext);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostBy {
    /// A plain `tokio::spawn` (or `JoinSet::spawn`, `Handle::spawn`) on a runtime with
    /// contextflow's hooks: only `Inherit::Everywhere` variables cross it, and nothing inside
    /// [`suppress_flow`](crate::suppress_flow).
    PlainSpawn,
    /// [`contextflow::spawn_without_context`](crate::spawn_without_context): starts empty.
    SpawnWithoutContext,
    /// An inheriting spawn or capture ([`contextflow::spawn`](crate::spawn),
    /// [`thread::spawn`](crate::thread::spawn), [`Snapshot::bind`](crate::Snapshot::bind), ...)
    /// made inside [`suppress_flow`](crate::suppress_flow), which starts empty.
    SuppressedCapture,
}

/// A root scope that ended while tasks it started still held its context ([`Report::Leak`]).
///
/// ```
/// use contextflow::diagnostics::Leak;
/// fn sites(leak: &Leak) -> Vec<String> {
///     leak.tasks.iter().map(|t| t.spawned_at.to_string()).collect()
/// }
/// # let _ = sites;
/// ```
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leak {
    /// The root's label ([`Root::new`](crate::tree::Root::new)).
    pub root: String,
    /// The tasks still running with its context, depth first in spawn order.
    pub tasks: Vec<LeakedTask>,
}

/// One task of a [`Leak`].
///
/// ```
/// use contextflow::diagnostics::LeakedTask;
/// fn line(task: &LeakedTask) -> String {
///     format!("{} at {}", task.spawned_by, task.spawned_at)
/// }
/// # let _ = line;
/// ```
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeakedTask {
    /// The task's id.
    pub id: Option<tokio::task::Id>,
    /// How it was spawned.
    pub spawned_by: crate::tree::SpawnedBy,
    /// Where.
    pub spawned_at: &'static Location<'static>,
}

type Sink = Arc<dyn Fn(&Report) + Send + Sync>;

/// The sink, `None` for the default (standard error).
static SINK: RwLock<Option<Sink>> = RwLock::new(None);
static MODE: RwLock<Mode> = RwLock::new(Mode::Report);
/// The lost reads reported so far.
static READS_REPORTED: Mutex<ReadsReported> = Mutex::new(ReadsReported {
    pairs: None,
    sites: None,
});

/// The (read site, variable key) pairs of lost reads reported so far, at most
/// [`MAX_READ_PAIRS`]; past that, the read sites reported since: variables made per request
/// (an `AsyncLocal` that is not a `static`) would otherwise grow the record without bound.
struct ReadsReported {
    pairs: Option<HashSet<(usize, usize)>>,
    sites: Option<HashSet<usize>>,
}

/// How many (read site, variable) pairs the lost-read record keeps.
const MAX_READ_PAIRS: usize = 4096;

impl ReadsReported {
    /// Records a lost read of variable `key` at `site`; `true` when it is to be reported
    /// (first seen).
    fn first(&mut self, site: usize, key: usize) -> bool {
        let pairs = self.pairs.get_or_insert_with(HashSet::new);
        if pairs.contains(&(site, key)) {
            return false;
        }
        if pairs.len() < MAX_READ_PAIRS {
            return pairs.insert((site, key));
        }
        self.sites.get_or_insert_with(HashSet::new).insert(site)
    }
}
/// The leaks reported so far.
#[cfg(feature = "tokio")]
static LEAKS_REPORTED: Mutex<LeaksReported> = Mutex::new(LeaksReported {
    labels: None,
    pairs: 0,
    sites: None,
});

/// The (root label, spawn site) pairs of leaked tasks reported so far (the labels of each
/// site), at most [`MAX_LEAK_PAIRS`]; past that, the spawn sites reported since. A leak is
/// reported once per pair while there is room, then once per spawn site whatever its root's
/// label: labels made per request (`Root::new(format!("order {id}"))`) would otherwise grow the
/// record without bound. Once full, the record stays full: a new label's leak from a site
/// already reported past the bound is not reported again.
#[cfg(feature = "tokio")]
struct LeaksReported {
    labels: Option<std::collections::HashMap<usize, HashSet<String>>>,
    /// How many (label, site) pairs `labels` holds.
    pairs: usize,
    sites: Option<HashSet<usize>>,
}

/// How many (root label, spawn site) pairs the leak record keeps.
#[cfg(feature = "tokio")]
const MAX_LEAK_PAIRS: usize = 1024;

#[cfg(feature = "tokio")]
impl LeaksReported {
    fn is_new(&self, root: &str, at: &'static Location<'static>) -> bool {
        let site = site_key(at);
        let pair_seen = self
            .labels
            .as_ref()
            .and_then(|labels| labels.get(&site))
            .is_some_and(|labels| labels.contains(root));
        let site_seen =
            self.pairs >= MAX_LEAK_PAIRS && self.sites.as_ref().is_some_and(|s| s.contains(&site));
        !pair_seen && !site_seen
    }

    fn insert(&mut self, root: &str, at: &'static Location<'static>) {
        if self.pairs < MAX_LEAK_PAIRS {
            let labels = self.labels.get_or_insert_with(Default::default);
            if labels
                .entry(site_key(at))
                .or_default()
                .insert(root.to_owned())
            {
                self.pairs += 1;
            }
        } else {
            self.sites
                .get_or_insert_with(HashSet::new)
                .insert(site_key(at));
        }
    }

    /// How many entries the record holds (pairs and sites).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pairs + self.sites.as_ref().map_or(0, HashSet::len)
    }
}

thread_local! {
    /// Set while a report is being delivered on this thread, so that a sink reading an unset
    /// variable does not report again from inside itself.
    static DELIVERING: Cell<bool> = const { Cell::new(false) };
}

/// Where the context of a lost task went: bound (`Inherit::Everywhere`) in the frame of code
/// started by a spawn that dropped bindings.
static LOSS: AsyncLocal<Arc<Loss>> =
    AsyncLocal::named("contextflow.lost_context").inherit(Inherit::Everywhere);

/// What one spawn dropped.
struct Loss {
    by: LostBy,
    at: &'static Location<'static>,
    suppressed_at: Option<&'static Location<'static>>,
    spawner_was_task: bool,
    dropped: Vec<Dropped>,
    /// A loss further up (the spawner's own context had lost variables already).
    earlier: Option<Arc<Loss>>,
    /// How many records this one's chain holds, itself included (at most [`MAX_LOSS_CHAIN`]).
    depth: usize,
}

/// The most loss records one chain keeps: a task that re-spawns itself through lossy spawns
/// would otherwise keep one record per generation forever (and free the chain recursively,
/// deep enough to overflow the stack). A read of a variable lost further up goes unreported.
const MAX_LOSS_CHAIN: usize = 32;

/// One binding a spawn dropped.
struct Dropped {
    key: usize,
    name: &'static str,
    bound_at: Option<&'static Location<'static>>,
}

// ===== public API =====

/// Sends every report to `sink` from now on (process-wide), instead of standard error. The
/// sink runs where the report is detected (in the reading task, where a root scope ends), so it
/// should be quick; reads of unset variables inside it are not reported.
///
/// ```
/// use contextflow::diagnostics;
/// diagnostics::set_sink(|report| eprintln!("[context] {report}"));
/// diagnostics::reset_sink();
/// ```
pub fn set_sink(sink: impl Fn(&Report) + Send + Sync + 'static) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(sink));
}

/// Puts back the default sink, which prints each report to standard error as
/// `contextflow: <report>`.
///
/// ```
/// contextflow::diagnostics::reset_sink();
/// ```
pub fn reset_sink() {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Sets what happens after the sink has seen a report (process-wide); [`Mode::Panic`] makes
/// every report a failure, for test suites.
///
/// ```
/// use contextflow::diagnostics::{self, Mode};
/// diagnostics::set_mode(Mode::Report);
/// assert_eq!(diagnostics::mode(), Mode::Report);
/// ```
pub fn set_mode(mode: Mode) {
    *MODE.write().unwrap_or_else(|e| e.into_inner()) = mode;
}

/// The current [`Mode`].
///
/// ```
/// assert_eq!(contextflow::diagnostics::mode(), contextflow::diagnostics::Mode::Report);
/// ```
pub fn mode() -> Mode {
    *MODE.read().unwrap_or_else(|e| e.into_inner())
}

// ===== impl Report =====

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::LostContext(lost) => lost.fmt(f),
            #[cfg(feature = "tokio")]
            Report::Leak(leak) => leak.fmt(f),
        }
    }
}

/// `<variable> read at <site> is unset: this task was started by ... at <site> from a task
/// where <variable> was set (at <site>); <why>`.
///
/// ```
/// use contextflow::diagnostics::LostContext;
/// fn print(lost: &LostContext) { eprintln!("{lost}") }
/// # let _ = print;
/// ```
impl fmt::Display for LostContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let var = &self.variable;
        write!(f, "{var} read at {} is unset: ", At(self.read_at))?;
        let spawned_at = At(self.spawned_at);
        match self.lost_by {
            LostBy::PlainSpawn => write!(
                f,
                "this task was started by plain tokio::spawn at {spawned_at}"
            )?,
            LostBy::SpawnWithoutContext => write!(
                f,
                "this task was started by contextflow::spawn_without_context at {spawned_at}"
            )?,
            LostBy::SuppressedCapture => write!(f, "this code was started at {spawned_at}")?,
        }
        if let Some(at) = self.suppressed_at {
            write!(f, " inside suppress_flow (at {})", At(at))?;
        }
        let spawner = if self.spawner_was_task {
            "a task"
        } else {
            "outside any task, in code"
        };
        write!(f, " from {spawner} where {var} was set")?;
        if let Some(at) = self.bound_at {
            write!(f, " (at {})", At(at))?;
        }
        match (self.lost_by, self.suppressed_at) {
            (_, Some(_)) => f.write_str("; nothing flows from inside suppress_flow"),
            (LostBy::PlainSpawn, None) => {
                f.write_str("; plain spawns carry only variables marked Inherit::Everywhere")
            }
            (LostBy::SpawnWithoutContext, None) => f.write_str("; it starts from nothing"),
            (LostBy::SuppressedCapture, None) => Ok(()),
        }
    }
}

/// `tree::Root "<label>" ended while N task(s) still hold its context:` then one line per task.
///
/// ```
/// use contextflow::diagnostics::Leak;
/// fn print(leak: &Leak) { eprintln!("{leak}") }
/// # let _ = print;
/// ```
#[cfg(feature = "tokio")]
impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.tasks.len();
        write!(
            f,
            "tree::Root {:?} ended while {n} {} still {} its context:",
            self.root,
            if n == 1 { "task" } else { "tasks" },
            if n == 1 { "holds" } else { "hold" },
        )?;
        for task in &self.tasks {
            let id = task.id.map_or_else(|| "?".to_string(), |id| id.to_string());
            write!(
                f,
                "\n  task {id} started by {} at {}",
                task.spawned_by,
                At(task.spawned_at)
            )?;
        }
        Ok(())
    }
}

/// A source location as `file:line`, as the task tree prints it.
struct At(&'static Location<'static>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.file(), self.0.line())
    }
}

// ===== recording losses =====

/// The frame of a task started by a plain spawn on a hooked runtime: `base` (what the spawn
/// carries, the spawner's `Inherit::Everywhere` bindings) plus, if the spawner had bindings
/// that do not cross, a record of them. Runs on the spawning thread, in the spawner's context.
#[cfg(all(feature = "runtime-hooks", tokio_unstable))]
pub(crate) fn plain_spawn(
    base: Option<NodeRef>,
    at: &'static Location<'static>,
) -> Option<NodeRef> {
    let dropped = dropped_here(true);
    if dropped.is_empty() {
        return base;
    }
    Some(loss_node(base, LostBy::PlainSpawn, at, None, dropped))
}

/// The frame of code started empty ([`LostBy::SpawnWithoutContext`], or any spawn inside
/// `suppress_flow`) by a spawn at `at`: nothing, or a record of the bindings the spawner had.
pub(crate) fn empty_start(by: LostBy, at: Option<&'static Location<'static>>) -> Option<NodeRef> {
    let at = at?;
    let dropped = dropped_here(false);
    if dropped.is_empty() {
        return None;
    }
    let suppressed_at = crate::flow::suppressed_site();
    Some(loss_node(None, by, at, suppressed_at, dropped))
}

fn loss_node(
    base: Option<NodeRef>,
    by: LostBy,
    at: &'static Location<'static>,
    suppressed_at: Option<&'static Location<'static>>,
    dropped: Vec<Dropped>,
) -> NodeRef {
    // A full chain starts over: the records it held go once nothing else refers to them.
    let earlier = current_loss().filter(|earlier| earlier.depth < MAX_LOSS_CHAIN);
    let loss = Loss {
        by,
        at,
        suppressed_at,
        spawner_was_task: spawner_is_task(),
        dropped,
        depth: earlier.as_ref().map_or(1, |earlier| earlier.depth + 1),
        earlier,
    };
    NodeRef::new_value_at(
        base,
        LOSS.key(),
        LOSS.name(),
        LOSS.inherit_policy(),
        Arc::new(loss),
        Site::at(at),
    )
}

fn spawner_is_task() -> bool {
    #[cfg(feature = "tokio")]
    {
        tokio::task::try_id().is_some()
    }
    #[cfg(not(feature = "tokio"))]
    {
        false
    }
}

/// The visible, inherited bindings of the current frame that a spawn drops: those not marked
/// `Inherit::Everywhere` when `keep_plain` (a plain spawn), all of them otherwise. Never
/// contextflow's own variables, nor `Inherit::Never` ones (which stay with their code by
/// design).
fn dropped_here(keep_plain: bool) -> Vec<Dropped> {
    current::with_current(|frame| {
        let mut seen: Vec<usize> = Vec::new();
        let mut dropped = Vec::new();
        let mut frame = frame;
        // SAFETY: `with_current` keeps the current frame, and so its whole chain, alive.
        while let Some(header) = unsafe { frame.as_ref() } {
            frame = header.parent_ptr();
            if header.is_marker() || header.is_hidden() || seen.contains(&header.key) {
                continue;
            }
            seen.push(header.key);
            let kept = keep_plain && header.is_plain();
            let ours = header.name.starts_with("contextflow.");
            if header.is_inherited() && !header.is_unset() && !kept && !ours {
                dropped.push(Dropped {
                    key: header.key,
                    name: header.name,
                    bound_at: header.site.location(),
                });
            }
        }
        dropped
    })
}

/// The loss recorded in the current frame, if any.
fn current_loss() -> Option<Arc<Loss>> {
    let key = LOSS.key();
    current::with_current(|frame| {
        // SAFETY: `with_current` keeps the frame alive for the call; the value is cloned out.
        let binding = unsafe { node::lookup(frame, key) };
        // SAFETY: the key is `LOSS`'s, so the node holds an `Arc<Loss>`.
        binding.map(|b| unsafe { b.value::<Arc<Loss>>() }.clone())
    })
}

/// Whether `header` is the record of a loss (not a binding users see: `Debug` and `is_empty`
/// skip it).
pub(crate) fn is_loss(header: &Header) -> bool {
    header.key == LOSS.key()
}

// ===== reporting =====

/// A read at `read_at` of the variable `key` found nothing: reports it (once per read site and
/// variable) if a spawn on the way dropped it.
pub(crate) fn unset_read(
    key: usize,
    name: &'static str,
    type_name: &'static str,
    read_at: &'static Location<'static>,
) {
    if key == LOSS.key() || DELIVERING.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let Some(loss) = current_loss() else {
        return;
    };
    let mut at: &Loss = &loss;
    let dropped = loop {
        if let Some(d) = at.dropped.iter().find(|d| d.key == key) {
            break d;
        }
        match &at.earlier {
            Some(earlier) => at = earlier.as_ref(),
            None => return,
        }
    };
    let first = READS_REPORTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first(read_at as *const Location<'static> as usize, key);
    if !first {
        return;
    }
    let variable = if name.is_empty() {
        format!("an unnamed AsyncLocal<{type_name}>")
    } else {
        name.to_string()
    };
    debug_assert!(dropped.name == name);
    deliver(Report::LostContext(LostContext {
        variable,
        read_at,
        lost_by: at.by,
        spawned_at: at.at,
        suppressed_at: at.suppressed_at,
        bound_at: dropped.bound_at,
        spawner_was_task: at.spawner_was_task,
    }));
}

/// The leaked tasks not reported yet (by spawn site), marked reported.
#[cfg(feature = "tokio")]
pub(crate) fn report_leak(root: &str, tasks: Vec<LeakedTask>) {
    let tasks = first_leaks(root, tasks);
    if tasks.is_empty() {
        return;
    }
    deliver(Report::Leak(Leak {
        root: root.to_string(),
        tasks,
    }));
}

/// Keeps the tasks whose spawn site has not been reported as leaking from a root labelled
/// `root` before, and marks them.
#[cfg(feature = "tokio")]
fn first_leaks(root: &str, tasks: Vec<LeakedTask>) -> Vec<LeakedTask> {
    let mut reported = LEAKS_REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    let tasks: Vec<LeakedTask> = tasks
        .into_iter()
        .filter(|t| reported.is_new(root, t.spawned_at))
        .collect();
    for task in &tasks {
        reported.insert(root, task.spawned_at);
    }
    tasks
}

/// Whether a task spawned at `at` that leaks from a root labelled `root` would be reported
/// (the pair has not been yet).
#[cfg(feature = "tokio")]
pub(crate) fn leak_is_new(root: &str, at: &'static Location<'static>) -> bool {
    LEAKS_REPORTED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_new(root, at)
}

#[cfg(feature = "tokio")]
fn site_key(at: &'static Location<'static>) -> usize {
    at as *const Location<'static> as usize
}

/// Gives `report` to the sink, then panics in [`Mode::Panic`].
fn deliver(report: Report) {
    struct Delivering(bool);
    impl Drop for Delivering {
        fn drop(&mut self) {
            let _ = DELIVERING.try_with(|d| d.set(self.0));
        }
    }
    let Ok(prev) = DELIVERING.try_with(|d| d.replace(true)) else {
        return;
    };
    let restore = Delivering(prev);
    // Cloned out, so that a sink may call `set_sink`.
    let sink = SINK.read().unwrap_or_else(|e| e.into_inner()).clone();
    match sink {
        Some(sink) => sink(&report),
        None => eprintln!("contextflow: {report}"),
    }
    drop(restore);
    if mode() == Mode::Panic && !std::thread::panicking() {
        panic!("contextflow: {report}");
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    use super::*;

    /// Leaks from roots labelled per request keep the record bounded: once it holds
    /// `MAX_LEAK_PAIRS` pairs, a spawn site is reported once more whatever the label, then
    /// never again.
    #[test]
    fn the_leak_record_is_bounded_under_per_request_labels() {
        let mut record = LeaksReported {
            labels: None,
            pairs: 0,
            sites: None,
        };
        let at = Location::caller();
        let other = Location::caller();
        for request in 0..MAX_LEAK_PAIRS {
            let label = format!("order {request}");
            assert!(record.is_new(&label, at), "{label}");
            record.insert(&label, at);
            assert!(!record.is_new(&label, at));
        }
        assert!(
            record.is_new("order -1", at),
            "the site was not reported past the bound"
        );
        record.insert("order -1", at);
        for request in MAX_LEAK_PAIRS..10 * MAX_LEAK_PAIRS {
            assert!(!record.is_new(&format!("order {request}"), at));
        }
        assert!(
            record.is_new("order 0", other),
            "another site is still reported"
        );
        record.insert("order 0", other);
        assert!(!record.is_new("order 1", other));
        assert_eq!(record.len(), MAX_LEAK_PAIRS + 2);
    }

    /// Lost reads of variables made per request keep the record bounded: past
    /// `MAX_READ_PAIRS` pairs, a read site is reported once more, then never again.
    #[test]
    fn the_lost_read_record_is_bounded_under_per_request_variables() {
        let mut record = ReadsReported {
            pairs: None,
            sites: None,
        };
        for key in 0..MAX_READ_PAIRS {
            assert!(record.first(1, key));
            assert!(!record.first(1, key));
        }
        assert!(
            record.first(1, usize::MAX),
            "one more report past the bound"
        );
        for key in MAX_READ_PAIRS..10 * MAX_READ_PAIRS {
            assert!(!record.first(1, key));
        }
        assert!(record.first(2, 0), "another site");
        assert_eq!(record.pairs.as_ref().unwrap().len(), MAX_READ_PAIRS);
        assert_eq!(record.sites.as_ref().unwrap().len(), 2);
    }
}
