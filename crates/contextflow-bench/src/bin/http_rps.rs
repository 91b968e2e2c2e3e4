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
//!
//! `--instructions` measures instructions per request instead, which is deterministic where
//! requests per second vary by 15% from one round to the next: each server runs under
//! `valgrind --tool=callgrind`, gets 2,000 warm-up requests, then `callgrind_control --zero`,
//! `--requests N` requests (default 10,000) over one keep-alive connection, and
//! `callgrind_control --dump`; the dump's total instruction count divided by N is the cost of
//! a request, server side (needs `valgrind`). `--only VARIANT` measures one stack (and the
//! bare baseline); `--keep` keeps the dumps (`$TMPDIR/http-rps-VARIANT.callgrind.1`) for
//! `callgrind_annotate`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
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
        "identity",
        "tower's Identity layer (what axum's `layer` costs by itself)",
    ),
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
    (
        "contextflow+span",
        "contextflow-http PropagateContextLayer + a recorded SDK server span",
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
    if args.iter().any(|a| a == "--instructions") {
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .cloned();
        let keep = args.iter().any(|a| a == "--keep");
        instructions(opt("--requests", 10_000), only.as_deref(), keep);
        return;
    }
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
    let addr = read_addr(&mut server);
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

/// Instructions per request of each variant under callgrind (see the module docs).
fn instructions(requests: u64, only: Option<&str>, keep: bool) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed (apt-get install valgrind): skipping");
        return;
    }
    println!("# HTTP server instructions per request (callgrind, {requests} requests after 2000 warm-up, one keep-alive connection)");
    let variants: Vec<(&str, &str)> = VARIANTS
        .iter()
        .enumerate()
        .filter(|(i, (v, _))| *i == 0 || only.is_none_or(|o| o == *v))
        .map(|(_, &pair)| pair)
        .collect();
    let mut counts = Vec::new();
    for (variant, _) in &variants {
        let per_request = callgrind(variant, requests, keep);
        eprintln!("{variant}: {per_request:.0} instructions/request");
        counts.push(per_request);
    }
    println!(
        "| {:<62} | {:>12} | {:>10} |",
        "stack", "instr/req", "over bare"
    );
    println!("|{:-<64}|{:->14}|{:->12}|", "", "", "");
    for ((_, desc), n) in variants.iter().zip(&counts) {
        println!("| {desc:<62} | {n:>12.0} | {:>+10.0} |", n - counts[0]);
    }
}

/// Runs `variant` under callgrind and returns its instructions per request.
fn callgrind(variant: &str, requests: u64, keep: bool) -> f64 {
    let out_file = std::env::temp_dir().join(format!("http-rps-{variant}.callgrind"));
    let _ = std::fs::remove_file(&out_file);
    let mut server = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            &format!("--callgrind-out-file={}", out_file.display()),
        ])
        .arg(std::env::current_exe().expect("own path"))
        .args(["--serve", variant])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start valgrind");
    let addr = read_addr(&mut server);
    let mut conn = Connection::open(&addr);
    for _ in 0..2000 {
        conn.get();
    }
    let pid = server.id().to_string();
    control(&["--zero", &pid]);
    for _ in 0..requests {
        conn.get();
    }
    control(&["--dump", &pid]);
    let _ = server.kill();
    let _ = server.wait();
    // The requested dump is `<out file>.1`; its `totals:` line is the instruction count since
    // the counters were zeroed (the final dump at exit, `<out file>`, is ignored).
    let dump = out_file.with_extension("callgrind.1");
    let text = std::fs::read_to_string(&dump).expect("read the dump");
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("a totals line");
    if keep {
        eprintln!("kept {}", dump.display());
    } else {
        let _ = std::fs::remove_file(&dump);
    }
    let _ = std::fs::remove_file(&out_file);
    total as f64 / requests as f64
}

fn control(args: &[&str]) {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run callgrind_control");
    assert!(status.success(), "callgrind_control {args:?} failed");
}

fn read_addr(server: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the server prints its address");
    line.trim().to_string()
}

/// A minimal HTTP/1.1 keep-alive client: one request at a time, the same headers as wrk's.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to the server");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Connection {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    fn get(&mut self) {
        self.stream
            .write_all(
                b"GET / HTTP/1.1\r\nHost: bench\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
            )
            .expect("send");
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).expect("receive");
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    return;
                }
            }
        }
    }
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
            "identity" => app.layer(tower::layer::util::Identity::new()),
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
            "contextflow+span" => {
                // A real SDK provider: spans are recorded (attributes, events), then dropped
                // by the absence of an exporter, so only the cost of making them is measured.
                let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_id_generator(contextflow_otel::SecureIdGenerator::default())
                    .build();
                opentelemetry::global::set_tracer_provider(provider);
                Router::new()
                    .route("/", get(contextflow_handler))
                    .layer(contextflow_http::PropagateContextLayer::new())
            }
            other => panic!("unknown variant {other}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        println!("{}", listener.local_addr().expect("bound"));
        axum::serve(listener, app).await.expect("serve");
    });
}
