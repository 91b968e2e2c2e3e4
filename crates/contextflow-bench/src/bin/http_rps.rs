//! Requests per second of an axum hello-world behind different middleware stacks, measured by
//! `wrk` from a second process over loopback, interleaved round by round, medians reported as
//! ratios to the bare server.
//!
//! Run with: `cargo run --release -p contextflow-bench --bin http-rps`
//! (options: `--rounds N`, `--duration SECS`, `--connections N`; needs `wrk` on the PATH:
//! `apt-get install wrk`).
//!
//! Each server runs in its own child process (this binary with `--serve VARIANT`) on a
//! one-worker runtime, so that the server and the load generator get a core each.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use axum::{routing::get, Router};
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};
use tracing_subscriber::layer::SubscriberExt as _;

/// The middleware stacks compared, in table order; the first is the baseline.
const VARIANTS: &[(&str, &str)] = &[
    ("bare", "axum hello-world, no middleware"),
    (
        "tower-http",
        "tower-http SetRequestId + PropagateRequestId + TraceLayer",
    ),
    (
        "contextflow",
        "contextflow-http PropagateContextLayer (handler reads ids)",
    ),
    (
        "contextflow+trace",
        "contextflow-http PropagateContextLayer + TraceLayer",
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let variant = args.get(i + 1).expect("--serve takes a variant name");
        serve(variant);
        return;
    }
    let opt = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let rounds = opt("--rounds", 5);
    let duration = opt("--duration", 5);
    let connections = opt("--connections", 64);
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk is not installed (apt-get install wrk): skipping the HTTP benchmark");
        return;
    }
    println!("# HTTP requests per second (wrk -t1 -c{connections} -d{duration}s, {rounds} rounds, medians)");
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (i, (variant, _)) in VARIANTS.iter().enumerate() {
            let rps = measure(variant, duration, connections);
            eprintln!("round {round}: {variant}: {rps:.0} req/s");
            samples[i].push(rps);
        }
    }
    let medians: Vec<f64> = samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(|a, b| a.total_cmp(b));
            s[s.len() / 2]
        })
        .collect();
    println!("| {:<62} | {:>10} | {:>9} |", "stack", "req/s", "vs bare");
    println!("|{:-<64}|{:->12}|{:->11}|", "", "", "");
    for ((_, desc), rps) in VARIANTS.iter().zip(&medians) {
        let delta = (rps / medians[0] - 1.0) * 100.0;
        println!("| {desc:<62} | {rps:>10.0} | {delta:>+8.1}% |");
    }
}

/// Starts a server process for `variant`, loads it with wrk, returns requests per second.
fn measure(variant: &str, duration: u64, connections: u64) -> f64 {
    let mut server = Command::new(std::env::current_exe().expect("own path"))
        .args(["--serve", variant])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the server prints its address");
    let addr = line.trim().to_string();
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{duration}s"),
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            &format!("http://{addr}/"),
        ])
        .output()
        .expect("run wrk");
    let _ = server.kill();
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

/// The hello-world handler, reading the ids from the context as real handlers would.
async fn contextflow_handler() -> &'static str {
    std::hint::black_box((
        contextflow_http::current_request_id(),
        contextflow_http::current_trace_id(),
    ));
    "Hello, World!"
}

/// Runs the server for `variant` on 127.0.0.1 (an ephemeral port, printed on stdout).
fn serve(variant: &str) {
    // Every variant runs under the same subscriber: a Registry plus a no-op layer, so spans are
    // really created but nothing is printed.
    let subscriber =
        tracing_subscriber::registry().with(tracing_subscriber::layer::Identity::new());
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let app = Router::new().route("/", get(|| async { "Hello, World!" }));
        let app = match variant {
            "bare" => app,
            "tower-http" => app.layer(
                ServiceBuilder::new()
                    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                    .layer(TraceLayer::new_for_http())
                    .layer(PropagateRequestIdLayer::x_request_id()),
            ),
            "contextflow" => Router::new()
                .route("/", get(contextflow_handler))
                .layer(contextflow_http::PropagateContextLayer::new()),
            "contextflow+trace" => Router::new().route("/", get(contextflow_handler)).layer(
                ServiceBuilder::new()
                    .layer(contextflow_http::PropagateContextLayer::new())
                    .layer(TraceLayer::new_for_http()),
            ),
            other => panic!("unknown variant {other}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        println!("{}", listener.local_addr().expect("bound"));
        axum::serve(listener, app).await.expect("serve");
    });
}
