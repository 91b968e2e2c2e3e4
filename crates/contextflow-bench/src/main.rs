//! Side-by-side benchmark of contextflow against the anchors of the project's performance targets:
//! a bare baseline, `tokio::task_local!`, `opentelemetry::Context` and a tracing span
//! (a `Registry` plus a no-op layer).
//!
//! Run with: `cargo run --release -p contextflow-bench` (add `-- --quick` for a short run, or
//! `-- --smoke` to only check that every row runs).
//!
//! Results, hardware, toolchain and date: see this crate's README.md (last full run 2026-11-26,
//! 2 vCPU AMD EPYC, rustc 1.95.0).
//!
//! Every contender of a row is measured in the same run, interleaved round by round (so drift
//! and noise hit all of them alike), and the median of the rounds is reported. "overhead" is a
//! contender's median minus the bare baseline's; the ratio columns compare our overhead with each
//! anchor's (below 1.00 means we are cheaper).

use std::{
    cell::Cell,
    future::Future,
    hint::black_box,
    pin::{pin, Pin},
    task::{Context as TaskContext, Poll, Waker},
    time::Instant,
};

use contextflow::{AsyncLocal, Snapshot};

/// Core rows added for issue 8 (depth, carriers, memory), and issue 11's diagnostics rows. Other engineers add their rows in
/// modules of their own, the same way: a `pub(crate) fn` taking the `Settings`, called from
/// `main`.
mod core_rows;
/// Issue 11: a runtime with contextflow's task hooks, per poll and per spawn.
mod hook_rows;
use opentelemetry::{context::FutureExt as _, Context as OtelContext};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

static OURS: AsyncLocal<u64> = AsyncLocal::named("request_id");

tokio::task_local! {
    static TASK_LOCAL: u64;
}

thread_local! {
    static PLAIN: Cell<u64> = const { Cell::new(7) };
}

/// A value type for the OpenTelemetry context (it is keyed by type).
#[derive(Clone, Copy, Debug)]
struct OtelValue(#[allow(dead_code)] u64);

/// One contender of a row: a name and a closure that runs `n` iterations and returns the
/// elapsed nanoseconds.
struct Contender<'a> {
    name: &'static str,
    run: Box<dyn FnMut(u64) -> f64 + 'a>,
}

fn contender<'a>(name: &'static str, run: impl FnMut(u64) -> f64 + 'a) -> Contender<'a> {
    Contender {
        name,
        run: Box::new(run),
    }
}

/// Times `n` calls of `f`, in nanoseconds.
fn time(n: u64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64
}

struct Settings {
    rounds: usize,
    /// Target duration of one batch, in nanoseconds.
    batch_ns: f64,
    /// Skips calibration and runs this many iterations per batch.
    fixed_batch: Option<u64>,
}

/// Measures every contender interleaved, returning (name, median ns/op) in input order.
fn measure(settings: &Settings, contenders: &mut [Contender<'_>]) -> Vec<(&'static str, f64)> {
    // Calibrate each contender's batch size so a batch takes about `batch_ns`.
    let sizes: Vec<u64> = contenders
        .iter_mut()
        .map(|c| {
            if let Some(n) = settings.fixed_batch {
                return n;
            }
            let mut n = 16u64;
            loop {
                let t = (c.run)(n);
                if t > settings.batch_ns / 4.0 || n > 1 << 28 {
                    let per = t / n as f64;
                    break ((settings.batch_ns / per.max(0.01)) as u64).clamp(16, 1 << 30);
                }
                n *= 4;
            }
        })
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    for _ in 0..settings.rounds {
        for (i, c) in contenders.iter_mut().enumerate() {
            samples[i].push((c.run)(sizes[i]) / sizes[i] as f64);
        }
    }
    contenders
        .iter()
        .zip(samples)
        .map(|(c, mut s)| {
            s.sort_by(|a, b| a.total_cmp(b));
            (c.name, s[s.len() / 2])
        })
        .collect()
}

/// Prints one table section. The first result is the bare baseline, `ours` names our row, and
/// every other row is an anchor.
fn report(title: &str, results: &[(&'static str, f64)], ours: &str) {
    let base = results[0].1;
    let ours_over = results
        .iter()
        .find(|(n, _)| *n == ours)
        .map_or(f64::NAN, |(_, t)| t - base);
    println!("\n## {title}");
    println!(
        "| {:<44} | {:>10} | {:>10} | {:>14} |",
        "contender", "ns/op", "overhead", "ours/anchor"
    );
    println!("|{:-<46}|{:->12}|{:->12}|{:->16}|", "", "", "", "");
    for (i, (name, t)) in results.iter().enumerate() {
        let over = t - base;
        let ratio = if i == 0 || *name == ours {
            String::from("-")
        } else if over.abs() < 0.05 {
            String::from("(anchor ~0)")
        } else {
            format!("{:.2}", ours_over / over)
        };
        println!("| {name:<44} | {t:>10.2} | {over:>+10.2} | {ratio:>14} |");
    }
}

// ===== futures for the per-poll and spawn rows =====

/// A future that returns `Pending` `n` times (waking itself) before completing: each poll of a
/// wrapper around it costs one context entry and exit.
struct YieldN(u32);

impl Future for YieldN {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        // `black_box` keeps the compiler from collapsing the poll loop into arithmetic.
        if black_box(self.0) == 0 {
            Poll::Ready(())
        } else {
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// Polls `fut` to completion on this thread with a no-op waker; returns the number of polls.
fn drive<F: Future>(fut: F) -> u64 {
    let mut fut = pin!(fut);
    let mut cx = TaskContext::from_waker(Waker::noop());
    let mut polls = 1;
    while fut.as_mut().poll(&mut cx).is_pending() {
        polls += 1;
    }
    polls
}

/// A future padded by one pointer: the size-matched baseline for an inheriting spawn, which adds
/// one pointer to the task.
struct Padded<F> {
    _pad: usize,
    inner: F,
}

impl<F: Future + Unpin> Future for Padded<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

fn main() {
    if std::env::args().any(|a| a == "--diag-raw") {
        // One measurement of the diagnostics rows, for `--diag-ab` (see core_rows.rs).
        return core_rows::diag_raw();
    }
    let smoke = std::env::args().any(|a| a == "--smoke");
    let quick = smoke || std::env::args().any(|a| a == "--quick");
    let settings = Settings {
        rounds: if smoke {
            1
        } else if quick {
            5
        } else {
            21
        },
        batch_ns: if smoke {
            1e5
        } else if quick {
            2e6
        } else {
            1e7
        },
        fixed_batch: None,
    };
    // tracing anchor: a Registry plus a no-op layer (a bare Registry leaks closed spans).
    let subscriber =
        tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new());
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber is set");

    // Warm up (CPU frequency, caches, the allocator) before the first timed row.
    let warm = Instant::now();
    while warm.elapsed().as_millis() < if smoke { 10 } else { 1000 } {
        black_box(OURS.sync_scope(1, || OURS.get()));
    }
    println!("# contextflow side-by-side benchmark");
    println!(
        "rounds: {}, batch: {:.0} ms, medians; overhead = ns/op - bare baseline",
        settings.rounds,
        settings.batch_ns / 1e6
    );

    // `--only NAME[,NAME]` runs the named sections only (get, sync_scope, poll, capture, spawn,
    // entry, depth, log, memory, hooks, diag, spawn_mt).
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|list| list.split(',').map(str::to_string).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    if want("get") {
        bench_get(&settings);
    }
    if want("sync_scope") {
        bench_sync_scope(&settings);
    }
    if want("poll") {
        bench_poll(&settings);
    }
    if want("capture") {
        bench_capture(&settings);
    }
    if want("spawn") {
        bench_spawn(quick, if smoke { 1_000 } else { 100_000 });
    }
    if want("entry") {
        bench_scope_entry_flat(&settings);
    }
    if want("depth") {
        bench_get_depth(&settings);
    }
    if want("log") {
        bench_log_event(&settings);
    }
    if want("memory") {
        core_rows::bench_memory_per_frame(smoke);
    }
    if want("hooks") {
        hook_rows::bench_hooked_runtime(&settings, smoke);
    }
    if want("diag") {
        core_rows::bench_diagnostics(&settings, smoke);
    }
    // Last: registers the tracing and OpenTelemetry carriers for the rest of the process.
    if want("spawn_mt") {
        core_rows::bench_spawn_multi_thread_with_carriers(
            quick,
            if smoke { 1_000 } else { 20_000 },
        );
    }
}

fn bench_get(settings: &Settings) {
    let otel_guard = OtelContext::current_with_value(OtelValue(7)).attach();
    let results = OURS.sync_scope(7, || {
        TASK_LOCAL.sync_scope(7, || {
            measure(
                settings,
                &mut [
                    contender("bare: thread_local! Cell read", |n| {
                        time(n, || {
                            black_box(PLAIN.with(Cell::get));
                        })
                    }),
                    contender("contextflow AsyncLocal::get", |n| {
                        time(n, || {
                            black_box(black_box(&OURS).get());
                        })
                    }),
                    contender("contextflow AsyncLocal::with", |n| {
                        time(n, || {
                            black_box(black_box(&OURS).with(|v| v.copied()));
                        })
                    }),
                    contender("tokio task_local! get", |n| {
                        time(n, || {
                            black_box(TASK_LOCAL.get());
                        })
                    }),
                    contender("opentelemetry Context::map_current get", |n| {
                        time(n, || {
                            black_box(OtelContext::map_current(|cx| {
                                cx.get::<OtelValue>().copied()
                            }));
                        })
                    }),
                ],
            )
        })
    });
    drop(otel_guard);
    report(
        "get: read the current value (1 variable set)",
        &results,
        "contextflow AsyncLocal::get",
    );
    let get = results[1].1 - results[0].1;
    let with = results[2].1 - results[0].1;
    println!(
        "(overhead over a plain thread-local read: get {get:+.2} ns, with {with:+.2} ns; \
         target: within +0.5 ns)"
    );
}

fn bench_sync_scope(settings: &Settings) {
    let results = measure(
        settings,
        &mut [
            contender("bare: call the closure", |n| {
                time(n, || {
                    black_box((black_box(|| 1u64))());
                })
            }),
            contender("contextflow AsyncLocal::sync_scope", |n| {
                time(n, || {
                    black_box(OURS.sync_scope(black_box(1), || 1u64));
                })
            }),
            contender("bare: thread_local! save/set/restore", |n| {
                time(n, || {
                    let prev = PLAIN.with(|c| c.replace(black_box(1)));
                    black_box((black_box(|| 1u64))());
                    PLAIN.with(|c| c.set(prev));
                })
            }),
            contender("tokio task_local! sync_scope", |n| {
                time(n, || {
                    black_box(TASK_LOCAL.sync_scope(black_box(1), || 1u64));
                })
            }),
            contender("opentelemetry with_value + attach", |n| {
                time(n, || {
                    let _g = OtelContext::current_with_value(OtelValue(black_box(1))).attach();
                    black_box(1u64);
                })
            }),
        ],
    );
    report(
        "sync_scope: bind a value around a closure",
        &results,
        "contextflow AsyncLocal::sync_scope",
    );
    println!(
        "(sync_scope / bare thread-local save-set-restore: {:.2}x; target: at most 6x)",
        results[1].1 / results[2].1
    );
}

fn bench_poll(settings: &Settings) {
    const POLLS: u32 = 1000;
    /// Runs about `n` polls as futures of `POLLS + 1` polls each, made by `make`, and returns
    /// the elapsed time scaled to exactly `n` polls, so `measure` reports ns per poll.
    fn polls<F: Future>(n: u64, mut make: impl FnMut() -> F) -> f64 {
        let futures = n.div_ceil(u64::from(POLLS) + 1).max(1);
        let start = Instant::now();
        let mut polls = 0;
        for _ in 0..futures {
            polls += drive(make());
        }
        start.elapsed().as_nanos() as f64 * n as f64 / polls as f64
    }
    let span = tracing::info_span!("request");
    let otel_cx = OtelContext::current_with_value(OtelValue(1));
    let results = measure(
        settings,
        &mut [
            contender("bare: poll a future", |n| {
                polls(n, || YieldN(black_box(POLLS)))
            }),
            contender("contextflow AsyncLocal::scope future", |n| {
                polls(n, || OURS.scope(1, YieldN(black_box(POLLS))))
            }),
            contender("contextflow WithContext (spawned task)", |n| {
                use contextflow::FutureExt as _;
                OURS.sync_scope(1, || {
                    polls(n, || YieldN(black_box(POLLS)).in_current_context())
                })
            }),
            contender("tokio task_local! scope future", |n| {
                polls(n, || TASK_LOCAL.scope(1, YieldN(black_box(POLLS))))
            }),
            contender("opentelemetry FutureExt::with_context", |n| {
                polls(n, || YieldN(black_box(POLLS)).with_context(otel_cx.clone()))
            }),
            contender("tracing Instrument (Registry + no-op layer)", |n| {
                polls(n, || YieldN(black_box(POLLS)).instrument(span.clone()))
            }),
        ],
    );
    report(
        "per poll: enter and leave the context around one poll",
        &results,
        "contextflow AsyncLocal::scope future",
    );
}

fn bench_capture(settings: &Settings) {
    let otel_guard = OtelContext::current_with_value(OtelValue(7)).attach();
    let span = tracing::info_span!("request");
    let span_guard = span.enter();
    let results = OURS.sync_scope(7, || {
        measure(
            settings,
            &mut [
                contender("bare: thread_local! Cell read", |n| {
                    time(n, || {
                        black_box(PLAIN.with(Cell::get));
                    })
                }),
                contender("contextflow Snapshot::capture (+drop)", |n| {
                    time(n, || {
                        black_box(Snapshot::capture());
                    })
                }),
                contender("contextflow Snapshot::capture_inheritable", |n| {
                    time(n, || {
                        black_box(Snapshot::capture_inheritable());
                    })
                }),
                contender("opentelemetry Context::current (+drop)", |n| {
                    time(n, || {
                        black_box(OtelContext::current());
                    })
                }),
                contender("tracing Span::current (+drop)", |n| {
                    time(n, || {
                        black_box(tracing::Span::current());
                    })
                }),
            ],
        )
    });
    drop(span_guard);
    drop(otel_guard);
    report(
        "capture: take the current context to carry it elsewhere",
        &results,
        "contextflow Snapshot::capture (+drop)",
    );
}

fn bench_spawn(quick: bool, tasks: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let span = tracing::info_span!("request");
    // Each contender spawns and awaits `tasks` tasks from inside a request context; the runner
    // returns the elapsed time for `n` batches.
    let mut spawn_batch = |n: u64, kind: u8| -> f64 {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                let mut handles = Vec::with_capacity(tasks as usize);
                for _ in 0..tasks {
                    handles.push(match kind {
                        0 => tokio::spawn(Padded {
                            _pad: 0,
                            inner: std::future::ready(()),
                        }),
                        1 => OURS.sync_scope(1, || contextflow::spawn(std::future::ready(()))),
                        2 => {
                            let v = TASK_LOCAL.get();
                            tokio::spawn(TASK_LOCAL.scope(v, std::future::ready(())))
                        }
                        3 => tokio::spawn(std::future::ready(()).with_current_context()),
                        _ => tokio::spawn(std::future::ready(()).in_current_span()),
                    });
                }
                for h in handles {
                    h.await.expect("the task completes");
                }
            }
            start.elapsed().as_nanos() as f64
        })
    };
    let otel_cx = OtelContext::current_with_value(OtelValue(1));
    let spawn_settings = Settings {
        rounds: if quick { 3 } else { 11 },
        batch_ns: 0.0,
        fixed_batch: Some(1),
    };
    let run = std::cell::RefCell::new(&mut spawn_batch);
    let results = {
        let make = |kind: u8| {
            let otel_cx = otel_cx.clone();
            let span = span.clone();
            let run = &run;
            move |n: u64| {
                let _otel = otel_cx.clone().attach();
                let _span = span.enter();
                let t = TASK_LOCAL.sync_scope(1, || (run.borrow_mut())(n, kind));
                t / tasks as f64
            }
        };
        let mut contenders = [
            contender("bare: tokio::spawn (size-matched, +1 pointer)", make(0)),
            contender("contextflow::spawn", make(1)),
            contender("tokio task_local! re-scoped in the child", make(2)),
            contender("opentelemetry with_current_context", make(3)),
            contender("tracing in_current_span", make(4)),
        ];
        measure(&spawn_settings, &mut contenders)
    };
    report(
        "spawn: inheriting spawn + await, per task (100k tasks per batch, current_thread)",
        &results,
        "contextflow::spawn",
    );
}

fn bench_scope_entry_flat(settings: &Settings) {
    let others: Vec<AsyncLocal<u64>> = (0..100).map(|_| AsyncLocal::new()).collect();
    let mut results = Vec::new();
    for k in [0usize, 10, 100] {
        let guards: Vec<_> = others[..k].iter().map(|v| v.enter(1)).collect();
        let r = measure(
            settings,
            &mut [
                contender("bare", |n| {
                    time(n, || {
                        black_box((black_box(|| 1u64))());
                    })
                }),
                contender("contextflow sync_scope", |n| {
                    time(n, || {
                        black_box(OURS.sync_scope(black_box(1), || 1u64));
                    })
                }),
                contender("contextflow scope future (1 poll)", |n| {
                    time(n, || {
                        black_box(drive(OURS.scope(black_box(1), std::future::ready(()))));
                    })
                }),
            ],
        );
        drop(guards);
        results.push((k, r));
    }
    println!("\n## scope entry with 0 / 10 / 100 other variables set (ns/op, ratio to 0)");
    println!(
        "| {:<34} | {:>8} | {:>8} | {:>8} | {:>10} | {:>10} |",
        "contender", "0", "10", "100", "10 / 0", "100 / 0"
    );
    println!(
        "|{:-<36}|{:->10}|{:->10}|{:->10}|{:->12}|{:->12}|",
        "", "", "", "", "", ""
    );
    for i in 1..3 {
        let name = results[0].1[i].0;
        let t: Vec<f64> = results.iter().map(|(_, r)| r[i].1).collect();
        println!(
            "| {name:<34} | {:>8.2} | {:>8.2} | {:>8.2} | {:>10.2} | {:>10.2} |",
            t[0],
            t[1],
            t[2],
            t[1] / t[0],
            t[2] / t[0]
        );
    }
}

fn bench_get_depth(settings: &Settings) {
    /// Runs `f` with each of `vars` bound by a nested `sync_scope` (scopes, the common case).
    fn nested(vars: &[AsyncLocal<u64>], f: &mut dyn FnMut() -> f64) -> f64 {
        match vars.split_first() {
            None => f(),
            Some((var, rest)) => var.sync_scope(1, || nested(rest, f)),
        }
    }
    let others: Vec<AsyncLocal<u64>> = (0..100).map(|_| AsyncLocal::new()).collect();
    println!("\n## get with 0 / 10 / 100 other variables bound after it (ns/op, ratio to 0)");
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} | {:>10} | {:>10} |",
        "contender", "0", "10", "100", "10 / 0", "100 / 0"
    );
    println!(
        "|{:-<46}|{:->10}|{:->10}|{:->10}|{:->12}|{:->12}|",
        "", "", "", "", "", ""
    );
    let get = |n: u64| {
        time(n, || {
            black_box(black_box(&OURS).get());
        })
    };
    for (name, by_guards) in [
        ("AsyncLocal::get, later bindings by scopes", false),
        ("AsyncLocal::get, later bindings by enter guards", true),
    ] {
        let mut row = Vec::new();
        for k in [0usize, 10, 100] {
            let t = OURS.sync_scope(7, || {
                let mut run = || measure(settings, &mut [contender("get", get)])[0].1;
                if by_guards {
                    let guards: Vec<_> = others[..k].iter().map(|v| v.enter(1)).collect();
                    let t = run();
                    drop(guards);
                    t
                } else {
                    nested(&others[..k], &mut run)
                }
            });
            row.push(t);
        }
        println!(
            "| {:<44} | {:>8.2} | {:>8.2} | {:>8.2} | {:>10.2} | {:>10.2} |",
            name,
            row[0],
            row[1],
            row[2],
            row[1] / row[0],
            row[2] / row[0]
        );
    }
    println!(
        "(target: 100 / 0 at most 2.00; under an enter guard every read also takes and drops a \
         reference, since the guard could be dropped inside the read)"
    );
}

/// Cost of one log event carrying 3 request fields, written to a sink: contextflow fields
/// (read from the context by `contextflow-tracing`'s formatter) against the usual approach
/// (the fields recorded on an entered request span, as a tower-http `TraceLayer` span would).
fn bench_log_event(settings: &Settings) {
    use contextflow_tracing::ContextFields;
    use tracing_subscriber::fmt::format;

    static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
    static USER_ID: AsyncLocal<u64> = AsyncLocal::named("user_id");

    fn fields() -> ContextFields {
        ContextFields::new()
            .field("request_id", &REQUEST_ID)
            .field("tenant", &TENANT)
            .field("user_id", &USER_ID)
    }
    fn text() -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .event_format(format().without_time())
            .finish()
            .into()
    }
    fn text_ctx() -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .event_format(fields().text(format().without_time()))
            .finish()
            .into()
    }
    fn text_ctx_escaped() -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .fmt_fields(fields().escaped_fields())
            .event_format(fields().text(format().without_time()))
            .finish()
            .into()
    }
    fn json() -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .json()
            .without_time()
            .with_writer(std::io::sink)
            .finish()
            .into()
    }
    fn json_ctx() -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .json()
            .without_time()
            .with_writer(std::io::sink)
            .map_event_format(|f| fields().json(f))
            .finish()
            .into()
    }
    // One event per iteration, under `dispatch`, with no request fields at all.
    let bare = |dispatch: tracing::Dispatch| {
        move |n: u64| {
            tracing::dispatcher::with_default(&dispatch, || {
                time(n, || tracing::info!(i = 1, "Order creation started"))
            })
        }
    };
    // ... inside an entered request span that holds the 3 fields.
    let on_span = |dispatch: tracing::Dispatch| {
        move |n: u64| {
            tracing::dispatcher::with_default(&dispatch, || {
                let span = tracing::info_span!(
                    "request",
                    request_id = "req-123456",
                    tenant = "acme",
                    user_id = 42
                );
                let _entered = span.enter();
                time(n, || tracing::info!(i = 1, "Order creation started"))
            })
        }
    };
    // ... inside the 3 contextflow scopes, the formatter reading them.
    let in_context = |dispatch: tracing::Dispatch| {
        move |n: u64| {
            tracing::dispatcher::with_default(&dispatch, || {
                REQUEST_ID.sync_scope("req-123456".into(), || {
                    TENANT.sync_scope("acme".into(), || {
                        USER_ID.sync_scope(42, || {
                            time(n, || tracing::info!(i = 1, "Order creation started"))
                        })
                    })
                })
            })
        }
    };
    // The other sinks' way: `ContextFields::layer` re-issues each event with the fields added
    // (here around fmt's JSON layer, which then prints them under "fields").
    fn json_layer() -> tracing::Dispatch {
        use tracing_subscriber::prelude::*;
        let json = tracing_subscriber::fmt::layer()
            .json()
            .without_time()
            .with_writer(std::io::sink);
        tracing_subscriber::registry()
            .with(fields().layer(json))
            .into()
    }
    for (title, plain, ctx, extra) in [
        (
            "text",
            text as fn() -> tracing::Dispatch,
            text_ctx as fn() -> tracing::Dispatch,
            (
                "3 contextflow fields + EscapedFields",
                text_ctx_escaped as fn() -> tracing::Dispatch,
            ),
        ),
        (
            "JSON",
            json,
            json_ctx,
            ("3 contextflow fields via ContextLayer", json_layer),
        ),
    ] {
        let results = measure(
            settings,
            &mut [
                contender("bare: event with no request fields", bare(plain())),
                contender("3 fields on an entered request span", on_span(plain())),
                contender(
                    "3 contextflow fields (contextflow-tracing)",
                    in_context(ctx()),
                ),
                contender(extra.0, in_context(extra.1())),
            ],
        );
        report(
            &format!("log event with 3 request fields, {title}, to a sink"),
            &results,
            "3 contextflow fields (contextflow-tracing)",
        );
        println!(
            "(ns per event, contextflow fields / span fields: {:.2})",
            results[2].1 / results[1].1
        );
    }
}
