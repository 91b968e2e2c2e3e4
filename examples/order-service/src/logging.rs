//! Log output: every line carries the request id, the trace id and the tenant of the context
//! it was written in, as text (logfmt) or JSON.
//!
//! [`ContextLogLayer`] is a `tracing` layer that reads the three context variables of
//! [`crate::context`] when an event fires, so no log statement in the service names them.
//! It also renders the span path (`http.request{..} > controller{..} > service{..}`), which
//! the demo uses to draw one request's tree.
//!
//! [`init`] also registers a contextflow [carrier](contextflow::carry) for tracing's current
//! span, so a task started with [`contextflow::spawn`] opens its spans under the request's.
//!
//! Text line (logfmt; values that are not plain words are quoted and escaped):
//!
//! ```text
//! ts=2026-11-24T18:00:00.123Z level=INFO request_id=demo-1 trace_id=4bf9...4736 tenant=acme span="http.request{service=orders method=POST path=/orders} > controller{handler=create_order}" msg="order accepted" order_id=7
//! ```

use std::{
    fmt::{self, Write as _},
    io::{self, Write as _},
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use contextflow::carry::{self, Carrier};
use serde_json::{Map, Value};
use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{
    filter::LevelFilter, fmt::MakeWriter, layer::Context, layer::SubscriberExt as _,
    registry::LookupSpan, util::SubscriberInitExt as _, Layer,
};

use crate::context::{self, REQUEST_ID, TENANT};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` pairs (logfmt), one line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// A `tracing` layer writing one line per event, with the context's request id, trace id and
/// tenant, to `W`.
#[derive(Debug)]
pub struct ContextLogLayer<W> {
    format: LogFormat,
    writer: W,
}

/// A [`MakeWriter`] that keeps every line in memory (the demo's and the tests' log capture).
#[derive(Clone, Debug, Default)]
pub struct LogCapture {
    lines: Arc<Mutex<Vec<String>>>,
}

/// The writer [`LogCapture`] hands out for one event.
#[derive(Debug)]
pub struct CaptureWriter {
    lines: Arc<Mutex<Vec<String>>>,
}

/// The context keys every line has, whatever the event's own fields.
pub const CONTEXT_KEYS: [&str; 3] = ["request_id", "trace_id", "tenant"];

/// Every key the layer writes itself; an event field of the same name is written as
/// `field.<name>`.
const RESERVED_KEYS: [&str; 8] = [
    "ts",
    "level",
    "target",
    "request_id",
    "trace_id",
    "tenant",
    "span",
    "msg",
];

/// Installs the global subscriber: events at INFO and above, formatted by a
/// [`ContextLogLayer`] into `writer`; and registers the span carrier.
///
/// # Errors
/// When a global subscriber is already installed.
pub fn init<W>(format: LogFormat, writer: W) -> Result<(), tracing_subscriber::util::TryInitError>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    carry::register(SpanCarrier);
    tracing_subscriber::registry()
        .with(ContextLogLayer::new(format, writer).with_filter(LevelFilter::INFO))
        .try_init()
}

// ===== impl ContextLogLayer =====

impl<W> ContextLogLayer<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    /// A layer writing `format` lines to `writer`.
    pub fn new(format: LogFormat, writer: W) -> Self {
        ContextLogLayer { format, writer }
    }
}

/// The fields of a span, kept in its extensions.
struct SpanFields(Vec<(&'static str, Value)>);

impl<S, W> Layer<S> for ContextLogLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = FieldVisitor::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut fields = FieldVisitor::default();
        values.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            if let Some(existing) = span.extensions_mut().get_mut::<SpanFields>() {
                existing.0.extend(fields.0);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = FieldVisitor::default();
        event.record(&mut fields);
        let message = fields
            .0
            .iter()
            .position(|(k, _)| *k == "message")
            .map(|i| fields.0.remove(i).1)
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .unwrap_or_default();

        let mut span_path = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if !span_path.is_empty() {
                    span_path.push_str(" > ");
                }
                span_path.push_str(span.name());
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    if !f.is_empty() {
                        span_path.push('{');
                        for (i, (k, v)) in f.iter().enumerate() {
                            if i > 0 {
                                span_path.push(' ');
                            }
                            push_logfmt_pair(&mut span_path, k, v);
                        }
                        span_path.push('}');
                    }
                }
            }
        }

        let request_id = REQUEST_ID.with(|r| r.map(|r| r.as_str().to_owned()));
        let trace_id = context::trace_id();
        let tenant = TENANT.with(|t| t.map(|t| t.as_str().to_owned()));
        let meta = event.metadata();
        let line = match self.format {
            LogFormat::Text => {
                let mut line = String::with_capacity(256);
                let _ = write!(line, "ts={} level={}", timestamp(), meta.level());
                for (key, value) in CONTEXT_KEYS.iter().zip([request_id, trace_id, tenant]) {
                    line.push(' ');
                    push_logfmt_pair(&mut line, key, &value.map_or(Value::Null, Value::String));
                }
                line.push(' ');
                push_logfmt_pair(&mut line, "span", &Value::String(span_path));
                line.push(' ');
                push_logfmt_pair(&mut line, "msg", &Value::String(message));
                for (k, v) in &fields.0 {
                    line.push(' ');
                    // An event field never shadows a key of the line itself.
                    if RESERVED_KEYS.contains(k) {
                        line.push_str("field.");
                    }
                    push_logfmt_pair(&mut line, k, v);
                }
                line
            }
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("ts".into(), timestamp().into());
                obj.insert("level".into(), meta.level().as_str().into());
                obj.insert("target".into(), meta.target().into());
                obj.insert("request_id".into(), request_id.into());
                obj.insert("trace_id".into(), trace_id.into());
                obj.insert("tenant".into(), tenant.into());
                obj.insert("span".into(), span_path.into());
                obj.insert("msg".into(), message.into());
                for (k, v) in fields.0 {
                    // An event field never overwrites a context key.
                    let key = if RESERVED_KEYS.contains(&k) {
                        format!("field.{k}")
                    } else {
                        k.to_string()
                    };
                    obj.insert(key, v);
                }
                Value::Object(obj).to_string()
            }
        };
        let mut writer = self.writer.make_writer_for(meta);
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        // A log line that cannot be written is dropped: logging never fails a request.
        let _ = writer.write_all(&bytes);
    }
}

/// Collects a span's or an event's fields as JSON values.
#[derive(Default)]
struct FieldVisitor(Vec<(&'static str, Value)>);

impl Visit for FieldVisitor {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name(), value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name(), value.into()));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), value.into()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}").into()));
    }
}

/// Appends `key=value`, quoting and escaping the value unless it is a plain word.
fn push_logfmt_pair(out: &mut String, key: &str, value: &Value) {
    out.push_str(key);
    out.push('=');
    match value {
        Value::Null => out.push('-'),
        Value::String(s) => push_logfmt_value(out, s),
        other => push_logfmt_value(out, &other.to_string()),
    }
}

fn push_logfmt_value(out: &mut String, s: &str) {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@+-".contains(&b));
    if plain {
        out.push_str(s);
    } else {
        // Debug formatting escapes quotes, backslashes and control characters: untrusted
        // input can neither break the line nor forge a field.
        let _ = write!(out, "{s:?}");
    }
}

/// Parses one logfmt line written by [`ContextLogLayer`] back into key/value pairs (quoted
/// values unescaped, `-` read as absent). Used by the demo's checks.
pub fn parse_logfmt(line: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_string();
        rest = &rest[eq + 1..];
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, 'r')) => value.push('\r'),
                        Some((_, 't')) => value.push('\t'),
                        Some((_, '0')) => value.push('\0'),
                        Some((_, 'u')) => {
                            // \u{XXXX}
                            let hex: String = chars
                                .by_ref()
                                .map(|(_, c)| c)
                                .skip_while(|c| *c == '{')
                                .take_while(|c| *c != '}')
                                .collect();
                            if let Some(c) =
                                u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                            {
                                value.push(c);
                            }
                        }
                        Some((_, other)) => value.push(other),
                        None => {}
                    },
                    other => value.push(other),
                }
            }
            rest = &quoted[end.min(quoted.len())..];
            Some(value)
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            let raw = &rest[..end];
            rest = &rest[end..];
            (raw != "-").then(|| raw.to_string())
        };
        out.push((key, value));
        rest = rest.trim_start();
    }
    out
}

/// The current UTC time as RFC 3339 with milliseconds, without a date-time dependency.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

// ===== impl LogCapture =====

impl LogCapture {
    /// An empty capture.
    pub fn new() -> Self {
        LogCapture::default()
    }

    /// Every line written so far (without the trailing newline).
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many lines were written so far.
    pub fn len(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter {
            lines: self.lines.clone(),
        }
    }
}

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The layer writes each line with one `write_all` of the whole line.
        let line = String::from_utf8_lossy(buf);
        let line = line.strip_suffix('\n').unwrap_or(&line).to_string();
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ===== span carrier =====

/// Carries tracing's current span across contextflow spawns, so spans opened in a spawned
/// task nest under the spawner's.
struct SpanCarrier;

impl Carrier for SpanCarrier {
    type Value = tracing::Span;

    fn capture(&self) -> Option<tracing::Span> {
        let span = tracing::Span::current();
        (!span.is_none()).then_some(span)
    }

    fn enter(&self, span: &tracing::Span, f: &mut dyn FnMut()) {
        span.in_scope(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_round_trip() {
        let mut line = String::new();
        push_logfmt_pair(&mut line, "a", &Value::String("plain".into()));
        line.push(' ');
        push_logfmt_pair(
            &mut line,
            "b",
            &Value::String("two words \"q\"\nx=1".into()),
        );
        line.push(' ');
        push_logfmt_pair(&mut line, "c", &Value::Null);
        line.push(' ');
        push_logfmt_pair(&mut line, "d", &Value::from(42));
        let parsed = parse_logfmt(&line);
        assert_eq!(
            parsed,
            vec![
                ("a".into(), Some("plain".into())),
                ("b".into(), Some("two words \"q\"\nx=1".into())),
                ("c".into(), None),
                ("d".into(), Some("42".into())),
            ]
        );
    }

    #[test]
    fn lines_carry_the_context_and_escape_untrusted_values() {
        use crate::context::{
            RequestId, TenantId, TraceContext, REQUEST_ID, TENANT, TRACE_CONTEXT,
        };
        use tracing_subscriber::layer::SubscriberExt as _;

        for format in [LogFormat::Text, LogFormat::Json] {
            let capture = LogCapture::new();
            let subscriber =
                tracing_subscriber::registry().with(ContextLogLayer::new(format, capture.clone()));
            let trace = TraceContext::new_trace(true);
            let id: RequestId = "req-7".parse().unwrap();
            tracing::subscriber::with_default(subscriber, || {
                REQUEST_ID.sync_scope(id, || {
                    TRACE_CONTEXT.sync_scope(trace.clone(), || {
                        TENANT.sync_scope(TenantId::new("acme"), || {
                            let _span =
                                tracing::info_span!("controller", reference = "r-1").entered();
                            // A forged field and a line break from a client.
                            tracing::info!(
                                note = "x\n request_id=evil tenant=globex",
                                tenant = "shadow",
                                "hello"
                            );
                        })
                    })
                });
                tracing::info!("outside");
            });
            let lines = capture.lines();
            assert_eq!(lines.len(), 2, "{lines:?}");
            let fields: std::collections::HashMap<String, Option<String>> = match format {
                LogFormat::Text => parse_logfmt(&lines[0]).into_iter().collect(),
                LogFormat::Json => serde_json::from_str::<Map<String, Value>>(&lines[0])
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().map(str::to_string)))
                    .collect(),
            };
            let get = |k: &str| fields.get(k).cloned().flatten();
            assert_eq!(get("request_id").as_deref(), Some("req-7"), "{format:?}");
            assert_eq!(get("trace_id"), Some(trace.trace_id().to_string()));
            assert_eq!(get("tenant").as_deref(), Some("acme"));
            assert_eq!(get("field.tenant").as_deref(), Some("shadow"));
            assert_eq!(get("span").as_deref(), Some("controller{reference=r-1}"));
            assert_eq!(get("msg").as_deref(), Some("hello"));
            assert_eq!(
                get("note").as_deref(),
                Some("x\n request_id=evil tenant=globex")
            );
            assert!(lines[1].contains("outside"));
            assert!(!lines[1].contains("req-7"), "no context outside the scope");
        }
    }

    #[test]
    fn timestamp_shape() {
        let ts = timestamp();
        assert_eq!(ts.len(), "2026-11-24T18:00:00.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
    }
}
