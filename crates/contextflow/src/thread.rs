//! OS threads that inherit the spawner's context.

use crate::Snapshot;

/// Spawns an OS thread that runs `f` inside the current (inheritable) context; otherwise
/// exactly [`std::thread::spawn`]. A plain `std::thread::spawn` starts with no context.
///
/// # Panics
/// As [`std::thread::spawn`]: when the OS fails to create a thread.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let handle = ID.sync_scope(5, || contextflow::thread::spawn(|| ID.get()));
/// assert_eq!(handle.join().unwrap(), Some(5));
/// let plain = ID.sync_scope(5, || std::thread::spawn(|| ID.get()));
/// assert_eq!(plain.join().unwrap(), None);
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn spawn<F, T>(f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let snapshot = Snapshot::capture_inheritable();
    std::thread::spawn(move || snapshot.run(f))
}

/// Spawns a thread from `builder` that inherits the current context.
///
/// # Errors
/// As [`std::thread::Builder::spawn`]: the OS failed to create the thread.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # fn main() -> std::io::Result<()> {
/// let builder = std::thread::Builder::new().name("worker".into());
/// let handle = ID.sync_scope(2, || contextflow::thread::spawn_with_builder(builder, || ID.get()))?;
/// assert_eq!(handle.join().unwrap(), Some(2));
/// # Ok(()) }
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn spawn_with_builder<F, T>(
    builder: std::thread::Builder,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let snapshot = Snapshot::capture_inheritable();
    builder.spawn(move || snapshot.run(f))
}

/// Runs `f` with a [`Scope`] whose threads inherit the context current where each is spawned;
/// otherwise exactly [`std::thread::scope`] (the threads may borrow from the caller, and all
/// are joined before `scope` returns). `f` itself runs on the calling thread, in its frame.
///
/// # Panics
/// As [`std::thread::scope`]: when a spawned thread panicked and its handle was not joined.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let mut results = [None; 4];
/// ID.sync_scope(7, || {
///     contextflow::thread::scope(|s| {
///         for slot in &mut results {
///             s.spawn(move || *slot = ID.get());
///         }
///     })
/// });
/// assert_eq!(results, [Some(7); 4]);
/// ```
pub fn scope<'env, F, T>(f: F) -> T
where
    F: for<'scope> FnOnce(Scope<'scope, 'env>) -> T,
{
    std::thread::scope(|inner| f(Scope { inner }))
}

/// The handle of [`scope`]: spawns scoped threads in the current inheritable context. `Copy`,
/// so a scoped thread can capture it and spawn more.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let seen = ID.sync_scope(1, || {
///     contextflow::thread::scope(|s| {
///         // Nested: the grandchild inherits the child's context.
///         s.spawn(move || ID.sync_scope(2, || s.spawn(|| ID.get()).join().unwrap())).join().unwrap()
///     })
/// });
/// assert_eq!(seen, Some(2));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Scope<'scope, 'env> {
    inner: &'scope std::thread::Scope<'scope, 'env>,
}

impl<'scope, 'env> Scope<'scope, 'env> {
    /// Spawns a scoped thread that runs `f` in the current inheritable context (as
    /// [`std::thread::Scope::spawn`]).
    ///
    /// # Panics
    /// As [`std::thread::Scope::spawn`]: when the OS fails to create a thread.
    ///
    /// ```
    /// use contextflow::{AsyncLocal, Inherit};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    /// static TX: AsyncLocal<u32> = AsyncLocal::new().inherit(Inherit::Never);
    ///
    /// let seen = ID.sync_scope(3, || TX.sync_scope(1, || {
    ///     contextflow::thread::scope(|s| s.spawn(|| (ID.get(), TX.get())).join().unwrap())
    /// }));
    /// assert_eq!(seen, (Some(3), None), "a transaction never crosses");
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn spawn<F, T>(&self, f: F) -> std::thread::ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        let snapshot = Snapshot::capture_inheritable();
        self.inner.spawn(move || snapshot.run(f))
    }

    /// The standard library's scope underneath, for what this wrapper does not cover (threads
    /// spawned through it directly start with no context).
    ///
    /// ```
    /// contextflow::thread::scope(|s| {
    ///     let handle = s.as_std().spawn(|| 1);
    ///     assert_eq!(handle.join().unwrap(), 1);
    /// });
    /// ```
    pub fn as_std(&self) -> &'scope std::thread::Scope<'scope, 'env> {
        self.inner
    }
}
