//! `ContextFormat`: an event format that adds the context fields to another one.

use std::{cell::RefCell, fmt};

use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{
        format::{FormatEvent, FormatFields, Writer},
        FmtContext,
    },
    registry::LookupSpan,
};

use crate::ContextFields;

/// A [`FormatEvent`] that adds the current context's fields to every event formatted by
/// `F`; made by [`ContextFields::text`] or [`ContextFields::json`].
///
/// - Text: the line starts with the prefix from [`ContextFields::write_text_prefix`], then
///   `F`'s output follows unchanged: `[req-123 tenant=acme] 2026-01-01T00:00:00Z  INFO app: Order
///   creation started`.
/// - JSON: `F` must write one JSON object per event (as `tracing_subscriber`'s `Json` format
///   does); the fields become its first keys: `{"request_id":"req-123","tenant":"acme",
///   "timestamp":...}`. Output that is not an object is passed through unchanged.
///
/// With no field set, `F`'s output is passed through unchanged (no empty brackets).
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_tracing::ContextFields;
///
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// let fields = ContextFields::new().field("request_id", &REQUEST_ID);
/// let format = tracing_subscriber::fmt::format().without_time().with_target(false);
/// let subscriber = tracing_subscriber::fmt()
///     .event_format(fields.text(format))
///     .with_writer(std::io::stdout)
///     .finish();
/// tracing::subscriber::with_default(subscriber, || {
///     REQUEST_ID.sync_scope("req-123".into(), || tracing::info!("Order creation started"));
///     // prints: [req-123]  INFO Order creation started
/// });
/// ```
#[derive(Debug, Clone)]
pub struct ContextFormat<F> {
    fields: ContextFields,
    inner: F,
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Text,
    Json,
}

// ===== impl ContextFormat =====

impl<F> ContextFormat<F> {
    pub(crate) fn new(fields: ContextFields, inner: F, mode: Mode) -> Self {
        ContextFormat {
            fields,
            inner,
            mode,
        }
    }

    /// The wrapped event format.
    ///
    /// ```
    /// let format = contextflow_tracing::ContextFields::new().text(tracing_subscriber::fmt::format());
    /// let _inner: &tracing_subscriber::fmt::format::Format = format.inner();
    /// ```
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// The context fields this format adds.
    ///
    /// ```
    /// let format = contextflow_tracing::ContextFields::new().text(tracing_subscriber::fmt::format());
    /// assert!(format.fields().is_empty());
    /// ```
    pub fn fields(&self) -> &ContextFields {
        &self.fields
    }
}

impl<S, N, F> FormatEvent<S, N> for ContextFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match self.mode {
            Mode::Text => {
                self.fields.write_text_prefix(&mut writer)?;
                self.inner.format_event(ctx, writer, event)
            }
            Mode::Json => {
                let mut result = None;
                with_line(|line| {
                    result = Some(self.format_json(ctx, &mut writer, event, line));
                });
                match result {
                    Some(result) => result,
                    // The line buffer is busy (an event logged while formatting an event) or
                    // gone (thread teardown): use a fresh one.
                    None => self.format_json(ctx, &mut writer, event, &mut String::new()),
                }
            }
        }
    }
}

impl<F> ContextFormat<F> {
    fn format_json<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        writer: &mut Writer<'_>,
        event: &Event<'_>,
        line: &mut String,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        line.clear();
        line.push('{');
        if !self.fields.write_json_members(line)? {
            return self.inner.format_event(ctx, writer.by_ref(), event);
        }
        let inner_start = line.len();
        // `Writer::new` has ANSI colours off, which is what JSON wants.
        self.inner.format_event(ctx, Writer::new(line), event)?;
        let (members, inner) = line.split_at(inner_start);
        match inner.strip_prefix('{') {
            Some(rest) => {
                writer.write_str(members)?;
                if !rest.trim_start().starts_with('}') {
                    writer.write_char(',')?;
                }
                writer.write_str(rest)
            }
            // Not a JSON object: leave it alone rather than corrupt it.
            None => writer.write_str(inner),
        }
    }
}

thread_local! {
    /// Reused buffer for one JSON line.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Calls `f` with this thread's line buffer; does not call it when the buffer is busy or gone.
fn with_line(f: impl FnOnce(&mut String)) {
    let _ = LINE.try_with(|cell| {
        if let Ok(mut line) = cell.try_borrow_mut() {
            f(&mut line);
            // Do not keep a huge buffer alive after one unusual event.
            if line.capacity() > 64 * 1024 {
                *line = String::new();
            }
        }
    });
}
