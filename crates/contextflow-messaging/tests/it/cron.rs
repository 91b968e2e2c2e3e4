//! Scheduled jobs: each run starts from an empty root context with its own run id and trace,
//! whatever the registering code had; overlapping runs never share one; panics, shutdown and
//! cancellation. `current_thread` tests run on tokio's paused clock, `multi_thread` ones on
//! short real periods; no assertion depends on how long anything took.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, UNIX_EPOCH},
};

use contextflow::AsyncLocal;
use contextflow_messaging::cron::{self, JobRun, Overlap, Schedule, Scheduler};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use proptest::prelude::*;
use tokio::sync::{mpsc, watch};

static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");

const REGISTRAR_TRACE: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736;

/// What a run saw.
#[derive(Debug)]
struct Seen {
    run: JobRun,
    request_id: Option<String>,
    trace_id: Option<TraceId>,
    tenant: Option<&'static str>,
}

fn seen() -> Seen {
    Seen {
        run: cron::current_run().expect("inside a run"),
        request_id: contextflow_otel::current_request_id().map(|id| id.as_str().to_owned()),
        trace_id: contextflow_otel::current_trace_id(),
        tenant: TENANT.get(),
    }
}

fn telemetry() -> &'static (SdkTracerProvider, InMemorySpanExporter) {
    static TELEMETRY: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        (provider, exporter)
    })
}

/// A short period: virtual on the paused `current_thread` clock, real on `multi_thread`.
const PERIOD: Duration = Duration::from_millis(10);

/// A gate the runs wait at until the test opens it.
fn gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn registration_in_a_request_does_not_leak() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let parent = SpanContext::new(
        TraceId::from(REGISTRAR_TRACE),
        SpanId::from(7u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let request: contextflow_otel::RequestId = "registrar-1".parse().unwrap();
    // Registered inside a request: a tenant, a request id and a trace.
    let running = contextflow_otel::REQUEST_ID
        .scope(
            request,
            TENANT.scope(
                "acme",
                contextflow_otel::in_remote_context(parent, async {
                    assert_eq!(
                        contextflow_otel::current_trace_id(),
                        Some(TraceId::from(REGISTRAR_TRACE))
                    );
                    Scheduler::new()
                        .without_spans()
                        .job(
                            "leak-check",
                            Schedule::every(PERIOD),
                            Overlap::Skip,
                            move || {
                                let tx = tx.clone();
                                async move {
                                    let _ = tx.send(seen());
                                }
                            },
                        )
                        .start()
                }),
            ),
        )
        .await;
    // The runs happen while the registering request goes on: they never change what it
    // sees (a run's context entered on the registrar's task and left there would).
    let registrar: contextflow_otel::RequestId = "registrar-2".parse().unwrap();
    let (runs, seen_by_registrar) = contextflow_otel::REQUEST_ID
        .scope(registrar, async {
            let mut runs = Vec::new();
            for _ in 0..3 {
                runs.push(rx.recv().await.unwrap());
            }
            let id = contextflow_otel::current_request_id().map(|id| id.as_str().to_owned());
            (runs, id)
        })
        .await;
    assert_eq!(seen_by_registrar.as_deref(), Some("registrar-2"));
    running.shutdown().await;
    for s in &runs {
        assert_eq!(s.tenant, None, "{s:?}");
        assert_eq!(s.run.name(), "leak-check");
        assert_eq!(s.request_id.as_deref(), Some(s.run.run_id().as_str()));
        assert_ne!(s.request_id.as_deref(), Some("registrar-1"));
        let trace = s.trace_id.expect("a fresh, valid trace");
        assert_ne!(trace, TraceId::from(REGISTRAR_TRACE));
        assert_ne!(trace, TraceId::INVALID);
    }
    let ids: HashSet<_> = runs.iter().map(|s| s.run.run_id().clone()).collect();
    let traces: HashSet<_> = runs.iter().map(|s| s.trace_id).collect();
    assert_eq!((ids.len(), traces.len()), (3, 3));
    // And outside every scope there is no request id, the runs' included.
    assert_eq!(contextflow_otel::current_request_id(), None);
}

async fn overlapping_runs_have_their_own_ids_and_traces() {
    let (provider, exporter) = telemetry();
    let job = format!("overlap-{}", contextflow_otel::RequestId::new());
    let (open, gate) = gate();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let finished = Arc::new(AtomicUsize::new(0));
    let done = finished.clone();
    let running = Scheduler::new()
        .with_tracer(provider.tracer("cron-test"))
        .job(
            job.clone(),
            Schedule::every(PERIOD),
            Overlap::Allow,
            move || {
                let (tx, mut gate, done) = (tx.clone(), gate.clone(), done.clone());
                async move {
                    let _ = tx.send(seen());
                    // Every run waits here until the test has seen three in progress at once.
                    let _ = gate.wait_for(|open| *open).await;
                    let after = seen();
                    let _ = tx.send(after);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            },
        )
        .start();
    let mut started = Vec::new();
    while started.len() < 3 {
        started.push(rx.recv().await.unwrap());
    }
    // Three runs in progress together, none finished.
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    open.send_replace(true);
    running.shutdown().await;
    let ended = finished.load(Ordering::SeqCst);
    assert!(ended >= 3, "shutdown waited for the runs in progress");
    let mut after = Vec::new();
    while let Ok(s) = rx.try_recv() {
        after.push(s);
    }
    let ids: HashSet<_> = started.iter().map(|s| s.run.run_id().clone()).collect();
    let traces: HashSet<_> = started.iter().map(|s| s.trace_id.unwrap()).collect();
    assert_eq!((ids.len(), traces.len()), (3, 3), "{started:?}");
    // Each run kept its own id and trace across the wait, while the others ran.
    for s in &started {
        let later = after
            .iter()
            .find(|a| a.run.run_id() == s.run.run_id() && a.trace_id == s.trace_id);
        assert!(later.is_some(), "{s:?} not seen again in its own context");
    }
    let spans: Vec<_> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.name == format!("job {job}"))
        .collect();
    assert_eq!(spans.len(), ended);
    // Every run (the three above and any that started before the shutdown) reported its trace
    // before the gate; each run's root span is in its own trace.
    let all_traces: HashSet<_> = started
        .iter()
        .chain(&after)
        .map(|s| s.trace_id.unwrap())
        .collect();
    let span_traces: HashSet<_> = spans.iter().map(|s| s.span_context.trace_id()).collect();
    assert_eq!(span_traces.len(), spans.len(), "one trace per run");
    for span in &spans {
        assert_eq!(span.parent_span_id, SpanId::INVALID, "a root span");
        assert!(
            all_traces.contains(&span.span_context.trace_id()),
            "{span:?} is in no run's trace"
        );
    }
    assert!(traces.is_subset(&span_traces), "the three runs' spans");
}

/// A run that panics is a failed run (its span ends with `error.type = panic`), and the
/// schedule goes on.
async fn a_panicking_run_does_not_stop_the_scheduler() {
    let (provider, exporter) = telemetry();
    let job = format!("flaky-{}", contextflow_otel::RequestId::new());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let running = Scheduler::new()
        .with_tracer(provider.tracer("cron-test"))
        .job(
            job.clone(),
            Schedule::every(PERIOD),
            Overlap::Skip,
            move || {
                let (tx, calls) = (tx.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("the first run fails");
                    }
                    let _ = tx.send(seen());
                }
            },
        )
        .start();
    let a = rx.recv().await.unwrap();
    let b = rx.recv().await.unwrap();
    assert_ne!(a.run.run_id(), b.run.run_id());
    running.shutdown().await;
    assert_eq!(contextflow_otel::current_request_id(), None);
    let errors: Vec<String> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.name == format!("job {job}"))
        .filter_map(|span| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == "error.type")
                .map(|kv| kv.value.to_string())
        })
        .collect();
    assert_eq!(errors, ["panic"], "the first run's span failed as a panic");
}

async fn cancel_drops_each_run_inside_its_context() {
    struct Probe(Arc<Mutex<Vec<Option<String>>>>);
    impl Drop for Probe {
        fn drop(&mut self) {
            let id = contextflow_otel::current_request_id().map(|id| id.as_str().to_owned());
            self.0.lock().unwrap().push(id);
        }
    }
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let in_drop = dropped.clone();
    let running = Scheduler::new()
        .without_spans()
        .job(
            "stuck",
            Schedule::every(PERIOD),
            Overlap::Allow,
            move || {
                let (tx, probe) = (tx.clone(), Probe(in_drop.clone()));
                async move {
                    let _probe = probe;
                    let _ = tx.send(seen());
                    std::future::pending::<()>().await;
                }
            },
        )
        .start();
    let mut started = Vec::new();
    while started.len() < 2 {
        started.push(rx.recv().await.unwrap());
    }
    running.cancel().await;
    let dropped = dropped.lock().unwrap().clone();
    for s in &started {
        assert!(
            dropped.contains(&Some(s.run.run_id().as_str().to_owned())),
            "{s:?} dropped outside its context: {dropped:?}"
        );
    }
    assert!(dropped.iter().all(Option::is_some), "{dropped:?}");
}

async fn shutdown_waits_for_the_run_in_progress() {
    let (open, gate) = gate();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let finished = Arc::new(AtomicUsize::new(0));
    let done = finished.clone();
    let running = Scheduler::new()
        .without_spans()
        .job("slow", Schedule::every(PERIOD), Overlap::Skip, move || {
            let (tx, mut gate, done) = (tx.clone(), gate.clone(), done.clone());
            async move {
                let _ = tx.send(());
                let _ = gate.wait_for(|open| *open).await;
                tokio::task::yield_now().await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
        .start();
    rx.recv().await.unwrap();
    // Shutdown is polled first; the gate opens only afterwards.
    tokio::join!(running.shutdown(), async {
        tokio::task::yield_now().await;
        open.send_replace(true);
    });
    assert_eq!(finished.load(Ordering::SeqCst), 1);
}

macro_rules! on_both_runtimes {
    ($($name:ident;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "current_thread", start_paused = true)]
            async fn current_thread_paused() {
                super::$name().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() {
                super::$name().await
            }
        }
    )*};
}

on_both_runtimes! {
    registration_in_a_request_does_not_leak;
    overlapping_runs_have_their_own_ids_and_traces;
    a_panicking_run_does_not_stop_the_scheduler;
    cancel_drops_each_run_inside_its_context;
    shutdown_waits_for_the_run_in_progress;
}

/// Skip and Queue, on the paused clock: due times that pass while a run is stuck.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn skip_and_queue_while_a_run_is_in_progress() {
    for overlap in [Overlap::Skip, Overlap::Queue] {
        let (open, gate) = gate();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let running = Scheduler::new()
            .without_spans()
            .job(
                "one-at-a-time",
                Schedule::every(Duration::from_secs(1)),
                overlap,
                move || {
                    let (tx, mut gate) = (tx.clone(), gate.clone());
                    async move {
                        let _ = tx.send(seen());
                        let _ = gate.wait_for(|open| *open).await;
                    }
                },
            )
            .start();
        let first = rx.recv().await.unwrap();
        // Ten due times pass (virtual time) while the first run is stuck.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            rx.try_recv().is_err(),
            "{overlap:?}: no second run meanwhile"
        );
        open.send_replace(true);
        let second = rx.recv().await.unwrap();
        let gap = second
            .run
            .scheduled()
            .duration_since(first.run.scheduled())
            .unwrap();
        match overlap {
            // Queued: the run due one period after the first, started late.
            Overlap::Queue => assert_eq!(gap, Duration::from_secs(1)),
            // Skipped: the next due time after the first run ended.
            _ => assert!(gap > Duration::from_secs(10), "{gap:?}"),
        }
        assert_ne!(first.run.run_id(), second.run.run_id());
        running.shutdown().await;
    }
}

/// A cron expression on the paused clock: due at whole seconds, one second apart.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn cron_expression_fires_at_its_times() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let running = Scheduler::new()
        .without_spans()
        .job(
            "every-second",
            Schedule::cron("* * * * * *").unwrap(),
            Overlap::Skip,
            move || {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(seen());
                }
            },
        )
        .start();
    let a = rx.recv().await.unwrap();
    let b = rx.recv().await.unwrap();
    running.cancel().await;
    let at = |s: &Seen| s.run.scheduled().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(at(&a).subsec_nanos(), 0);
    assert_eq!(at(&b) - at(&a), Duration::from_secs(1));
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_running_cancels() {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let running = Scheduler::new()
        .without_spans()
        .job(
            "dropped",
            Schedule::every(Duration::from_millis(1)),
            Overlap::Allow,
            move || {
                let tx = tx.clone();
                async move {
                    // Says it is in progress, then never ends on its own.
                    let _ = tx.send(());
                    std::future::pending::<()>().await;
                }
            },
        )
        .start();
    // A run is in progress when `Running` is dropped: only cancelling it ends it.
    assert_eq!(rx.recv().await, Some(()));
    drop(running);
    // Every sender lives in the job's closure or its runs: all are dropped once the runs in
    // progress are cancelled (waiting for them instead would never end).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "a run in progress outlived the dropped Running"
    );
}

/// `shutdown` waits for the runs in progress; a timeout around it that gives up drops its
/// future, and the runs still in progress are then cancelled, not left running detached.
#[tokio::test(flavor = "current_thread")]
async fn a_shutdown_given_up_on_cancels_the_runs() {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let running = Scheduler::new()
        .without_spans()
        .job(
            "stuck",
            Schedule::every(Duration::from_millis(1)),
            Overlap::Skip,
            move || {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(());
                    std::future::pending::<()>().await;
                }
            },
        )
        .start();
    assert_eq!(rx.recv().await, Some(()));
    let gave_up = tokio::time::timeout(Duration::from_millis(20), running.shutdown()).await;
    assert!(gave_up.is_err(), "the run never ends on its own");
    // Every sender lives in the job's closure or its runs: all are dropped once the run in
    // progress is cancelled.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while rx.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "a run outlived the shutdown given up on");
}

#[test]
fn schedules_reject_bad_expressions() {
    for (expr, reason) in [
        ("", "empty"),
        ("* * *", "too few fields"),
        ("61 * * * * *", "second out of range"),
        ("* * * * * * * *", "too many fields"),
        ("every tuesday", "words"),
    ] {
        assert!(Schedule::cron(expr).is_err(), "{reason}");
    }
    let long = "* ".repeat(200);
    assert!(Schedule::cron(&long)
        .unwrap_err()
        .to_string()
        .contains("longer than"));
    assert!(Schedule::cron("0 */5 * * * *").is_ok());
    assert!("0 30 2 * * Mon-Fri".parse::<Schedule>().is_ok());
}

fn field(max: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_owned()),
        (0..max).prop_map(|n| n.to_string()),
        (1..max.min(30)).prop_map(|n| format!("*/{n}")),
        (0..max / 2, max / 2..max).prop_map(|(a, b)| format!("{a}-{b}")),
    ]
}

/// Mostly valid six-field expressions, then sometimes mutated: a byte replaced, the end cut
/// off, or junk inserted.
fn expression() -> impl Strategy<Value = String> {
    let valid = (
        field(60),
        field(60),
        field(24),
        field(28),
        field(12),
        Just("*".to_owned()),
    )
        .prop_map(|(s, m, h, d, mo, w)| {
            // Day of month and month start at 1.
            let one_based = |f: String| {
                if f == "0" {
                    "1".to_owned()
                } else {
                    f.replace("0-", "1-")
                }
            };
            format!("{s} {m} {h} {} {} {w}", one_based(d), one_based(mo))
        });
    (valid, 0u8..6, any::<usize>(), "[ -~]{1,4}").prop_map(|(expr, mutation, at, junk)| {
        let at = at % (expr.len() + 1);
        match mutation {
            0 => format!("{}{junk}", &expr[..at]),
            1 => expr[..at].to_owned(),
            2 => format!("{}{junk}{}", &expr[..at], &expr[at..]),
            _ => expr,
        }
    })
}

proptest! {
    /// Any input is parsed or rejected, never a panic; most expressions reach the accept path.
    #[test]
    fn cron_parsing_never_panics(expr in expression(), raw in "\\PC{0,40}") {
        let accepted = Schedule::cron(&expr).is_ok();
        let _ = Schedule::cron(&raw);
        ACCEPTED.fetch_add(usize::from(accepted), Ordering::Relaxed);
        TOTAL.fetch_add(1, Ordering::Relaxed);
    }
}

static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

#[test]
fn cron_parsing_accept_share() {
    // Runs the property on its own and reports how much of it reached the accept path.
    cron_parsing_never_panics();
    let (accepted, total) = (
        ACCEPTED.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed),
    );
    println!("cron parsing: {accepted} of {total} cases accepted");
    assert!(total > 0 && accepted * 3 >= total, "{accepted} of {total}");
}
