//! Core rows added for issue 8: memory per live frame, and an inheriting spawn on a 2-worker
//! `multi_thread` runtime with the tracing and OpenTelemetry carriers registered.

use std::{hint::black_box, time::Instant};

use contextflow::{AsyncLocal, Snapshot};
use opentelemetry::Context as OtelContext;

use crate::{contender, measure, report, Padded, Settings};

static REQUEST_ID: AsyncLocal<u64> = AsyncLocal::named("request_id");
static NAME: AsyncLocal<String> = AsyncLocal::named("name");

/// Resident memory of this process, in bytes (Linux `/proc/self/statm`).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Bytes of resident memory per live item when `n` items made by `make` are alive at once.
fn bytes_per_item<T>(n: usize, mut make: impl FnMut(usize) -> T) -> f64 {
    let before = rss().unwrap_or(0);
    let items: Vec<T> = (0..n).map(&mut make).collect();
    let after = rss().unwrap_or(0);
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    black_box(&items);
    drop(items);
    per - std::mem::size_of::<T>() as f64
}

/// Memory per live frame: a snapshot of a frame holding one binding, kept alive (as a spawned
/// task or a queued message would keep it), without the snapshot's own pointer.
pub(crate) fn bench_memory_per_frame(smoke: bool) {
    let n = if smoke { 10_000 } else { 1_000_000 };
    let u64_frame = bytes_per_item(n, |i| REQUEST_ID.sync_scope(i as u64, Snapshot::capture));
    let string_frame = bytes_per_item(n, |i| NAME.sync_scope(i.to_string(), Snapshot::capture));
    let two_bindings = bytes_per_item(n, |i| {
        REQUEST_ID.sync_scope(i as u64, || {
            NAME.sync_scope(String::new(), Snapshot::capture)
        })
    });
    let otel = bytes_per_item(n, |i| OtelContext::new().with_value(OtelValue(i as u64)));
    println!("\n## memory per live frame ({n} alive at once, resident bytes per frame)");
    println!("| {:<52} | {:>10} |", "frame", "bytes");
    println!("|{:-<54}|{:->12}|", "", "");
    for (name, bytes) in [
        ("contextflow: one u64 binding (Snapshot)", u64_frame),
        ("contextflow: one String binding (Snapshot)", string_frame),
        (
            "contextflow: u64 + String, two bindings (Snapshot)",
            two_bindings,
        ),
        ("opentelemetry Context with one value", otel),
    ] {
        println!("| {name:<52} | {bytes:>10.0} |");
    }
}

#[derive(Clone, Copy, Debug)]
struct OtelValue(#[allow(dead_code)] u64);

/// An inheriting spawn + await on a 2-worker `multi_thread` runtime, from inside a request
/// (a tracing span entered, an OpenTelemetry context attached, a request id bound), with the
/// tracing and OpenTelemetry carriers registered, against a size-matched plain `tokio::spawn`.
pub(crate) fn bench_spawn_multi_thread_with_carriers(quick: bool, tasks: u64) {
    contextflow_tracing::carry_spans();
    contextflow_otel::carry_context();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("a multi-thread runtime");
    let span = tracing::info_span!("request");
    let otel_cx = opentelemetry::Context::current_with_value(OtelValue(1));
    let run = |kind: u8| {
        let span = span.clone();
        let otel_cx = otel_cx.clone();
        let rt = &rt;
        move |n: u64| -> f64 {
            let (span, otel_cx) = (span.clone(), otel_cx.clone());
            let elapsed = rt.block_on(async {
                // Spawned from a task (not the `block_on` future), as a request handler would.
                tokio::spawn(async move {
                    let _otel = otel_cx.attach();
                    let _span = span.enter();
                    REQUEST_ID.sync_scope(7, || {
                        let start = Instant::now();
                        let mut handles = Vec::with_capacity(tasks as usize);
                        for _ in 0..n * tasks {
                            handles.push(match kind {
                                0 => tokio::spawn(Padded {
                                    _pad: 0,
                                    inner: std::future::ready(()),
                                }),
                                _ => contextflow::spawn(std::future::ready(())),
                            });
                        }
                        (start, handles)
                    })
                })
                .await
                .map(|(start, handles)| async move {
                    for h in handles {
                        h.await.expect("the task completes");
                    }
                    start.elapsed().as_nanos() as f64
                })
                .expect("the spawner completes")
                .await
            });
            elapsed / tasks as f64
        }
    };
    let settings = Settings {
        rounds: if quick { 3 } else { 11 },
        batch_ns: 0.0,
        fixed_batch: Some(1),
    };
    let results = measure(
        &settings,
        &mut [
            contender("bare: tokio::spawn (size-matched, +1 pointer)", run(0)),
            contender("contextflow::spawn (tracing + OTel carriers)", run(1)),
        ],
    );
    report(
        &format!(
            "spawn: inheriting spawn + await, per task ({tasks} tasks per batch, 2-worker \
             multi_thread, tracing and OTel carriers registered)"
        ),
        &results,
        "contextflow::spawn (tracing + OTel carriers)",
    );
}

// ===== diagnostics (issue 11): the hot paths with the feature on and off =====

/// Variables of the diagnostics rows: one bound, one never bound (a read that misses).
static DIAG_BOUND: AsyncLocal<u64> = AsyncLocal::named("request_id");
static DIAG_MISS: AsyncLocal<u64> = AsyncLocal::named("tenant");

/// Whether this binary's core was built with the feature `diagnostics`.
const DIAGNOSTICS: bool = cfg!(feature = "diagnostics");

/// The hot paths, measured in this process: (row, median ns/op). The first row is the bare
/// baseline (a thread-local read).
fn diag_hot_paths(settings: &Settings) -> Vec<(&'static str, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let rt = &rt;
    DIAG_BOUND.sync_scope(7, || {
        measure(
            settings,
            &mut [
                contender("bare: thread_local! Cell read", |n| {
                    crate::time(n, || {
                        black_box(crate::PLAIN.with(std::cell::Cell::get));
                    })
                }),
                contender("get (bound)", |n| {
                    crate::time(n, || {
                        black_box(black_box(&DIAG_BOUND).get());
                    })
                }),
                contender("get (not bound: a miss)", |n| {
                    crate::time(n, || {
                        black_box(black_box(&DIAG_MISS).get());
                    })
                }),
                contender("sync_scope", |n| {
                    crate::time(n, || {
                        black_box(DIAG_BOUND.sync_scope(black_box(1), || 1u64));
                    })
                }),
                contender("scope future, made and polled once", |n| {
                    crate::time(n, || {
                        black_box(crate::drive(DIAG_BOUND.scope(black_box(1), async { 1u64 })));
                    })
                }),
                contender("contextflow::spawn + await (current_thread)", |n| {
                    let start = Instant::now();
                    rt.block_on(DIAG_BOUND.scope(1, async move {
                        for _ in 0..n {
                            contextflow::spawn(async {}).await.expect("no panic");
                        }
                    }));
                    start.elapsed().as_nanos() as f64
                }),
                contender(
                    "spawn_without_context + await, 1 variable left behind",
                    |n| {
                        let start = Instant::now();
                        rt.block_on(DIAG_BOUND.scope(1, async move {
                            for _ in 0..n {
                                contextflow::spawn_without_context(async {})
                                    .await
                                    .expect("no panic");
                            }
                        }));
                        start.elapsed().as_nanos() as f64
                    },
                ),
            ],
        )
    })
}

/// The `diag` rows. By themselves they measure this build only; with `--diag-ab OTHER`, where
/// OTHER is this binary built with the other setting of the feature `diagnostics`, both
/// binaries run `--diag-raw` in turn, round after round, and the table puts them side by side
/// with ratios (see the crate's README for the commands).
pub(crate) fn bench_diagnostics(settings: &Settings, smoke: bool) {
    let other = std::env::args().skip_while(|a| a != "--diag-ab").nth(1);
    let Some(other) = other else {
        let results = diag_hot_paths(settings);
        println!(
            "\n## diagnostics: hot paths of this build (feature `diagnostics` {})",
            if DIAGNOSTICS { "on" } else { "off" }
        );
        print_rows(&results);
        if !smoke {
            println!(
                "(for both builds side by side: see \"Diagnostics\" in this crate's README; \
                 `-- --only diag --diag-ab <the other build>`)"
            );
        }
        return;
    };
    let rounds = if smoke { 1 } else { 9 };
    let me = std::env::current_exe().expect("this binary's path");
    let mut ours: Vec<Vec<(String, f64)>> = Vec::new();
    let mut theirs: Vec<Vec<(String, f64)>> = Vec::new();
    let mut their_build = String::new();
    for _ in 0..rounds {
        ours.push(raw_run(&me).1);
        let (build, rows) = raw_run(std::path::Path::new(&other));
        their_build = build;
        theirs.push(rows);
    }
    let (on, off, on_is_ours) = match (DIAGNOSTICS, their_build.as_str()) {
        (true, "off") => (&ours, &theirs, true),
        (false, "on") => (&theirs, &ours, false),
        _ => panic!(
            "--diag-ab wants the other build (this one: diagnostics {}; the other: {their_build})",
            if DIAGNOSTICS { "on" } else { "off" }
        ),
    };
    println!(
        "\n## diagnostics: the hot paths with the feature on and off ({rounds} rounds, the two \
         binaries alternating; medians; this binary is the {} build)",
        if on_is_ours { "\"on\"" } else { "\"off\"" }
    );
    println!(
        "| {:<56} | {:>9} | {:>9} | {:>8} |",
        "row (ns/op)", "off", "on", "on/off"
    );
    println!("|{:-<58}|{:->11}|{:->11}|{:->10}|", "", "", "", "");
    let names: Vec<String> = on[0].iter().map(|(n, _)| n.clone()).collect();
    for (i, name) in names.iter().enumerate() {
        let median = |runs: &Vec<Vec<(String, f64)>>| {
            let mut v: Vec<f64> = runs.iter().map(|r| r[i].1).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (off_ns, on_ns) = (median(off), median(on));
        println!(
            "| {name:<56} | {off_ns:>9.2} | {on_ns:>9.2} | {:>8.2} |",
            on_ns / off_ns
        );
    }
}

/// Prints `results` as rows of ns/op and overhead over the first (bare) row.
fn print_rows(results: &[(&'static str, f64)]) {
    let base = results[0].1;
    println!("| {:<56} | {:>9} | {:>9} |", "row", "ns/op", "overhead");
    println!("|{:-<58}|{:->11}|{:->11}|", "", "", "");
    for (name, t) in results {
        println!("| {name:<56} | {t:>9.2} | {:>+9.2} |", t - base);
    }
}

/// `--diag-raw`: measures the hot paths once (3 rounds of ~2 ms batches after a short warm-up)
/// and prints them for the `--diag-ab` driver, one `DIAG <ns> <row>` line each.
pub(crate) fn diag_raw() {
    let warm = Instant::now();
    while warm.elapsed().as_millis() < 200 {
        black_box(DIAG_BOUND.sync_scope(1, || DIAG_BOUND.get()));
    }
    let settings = Settings {
        rounds: 3,
        batch_ns: 2e6,
        fixed_batch: None,
    };
    println!("DIAG-BUILD {}", if DIAGNOSTICS { "on" } else { "off" });
    for (name, ns) in diag_hot_paths(&settings) {
        println!("DIAG {ns} {name}");
    }
}

/// Runs `binary --diag-raw`; returns its build ("on"/"off") and rows.
fn raw_run(binary: &std::path::Path) -> (String, Vec<(String, f64)>) {
    let out = std::process::Command::new(binary)
        .arg("--diag-raw")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    assert!(
        out.status.success(),
        "{} --diag-raw failed",
        binary.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut build = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(b) = line.strip_prefix("DIAG-BUILD ") {
            build = b.to_string();
        } else if let Some(rest) = line.strip_prefix("DIAG ") {
            let (ns, name) = rest.split_once(' ').expect("DIAG <ns> <row>");
            rows.push((name.to_string(), ns.parse().expect("a number")));
        }
    }
    (build, rows)
}
