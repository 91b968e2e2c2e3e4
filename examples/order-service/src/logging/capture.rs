//! [`EventCapture`]: a `tracing` layer that keeps every event as structured data, for the
//! demo's check and the tests.
//!
//! Nothing is parsed back from a formatted line: each [`CapturedEvent`] holds the level, the
//! target, the message, the event's fields, the path of spans it happened in (each with its
//! own fields and an id unique for the run), and its context fields. The context fields are
//! rendered by the same [`ContextFields`] the log output uses, through its JSON form, so the
//! check sees exactly the values the log lines carry (bounded and escaped as they are).

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use contextflow_tracing::ContextFields;
use tracing::{
    field::{Field, Visit},
    span, Level, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

/// A layer that records every event it sees; clones share the same record.
#[derive(Clone)]
pub struct EventCapture {
    inner: Arc<Inner>,
}

struct Inner {
    fields: ContextFields,
    events: Mutex<Vec<CapturedEvent>>,
    spans: Mutex<Vec<SpanOpened>>,
    next_span: AtomicU64,
}

/// A span was opened: its path, outermost first and itself last. Spans with no event of their
/// own (a query that logged nothing at INFO) still show in the request's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanOpened {
    /// How many events had been captured when it opened.
    pub after_events: usize,
    /// The request id current when it opened.
    pub request_id: Option<String>,
    /// The span and its parents.
    pub path: Vec<Arc<SpanRecord>>,
    /// The tokio task it opened in (its execution id), `None` outside a task.
    pub task: Option<tokio::task::Id>,
}

/// One event, as structured data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedEvent {
    /// Its position in the capture (0 for the first event).
    pub seq: usize,
    /// Its level.
    pub level: Level,
    /// The module that emitted it.
    pub target: String,
    /// Its message (the `message` field), empty if it has none.
    pub message: String,
    /// Its other fields, in the order they were recorded, values as displayed.
    pub fields: Vec<(String, String)>,
    /// The spans it happened in, outermost first.
    pub spans: Vec<Arc<SpanRecord>>,
    /// Its context fields (`request_id`, `trace_id`, `tenant`), as the log line carries them.
    pub context: EventContext,
}

/// A span an event happened in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    /// Unique for the life of the capture (tracing's own span ids are reused).
    pub uid: u64,
    /// The span's name.
    pub name: &'static str,
    /// Its fields, values as displayed.
    pub fields: Vec<(String, String)>,
}

/// The context fields of an event; `None` where the log line has none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventContext {
    /// The `request_id` field.
    pub request_id: Option<String>,
    /// The `trace_id` field.
    pub trace_id: Option<String>,
    /// The `tenant` field.
    pub tenant: Option<String>,
}

// ===== impl EventCapture =====

impl EventCapture {
    /// A capture that reads the context through `fields` (the ones the log output uses).
    pub fn new(fields: ContextFields) -> Self {
        EventCapture {
            inner: Arc::new(Inner {
                fields,
                events: Mutex::new(Vec::new()),
                spans: Mutex::new(Vec::new()),
                next_span: AtomicU64::new(1),
            }),
        }
    }

    /// How many events were captured so far (the `seq` the next one gets).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every event captured so far.
    pub fn events(&self) -> Vec<CapturedEvent> {
        self.lock().clone()
    }

    /// Takes every span opening recorded so far out of the capture.
    pub fn take_spans(&self) -> Vec<SpanOpened> {
        std::mem::take(
            &mut *self
                .inner
                .spans
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Takes every event captured so far out of the capture.
    pub fn take(&self) -> Vec<CapturedEvent> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CapturedEvent>> {
        // A panic while holding the lock only interrupted a `push`: the vector is intact.
        self.inner
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The context fields of the current execution point, as the log line would carry them.
    fn current_context(&self) -> EventContext {
        let mut json = String::from("{");
        // Writing into a `String` cannot fail.
        let _ = self.inner.fields.write_json_members(&mut json);
        json.push('}');
        parse_context(&json)
    }
}

impl fmt::Debug for EventCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventCapture")
            .field("events", &self.len())
            .finish()
    }
}

/// Reads the context members `{"request_id":..,"trace_id":..,"tenant":..}` back. The text
/// comes from `ContextFields::write_json_members`, which always writes valid JSON strings; a
/// value that would not parse is kept as the marker `"<unreadable>"`, which matches no request.
fn parse_context(json: &str) -> EventContext {
    let Ok(serde_json::Value::Object(members)) = serde_json::from_str(json) else {
        return EventContext {
            request_id: Some("<unreadable>".into()),
            ..EventContext::default()
        };
    };
    let get = |key: &str| {
        members.get(key).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    EventContext {
        request_id: get("request_id"),
        trace_id: get("trace_id"),
        tenant: get("tenant"),
    }
}

impl<S> Layer<S> for EventCapture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = FieldList::default();
        attrs.record(&mut fields);
        let record = SpanRecord {
            uid: self.inner.next_span.fetch_add(1, Ordering::Relaxed),
            name: attrs.metadata().name(),
            fields: fields.0,
        };
        let Some(span) = ctx.span(id) else { return };
        let record = Arc::new(record);
        span.extensions_mut().insert(record.clone());
        let mut path: Vec<Arc<SpanRecord>> = span
            .scope()
            .skip(1)
            .filter_map(|parent| parent.extensions().get::<Arc<SpanRecord>>().cloned())
            .collect();
        path.reverse();
        path.push(record);
        let after_events = self.len();
        self.inner
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(SpanOpened {
                after_events,
                request_id: crate::context::request_id().map(|id| id.as_str().to_owned()),
                path,
                task: contextflow::tree::execution_id(),
            });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(record) = extensions.get_mut::<Arc<SpanRecord>>() {
            let mut fields = FieldList(record.fields.clone());
            values.record(&mut fields);
            *record = Arc::new(SpanRecord {
                uid: record.uid,
                name: record.name,
                fields: fields.0,
            });
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = FieldList::default();
        event.record(&mut fields);
        let mut message = String::new();
        fields.0.retain(|(name, value)| {
            if name == "message" {
                message = value.clone();
                false
            } else {
                true
            }
        });
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|span| span.extensions().get::<Arc<SpanRecord>>().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let context = self.current_context();
        let metadata = event.metadata();
        let mut events = self.lock();
        let seq = events.len();
        events.push(CapturedEvent {
            seq,
            level: *metadata.level(),
            target: metadata.target().to_owned(),
            message,
            fields: fields.0,
            spans,
            context,
        });
    }
}

// ===== impl CapturedEvent =====

impl CapturedEvent {
    /// The value of the event's field `name`, if it has one.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name` on the event, else on the innermost span that has it.
    pub fn field_or_span(&self, name: &str) -> Option<&str> {
        self.field(name)
            .or_else(|| self.spans.iter().rev().find_map(|span| span.field(name)))
    }

    /// The message followed by the fields, `message k=v k=v`.
    pub fn summary(&self) -> String {
        let mut out = self.message.clone();
        for (name, value) in &self.fields {
            out.push_str(&format!(" {name}={value}"));
        }
        out
    }
}

impl fmt::Display for CapturedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctx = &self.context;
        write!(
            f,
            "[request_id={:?} trace_id={:?} tenant={:?}] {} ",
            ctx.request_id, ctx.trace_id, ctx.tenant, self.level
        )?;
        for span in &self.spans {
            write!(f, "{span}:")?;
        }
        write!(f, " {}: {}", self.target, self.summary())
    }
}

// ===== impl SpanRecord =====

impl SpanRecord {
    /// The value of the span's field `name`, if it has one.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for SpanRecord {
    /// `name{k=v k=v}`, or the bare name when it has no fields.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.fields.is_empty() {
            f.write_str("{")?;
            for (i, (name, value)) in self.fields.iter().enumerate() {
                if i > 0 {
                    f.write_str(" ")?;
                }
                write!(f, "{name}={value}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

// ===== field visitor =====

/// Fields as `(name, displayed value)`: strings as they are, `%x` as `Display` shows it, `?x`
/// as `Debug` shows it.
#[derive(Default)]
struct FieldList(Vec<(String, String)>);

impl Visit for FieldList {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::{
        context::{RequestId, TenantId, REQUEST_ID, TENANT},
        logging::context_fields,
    };

    #[test]
    fn records_fields_spans_and_context() {
        let capture = EventCapture::new(context_fields());
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let id: RequestId = "req-1".parse().unwrap();
            REQUEST_ID.sync_scope(id, || {
                TENANT.sync_scope(TenantId::new("acme \"corp\"\n"), || {
                    let outer = tracing::info_span!("controller", reference = %"ord-1");
                    let _outer = outer.enter();
                    let inner = tracing::info_span!(
                        "db",
                        statement = "SELECT",
                        rows = tracing::field::Empty
                    );
                    inner.record("rows", 3);
                    let _inner = inner.enter();
                    tracing::warn!(quantity = 2, sku = ?"sku-a", "hello");
                });
            });
        });
        let events = capture.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].context, EventContext::default());
        assert!(events[0].spans.is_empty());
        let event = &events[1];
        assert_eq!(event.seq, 1);
        assert_eq!(event.level, Level::WARN);
        assert_eq!(event.message, "hello");
        assert_eq!(event.field("quantity"), Some("2"));
        assert_eq!(event.field("sku"), Some("\"sku-a\""));
        assert_eq!(event.context.request_id.as_deref(), Some("req-1"));
        assert_eq!(event.context.tenant.as_deref(), Some("acme \"corp\"\n"));
        assert_eq!(event.context.trace_id, None);
        let names: Vec<_> = event.spans.iter().map(|s| s.name).collect();
        assert_eq!(names, ["controller", "db"]);
        assert_eq!(event.spans[1].field("rows"), Some("3"));
        assert_eq!(event.field_or_span("reference"), Some("ord-1"));
        assert_ne!(event.spans[0].uid, event.spans[1].uid);
    }

    #[test]
    fn unreadable_context_matches_no_request() {
        assert_eq!(
            parse_context("{not json").request_id.as_deref(),
            Some("<unreadable>")
        );
        assert_eq!(
            parse_context(r#"{"request_id":"a","tenant":"b"}"#),
            EventContext {
                request_id: Some("a".into()),
                trace_id: None,
                tenant: Some("b".into())
            }
        );
    }
}
