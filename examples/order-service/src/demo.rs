//! The demo: many concurrent orders against an in-process service, then a check of every log
//! line it wrote.
//!
//! Each client request sends its own `x-request-id`, a `traceparent` with a fresh trace id, the
//! token of one of three tenants and an order with its own reference. Every captured log line
//! that names a request id must then name one that was sent, with that request's trace id, its
//! tenant (where the line has one) and its order reference (where the line has one, as an
//! event field or in its span path). A line that fails is a *mismatch*: context that leaked
//! from one request into another.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use crate::{
    app::{self, Config},
    context::{TraceContext, TENANT},
    db::{Backend, OrderRepository},
    http::{auth::DEMO_TOKENS, TokenTable},
    logging::{self, LogCapture, LogFormat},
    service::{NewOrder, NewOrderItem},
};

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How many orders (default 2,000).
    pub orders: usize,
    /// How many requests in flight at most (default 64).
    pub concurrency: usize,
    /// The service's log format.
    pub format: LogFormat,
    /// The database; `None` for a fresh SQLite file, removed afterwards.
    pub database_url: Option<String>,
    /// Whether to draw a progress bar on stderr.
    pub progress: bool,
    /// Where to save every captured log line, if anywhere.
    pub log_file: Option<std::path::PathBuf>,
}

/// What the demo saw.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Orders sent.
    pub requests: usize,
    /// Requests answered `201 Created`.
    pub created: usize,
    /// Requests that failed (other status, transport error).
    pub failed: usize,
    /// Every log line captured.
    pub log_lines: usize,
    /// Lines that name no request (start-up).
    pub lines_without_request: usize,
    /// Lines whose order reference was checked.
    pub lines_with_reference: usize,
    /// Lines whose context does not belong to their request (must be 0).
    pub mismatches: usize,
    /// A few of them, for the report.
    pub mismatch_examples: Vec<String>,
    /// Requests whose confirmation job logged "confirmation sent" under their id.
    pub jobs_logged: usize,
    /// Requests whose payment the stub logged under their id and trace.
    pub payments_logged: usize,
    /// Requests whose `order.confirmed` event the queue consumer logged under their id and trace.
    pub events_logged: usize,
    /// Orders of this run found paid in the database.
    pub committed: i64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Which database.
    pub backend: Backend,
    /// The log format.
    pub format: LogFormat,
    /// The concurrency used.
    pub concurrency: usize,
    /// One request's path, drawn as a tree.
    pub tree: String,
}

/// What one request is expected to produce in the logs.
#[derive(Clone, Debug)]
struct Expected {
    reference: String,
    trace_id: String,
    tenant: String,
}

/// One client request's outcome.
struct Outcome {
    latency: Duration,
    created: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            orders: 2_000,
            concurrency: 64,
            format: LogFormat::Text,
            database_url: None,
            progress: true,
            log_file: None,
        }
    }
}

/// Runs the demo: installs the global log capture, starts the service, fires the orders,
/// waits for the background jobs, and checks the logs and the database.
///
/// # Errors
/// When a global `tracing` subscriber is already installed, or the service cannot start.
pub async fn run(
    opts: DemoOptions,
) -> Result<DemoReport, Box<dyn std::error::Error + Send + Sync>> {
    let capture = LogCapture::new();
    logging::init(opts.format, capture.clone())?;

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let temp_db = opts.database_url.is_none().then(|| {
        let dir = std::env::temp_dir().join("order-service");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("demo-{run_id}.db"))
    });
    let database_url = match (&opts.database_url, &temp_db) {
        (Some(url), _) => url.clone(),
        (None, Some(path)) => app::sqlite_url(path),
        (None, None) => unreachable!("a temp file is chosen when no URL is given"),
    };
    let service = app::start(Config {
        database_url,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens: TokenTable::demo(),
    })
    .await?;
    let backend = service.state.db.backend();
    // Every line after these belongs to some request: one of ours without a request id has
    // lost its context.
    let startup_lines = capture.len();

    // ----- the load -----
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!("http://{}", service.addr);
    let mut expected = HashMap::with_capacity(opts.orders);
    let mut set = JoinSet::new();
    let mut outcomes = Vec::with_capacity(opts.orders);
    let mut progress = Progress::new(opts.orders, opts.progress);
    let started = Instant::now();
    let mut next = 0;
    while next < opts.orders || !set.is_empty() {
        while next < opts.orders && set.len() < opts.concurrency.max(1) {
            let (token, tenant) = DEMO_TOKENS[next % DEMO_TOKENS.len()];
            let request_id = format!("demo-{run_id}-{next:05}");
            let trace = TraceContext::new_trace(true);
            let order = demo_order(&run_id, next);
            expected.insert(
                request_id.clone(),
                Expected {
                    reference: order.reference.clone(),
                    trace_id: trace.trace_id().to_string(),
                    tenant: tenant.to_string(),
                },
            );
            let request = client
                .post(format!("{base}/orders"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-request-id", request_id)
                .header("traceparent", trace.traceparent().to_header_value())
                .json(&order);
            set.spawn(async move {
                let sent = Instant::now();
                let created = match request.send().await {
                    Ok(response) => response.status() == reqwest::StatusCode::CREATED,
                    Err(_) => false,
                };
                Outcome {
                    latency: sent.elapsed(),
                    created,
                }
            });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            outcomes.push(done.unwrap_or(Outcome {
                latency: Duration::ZERO,
                created: false,
            }));
            progress.tick();
        }
    }
    let elapsed = started.elapsed();
    progress.finish();

    // Background jobs log after the responses went out.
    if tokio::time::timeout(Duration::from_secs(60), service.state.jobs.wait_idle())
        .await
        .is_err()
    {
        eprintln!("warning: confirmation jobs still running after 60 s");
    }

    // ----- the database -----
    let orders = OrderRepository::new(&service.state.db);
    let mut committed = 0;
    for tenant in TokenTable::demo().tenants() {
        committed += TENANT
            .scope(
                tenant,
                orders.count_paid_with_prefix(&format!("ord-{run_id}-")),
            )
            .await?;
    }
    service.shutdown().await;
    if let Some(path) = temp_db {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    // ----- the logs -----
    let lines = capture.lines();
    if let Some(path) = &opts.log_file {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text)?;
    }
    let parsed: Vec<LogLine> = lines.iter().map(|line| LogLine::parse(line)).collect();
    let check = check_lines(&lines, &parsed, &expected, startup_lines);
    let first_id = format!("demo-{run_id}-00000");
    let tree = expected
        .get(&first_id)
        .map(|e| draw_tree(&parsed, &first_id, e))
        .unwrap_or_default();

    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort();
    let created = outcomes.iter().filter(|o| o.created).count();
    Ok(DemoReport {
        requests: outcomes.len(),
        created,
        failed: outcomes.len() - created,
        log_lines: lines.len(),
        lines_without_request: check.without_request,
        lines_with_reference: check.with_reference,
        mismatches: check.mismatches,
        mismatch_examples: check.examples,
        jobs_logged: check.jobs.len(),
        payments_logged: check.payments.len(),
        events_logged: check.events.len(),
        committed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        elapsed,
        backend,
        format: opts.format,
        concurrency: opts.concurrency,
        tree,
    })
}

/// Order `i` of run `run_id`: one to three apples, and a pear every other order.
fn demo_order(run_id: &str, i: usize) -> NewOrder {
    let mut items = vec![NewOrderItem {
        sku: "sku-apple".into(),
        quantity: 1 + (i % 3) as i64,
    }];
    if i.is_multiple_of(2) {
        items.push(NewOrderItem {
            sku: "sku-pear".into(),
            quantity: 1,
        });
    }
    NewOrder {
        reference: format!("ord-{run_id}-{i:05}"),
        items,
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ===== the log check =====

#[derive(Default)]
struct Check {
    without_request: usize,
    with_reference: usize,
    mismatches: usize,
    examples: Vec<String>,
    jobs: HashSet<String>,
    payments: HashSet<String>,
    events: HashSet<String>,
}

/// What the check needs from one log line, read back from the text or the JSON format.
#[derive(Debug, Default, PartialEq)]
struct LogLine {
    request_id: Option<String>,
    trace_id: Option<String>,
    tenant: Option<String>,
    /// The span path, outermost first, each as `name{fields}`.
    spans: Vec<String>,
    /// The module that logged it.
    target: String,
    /// The message and the event's fields, as printed.
    event: String,
    /// The order reference the line names (event field, or a span field), if any.
    reference: Option<String>,
}

impl LogLine {
    /// Parses a line of either format; a line it cannot read has no request id (and is then
    /// counted as outside any request).
    fn parse(line: &str) -> LogLine {
        if line.starts_with('{') {
            LogLine::parse_json(line)
        } else {
            LogLine::parse_text(line)
        }
    }

    /// `[request_id trace_id=.. tenant=..] <ts>  <LEVEL> <span>{..}:<span>{..}: <target>: <message> k=v`
    fn parse_text(line: &str) -> LogLine {
        let mut out = LogLine::default();
        let mut rest = line;
        if let Some(prefix) = line.strip_prefix('[') {
            let end = scan(prefix, |_, c, depth| depth == 0 && c == ']').unwrap_or(prefix.len());
            for (i, token) in split_top(&prefix[..end], " ").into_iter().enumerate() {
                let (key, value) = match token.split_once('=') {
                    Some((k, v)) if i > 0 => (k, v),
                    _ => ("request_id", token),
                };
                let value = Some(unquote(value));
                match key {
                    "request_id" => out.request_id = value,
                    "trace_id" => out.trace_id = value,
                    "tenant" => out.tenant = value,
                    _ => {}
                }
            }
            rest = prefix.get(end + 1..).unwrap_or("").trim_start();
        }
        // Timestamp and level.
        let mut words = rest.splitn(2, ' ');
        let _timestamp = words.next();
        let rest = words.next().unwrap_or("").trim_start();
        let rest = rest.split_once(' ').map_or("", |(_level, r)| r);
        let pieces = split_top(rest, ": ");
        let has_spans = pieces.len() >= 3 && !contains_top(pieces[0], "::");
        let (spans, target, event) = if has_spans {
            (split_top(pieces[0], ":"), pieces[1], pieces[2..].join(": "))
        } else {
            (
                Vec::new(),
                pieces[0],
                pieces.get(1..).map(|p| p.join(": ")).unwrap_or_default(),
            )
        };
        out.target = target.to_string();
        out.spans = spans.into_iter().map(str::to_string).collect();
        out.reference = find_value(&event, "reference=").or_else(|| {
            out.spans
                .iter()
                .rev()
                .find_map(|s| find_value(s, "reference="))
        });
        out.event = event;
        out
    }

    /// `{"request_id":..,"trace_id":..,"tenant":..,"fields":{"message":..},"spans":[..]}`
    fn parse_json(line: &str) -> LogLine {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line) else {
            return LogLine::default();
        };
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let get = |key: &str| obj.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let mut out = LogLine {
            request_id: get("request_id"),
            trace_id: get("trace_id"),
            tenant: get("tenant"),
            target: get("target").unwrap_or_default(),
            ..LogLine::default()
        };
        if let Some(serde_json::Value::Object(fields)) = obj.get("fields") {
            out.event = fields.get("message").map(text).unwrap_or_default();
            for (k, v) in fields.iter().filter(|(k, _)| *k != "message") {
                out.event.push_str(&format!(" {k}={}", text(v)));
            }
            out.reference = fields.get("reference").map(text);
        }
        if let Some(serde_json::Value::Array(spans)) = obj.get("spans") {
            for span in spans {
                let Some(span) = span.as_object() else {
                    continue;
                };
                let name = span.get("name").map(text).unwrap_or_default();
                let fields: Vec<String> = span
                    .iter()
                    .filter(|(k, _)| *k != "name")
                    .map(|(k, v)| format!("{k}={}", text(v)))
                    .collect();
                out.spans.push(if fields.is_empty() {
                    name
                } else {
                    format!("{name}{{{}}}", fields.join(" "))
                });
                if out.reference.is_none() {
                    out.reference = span.get("reference").map(text);
                }
            }
        }
        out
    }
}

/// The byte index of the first character for which `stop(byte index, c, brace depth)` holds,
/// outside double quotes (with backslash escapes).
fn scan(s: &str, mut stop: impl FnMut(usize, char, usize) -> bool) -> Option<usize> {
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for (i, c) in s.char_indices() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        if stop(i, c, depth) {
            return Some(i);
        }
        match c {
            '"' => quoted = true,
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Splits `s` at `sep` where it occurs outside quotes and braces. `sep` is not empty.
fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = s;
    // A separator only matches outside quotes and braces, so scanning the rest afresh from
    // just after it starts in the same state the scan was in.
    while let Some(at) = scan(rest, |i, _, depth| depth == 0 && rest[i..].starts_with(sep)) {
        out.push(&rest[..at]);
        rest = &rest[at + sep.len()..];
    }
    out.push(rest);
    out
}

fn contains_top(s: &str, needle: &str) -> bool {
    split_top(s, needle).len() > 1
}

/// The value after `key` in `s` (up to a space or a closing brace), unquoted.
fn find_value(s: &str, key: &str) -> Option<String> {
    let at = s.find(key)? + key.len();
    let rest = &s[at..];
    if rest.starts_with('"') {
        let end = scan(rest, |_, c, _| c == ' ' || c == '}').unwrap_or(rest.len());
        return Some(unquote(&rest[..end]));
    }
    let end = rest.find([' ', '}']).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => value.to_string(),
    }
}

fn check_lines(
    lines: &[String],
    parsed: &[LogLine],
    expected: &HashMap<String, Expected>,
    startup_lines: usize,
) -> Check {
    let mut check = Check::default();
    for (i, (line, parsed)) in lines.iter().zip(parsed).enumerate() {
        let Some(request_id) = parsed.request_id.as_deref() else {
            if i >= startup_lines && parsed.target.starts_with("order_service") {
                check.mismatches += 1;
                if check.examples.len() < 5 {
                    check
                        .examples
                        .push(format!("no request id during the load: {line}"));
                }
            } else {
                check.without_request += 1;
            }
            continue;
        };
        let mut problems = Vec::new();
        match expected.get(request_id) {
            None => problems.push("request id was never sent"),
            Some(want) => {
                if parsed.trace_id.as_deref() != Some(want.trace_id.as_str()) {
                    problems.push("trace id of another request");
                }
                if parsed.tenant.as_deref().is_some_and(|t| t != want.tenant) {
                    problems.push("tenant of another request");
                }
                if let Some(reference) = &parsed.reference {
                    check.with_reference += 1;
                    if *reference != want.reference {
                        problems.push("order reference of another request");
                    }
                }
                let event = parsed.event.as_str();
                if event.starts_with("confirmation sent") {
                    check.jobs.insert(request_id.to_string());
                } else if event.starts_with("payment authorized") {
                    check.payments.insert(request_id.to_string());
                } else if event.starts_with("audit: order confirmed") {
                    check.events.insert(request_id.to_string());
                }
            }
        }
        if !problems.is_empty() {
            check.mismatches += 1;
            if check.examples.len() < 5 {
                check
                    .examples
                    .push(format!("{}: {line}", problems.join(", ")));
            }
        }
    }
    check
}

// ===== the tree =====

/// A span (with children) or an event (a leaf).
struct Node {
    label: String,
    is_span: bool,
    children: Vec<Node>,
}

fn draw_tree(lines: &[LogLine], request_id: &str, want: &Expected) -> String {
    let mut root = Node {
        label: String::new(),
        is_span: true,
        children: Vec::new(),
    };
    // Where the lines of another service (the payment stub, the queue consumer) hang: under
    // the outgoing call or publish that caused them.
    let mut client_call: Vec<String> = Vec::new();
    let mut publish: Vec<String> = Vec::new();
    for line in lines {
        if line.request_id.as_deref() != Some(request_id) {
            continue;
        }
        let mut path = line.spans.clone();
        if let Some(at) = path.iter().position(|s| s.starts_with("http.client")) {
            client_call = path[..=at].to_vec();
        }
        if let Some(at) = path.iter().position(|s| s.starts_with("queue.publish")) {
            publish = path[..=at].to_vec();
        }
        let graft_under = match path.first() {
            Some(root) if root.starts_with("http.request") && root.contains("payment") => {
                Some(&client_call)
            }
            Some(root) if root.starts_with("queue.consume") => Some(&publish),
            _ => None,
        };
        if let Some(parent) = graft_under {
            let mut grafted = parent.clone();
            grafted.append(&mut path);
            path = grafted;
        }
        insert(&mut root, &path, format!("• {}", line.event));
    }
    let mut out = format!(
        "POST /orders  request_id={request_id}  trace_id={}  tenant={}  reference={}\n",
        want.trace_id, want.tenant, want.reference
    );
    let count = root.children.len();
    for (i, child) in root.children.iter().enumerate() {
        render(child, "", i + 1 == count, &mut out);
    }
    out
}

fn insert(node: &mut Node, path: &[String], event: String) {
    match path.split_first() {
        None => node.children.push(Node {
            label: event,
            is_span: false,
            children: Vec::new(),
        }),
        Some((head, rest)) => {
            // Consecutive lines of the same span share its node; a span seen again after
            // something else happened is a new node (a second query, a second item).
            let reuse = node
                .children
                .last()
                .is_some_and(|last| last.is_span && &last.label == head);
            if !reuse {
                node.children.push(Node {
                    label: head.clone(),
                    is_span: true,
                    children: Vec::new(),
                });
            }
            let last = node.children.len() - 1;
            insert(&mut node.children[last], rest, event);
        }
    }
}

fn render(node: &Node, prefix: &str, last: bool, out: &mut String) {
    out.push_str(prefix);
    out.push_str(if last { "└── " } else { "├── " });
    out.push_str(&node.label);
    if node.is_span {
        // How the context got there, where it crossed something.
        let note = if node.label.starts_with("job") {
            "   <- contextflow::spawn, after the response"
        } else if node.label.starts_with("queue.consume") {
            "   <- another task: context from the message headers"
        } else if node.label.starts_with("http.request") && node.label.contains("payment") {
            "   <- another server: context from traceparent / x-request-id"
        } else if node.label.starts_with("transaction") {
            "   <- bound in the context: every query below joins it"
        } else {
            ""
        };
        out.push_str(note);
    }
    out.push('\n');
    let child_prefix = format!("{prefix}{}", if last { "    " } else { "│   " });
    let count = node.children.len();
    for (i, child) in node.children.iter().enumerate() {
        render(child, &child_prefix, i + 1 == count, out);
    }
}

// ===== progress =====

struct Progress {
    total: usize,
    done: usize,
    shown: usize,
    enabled: bool,
    terminal: bool,
}

impl Progress {
    fn new(total: usize, enabled: bool) -> Self {
        Progress {
            total,
            done: 0,
            shown: usize::MAX,
            enabled,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        if !self.enabled {
            return;
        }
        // A redraw per percent on a terminal, a line per quarter otherwise.
        let steps = if self.terminal { 100 } else { 4 };
        let step = self.done * steps / self.total.max(1);
        if step == self.shown {
            return;
        }
        self.shown = step;
        let width = 40;
        let filled = self.done * width / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r  orders [{bar}] {}/{}", self.done, self.total);
        } else {
            let _ = writeln!(stderr, "  orders [{bar}] {}/{}", self.done, self.total);
        }
        let _ = stderr.flush();
    }

    fn finish(&self) {
        if self.enabled && self.terminal {
            eprintln!();
        }
    }
}

// ===== impl DemoReport =====

impl DemoReport {
    /// Whether everything checked out: every order created and committed, no mismatched
    /// line, every job and payment logged under its request.
    pub fn is_correct(&self) -> bool {
        self.mismatches == 0
            && self.failed == 0
            && self.committed == self.requests as i64
            && self.jobs_logged == self.requests
            && self.payments_logged == self.requests
            && self.events_logged == self.requests
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let backend = match self.backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        };
        let format = match self.format {
            LogFormat::Text => "text",
            LogFormat::Json => "JSON",
        };
        writeln!(f, "\nOne request's path, from its captured log lines:\n")?;
        writeln!(f, "{}", self.tree)?;
        writeln!(
            f,
            "Summary ({backend}, {format} logs, concurrency {}):",
            self.concurrency
        )?;
        writeln!(
            f,
            "  requests            {} ({} created, {} failed) in {:.2} s, {:.0} orders/s",
            self.requests,
            self.created,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )?;
        writeln!(
            f,
            "  log lines           {} ({} outside any request: start-up, other crates' background)",
            self.log_lines, self.lines_without_request
        )?;
        writeln!(
            f,
            "  mismatched lines    {} (request id, trace id, tenant and order reference of every line checked against the request that caused it; {} lines carried a reference)",
            self.mismatches, self.lines_with_reference
        )?;
        for example in &self.mismatch_examples {
            writeln!(f, "    {example}")?;
        }
        writeln!(
            f,
            "  confirmation jobs   {}/{} logged under their request (contextflow::spawn)",
            self.jobs_logged, self.requests
        )?;
        writeln!(
            f,
            "  payment calls       {}/{} logged by the payment stub with the caller's request and trace id",
            self.payments_logged, self.requests
        )?;
        writeln!(
            f,
            "  queue events        {}/{} consumed under their request's id and trace (headers, not the tenant)",
            self.events_logged, self.requests
        )?;
        writeln!(
            f,
            "  orders committed    {} (counted in the database, tenant by tenant)",
            self.committed
        )?;
        writeln!(
            f,
            "  latency             p50 {:.1} ms, p99 {:.1} ms",
            ms(self.p50),
            ms(self.p99)
        )?;
        writeln!(
            f,
            "  result              {}",
            if self.is_correct() { "OK" } else { "FAILED" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_text_lines() {
        let line = r#"[demo-1 trace_id=abc tenant=acme] 2026-11-24T18:00:00.123456Z  INFO http.request{service="orders" path="/orders/{id}"}:controller{handler="create_order" reference=ord-1}: order_service::http::orders: audit: x lines=2 error="a: b""#;
        let parsed = LogLine::parse(line);
        assert_eq!(parsed.request_id.as_deref(), Some("demo-1"));
        assert_eq!(parsed.trace_id.as_deref(), Some("abc"));
        assert_eq!(parsed.tenant.as_deref(), Some("acme"));
        assert_eq!(
            parsed.spans,
            [
                r#"http.request{service="orders" path="/orders/{id}"}"#,
                r#"controller{handler="create_order" reference=ord-1}"#
            ]
        );
        assert_eq!(parsed.event, r#"audit: x lines=2 error="a: b""#);
        assert_eq!(parsed.reference.as_deref(), Some("ord-1"));
        assert_eq!(parsed.target, "order_service::http::orders");

        let bare =
            LogLine::parse("2026-11-24T18:00:00.123456Z  INFO order_service::app: started addr=1");
        assert_eq!(bare.request_id, None);
        assert!(bare.spans.is_empty());
        assert_eq!(bare.event, "started addr=1");
        assert_eq!(bare.target, "order_service::app");

        let quoted = LogLine::parse(r#"["a b" tenant="x\"y"] 2026  WARN t::u: m"#);
        assert_eq!(quoted.request_id.as_deref(), Some("a b"));
        assert_eq!(quoted.tenant.as_deref(), Some("x\"y"));
    }

    #[test]
    fn check_catches_leaked_context() {
        let want = |reference: &str, trace: &str| Expected {
            reference: reference.into(),
            trace_id: trace.into(),
            tenant: "acme".into(),
        };
        let expected = HashMap::from([
            ("r-1".to_string(), want("ord-1", "t1")),
            ("r-2".to_string(), want("ord-2", "t2")),
        ]);
        let ts = "2026-11-24T18:00:00.000000Z  INFO";
        let lines: Vec<String> = [
            format!("{ts} order_service::app: started"),
            format!("[r-1 trace_id=t1 tenant=acme] {ts} controller{{reference=ord-1}}: order_service::x: ok"),
            format!("[r-1 trace_id=t2 tenant=acme] {ts} order_service::x: wrong trace"),
            format!("[r-2 trace_id=t2 tenant=globex] {ts} order_service::x: wrong tenant"),
            format!("[r-2 trace_id=t2 tenant=acme] {ts} controller{{reference=ord-1}}: order_service::x: wrong order"),
            format!("[r-9 trace_id=t2] {ts} order_service::x: never sent"),
            format!("{ts} order_service::jobs: lost its context"),
            format!("{ts} sqlx::pool: background"),
        ]
        .into();
        let parsed: Vec<LogLine> = lines.iter().map(|l| LogLine::parse(l)).collect();
        let check = check_lines(&lines, &parsed, &expected, 1);
        assert_eq!(check.mismatches, 5, "{:#?}", check.examples);
        assert_eq!(
            check.without_request, 2,
            "start-up and another crate's background line"
        );
        assert_eq!(check.with_reference, 2);
    }

    #[test]
    fn reads_back_json_lines() {
        let line = r#"{"request_id":"demo-1","trace_id":"abc","tenant":"acme","fields":{"message":"payment authorized","reference":"ord-1"},"spans":[{"name":"http.request","service":"payment"}]}"#;
        let parsed = LogLine::parse(line);
        assert_eq!(parsed.request_id.as_deref(), Some("demo-1"));
        assert_eq!(parsed.spans, ["http.request{service=payment}"]);
        assert_eq!(parsed.event, "payment authorized reference=ord-1");
        assert_eq!(parsed.reference.as_deref(), Some("ord-1"));
    }
}
