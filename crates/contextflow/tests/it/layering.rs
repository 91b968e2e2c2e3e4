//! Replace or layer (issue 8). A request's bindings layer over the frame of whoever polls
//! them, so a binding made outside (an outer tower layer wrapping the future that an inner
//! layer returned) stays visible; `with_snapshot` and `Snapshot::run` replace the frame.

use std::{future::Future, pin::Pin};

use contextflow::{AsyncLocal, FutureExt, Snapshot};

static OUTER: AsyncLocal<&'static str> = AsyncLocal::named("outer");
static REQUEST_ID: AsyncLocal<&'static str> = AsyncLocal::named("request_id");
static TRACE: AsyncLocal<u64> = AsyncLocal::named("trace");

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

async fn handler() -> (Option<&'static str>, Option<&'static str>, Option<u64>) {
    tokio::task::yield_now().await;
    (OUTER.get(), REQUEST_ID.get(), TRACE.get())
}

/// The inner "service": binds the request's variables at call time and layers them over the
/// poller, as a server layer does.
fn inner_call_layering() -> BoxFuture<(Option<&'static str>, Option<&'static str>, Option<u64>)> {
    let fut = REQUEST_ID.sync_scope("req-1", || TRACE.sync_scope(7, handler));
    Box::pin(REQUEST_ID.scope("req-1", TRACE.scope(7, fut)))
}

/// The same service replacing the poller's frame with a snapshot taken at call time.
fn inner_call_replacing() -> BoxFuture<(Option<&'static str>, Option<&'static str>, Option<u64>)> {
    let snapshot = REQUEST_ID.sync_scope("req-1", || TRACE.sync_scope(7, Snapshot::capture));
    Box::pin(handler().with_snapshot(snapshot))
}

async fn an_outer_layer_binding_is_visible_through_layered_bindings() {
    // The usual tower shape: `let fut = inner.call(req); Box::pin(X.scope(v, fut))`.
    let fut = inner_call_layering();
    let outer: BoxFuture<_> = Box::pin(OUTER.scope("outer layer", fut));
    let seen = tokio::spawn(outer).await.unwrap();
    assert_eq!(seen, (Some("outer layer"), Some("req-1"), Some(7)));
}

async fn with_snapshot_replaces_the_pollers_frame() {
    let fut = inner_call_replacing();
    let seen = OUTER.scope("outer layer", fut).await;
    assert_eq!(
        seen,
        (None, Some("req-1"), Some(7)),
        "replaced: the outer binding is hidden"
    );
    let run = OUTER.sync_scope("outer", || Snapshot::empty().run(|| OUTER.get()));
    assert_eq!(run, None, "Snapshot::run replaces too");
}

async fn in_current_context_replaces_with_the_frame_at_the_call() {
    let fut = OUTER.sync_scope("at the call", || async { OUTER.get() }.in_current_context());
    let seen = OUTER.scope("at the poll", fut).await;
    assert_eq!(seen, Some("at the call"));
}

on_both_runtimes! {
    an_outer_layer_binding_is_visible_through_layered_bindings => an_outer_layer_binding_is_visible_through_layered_bindings;
    with_snapshot_replaces_the_pollers_frame => with_snapshot_replaces_the_pollers_frame;
    in_current_context_replaces_with_the_frame_at_the_call => in_current_context_replaces_with_the_frame_at_the_call;
}
