//! Request context in every `tracing` log line, and tracing spans carried across
//! contextflow spawns.
//!
//! Declare once which [`contextflow::AsyncLocal`] variables are log fields (request id, trace
//! id, tenant, user: any `&'static AsyncLocal<T>` with `T: Display`). From then on every
//! `tracing` event emitted anywhere inside a request carries them, with no span and no extra
//! argument at the call site: as a prefix in text output and as top-level keys in JSON.
//!
//! # Setup
//!
//! ```
//! use contextflow::AsyncLocal;
//! use contextflow_tracing::{ContextFields, MemoryWriter};
//!
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! let fields = ContextFields::new()
//!     .field("request_id", &REQUEST_ID) // the first field prints as a bare value
//!     .field("tenant", &TENANT);
//!
//! // Text: wrap the event format; the escaping field formatter bounds each value too.
//! # let log = MemoryWriter::new();
//! let text = tracing_subscriber::fmt()
//! #   .with_ansi(false)
//!     .fmt_fields(fields.escaped_fields())
//!     .event_format(fields.text(tracing_subscriber::fmt::format().without_time()))
//! #   .with_writer(log.clone())
//!     .finish();
//! // JSON: wrap the JSON event format, keeping the JSON field formatter.
//! let json = tracing_subscriber::fmt()
//!     .json()
//!     .map_event_format(|f| fields.json(f))
//!     .finish();
//! // As a layer of a registry, the same `map_event_format` works on `fmt::layer()`; any other
//! // layer (OpenTelemetry's log appender, ...) gets the fields through `fields.layer(..)`.
//! use tracing_subscriber::prelude::*;
//! let layered = tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer().map_event_format(|f| fields.text(f)));
//! # drop((json, layered));
//! // ...then `.init()` one of them, and in a request handler:
//! tracing::subscriber::with_default(text, || {
//!     REQUEST_ID.sync_scope("req-123".into(), || {
//!         TENANT.sync_scope("acme".into(), || tracing::info!("Order creation started"));
//!     });
//! });
//! assert_eq!(log.lines(), ["[req-123 tenant=acme]  INFO rust_out: Order creation started"]);
//! ```
//!
//! # Output
//!
//! Text: `[first other=value ...] ` then the wrapped format's line, escaped:
//!
//! ```text
//! [req-123 tenant=acme] 2026-11-24T17:00:00.000000Z  INFO shop::orders: Order creation started
//! 2026-11-24T17:00:00.000100Z  INFO shop: server listening (no context: no brackets)
//! ```
//!
//! JSON: one key per field that is set (and displays as something), first in the object,
//! always as a JSON string:
//!
//! ```text
//! {"request_id":"req-123","tenant":"acme","timestamp":"...","level":"INFO","fields":{"message":"Order creation started"},"target":"shop::orders"}
//! ```
//!
//! Fields that are not set, or whose value displays as nothing (an empty string, an
//! OpenTelemetry context without a valid span), are left out; an event with none set is printed as the wrapped
//! format prints it (escaped and bounded). Do not name a field like a key of the wrapped JSON
//! format (`timestamp`, `level`, `fields`, `target`, `span`, `spans`). `log`-crate records
//! bridged with `tracing_log::LogTracer` are events like any other and get the same fields.
//!
//! For the trace id, `contextflow-otel` provides `contextflow_otel::OTEL_CONTEXT`, whose value
//! displays as the trace id: `.field("trace_id", &contextflow_otel::OTEL_CONTEXT)`; or read
//! OpenTelemetry's current context with [`ContextFields::field_fn`].
//!
//! # Other sinks
//!
//! [`ContextFields::layer`] wraps any [`Layer`](tracing_subscriber::Layer): the wrapped layer
//! sees each event with the context fields added as ordinary event fields, so OpenTelemetry's
//! log appender (`opentelemetry-appender-tracing`), a JSON layer or an error tracker records
//! them on every record:
//!
//! ```
//! use contextflow::AsyncLocal;
//! use contextflow_tracing::ContextFields;
//! use tracing_subscriber::prelude::*;
//! # #[derive(Default)] struct Appender(std::sync::Mutex<Vec<String>>);
//! # impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for &'static Appender {
//! #     fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
//! #         let mut names: Vec<String> = e.fields().map(|f| f.name().to_owned()).collect();
//! #         self.0.lock().unwrap().append(&mut names);
//! #     }
//! # }
//! # let otel_appender: &'static Appender = Box::leak(Box::default());
//!
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! let fields = ContextFields::new()
//!     .field("request_id", &REQUEST_ID)
//!     // e.g. the active OpenTelemetry span's ids:
//!     // .field_fn("trace_id", || Context::map_current(|cx| { .. }))
//!     ;
//! // `otel_appender` would be `OpenTelemetryTracingBridge::new(&logger_provider)`.
//! let subscriber = tracing_subscriber::registry().with(fields.layer(otel_appender));
//! tracing::subscriber::with_default(subscriber, || {
//!     REQUEST_ID.sync_scope("req-1".into(), || tracing::info!("paid"));
//! });
//! assert_eq!(*otel_appender.0.lock().unwrap(), ["message", "request_id"]);
//! ```
//!
//! # Security: escaping and bounding
//!
//! Values often come from a request (a header, a message attribute, an order reference), so
//! every value of every event is treated as hostile, not only the context fields:
//!
//! - Escaped in every line this crate writes: every control character (C0 with newline, carriage return, tab and
//!   ESC; DEL; C1), U+2028/U+2029, the bidirectional controls (U+202A..U+202E,
//!   U+2066..U+2069, U+200E/U+200F/U+061C) and invisible format characters (zero-width
//!   characters, word joiner, BOM, soft hyphen, variation selectors, Hangul fillers, the tag
//!   block U+E0000..U+E0FFF, ...). Text writes `\n`, `\r`, `\t`, `\x1b`, `\u{202e}`; JSON
//!   writes `\n`, `\u001b`, `\u202e` (a surrogate pair above U+FFFF), so a JSON line stays
//!   valid JSON and decodes to the original. A value can neither start a line, nor send a
//!   terminal escape sequence, nor reorder or hide text.
//! - Text: [`ContextFields::text`] passes everything the wrapped format writes (message,
//!   fields, span fields, target) through a line escaper that keeps only the final newline,
//!   and cuts the line at [`ContextFields::max_line_len`] bytes ([`DEFAULT_MAX_LINE_LEN`],
//!   8192, newline and [`TRUNCATED_MARKER`] included). With [`EscapedFields`] as the field
//!   formatter ([`ContextFields::escaped_fields`]) each value is also cut at
//!   [`ContextFields::max_value_len`] characters ([`DEFAULT_MAX_VALUE_LEN`], 2048, escapes
//!   included) with the marker, and formatting stops there. A value without anything to
//!   escape is printed byte for byte as `tracing_subscriber` prints it: a `%value` (`Display`)
//!   event or span field is not quoted, so its text may hold spaces, `=` or braces that look
//!   like other fields (`reference=x tenant=globex`); the line is still one line, and the
//!   context is only ever the `[...]` prefix, which no value can fake. Log untrusted text as
//!   `?value` (quoted) where a reader splits fields on spaces. ANSI colours: a colour
//!   code cannot be told from one in a value, so the wrapped format always writes without
//!   colours, through the escaper and its bound, whatever the layer's ANSI setting (on by
//!   default in `tracing_subscriber`). With colours on, use [`EscapedFields`], which stores span
//!   fields without colour codes: the default field formatter stores them with codes, which
//!   would then show escaped.
//! - Text prefix: a context value made only of printable, non-space characters other than `"`,
//!   `\`, `=`, `[`, `]` is printed as it is, any other value in double quotes with `"` and
//!   `\` backslash-escaped and `[`, `]`, `=` written `\x5b`, `\x5d`, `\x3d` (reversible), so it
//!   cannot fake the end of the prefix or another field either, not even for a reader that
//!   ignores quotes; cut at [`DEFAULT_MAX_LEN`] characters ([`ContextFields::max_len`]).
//! - [`ContextLayer`] (for sinks other than `fmt`: OpenTelemetry's log appender, other JSON
//!   layers) hands the sink the values as they are, bounded but not escaped: a structured
//!   sink keeps them as data, and the sink that prints them escapes them (with `fmt`, use
//!   [`ContextFields::text`] or [`ContextFields::json`], which escape everything above).
//! - JSON: [`ContextFields::json`] rewrites the wrapped format's line string by string: every
//!   string (event fields, message, span fields) keeps at most
//!   [`ContextFields::max_value_len`] characters of its escaped form, then the marker. A line
//!   still longer than [`ContextFields::max_line_len`] is replaced by a short valid object
//!   (context fields, timestamp, level, message cut, target, `"truncated":true`).
//!
//! # Spans across spawn
//!
//! `tracing`'s current span is a thread-local that a plain `tokio::spawn` loses (hence the
//! usual `.in_current_span()`). [`SpanCarrier`] plugs into [`contextflow::carry`]: every
//! `contextflow::spawn`, `spawn_blocking`, `contextflow::thread::spawn` and
//! `in_current_context` captures [`tracing::Span::current`] and enters it around each poll
//! of the child, so children log inside their parent's span. [`ContextFields::text`] and
//! [`ContextFields::json`] register it; without them call [`carry_spans`] once at start-up.
//!
//! ```
//! use tracing::Instrument;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let _s = tracing::subscriber::set_default(tracing_subscriber::registry());
//! contextflow_tracing::carry_spans();
//! let span = tracing::info_span!("request", id = 1);
//! let child_span = async { contextflow::spawn(async { tracing::Span::current() }).await }
//!     .instrument(span.clone())
//!     .await
//!     .unwrap();
//! assert_eq!(child_span.id(), span.id());
//! # }
//! ```
//!
//! # Cost
//!
//! Per event, each field is one `AsyncLocal::with` lookup (no allocation) plus formatting of
//! the value into a reused thread-local buffer. Text lines stream through the escaper (a
//! vectorizable check per write, then the wrapped format's own output); JSON lines are built
//! in a second reused buffer so the fields can be put first, strings rewritten on the way.
//! Nothing is stored in spans. `contextflow-bench` measures both against fields on a span.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod capture;
mod escape;
mod fields;
mod fmt_fields;
mod format;
mod layer;
#[cfg(test)]
mod props;
mod span;

pub use crate::{
    capture::MemoryWriter,
    fields::{
        ContextFields, DEFAULT_MAX_LEN, DEFAULT_MAX_LINE_LEN, DEFAULT_MAX_VALUE_LEN,
        TRUNCATED_MARKER,
    },
    fmt_fields::EscapedFields,
    format::ContextFormat,
    layer::ContextLayer,
    span::{carry_spans, SpanCarrier},
};
