//! `ContextLayer`: any `Layer` sees the context fields as ordinary event fields.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, OnceLock, PoisonError, RwLock},
};

use tracing::{
    callsite::{Callsite, Identifier},
    field::{Field, FieldSet, Value, Visit},
    level_filters::LevelFilter,
    metadata::Kind,
    span,
    subscriber::Interest,
    Dispatch, Event, Metadata, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

use crate::{fields::with_scratch, ContextFields};

/// A [`Layer`] wrapper: the wrapped layer gets every event with the context fields added as
/// ordinary event fields (after the event's own), so a sink that only reads event fields, such
/// as OpenTelemetry's log appender (`opentelemetry-appender-tracing`), a JSON layer or an error
/// tracker's layer, records `request_id`, `trace_id`, `span_id`, `tenant` on every record.
/// Made by [`ContextFields::layer`]; every other [`Layer`] method is passed through unchanged.
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_tracing::{ContextFields, MemoryWriter};
/// use tracing_subscriber::prelude::*;
///
/// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
/// let fields = ContextFields::new()
///     .field("tenant", &TENANT)
///     // What does not live in a contextflow variable comes from a closure, e.g. the
///     // OpenTelemetry span: `|| Some(Context::current().span().span_context().trace_id())`.
///     .field_fn("pid", || Some(std::process::id()));
///
/// let log = MemoryWriter::new();
/// let sink = tracing_subscriber::fmt::layer().json().without_time().with_writer(log.clone());
/// // Filters go around the wrapper: `fields.layer(sink).with_filter(LevelFilter::INFO)`.
/// let subscriber = tracing_subscriber::registry().with(fields.layer(sink));
/// tracing::subscriber::with_default(subscriber, || {
///     TENANT.sync_scope("acme".into(), || tracing::info!(order = 1, "placed"));
/// });
/// let line: serde_json::Value = serde_json::from_str(&log.contents()).unwrap();
/// assert_eq!(line["fields"]["tenant"], "acme");
/// assert_eq!(line["fields"]["pid"], std::process::id().to_string());
/// assert_eq!(line["fields"]["order"], 1);
/// ```
///
/// # What the wrapped layer sees
/// - Each event is re-issued with metadata of its own: same name, target, level, file, line and
///   module path, the event's fields followed by the context fields that are set, each as a
///   string (bounded by [`ContextFields::max_len`], not escaped: structured sinks keep values
///   as they are, text sinks escape them when they print). An event field with a context
///   field's name (`info!(tenant = %body.tenant)`) is renamed `event.<name>`, so the record's
///   `tenant` is always the context's. The event's own values keep their types.
/// - tracing carries at most 32 fields per event: context fields that do not fit after the
///   event's own are left out (an event with 32 fields gets none).
/// - The parent span is the event's. The metadata is made once per event callsite and kept for
///   the life of the process (as `tracing-log` does for `log` records).
/// - Spans reach the wrapped layer as they are: a span field with a context field's name
///   (`info_span!("call", tenant = %body.tenant)`) is not renamed. A sink that copies span
///   fields onto its records (OpenTelemetry's appender with span attributes turned on) would
///   then show it beside, or instead of, the context's `tenant`: keep the context fields'
///   names out of what such a sink copies, or out of span fields.
/// - A `log`-crate record (through `tracing-log`) keeps its `log.*` fields, and its metadata is
///   the bridge's (target `log`).
/// - Put per-layer filters around the wrapper, not inside it: the wrapper cannot forward
///   `Layer::downcast_raw` (an `unsafe` method; this crate forbids `unsafe`).
pub struct ContextLayer<L> {
    fields: ContextFields,
    inner: L,
    callsites: Arc<RwLock<HashMap<Identifier, &'static Synthetic>>>,
}

/// The metadata of the re-issued event for one original callsite.
struct Synthetic {
    meta: &'static Metadata<'static>,
    /// The fields of `meta`: the original ones in order, then the context fields kept.
    fields: Vec<Field>,
    /// For each context field (by position in the list), its index in `fields`, if kept.
    context: Vec<Option<usize>>,
    original: usize,
}

/// The callsite of re-issued events: never registered, it only identifies their fields.
struct SyntheticCallsite {
    meta: OnceLock<&'static Metadata<'static>>,
}

/// The most fields a re-issued event carries (tracing's limit on a value set).
const MAX_FIELDS: usize = 32;

// ===== impl ContextLayer =====

impl<L> ContextLayer<L> {
    pub(crate) fn new(fields: ContextFields, inner: L) -> Self {
        ContextLayer {
            fields,
            inner,
            callsites: Arc::default(),
        }
    }

    /// The wrapped layer.
    ///
    /// ```
    /// let layer = contextflow_tracing::ContextFields::new().layer(tracing_subscriber::fmt::layer());
    /// let _fmt: &tracing_subscriber::fmt::Layer<tracing_subscriber::Registry> = layer.inner();
    /// ```
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// The wrapped layer, mutably.
    ///
    /// ```
    /// let mut layer = contextflow_tracing::ContextFields::new().layer(Vec::<u8>::new());
    /// layer.inner_mut().push(1);
    /// assert_eq!(layer.inner(), &[1]);
    /// ```
    pub fn inner_mut(&mut self) -> &mut L {
        &mut self.inner
    }

    /// The metadata for events of `meta`'s callsite, made on first use.
    fn synthetic(&self, meta: &'static Metadata<'static>) -> &'static Synthetic {
        let id = meta.callsite();
        if let Some(found) = self
            .callsites
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return found;
        }
        let mut map = self
            .callsites
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(id)
            .or_insert_with(|| Synthetic::make(meta, &self.fields))
    }
}

impl Synthetic {
    fn make(meta: &'static Metadata<'static>, fields: &ContextFields) -> &'static Synthetic {
        let mut names: Vec<&'static str> = meta.fields().iter().map(|f| f.name()).collect();
        let original = names.len();
        let mut context = Vec::new();
        for field in fields.list() {
            // The event's field of that name keeps its value under another name: the record's
            // field of the context's name is the context's (once per callsite: leaked, as the
            // metadata is). Every field of that name (an event may repeat one), also when the
            // context field itself finds no room: a record never shows an event's value under
            // a context field's name.
            if names.contains(&field.name) {
                let renamed: &'static str =
                    Box::leak(format!("event.{}", field.name).into_boxed_str());
                for name in names.iter_mut().filter(|name| **name == field.name) {
                    *name = renamed;
                }
            }
            if names.len() >= MAX_FIELDS {
                context.push(None);
                continue;
            }
            context.push(Some(names.len()));
            names.push(field.name);
        }
        let names: &'static [&'static str] = Box::leak(names.into_boxed_slice());
        let callsite: &'static SyntheticCallsite = Box::leak(Box::new(SyntheticCallsite {
            meta: OnceLock::new(),
        }));
        let synthetic_meta: &'static Metadata<'static> = Box::leak(Box::new(Metadata::new(
            meta.name(),
            meta.target(),
            *meta.level(),
            meta.file(),
            meta.line(),
            meta.module_path(),
            FieldSet::new(names, Identifier(callsite)),
            Kind::EVENT,
        )));
        let _ = callsite.meta.set(synthetic_meta);
        Box::leak(Box::new(Synthetic {
            meta: synthetic_meta,
            fields: synthetic_meta.fields().iter().collect(),
            context,
            original,
        }))
    }
}

impl Callsite for SyntheticCallsite {
    fn set_interest(&self, _interest: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        // Set right after the callsite is made, before any event can name it.
        self.meta
            .get()
            .expect("synthetic callsite has its metadata")
    }
}

impl<L: fmt::Debug> fmt::Debug for ContextLayer<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextLayer")
            .field("fields", &self.fields)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, L> Layer<S> for ContextLayer<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        self.inner.on_register_dispatch(subscriber)
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber)
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_new_span(attrs, id, ctx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }

    fn on_record(&self, span: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.inner.on_record(span, values, ctx)
    }

    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_follows_from(span, follows, ctx)
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let synthetic = self.synthetic(event.metadata());
        // Render the context values that are set into one buffer; remember their ranges.
        let mut ranges = [None::<(usize, usize)>; MAX_FIELDS];
        let mut ctx = Some(ctx);
        with_scratch(|all| {
            all.clear();
            let mut one = String::new();
            for (i, field) in self.fields.list().iter().enumerate() {
                let Some(slot) = synthetic.context[i] else {
                    continue;
                };
                if self.fields.render(field, &mut one) {
                    let start = all.len();
                    all.push_str(&one);
                    ranges[slot] = Some((start, all.len()));
                }
            }
            if let Some(ctx) = ctx.take() {
                let rendered = Rendered {
                    buf: all,
                    ranges: &ranges,
                };
                Capture::run(event, synthetic, 0, None, &rendered, &mut |event| {
                    self.inner.on_event(event, ctx.clone())
                });
            }
        });
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx)
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx)
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx)
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx)
    }
}

// ===== re-issuing an event =====

/// The rendered context values.
struct Rendered<'a> {
    buf: &'a str,
    ranges: &'a [Option<(usize, usize)>; MAX_FIELDS],
}

/// One value of the original event, borrowed for the duration of a visit.
#[derive(Clone, Copy)]
enum Captured<'a> {
    Str(&'a str),
    Debug(&'a dyn fmt::Debug),
    Error(&'a (dyn std::error::Error + 'static)),
    Bytes(&'a [u8]),
    I64(i64),
    U64(u64),
    I128(i128),
    U128(u128),
    F64(f64),
    Bool(bool),
}

/// The values captured so far, a list on the stack (innermost first).
struct Node<'a> {
    index: usize,
    value: Captured<'a>,
    prev: Option<&'a Node<'a>>,
}

/// A visitor that captures field `index` of the original event and, with its value still
/// borrowed, goes on to the next field: the values of a `tracing` event are only lent to a
/// visitor for the duration of one call, so the re-issued event is built at the bottom of this
/// recursion (one visit of the event per field, fields number at most 32).
struct Capture<'a, 'r> {
    event: &'a Event<'a>,
    synthetic: &'static Synthetic,
    index: usize,
    target: &'a Field,
    prev: Option<&'a Node<'a>>,
    rendered: &'a Rendered<'a>,
    emit: &'r mut dyn FnMut(&Event<'_>),
    found: bool,
}

impl Capture<'_, '_> {
    fn run<'a>(
        event: &'a Event<'a>,
        synthetic: &'static Synthetic,
        index: usize,
        prev: Option<&'a Node<'a>>,
        rendered: &'a Rendered<'a>,
        emit: &mut dyn FnMut(&Event<'_>),
    ) {
        if index == synthetic.original {
            return Self::issue(event, synthetic, prev, rendered, emit);
        }
        let target = &event.metadata().fields().iter().nth(index);
        let Some(target) = target else {
            return Self::issue(event, synthetic, prev, rendered, emit);
        };
        let mut capture = Capture {
            event,
            synthetic,
            index,
            target,
            prev,
            rendered,
            emit,
            found: false,
        };
        event.record(&mut capture);
        if !capture.found {
            // No value for this field: go on without it.
            Self::run(event, synthetic, index + 1, prev, rendered, capture.emit);
        }
    }

    fn take(&mut self, field: &Field, value: Captured<'_>) {
        if self.found || field != self.target {
            return;
        }
        self.found = true;
        let node = Node {
            index: self.index,
            value,
            prev: self.prev,
        };
        Self::run(
            self.event,
            self.synthetic,
            self.index + 1,
            Some(&node),
            self.rendered,
            self.emit,
        );
    }

    /// Builds the re-issued event from the captured values and the context values.
    fn issue(
        event: &Event<'_>,
        synthetic: &'static Synthetic,
        mut node: Option<&Node<'_>>,
        rendered: &Rendered<'_>,
        emit: &mut dyn FnMut(&Event<'_>),
    ) {
        let mut captured: [Option<Captured<'_>>; MAX_FIELDS] = [None; MAX_FIELDS];
        while let Some(n) = node {
            if let Some(slot) = captured.get_mut(n.index) {
                *slot = Some(n.value);
            }
            node = n.prev;
        }
        let debug_values: [Option<tracing::field::DebugValue<&dyn fmt::Debug>>; MAX_FIELDS] =
            std::array::from_fn(|i| match captured[i] {
                Some(Captured::Debug(d)) => Some(tracing::field::debug(d)),
                _ => None,
            });
        let strs: [Option<&str>; MAX_FIELDS] = std::array::from_fn(|i| match captured[i] {
            Some(Captured::Str(s)) => Some(s),
            _ => rendered.ranges[i].map(|(a, b)| &rendered.buf[a..b]),
        });
        let values: [Option<&dyn Value>; MAX_FIELDS] = std::array::from_fn(|i| {
            let value: &dyn Value = match &captured[i] {
                Some(Captured::Str(_)) => strs[i].as_ref()?,
                Some(Captured::Debug(_)) => debug_values[i].as_ref()?,
                Some(Captured::Error(e)) => e,
                Some(Captured::Bytes(b)) => b,
                Some(Captured::I64(v)) => v,
                Some(Captured::U64(v)) => v,
                Some(Captured::I128(v)) => v,
                Some(Captured::U128(v)) => v,
                Some(Captured::F64(v)) => v,
                Some(Captured::Bool(v)) => v,
                None => strs[i].as_ref()?,
            };
            Some(value)
        });
        let Some(first) = synthetic.fields.first() else {
            // No field at all: nothing to add.
            return emit(event);
        };
        let pairs: [(&Field, Option<&dyn Value>); MAX_FIELDS] =
            std::array::from_fn(|i| match synthetic.fields.get(i) {
                Some(field) => (field, values[i]),
                None => (first, None),
            });
        let value_set = synthetic.meta.fields().value_set(&pairs);
        let reissued = if event.is_contextual() {
            Event::new(synthetic.meta, &value_set)
        } else {
            Event::new_child_of(event.parent().cloned(), synthetic.meta, &value_set)
        };
        emit(&reissued)
    }
}

impl Visit for Capture<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.take(field, Captured::Str(value))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.take(field, Captured::Debug(value))
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.take(field, Captured::Error(value))
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.take(field, Captured::Bytes(value))
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.take(field, Captured::I64(value))
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.take(field, Captured::U64(value))
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.take(field, Captured::I128(value))
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.take(field, Captured::U128(value))
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.take(field, Captured::F64(value))
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.take(field, Captured::Bool(value))
    }
}
