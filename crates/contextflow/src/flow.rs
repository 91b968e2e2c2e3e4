//! Suppressing flow: a scope inside which spawns do not inherit (.NET's
//! `ExecutionContext.SuppressFlow`).
//!
//! The suppression is itself a (private, never inherited) binding of the current frame, so it
//! belongs to the code inside the scope and to nothing else: a task polled on the same thread
//! with a frame of its own does not see it, and a child started inside it is not suppressed.

use crate::{node::Site, AsyncLocal, Inherit, Snapshot};

/// Bound while flow is suppressed. Never inherited: a child starts empty, not suppressed.
static SUPPRESSED: AsyncLocal<()> =
    AsyncLocal::named("contextflow.flow_suppressed").inherit(Inherit::Never);

/// Runs `f` with flow suppressed: what `f` starts does not inherit the current context, while
/// `f` itself still sees it. For long-lived background work started from inside a request (a
/// cache refresher, a connection pool's reaper) that must not keep the request's ids, tenant or
/// trace.
///
/// Inside `f`, every capture made for a child starts empty: [`contextflow::spawn`](crate::spawn)
/// and the other spawn helpers, [`thread::spawn`](crate::thread::spawn),
/// [`FutureExt::in_current_context`](crate::FutureExt::in_current_context),
/// [`Snapshot::capture_inheritable`], [`Snapshot::bind`], and a plain `tokio::spawn` on a
/// runtime with contextflow's hooks (feature `runtime-hooks`). [`Snapshot::capture`], which
/// asks for the whole context explicitly, still captures it, without the suppression: code run
/// in that snapshot later spawns normally. Nested calls are fine; the
/// previous state comes back when `f` returns or panics.
///
/// ```
/// use contextflow::AsyncLocal;
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// # #[cfg(not(feature = "tokio"))] fn main() { let _ = &REQUEST_ID; }
/// # #[cfg(feature = "tokio")]
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// REQUEST_ID
///     .scope("req-1".into(), async {
///         let refresher = contextflow::suppress_flow(|| {
///             assert_eq!(REQUEST_ID.get().as_deref(), Some("req-1")); // still visible here
///             contextflow::spawn(async { REQUEST_ID.get() })
///         });
///         assert_eq!(refresher.await.unwrap(), None); // not inherited
///         // Outside the closure, spawns inherit again.
///         let child = contextflow::spawn(async { REQUEST_ID.get() });
///         assert_eq!(child.await.unwrap().as_deref(), Some("req-1"));
///     })
///     .await;
/// # }
/// ```
#[cfg_attr(feature = "diagnostics", track_caller)]
pub fn suppress_flow<R>(f: impl FnOnce() -> R) -> R {
    SUPPRESSED.sync_scope((), f)
}

/// Runs `f` with the suppression unset (for a full capture made inside [`suppress_flow`]).
pub(crate) fn unsuppressed<R>(f: impl FnOnce() -> R) -> R {
    SUPPRESSED.sync_unset(f)
}

/// Whether flow is suppressed here (inside [`suppress_flow`]): .NET's
/// `ExecutionContext.IsFlowSuppressed`.
///
/// ```
/// assert!(!contextflow::is_flow_suppressed());
/// assert!(contextflow::suppress_flow(contextflow::is_flow_suppressed));
/// // A child started inside is not suppressed itself.
/// let child = contextflow::suppress_flow(|| contextflow::thread::spawn(contextflow::is_flow_suppressed));
/// assert!(!child.join().unwrap());
/// ```
pub fn is_flow_suppressed() -> bool {
    SUPPRESSED.is_set()
}

/// What an inheriting capture made at `site` starts from when flow is suppressed: nothing
/// (with the feature `diagnostics`, a record of what the capture left behind).
#[inline]
pub(crate) fn suppressed_snapshot(site: Site) -> Option<Snapshot> {
    if !is_flow_suppressed() {
        return None;
    }
    #[cfg(feature = "diagnostics")]
    let empty = Snapshot::from_frame(crate::diagnostics::empty_start(
        crate::diagnostics::LostBy::SuppressedCapture,
        site.location(),
    ));
    #[cfg(not(feature = "diagnostics"))]
    let empty = {
        let _ = site;
        Snapshot::empty()
    };
    Some(empty)
}

/// Where the innermost [`suppress_flow`] around the current code was called.
#[cfg(feature = "diagnostics")]
pub(crate) fn suppressed_site() -> Option<&'static std::panic::Location<'static>> {
    let key = SUPPRESSED.key();
    crate::current::with_current(|frame| {
        // SAFETY: `with_current` keeps the frame alive for the call; only the site is read.
        unsafe { crate::node::lookup(frame, key) }.and_then(|b| b.site.location())
    })
}
