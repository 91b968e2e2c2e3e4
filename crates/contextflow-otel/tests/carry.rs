//! The request's OpenTelemetry context follows contextflow spawns on both runtimes.
//! Registers a process-wide carrier, hence its own test binary.

use contextflow::Snapshot;
use contextflow_otel::{current_span_id, current_trace_id, in_remote_context, OTEL_CONTEXT};
use opentelemetry::{
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};

fn remote_parent(n: u64) -> SpanContext {
    SpanContext::new(
        TraceId::from(u128::from(n) + 1),
        SpanId::from(n + 1),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// What each place in a request sees: (our accessor, OpenTelemetry's own `Context::current`).
type Seen = (Option<TraceId>, TraceId);

fn seen() -> Seen {
    (
        current_trace_id(),
        Context::map_current(|cx| cx.span().span_context().trace_id()),
    )
}

async fn request(n: u64) -> Vec<Seen> {
    let mut out = vec![seen()];
    tokio::task::yield_now().await;
    out.push(contextflow::spawn(async { seen() }).await.unwrap());
    out.push(contextflow::spawn_blocking(seen).await.unwrap());
    out.push(contextflow::thread::spawn(seen).join().unwrap());
    // A grandchild, spawned after a yield, from inside a child.
    out.push(
        contextflow::spawn(async {
            tokio::task::yield_now().await;
            contextflow::spawn(async { seen() }).await.unwrap()
        })
        .await
        .unwrap(),
    );
    assert_eq!(current_span_id(), Some(SpanId::from(n + 1)));
    out
}

fn run(rt: tokio::runtime::Runtime) {
    rt.block_on(async {
        let handles: Vec<_> = (0..200u64)
            .map(|n| tokio::spawn(in_remote_context(remote_parent(n), request(n))))
            .collect();
        for (n, h) in handles.into_iter().enumerate() {
            let expected = TraceId::from(n as u128 + 1);
            for (ours, otel) in h.await.unwrap() {
                assert_eq!(ours, Some(expected), "request {n}");
                assert_eq!(otel, expected, "request {n}");
            }
        }
        // Outside every request nothing leaks.
        assert_eq!(seen(), (None, TraceId::INVALID));
        let plain = tokio::spawn(async { seen() }).await.unwrap();
        assert_eq!(plain, (None, TraceId::INVALID));
    });
}

#[test]
fn context_follows_spawns_on_both_runtimes() {
    contextflow_otel::carry_context();
    run(tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap());
    run(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap());
}

#[test]
fn our_variable_answers_where_otel_thread_local_is_not_set() {
    // A snapshot taken inside a request and run elsewhere restores our frame; the carrier
    // (registered by the other test or not) restores OpenTelemetry's too.
    let cx = Context::new().with_remote_span_context(remote_parent(41));
    let snapshot = contextflow_otel::sync_scope(cx, Snapshot::capture);
    assert_eq!(current_trace_id(), None);
    let inside = std::thread::spawn(move || snapshot.run(current_trace_id))
        .join()
        .unwrap();
    assert_eq!(inside, Some(TraceId::from(42u128)));
    let stored = OTEL_CONTEXT.sync_scope(
        Context::new()
            .with_remote_span_context(remote_parent(9))
            .into(),
        current_trace_id,
    );
    assert_eq!(stored, Some(TraceId::from(10u128)));
}

/// What runs in a snapshot that carries no `Context` (an empty one, one captured under
/// `suppress_flow`, a task spawned without context) sees no trace, not the trace of the
/// request whose poll or closure it happens to run inside.
fn empty_snapshots(rt: tokio::runtime::Runtime) {
    rt.block_on(in_remote_context(remote_parent(7), async {
        let expected = TraceId::from(8u128);
        assert_eq!(seen(), (Some(expected), expected));
        let nothing = (None, TraceId::INVALID);
        assert_eq!(
            Snapshot::empty().run(seen),
            nothing,
            "Snapshot::empty().run"
        );
        let suppressed = contextflow::suppress_flow(Snapshot::capture_inheritable);
        assert_eq!(
            suppressed.run(seen),
            nothing,
            "captured under suppress_flow"
        );
        use contextflow::FutureExt as _;
        let polled = async {
            tokio::task::yield_now().await;
            seen()
        }
        .with_snapshot(Snapshot::empty())
        .await;
        assert_eq!(polled, nothing, "a future polled inside the request");
        let spawned = contextflow::spawn_without_context(async { seen() })
            .await
            .unwrap();
        assert_eq!(spawned, nothing, "spawn_without_context");
        // And the request's own context is back afterwards.
        assert_eq!(seen(), (Some(expected), expected));
    }));
}

#[test]
fn snapshots_without_a_context_replace_the_threads_on_both_runtimes() {
    contextflow_otel::carry_context();
    empty_snapshots(
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
    );
    empty_snapshots(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap(),
    );
}

/// An empty snapshot entered where telemetry is suppressed (an exporter's own work) keeps it
/// suppressed: only the trace is replaced.
#[test]
fn an_empty_snapshot_keeps_telemetry_suppressed() {
    contextflow_otel::carry_context();
    let _suppressed = Context::enter_telemetry_suppressed_scope();
    assert!(Context::is_current_telemetry_suppressed());
    assert!(Snapshot::empty().run(Context::is_current_telemetry_suppressed));
}
