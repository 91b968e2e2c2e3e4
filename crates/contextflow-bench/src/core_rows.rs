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
