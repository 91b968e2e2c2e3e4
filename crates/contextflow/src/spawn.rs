//! Spawn helpers that carry the spawner's context into the child.
//!
//! Each captures the spawner's *inheritable* context (everything but the variables marked
//! [`Inherit::Never`](crate::Inherit::Never)) when it is called, and adds one pointer to the
//! spawned task. They share tokio's names and signatures, so switching is an import change.

use std::future::Future;

use tokio::task::JoinHandle;

use crate::{FutureExt, Snapshot};

/// Spawns a task that inherits the current context; otherwise exactly [`tokio::spawn`].
///
/// # Panics
/// As [`tokio::spawn`]: when called outside a tokio runtime.
///
/// ```
/// use contextflow::AsyncLocal;
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// REQUEST_ID
///     .scope("req-1".into(), async {
///         let child = contextflow::spawn(async { REQUEST_ID.get() });
///         assert_eq!(child.await.unwrap().as_deref(), Some("req-1"));
///         // A plain `tokio::spawn` does not carry the context.
///         assert_eq!(tokio::spawn(async { REQUEST_ID.get() }).await.unwrap(), None);
///     })
///     .await;
/// # }
/// ```
#[track_caller]
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "runtime-hooks")]
    let _explicit = crate::runtime::ExplicitSpawn::enter();
    match crate::tree::record_spawn(std::panic::Location::caller(), fut) {
        Err(fut) => tokio::spawn(fut.in_current_context()),
        Ok((node, fut)) => {
            let handle = tokio::spawn(fut.in_current_context());
            crate::tree::set_id(&node, handle.id());
            handle
        }
    }
}

/// Spawns a task that runs inside `snapshot` instead of the current context.
///
/// The task gets what `snapshot` holds, *all* of it: a full [`Snapshot::capture`] keeps the
/// variables marked [`Inherit::Never`](crate::Inherit::Never) (a database transaction), which
/// then reach a task that may outlive the code that bound them. To hand a task only what a
/// spawn would, capture with [`Snapshot::capture_inheritable`].
///
/// # Panics
/// As [`tokio::spawn`]: when called outside a tokio runtime.
///
/// ```
/// use contextflow::{AsyncLocal, Snapshot};
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let snap = ID.sync_scope(3, Snapshot::capture);
/// assert_eq!(contextflow::spawn_with(snap, async { ID.get() }).await.unwrap(), Some(3));
/// # }
/// ```
#[track_caller]
pub fn spawn_with<F>(snapshot: Snapshot, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "runtime-hooks")]
    let _explicit = crate::runtime::ExplicitSpawn::enter();
    tokio::spawn(fut.with_snapshot(snapshot))
}

/// Spawns a task that starts from an *empty* context, even if the spawner has one (no
/// variable set, no carried span): for work that outlives and does not belong to the current
/// request (a cache refresher, a connection pool reaper, a queue consumer). The same as
/// `spawn_with(Snapshot::empty(), fut)`; the task is an ordinary tokio task otherwise.
///
/// # Panics
/// As [`tokio::spawn`]: when called outside a tokio runtime.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let seen = ID
///     .scope(1, async { contextflow::spawn_without_context(async { ID.get() }).await })
///     .await;
/// assert_eq!(seen.unwrap(), None);
/// # }
/// ```
#[track_caller]
pub fn spawn_without_context<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "runtime-hooks")]
    let _explicit = crate::runtime::ExplicitSpawn::enter();
    #[cfg(feature = "diagnostics")]
    let empty = Snapshot::from_frame(crate::diagnostics::empty_start(
        crate::diagnostics::LostBy::SpawnWithoutContext,
        Some(std::panic::Location::caller()),
    ));
    #[cfg(not(feature = "diagnostics"))]
    let empty = Snapshot::empty();
    tokio::spawn(fut.with_snapshot(empty))
}

/// The former name of [`spawn_without_context`]: the task is not detached, it starts from an
/// empty context.
///
/// ```
/// # #![allow(deprecated)]
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(contextflow::spawn_detached(async { 1 }).await.unwrap(), 1);
/// # }
/// ```
#[deprecated(since = "0.1.1", note = "renamed to `spawn_without_context`")]
#[track_caller]
pub fn spawn_detached<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    spawn_without_context(fut)
}

/// Runs blocking code on tokio's blocking pool, inside the current context; otherwise exactly
/// [`tokio::task::spawn_blocking`].
///
/// # Panics
/// As [`tokio::task::spawn_blocking`]: when called outside a tokio runtime.
///
/// ```
/// use contextflow::AsyncLocal;
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let id = REQUEST_ID
///     .scope("req-2".into(), async {
///         contextflow::spawn_blocking(|| REQUEST_ID.get()).await.unwrap()
///     })
///     .await;
/// assert_eq!(id.as_deref(), Some("req-2"));
/// # }
/// ```
#[track_caller]
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let snapshot = Snapshot::capture_inheritable();
    tokio::task::spawn_blocking(move || snapshot.run(f))
}

/// Spawns a `!Send` task on the current [`tokio::task::LocalSet`], inheriting the current
/// context; otherwise exactly [`tokio::task::spawn_local`].
///
/// # Panics
/// As [`tokio::task::spawn_local`]: when called outside a `LocalSet`.
///
/// ```
/// use contextflow::AsyncLocal;
/// use std::rc::Rc;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let local = tokio::task::LocalSet::new();
/// let seen = local
///     .run_until(ID.scope(4, async {
///         let not_send = Rc::new(());
///         contextflow::spawn_local(async move { (ID.get(), Rc::strong_count(&not_send)) }).await
///     }))
///     .await
///     .unwrap();
/// assert_eq!(seen, (Some(4), 1));
/// # }
/// ```
#[track_caller]
pub fn spawn_local<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    #[cfg(feature = "runtime-hooks")]
    let _explicit = crate::runtime::ExplicitSpawn::enter();
    tokio::task::spawn_local(fut.in_current_context())
}

/// Spawns a task on `set` that inherits the current context (the [`tokio::task::JoinSet`]
/// counterpart of [`spawn`]).
///
/// # Panics
/// As [`tokio::task::JoinSet::spawn`]: when called outside a tokio runtime.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut set = tokio::task::JoinSet::new();
/// ID.sync_scope(6, || {
///     contextflow::spawn_in(&mut set, async { ID.get() });
/// });
/// assert_eq!(set.join_next().await.unwrap().unwrap(), Some(6));
/// # }
/// ```
#[track_caller]
pub fn spawn_in<F>(set: &mut tokio::task::JoinSet<F::Output>, fut: F) -> tokio::task::AbortHandle
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(feature = "runtime-hooks")]
    let _explicit = crate::runtime::ExplicitSpawn::enter();
    match crate::tree::record_spawn(std::panic::Location::caller(), fut) {
        Err(fut) => set.spawn(fut.in_current_context()),
        Ok((node, fut)) => {
            let handle = set.spawn(fut.in_current_context());
            crate::tree::set_id(&node, handle.id());
            handle
        }
    }
}
