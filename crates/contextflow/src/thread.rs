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
