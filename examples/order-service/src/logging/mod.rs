//! Log output: every line carries the request id, the trace id and the tenant of the context
//! it was written in, as text or JSON, through `contextflow-tracing`.
//!
//! [`init`] installs `tracing_subscriber`'s `fmt` layer wrapped by
//! `contextflow_tracing::ContextFields`, which reads [`REQUEST_ID`], [`OTEL_CONTEXT`] (shown as
//! the trace id) and [`TENANT`] when an event is formatted: no log statement in the service names them. It also
//! registers contextflow-tracing's span carrier, so a task started with
//! [`contextflow::spawn`] opens its spans under the request's.
//!
//! Text (the first field, the request id, is printed bare; absent fields are left out):
//!
//! ```text
//! [demo-1 trace_id=4bf9...4736 tenant=acme] 2026-11-24T18:00:00.123456Z  INFO http.request{service="orders" method=POST path="/orders"}:controller{handler="create_order" reference=ord-1}: order_service::http::orders: order received lines=2
//! ```
//!
//! JSON: `{"request_id":"demo-1","trace_id":"4bf9...","tenant":"acme","timestamp":...,
//! "level":"INFO","fields":{"message":"order received","lines":2},"target":...,"span":{...},
//! "spans":[{"name":"http.request",...},...]}`.

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
};

use contextflow_tracing::ContextFields;
use tracing::Subscriber;
use tracing_subscriber::{
    filter::LevelFilter, fmt::MakeWriter, layer::SubscriberExt as _, registry::LookupSpan,
    util::SubscriberInitExt as _, Layer,
};

use crate::context::{OTEL_CONTEXT, REQUEST_ID, TENANT};

mod capture;

pub use self::capture::{CapturedEvent, EventCapture, EventContext, SpanOpened, SpanRecord};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `tracing_subscriber`'s full text format, prefixed with `[request_id trace_id=.. tenant=..]`.
    Text,
    /// One JSON object per line, the context fields first.
    Json,
}

/// A [`MakeWriter`] that keeps every written line in memory (the demo's log stream).
#[derive(Clone, Debug, Default)]
pub struct LogSink {
    lines: Arc<Mutex<Vec<String>>>,
}

/// The writer [`LogSink`] hands out for one event.
#[derive(Debug)]
pub struct SinkWriter {
    lines: Arc<Mutex<Vec<String>>>,
}

/// The context fields of every line: `request_id` (printed bare in text), `trace_id`, `tenant`.
pub fn context_fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("trace_id", &OTEL_CONTEXT)
        .field("tenant", &TENANT)
}

/// Installs the global subscriber: events at INFO and above, in `format`, with the context
/// fields, written to `writer`.
///
/// # Errors
/// When a global subscriber is already installed.
pub fn init<W>(format: LogFormat, writer: W) -> Result<(), tracing_subscriber::util::TryInitError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(fmt_layer(format, writer))
        .try_init()
}

/// Like [`init`], and every event is also recorded as structured data in `capture` (the
/// demo's check reads that, never the formatted lines).
///
/// # Errors
/// When a global subscriber is already installed.
pub fn init_captured<W>(
    format: LogFormat,
    writer: W,
    capture: &EventCapture,
) -> Result<(), tracing_subscriber::util::TryInitError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        // The same filter as the lines': every captured event has its line.
        .with(capture.clone().with_filter(targets()))
        .with(fmt_layer(format, writer))
        .try_init()
}

/// INFO and above, but for sqlx's warning about a connect parameter it does not know, which
/// prints the parameter's value: a password given as `?sslpassword=` or `?PASSWORD=` in
/// `DATABASE_URL` would reach the log.
fn targets() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("sqlx_postgres::options", LevelFilter::ERROR)
}

/// The `fmt` layer in `format`, with the context fields, at INFO and above.
pub fn fmt_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let fields = context_fields();
    match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                // Every field value of events and spans escaped and bounded on its own (a
                // rejected body's text, a reference not yet validated), not only the line.
                .fmt_fields(fields.escaped_fields())
                .map_event_format(|f| fields.text(f))
                .with_filter(targets()),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(writer)
                .map_event_format(|f| fields.json(f))
                .with_filter(targets()),
        ),
    }
}

// ===== impl LogSink =====

impl LogSink {
    /// An empty sink.
    pub fn new() -> Self {
        LogSink::default()
    }

    /// Every line written so far (without the trailing newline).
    pub fn lines(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// Takes every line written so far out of the sink.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lock())
    }

    /// How many lines were written so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A panic while holding the lock only interrupted an `extend`: the lines are intact.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<'a> MakeWriter<'a> for LogSink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter {
            lines: self.lines.clone(),
        }
    }
}

/// What [`LogSink`] records after a write that did not end its line.
pub const MISSING_NEWLINE: &str = "<a log write without its final newline>";

impl io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The fmt layer writes each event with one `write_all` of the whole line; a line that
        // broke in two shows up as two lines, which the demo's output check counts.
        let text = String::from_utf8_lossy(buf);
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.extend(text.lines().map(str::to_string));
        if !text.is_empty() && !text.ends_with('\n') {
            // The line has no end: on a real stream the next event would run on in it. A
            // line of its own that matches no event makes the output check fail.
            lines.push(MISSING_NEWLINE.to_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TenantId;

    fn subscriber(format: LogFormat, sink: LogSink) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::registry().with(fmt_layer(format, sink))
    }

    #[test]
    fn lines_carry_the_context_and_escape_untrusted_values() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let capture = LogSink::new();
            let trace_id = contextflow_otel::new_trace_id().to_string();
            let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
            let _default = tracing::subscriber::set_default(subscriber(format, capture.clone()));
            let request = async {
                // A tenant name with a line break and a forged prefix.
                TENANT.sync_scope(TenantId::new("acme\n[req-8] x"), || tracing::info!("hello"));
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let cx = contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new([
                ("traceparent", traceparent.as_str()),
                ("x-request-id", "req-7"),
            ]));
            runtime.block_on(contextflow_otel::scope(cx, request));
            tracing::info!("outside");
            let lines = capture.lines();
            assert_eq!(lines.len(), 2, "{format:?}: {lines:?}");
            match format {
                LogFormat::Text => {
                    let want =
                        format!("[req-7 trace_id={trace_id} tenant=\"acme\\n\\x5breq-8\\x5d x\"] ");
                    assert!(lines[0].starts_with(&want), "{}", lines[0]);
                    assert!(lines[0].ends_with("hello"), "{}", lines[0]);
                }
                LogFormat::Json => {
                    let obj: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
                    assert_eq!(obj["request_id"], "req-7");
                    assert_eq!(obj["trace_id"], trace_id.as_str());
                    assert_eq!(obj["tenant"], "acme\n[req-8] x");
                    assert_eq!(obj["fields"]["message"], "hello");
                }
            }
            assert!(lines[1].contains("outside"));
            assert!(!lines[1].contains("req-7"), "no context outside the scope");
        }
    }

    /// An untrusted value (a rejected body's text, a reference not validated yet) is bounded
    /// on its own in both outputs, in an event's fields and in a span's.
    #[test]
    fn long_values_are_bounded_on_their_own() {
        let long = "x".repeat(50_000);
        for format in [LogFormat::Text, LogFormat::Json] {
            let capture = LogSink::new();
            let _default = tracing::subscriber::set_default(subscriber(format, capture.clone()));
            let span = tracing::info_span!("controller", reference = %long);
            span.in_scope(|| tracing::info!(body = %long, "rejected"));
            let lines = capture.lines();
            assert_eq!(lines.len(), 1, "{format:?}");
            let longest = lines[0]
                .split(|c| c != 'x')
                .map(str::len)
                .max()
                .unwrap_or(0);
            assert!(longest > 0, "{format:?}: the values are there");
            assert!(
                longest <= contextflow_tracing::DEFAULT_MAX_VALUE_LEN,
                "{format:?}: a value of {longest} bytes in a {} byte line",
                lines[0].len()
            );
        }
    }

    /// A write that does not end its line (a format that lost its newline: on a real stream
    /// every event would run on in one line) leaves a line that matches no event.
    #[test]
    fn a_write_without_its_newline_is_recorded() {
        use std::io::Write as _;
        let sink = LogSink::new();
        let mut writer = sink.make_writer();
        writer.write_all(b"one\n").unwrap();
        writer.write_all(b"two").unwrap();
        assert_eq!(sink.take(), ["one", "two", MISSING_NEWLINE]);
    }
}
