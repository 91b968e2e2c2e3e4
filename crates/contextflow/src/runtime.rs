//! A tokio runtime on which plain `tokio::spawn` inherits the spawner's context (feature
//! `runtime-hooks`, opt-in; needs `RUSTFLAGS="--cfg tokio_unstable"`).
//!
//! On an ordinary runtime only contextflow's own spawns ([`spawn`](crate::spawn) and friends)
//! carry the context: a plain `tokio::spawn`, `JoinSet::spawn` or `Handle::spawn` starts empty.
//! [`Hooks::install`] puts tokio's task hooks on a [`tokio::runtime::Builder`] so that every
//! task spawned on the built runtime starts from its spawner's frame, like Node's
//! `AsyncLocalStorage` does for every promise:
//!
//! - `on_task_spawn` runs on the spawning thread, inside the spawn call: it captures the
//!   spawner's frame, keyed by the new task's id, in a map owned by the runtime;
//! - `on_before_task_poll` makes that frame current for the poll, and `on_after_task_poll`
//!   restores exactly the frame that was current before (tokio catches a panicking poll, so
//!   the after-poll hook always runs; a hook of yours that panics restores it too);
//! - `on_task_terminate` drops the entry: the map is empty once the runtime's tasks are done
//!   ([`Installed::tasks_with_context`]), and it is dropped with the runtime.
//!
//! A task spawned through contextflow ([`spawn`](crate::spawn), [`spawn_in`](crate::spawn_in),
//! ...) is not captured twice: the hook sees that the spawn is an explicit one and leaves the
//! context to the task's own [`WithContext`](crate::WithContext).
//!
//! # What flows through a plain spawn
//!
//! Less than through an explicit one: only variables marked
//! [`Inherit::Everywhere`](crate::Inherit::Everywhere) (request ids, the trace), so that a
//! connection pool's or an HTTP client's background task that happens to start during a request
//! never keeps that request's tenant, user or transaction. Values carried by a
//! [carrier](crate::carry) (the tracing span) do not flow through plain spawns: carriers are
//! entered around a closure, and tokio's hooks are not one.
//!
//! # Holes
//!
//! tokio does not run these hooks everywhere; there, tasks behave as on an ordinary runtime:
//!
//! - `tokio::task::spawn_blocking` closures start empty (use
//!   [`contextflow::spawn_blocking`](crate::spawn_blocking));
//! - tasks of a `LocalSet` (`spawn_local`) start empty (use
//!   [`contextflow::spawn_local`](crate::spawn_local));
//! - the `block_on` future is not a task: it sees the frame of the thread that calls `block_on`;
//! - a task's future dropped by the runtime's shutdown (not by an abort) is dropped outside any
//!   poll, so its destructors do not see its context.
//!
//! # Your own task hooks
//!
//! tokio keeps one callback per hook, and `install` sets all four: a hook set on the builder
//! before `install` is replaced, and one set after replaces contextflow's. Give yours to
//! [`Hooks`] instead (`Hooks::on_task_spawn` and the others, which exist with
//! `--cfg tokio_unstable`); contextflow calls them, with the task's context current in the poll
//! hooks.
//!
//! # Without `--cfg tokio_unstable`
//!
//! tokio has no task hooks, and [`Hooks::install`] returns [`Unsupported`]: a runtime built
//! anyway is an ordinary one, where plain spawns do not inherit.
//!
//! ```
//! use contextflow::{AsyncLocal, Inherit};
//! static REQUEST_ID: AsyncLocal<u64> = AsyncLocal::named("request_id").inherit(Inherit::Everywhere);
//!
//! let mut builder = tokio::runtime::Builder::new_multi_thread();
//! builder.worker_threads(2);
//! match contextflow::runtime::Hooks::new().install(&mut builder) {
//!     Ok(installed) => {
//!         let rt = builder.build().unwrap();
//!         let seen = rt.block_on(REQUEST_ID.scope(7, async {
//!             tokio::spawn(async { REQUEST_ID.get() }).await.unwrap()
//!         }));
//!         assert_eq!(seen, Some(7));
//!         drop(rt);
//!         assert_eq!(installed.tasks_with_context(), 0);
//!     }
//!     Err(unsupported) => assert!(unsupported.to_string().contains("tokio_unstable")),
//! }
//! ```

use std::{error::Error, fmt};

/// The task hooks that make plain spawns inherit, plus any hooks of your own, to put on a
/// [`tokio::runtime::Builder`] with [`install`](Hooks::install).
///
/// See the [module docs](self).
///
/// ```
/// let hooks = contextflow::runtime::Hooks::new();
/// assert!(format!("{hooks:?}").starts_with("Hooks"));
/// ```
#[derive(Default, Clone)]
pub struct Hooks {
    #[cfg(tokio_unstable)]
    user: imp::UserHooks,
}

impl Hooks {
    /// Hooks with no user hook.
    ///
    /// ```
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// let installed = contextflow::runtime::Hooks::new().install(&mut builder);
    /// assert_eq!(installed.is_ok(), cfg!(tokio_unstable));
    /// ```
    pub fn new() -> Hooks {
        Hooks::default()
    }

    /// Installs the hooks on `builder`, replacing any task hook set on it so far (see the
    /// [module docs](self#your-own-task-hooks)). The returned [`Installed`] observes the runtime
    /// that `builder` builds next.
    ///
    /// # Errors
    /// [`Unsupported`] when tokio was built without `--cfg tokio_unstable`: `builder` is left as
    /// it is, and a runtime built from it does not make plain spawns inherit.
    ///
    /// ```
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// match contextflow::runtime::Hooks::new().install(&mut builder) {
    ///     Ok(installed) => assert_eq!(installed.tasks_with_context(), 0),
    ///     Err(e) => assert!(e.to_string().contains("--cfg tokio_unstable")),
    /// }
    /// ```
    pub fn install(self, builder: &mut tokio::runtime::Builder) -> Result<Installed, Unsupported> {
        #[cfg(tokio_unstable)]
        {
            Ok(Installed {
                tasks: imp::install(self.user, builder),
            })
        }
        #[cfg(not(tokio_unstable))]
        {
            let _ = (self, builder);
            Err(Unsupported(()))
        }
    }
}

#[cfg(tokio_unstable)]
#[cfg_attr(docsrs, doc(cfg(tokio_unstable)))]
impl Hooks {
    /// Adds a hook called after contextflow's own when a task is spawned (tokio's
    /// `on_task_spawn`): on the spawning thread, in the spawner's context. Calling it again
    /// replaces the previous one.
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
    /// let spawned = Arc::new(AtomicUsize::new(0));
    /// let counter = spawned.clone();
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// contextflow::runtime::Hooks::new()
    ///     .on_task_spawn(move |_meta| { counter.fetch_add(1, Ordering::Relaxed); })
    ///     .install(&mut builder)
    ///     .unwrap();
    /// builder.build().unwrap().block_on(async { tokio::spawn(async {}).await.unwrap() });
    /// assert_eq!(spawned.load(Ordering::Relaxed), 1);
    /// ```
    pub fn on_task_spawn<F>(mut self, f: F) -> Self
    where
        F: Fn(&tokio::runtime::TaskMeta<'_>) + Send + Sync + 'static,
    {
        self.user.spawn = Some(std::sync::Arc::new(f));
        self
    }

    /// Adds a hook called just before a task is polled (tokio's `on_before_task_poll`), with the
    /// task's context already current. Calling it again replaces the previous one.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// use std::sync::{Arc, Mutex};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new().inherit(Inherit::Everywhere);
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// contextflow::runtime::Hooks::new()
    ///     .on_before_task_poll(move |_meta| log.lock().unwrap().push(ID.get()))
    ///     .install(&mut builder)
    ///     .unwrap();
    /// let rt = builder.build().unwrap();
    /// rt.block_on(ID.scope(3, async { tokio::spawn(async {}).await.unwrap() }));
    /// assert_eq!(*seen.lock().unwrap(), [Some(3)]);
    /// ```
    pub fn on_before_task_poll<F>(mut self, f: F) -> Self
    where
        F: Fn(&tokio::runtime::TaskMeta<'_>) + Send + Sync + 'static,
    {
        self.user.before_poll = Some(std::sync::Arc::new(f));
        self
    }

    /// Adds a hook called just after a task is polled (tokio's `on_after_task_poll`), while the
    /// task's context is still current. Calling it again replaces the previous one.
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
    /// let polls = Arc::new(AtomicUsize::new(0));
    /// let counter = polls.clone();
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// contextflow::runtime::Hooks::new()
    ///     .on_after_task_poll(move |_meta| { counter.fetch_add(1, Ordering::Relaxed); })
    ///     .install(&mut builder)
    ///     .unwrap();
    /// builder.build().unwrap().block_on(async { tokio::spawn(async {}).await.unwrap() });
    /// assert_eq!(polls.load(Ordering::Relaxed), 1);
    /// ```
    pub fn on_after_task_poll<F>(mut self, f: F) -> Self
    where
        F: Fn(&tokio::runtime::TaskMeta<'_>) + Send + Sync + 'static,
    {
        self.user.after_poll = Some(std::sync::Arc::new(f));
        self
    }

    /// Adds a hook called when a task ends (tokio's `on_task_terminate`), before contextflow
    /// drops the task's entry. Calling it again replaces the previous one.
    ///
    /// ```
    /// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
    /// let ended = Arc::new(AtomicUsize::new(0));
    /// let counter = ended.clone();
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// contextflow::runtime::Hooks::new()
    ///     .on_task_terminate(move |_meta| { counter.fetch_add(1, Ordering::Relaxed); })
    ///     .install(&mut builder)
    ///     .unwrap();
    /// builder.build().unwrap().block_on(async { tokio::spawn(async {}).await.unwrap() });
    /// assert_eq!(ended.load(Ordering::Relaxed), 1);
    /// ```
    pub fn on_task_terminate<F>(mut self, f: F) -> Self
    where
        F: Fn(&tokio::runtime::TaskMeta<'_>) + Send + Sync + 'static,
    {
        self.user.terminate = Some(std::sync::Arc::new(f));
        self
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// What [`Hooks::install`] returns: a view of the runtime's per-task contexts.
///
/// ```
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// if let Ok(installed) = contextflow::runtime::Hooks::new().install(&mut builder) {
///     let rt = builder.build().unwrap();
///     rt.block_on(async { tokio::spawn(async {}).await.unwrap() });
///     assert_eq!(installed.tasks_with_context(), 0);
/// }
/// ```
#[derive(Clone)]
pub struct Installed {
    #[cfg(tokio_unstable)]
    tasks: std::sync::Arc<imp::Tasks>,
}

impl Installed {
    /// How many live tasks of the runtime hold an entry (a captured frame): 0 once every task
    /// spawned on it has ended.
    ///
    /// One case keeps an entry past its task: a plain spawn from a thread outside the runtime
    /// (through a `Handle`) racing the runtime's shutdown on another thread, where tokio may
    /// shut the new task down (its terminate hook) before the spawning thread runs the spawn
    /// hook. That entry, and the frame it holds, lives until the last `Installed` and
    /// `Handle` of the runtime are dropped.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new().inherit(Inherit::Everywhere);
    /// let mut builder = tokio::runtime::Builder::new_current_thread();
    /// if let Ok(installed) = contextflow::runtime::Hooks::new().install(&mut builder) {
    ///     let rt = builder.build().unwrap();
    ///     let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    ///     let task = rt.block_on(ID.scope(1, async { tokio::spawn(async { rx.await }) }));
    ///     assert_eq!(installed.tasks_with_context(), 1);
    ///     tx.send(()).unwrap();
    ///     rt.block_on(task).unwrap().unwrap();
    ///     assert_eq!(installed.tasks_with_context(), 0);
    /// }
    /// ```
    pub fn tasks_with_context(&self) -> usize {
        #[cfg(tokio_unstable)]
        {
            self.tasks.len()
        }
        #[cfg(not(tokio_unstable))]
        {
            0
        }
    }
}

impl fmt::Debug for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Installed")
            .field("tasks_with_context", &self.tasks_with_context())
            .finish()
    }
}

/// The error of [`Hooks::install`] when tokio has no task hooks (built without
/// `--cfg tokio_unstable`).
///
/// ```
/// let mut builder = tokio::runtime::Builder::new_current_thread();
/// if let Err(e) = contextflow::runtime::Hooks::new().install(&mut builder) {
///     assert!(e.to_string().contains("RUSTFLAGS=\"--cfg tokio_unstable\""));
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(());

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "contextflow's runtime hooks need tokio's task hooks, which exist only when built \
             with RUSTFLAGS=\"--cfg tokio_unstable\"; without them a plain tokio::spawn does not \
             inherit the context (use contextflow::spawn)",
        )
    }
}

impl Error for Unsupported {}

/// Marks the spawns made while it lives as contextflow's own (explicit) spawns, which carry
/// their context themselves; the spawn hook then captures nothing for them.
#[must_use]
pub(crate) struct ExplicitSpawn {
    #[cfg(tokio_unstable)]
    prev: bool,
}

impl ExplicitSpawn {
    #[inline]
    pub(crate) fn enter() -> ExplicitSpawn {
        ExplicitSpawn {
            #[cfg(tokio_unstable)]
            prev: imp::EXPLICIT.with(|e| e.replace(true)),
        }
    }
}

impl Drop for ExplicitSpawn {
    #[inline]
    fn drop(&mut self) {
        #[cfg(tokio_unstable)]
        imp::EXPLICIT.with(|e| e.set(self.prev));
    }
}

#[cfg(tokio_unstable)]
mod imp {
    use std::{
        cell::{Cell, RefCell},
        collections::HashMap,
        hash::{BuildHasherDefault, Hasher},
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex, MutexGuard,
        },
    };

    use tokio::{runtime::TaskMeta, task::Id};

    use crate::{current, node::NodeRef};

    pub(super) type Callback = Arc<dyn Fn(&TaskMeta<'_>) + Send + Sync>;

    #[derive(Default, Clone)]
    pub(super) struct UserHooks {
        pub(super) spawn: Option<Callback>,
        pub(super) before_poll: Option<Callback>,
        pub(super) after_poll: Option<Callback>,
        pub(super) terminate: Option<Callback>,
    }

    thread_local! {
        /// Set by contextflow's spawn helpers around their `tokio::spawn`.
        pub(super) static EXPLICIT: Cell<bool> = const { Cell::new(false) };

        /// The tasks being polled on this thread, innermost last (more than one only when a
        /// task drives another runtime, e.g. in `block_in_place`).
        static POLLING: RefCell<Vec<Polling>> = const { RefCell::new(Vec::new()) };

        /// The last task this thread saw terminate with no entry in the map. A task spawned on
        /// a runtime that is shut down (through a `Handle` kept after it) is shut down inside
        /// tokio's spawn, which runs the terminate hook and only then, on the same thread, the
        /// spawn hook: that spawn must not add an entry nothing would ever remove.
        static TERMINATED_UNSEEN: Cell<Option<tokio::task::Id>> = const { Cell::new(None) };
    }

    /// One task's poll: the frame it entered, and the frame to restore.
    struct Polling {
        task: Id,
        /// Declared before `frame` so that it is dropped first: it restores the previous frame
        /// while `frame` (which it made current) is still alive.
        _entered: current::Entered,
        _frame: Option<NodeRef>,
    }

    /// What the runtime keeps per task.
    struct Entry {
        frame: Option<NodeRef>,
        /// The task's node in a request's task tree, if spawned under a `tree::Root`.
        node: Option<Arc<crate::tree::Node>>,
    }

    impl Drop for Entry {
        fn drop(&mut self) {
            if let Some(node) = &self.node {
                node.finish();
            }
        }
    }

    const SHARDS: usize = 32;

    /// The per-task entries of one runtime, sharded by task id.
    pub(super) struct Tasks {
        shards: [Mutex<HashMap<Id, Entry, BuildHasherDefault<IdHasher>>>; SHARDS],
        /// How many entries the shards hold: while 0 (only contextflow's own spawns, or tasks
        /// spawned with nothing to inherit), a poll skips the lookup. Relaxed is enough: a task
        /// is polled only after its spawn has handed it to a scheduler queue, which
        /// synchronizes with the spawning thread, so the poller sees the increment made
        /// there.
        live: AtomicUsize,
    }

    impl Tasks {
        fn new() -> Tasks {
            Tasks {
                shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
                live: AtomicUsize::new(0),
            }
        }

        fn shard(
            &self,
            id: Id,
        ) -> MutexGuard<'_, HashMap<Id, Entry, BuildHasherDefault<IdHasher>>> {
            let mut h = IdHasher::default();
            std::hash::Hash::hash(&id, &mut h);
            // A poisoned shard only means a frame's destructor panicked; the map is intact.
            self.shards[h.0 as usize % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        }

        pub(super) fn len(&self) -> usize {
            self.shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
                .sum()
        }

        fn on_spawn(&self, meta: &TaskMeta<'_>) {
            // An explicit spawn carries its context itself.
            if EXPLICIT.with(Cell::get) {
                return;
            }
            // Already terminated (see `TERMINATED_UNSEEN`).
            if TERMINATED_UNSEEN.with(|t| t.get() == Some(meta.id())) {
                TERMINATED_UNSEEN.with(|t| t.set(None));
                return;
            }
            // Inside `suppress_flow` nothing flows (with diagnostics: but a record of it).
            if crate::flow::is_flow_suppressed() {
                #[cfg(feature = "diagnostics")]
                if let Some(frame) = crate::diagnostics::empty_start(
                    crate::diagnostics::LostBy::PlainSpawn,
                    Some(meta.spawned_at()),
                ) {
                    self.insert(meta, Some(frame), None);
                }
                return;
            }
            let at = meta.spawned_at();
            let (frame, node) =
                crate::tree::record_plain_spawn(meta.id(), at, || plain_capture(at));
            if frame.is_none() && node.is_none() {
                return;
            }
            self.insert(meta, frame, node);
        }

        fn insert(
            &self,
            meta: &TaskMeta<'_>,
            frame: Option<NodeRef>,
            node: Option<Arc<crate::tree::Node>>,
        ) {
            let old = self
                .shard(meta.id())
                .insert(meta.id(), Entry { frame, node });
            if old.is_none() {
                self.live.fetch_add(1, Ordering::Relaxed);
            }
            drop(old);
        }

        fn before_poll(&self, meta: &TaskMeta<'_>) {
            let id = meta.id();
            let frame = if self.live.load(Ordering::Relaxed) == 0 {
                None
            } else {
                self.shard(id).get(&id).and_then(|e| e.frame.clone())
            };
            let ptr = frame.as_ref().map_or(std::ptr::null(), NodeRef::as_ptr);
            // `frame` is kept alive by the `Polling` entry until `_entered` has restored the
            // previous frame.
            let entered = current::enter_borrowed(ptr);
            let polling = Polling {
                task: id,
                _entered: entered,
                _frame: frame,
            };
            // During thread teardown the closure is dropped uncalled, and `polling` with it:
            // the previous frame is restored at once.
            let _ = POLLING.try_with(|p| p.borrow_mut().push(polling));
        }

        fn remove(&self, meta: &TaskMeta<'_>) -> Option<Entry> {
            // Dropped by the caller, after the shard's lock is released.
            let entry = self.shard(meta.id()).remove(&meta.id());
            if entry.is_some() {
                self.live.fetch_sub(1, Ordering::Relaxed);
            } else {
                // `try_with`: a task may end while this thread's locals are being torn down.
                let _ = TERMINATED_UNSEEN.try_with(|t| t.set(Some(meta.id())));
            }
            entry
        }
    }

    /// What a plain spawn at `at` carries of the current frame: its `Inherit::Everywhere`
    /// bindings (with the feature `diagnostics`, and a record of those left behind).
    #[cfg(feature = "diagnostics")]
    fn plain_capture(at: &'static std::panic::Location<'static>) -> Option<NodeRef> {
        crate::diagnostics::plain_spawn(current::capture_plain(), at)
    }

    #[cfg(not(feature = "diagnostics"))]
    fn plain_capture(_at: &'static std::panic::Location<'static>) -> Option<NodeRef> {
        current::capture_plain()
    }

    /// Ends this thread's poll of task `id` (and any poll left above it, whose after-hook never
    /// ran because a hook panicked), innermost first, each dropped outside the borrow (a
    /// frame's destructor may spawn). Does nothing if `id` is not being polled here.
    fn end_poll(id: Id) {
        let ours = POLLING
            .try_with(|p| p.borrow().iter().any(|e| e.task == id))
            .unwrap_or(false);
        if !ours {
            return;
        }
        loop {
            let Ok(Some(top)) = POLLING.try_with(|p| p.borrow_mut().pop()) else {
                return;
            };
            let done = top.task == id;
            drop(top);
            if done {
                return;
            }
        }
    }

    /// Ends the poll of its task when dropped armed: after the after-poll hook, or when a user
    /// hook panics between contextflow's enter and exit.
    struct EndPoll(Option<Id>);

    impl Drop for EndPoll {
        fn drop(&mut self) {
            if let Some(id) = self.0 {
                end_poll(id);
            }
        }
    }

    pub(super) fn install(user: UserHooks, builder: &mut tokio::runtime::Builder) -> Arc<Tasks> {
        let tasks = Arc::new(Tasks::new());
        let UserHooks {
            spawn,
            before_poll,
            after_poll,
            terminate,
        } = user;

        let t = tasks.clone();
        builder.on_task_spawn(move |meta| {
            t.on_spawn(meta);
            if let Some(f) = &spawn {
                f(meta);
            }
        });
        let t = tasks.clone();
        builder.on_before_task_poll(move |meta| {
            t.before_poll(meta);
            if let Some(f) = &before_poll {
                let mut guard = EndPoll(Some(meta.id()));
                f(meta);
                guard.0 = None;
            }
        });
        builder.on_after_task_poll(move |meta| {
            // Ends the poll when dropped, even if `f` panics.
            let _end = EndPoll(Some(meta.id()));
            if let Some(f) = &after_poll {
                f(meta);
            }
        });
        let t = tasks.clone();
        builder.on_task_terminate(move |meta| {
            // Taken out first and dropped last, so that it goes even if `f` panics.
            let entry = t.remove(meta);
            if let Some(f) = &terminate {
                f(meta);
            }
            drop(entry);
        });
        tasks
    }

    /// A hasher for task ids: tokio hashes an `Id` as one `u64`, unique per task, which is a
    /// good enough hash by itself.
    #[derive(Default)]
    pub(super) struct IdHasher(u64);

    impl Hasher for IdHasher {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
}
