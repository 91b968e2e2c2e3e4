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
//! use contextflow_tracing::ContextFields;
//!
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
//!
//! let fields = ContextFields::new()
//!     .field("request_id", &REQUEST_ID) // the first field prints as a bare value
//!     .field("tenant", &TENANT);
//!
//! // Text: wrap the event format.
//! let text = tracing_subscriber::fmt()
//!     .event_format(fields.text(tracing_subscriber::fmt::format()))
//!     .finish();
//! // JSON: wrap the JSON event format, keeping the JSON field formatter.
//! let json = tracing_subscriber::fmt()
//!     .json()
//!     .map_event_format(|f| fields.json(f))
//!     .finish();
//! // As a layer of a registry, the same `map_event_format` works on `fmt::layer()`:
//! use tracing_subscriber::prelude::*;
//! let layered = tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer().map_event_format(|f| fields.text(f)));
//! # drop((text, json, layered));
//! // ...then `.init()` one of them, and in a request handler:
//! # tracing::subscriber::with_default(tracing_subscriber::fmt().event_format(fields.text(tracing_subscriber::fmt::format())).finish(), || {
//! REQUEST_ID.sync_scope("req-123".into(), || {
//!     TENANT.sync_scope("acme".into(), || tracing::info!("Order creation started"));
//! });
//! # });
//! ```
//!
//! # Output
//!
//! Text: `[first other=value ...] ` then the wrapped format's line, unchanged:
//!
//! ```text
//! [req-123 tenant=acme] 2026-11-24T17:00:00.000000Z  INFO shop::orders: Order creation started
//! 2026-11-24T17:00:00.000100Z  INFO shop: server listening (no context: no brackets)
//! ```
//!
//! JSON: one key per field that is set, first in the object, always as a JSON string:
//!
//! ```text
//! {"request_id":"req-123","tenant":"acme","timestamp":"...","level":"INFO","fields":{"message":"Order creation started"},"target":"shop::orders"}
//! ```
//!
//! Fields that are not set are left out; an event with none set is printed exactly as the
//! wrapped format prints it. Do not name a field like a key of the wrapped JSON format
//! (`timestamp`, `level`, `fields`, `target`, `span`, `spans`). `log`-crate records bridged
//! with `tracing_log::LogTracer` are events like any other and get the same fields.
//!
//! For the trace id, `contextflow-otel` provides `contextflow_otel::OTEL_CONTEXT`, whose value
//! displays as the trace id: `.field("trace_id", &contextflow_otel::OTEL_CONTEXT)`.
//!
//! # Security: escaping and bounding
//!
//! Context values often come from a request (a header, a message attribute), so they are
//! treated as hostile:
//!
//! - Text: a value made only of printable, non-space characters other than `"`, `\`, `=`,
//!   `[`, `]` is printed as it is. Any other value is put in double quotes, with `"` and `\`
//!   backslash-escaped, `\n` `\r` `\t` as such, other ASCII controls as `\x1b`, and other
//!   control or invisible characters (C1 controls, U+2028/U+2029, zero-width and bidirectional
//!   controls) as `\u{2028}`. A value can therefore neither start a new line, nor send a
//!   terminal escape sequence, nor fake the end of the prefix.
//! - JSON: values are JSON strings, escaped as JSON requires, plus DEL, C1 controls and the
//!   invisible characters as `\uXXXX`; the line stays valid JSON and single-line.
//! - Every value is cut at [`DEFAULT_MAX_LEN`] characters (see [`ContextFields::max_len`])
//!   and marked with [`TRUNCATED_MARKER`]; formatting stops at the bound, so a huge value
//!   costs no more than a short one.
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
//! the value into a reused thread-local buffer. JSON output is formatted into a second reused
//! buffer so the fields can be put first. Nothing is stored in spans.
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod escape;
mod fields;
mod format;
mod span;

pub use crate::{
    fields::{ContextFields, DEFAULT_MAX_LEN, TRUNCATED_MARKER},
    format::ContextFormat,
    span::{carry_spans, SpanCarrier},
};
