//! `EscapedFields`: tracing-subscriber's default field layout, every value escaped and bounded.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::{RecordFields, VisitFmt, VisitOutput},
    fmt::format::{FormatFields, Writer},
};

use crate::{
    escape::TextValue,
    fields::{DEFAULT_MAX_VALUE_LEN, TRUNCATED_MARKER},
};

/// A [`FormatFields`] for text output that writes event and span fields exactly as
/// `tracing_subscriber`'s default (`message` first as it is, then `name=value` with the value's
/// `Debug` form, `error.sources=[..]` for errors), except that every value, the message
/// included, goes through the escaper and is bounded.
///
/// - Escaped: every control character (newline, carriage return, tab, ESC, DEL, C1), U+2028,
///   U+2029, the bidirectional controls and the invisible format characters listed in the
///   [crate docs](crate#security-escaping-and-bounding), written as `\n`, `\r`, `\t`, `\x1b`,
///   `\u{202e}`. A value without any of them is written byte for byte as the default would.
/// - Bounded: each value writes at most `max_value_len` characters, escapes included (an escape
///   is never split), then [`TRUNCATED_MARKER`](crate::TRUNCATED_MARKER); formatting of the
///   value stops there, so a huge value costs no more than a short one.
///
/// Install it with `.fmt_fields(..)` next to [`ContextFields::text`](crate::ContextFields::text)
/// (use [`ContextFields::escaped_fields`](crate::ContextFields::escaped_fields) to share the
/// bound). It writes no colour codes, whatever the layer's ANSI setting, so the span fields it
/// stores print cleanly through `ContextFields::text`, which writes every line without colours.
///
/// ```
/// use contextflow_tracing::{EscapedFields, MemoryWriter};
///
/// let log = MemoryWriter::new();
/// let subscriber = tracing_subscriber::fmt()
///     .fmt_fields(EscapedFields::new().max_value_len(24))
///     .without_time()
///     .with_ansi(false)
///     .with_writer(log.clone())
///     .finish();
/// tracing::subscriber::with_default(subscriber, || {
///     let reference = "R1\n[FORGED] INFO forged line";
///     tracing::info!(%reference, count = 2, "order\u{202E} placed");
/// });
/// assert_eq!(
///     log.contents(),
///     " INFO rust_out: order\\u{202e} placed reference=R1\\n[FORGED] INFO forged… count=2\n"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct EscapedFields {
    max_value_len: usize,
}

// ===== impl EscapedFields =====

impl EscapedFields {
    /// Escaping with the default bound, [`DEFAULT_MAX_VALUE_LEN`](crate::DEFAULT_MAX_VALUE_LEN)
    /// characters per value.
    ///
    /// ```
    /// # use contextflow_tracing::MemoryWriter;
    /// # let log = MemoryWriter::new();
    /// # let subscriber = tracing_subscriber::fmt().without_time().with_ansi(false).with_target(false)
    /// #     .with_writer(log.clone())
    /// .fmt_fields(contextflow_tracing::EscapedFields::new())
    /// # .finish();
    /// # tracing::subscriber::with_default(subscriber, || {
    /// tracing::info!(id = %"a".repeat(5000), "big");
    /// # });
    /// let line = log.contents();
    /// assert!(line.ends_with(&format!("id={}…\n", "a".repeat(contextflow_tracing::DEFAULT_MAX_VALUE_LEN))));
    /// ```
    pub const fn new() -> Self {
        EscapedFields {
            max_value_len: DEFAULT_MAX_VALUE_LEN,
        }
    }

    /// Sets the bound on each value, in characters of output (escapes included).
    ///
    /// ```
    /// # use contextflow_tracing::MemoryWriter;
    /// # let log = MemoryWriter::new();
    /// # let subscriber = tracing_subscriber::fmt().without_time().with_ansi(false).with_target(false)
    /// #     .with_writer(log.clone())
    /// .fmt_fields(contextflow_tracing::EscapedFields::new().max_value_len(4))
    /// # .finish();
    /// # tracing::subscriber::with_default(subscriber, || {
    /// tracing::info!(id = "abcdefgh", "hi");
    /// # });
    /// assert_eq!(log.contents(), " INFO hi id=\"abc…\"\n");
    /// ```
    pub const fn max_value_len(mut self, max_value_len: usize) -> Self {
        self.max_value_len = max_value_len;
        self
    }
}

impl Default for EscapedFields {
    fn default() -> Self {
        Self::new()
    }
}

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapedVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
            max_value_len: self.max_value_len,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// The visitor behind [`EscapedFields`], laid out as `tracing_subscriber`'s `DefaultVisitor`.
struct EscapedVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
    max_value_len: usize,
}

impl EscapedVisitor<'_> {
    fn pad(&mut self) {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.result = self.writer.write_char(' ');
        }
    }

    /// Writes `name=`, without colour codes even when the writer has colours on: span fields
    /// are stored as formatted here, and [`ContextFields::text`](crate::ContextFields::text)
    /// escapes every colour code in a line (it cannot tell one from a value's).
    fn name(&mut self, name: &str) -> fmt::Result {
        let name = name.strip_prefix("r#").unwrap_or(name);
        write!(self.writer, "{name}=")
    }
}

impl Visit for EscapedVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        // `log` metadata fields, as in `record_debug`.
        if field.name().starts_with("log.") {
            return;
        }
        // Quoted and escaped as `Debug` writes it; a cut value still ends in a closing quote
        // and never inside an escape (`a="abc…"`), or a logfmt reader would read on past the
        // cut, through the next field's quote, and take its content for top-level fields.
        if self.result.is_err() {
            return;
        }
        self.pad();
        if self.result.is_err() {
            return;
        }
        let mut quoted = String::new();
        let mut value_out = TextValue::new(&mut quoted, self.max_value_len);
        let _ = write!(value_out, "{value:?}");
        if value_out.truncated() {
            quoted.truncate(quoted.len() - TRUNCATED_MARKER.len());
            crate::escape::trim_open_escape(&mut quoted);
            if quoted.is_empty() {
                // A bound too small for even the opening quote.
                quoted.push('"');
            }
            quoted.push_str(TRUNCATED_MARKER);
            quoted.push('"');
        }
        self.result = (|| {
            self.name(field.name())?;
            self.writer.write_str(&quoted)
        })();
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match value.source() {
            Some(source) => {
                let name = field.name();
                self.record_debug(
                    field,
                    &format_args!("{} {name}.sources={}", value, SourceList(source)),
                )
            }
            None => self.record_debug(field, &format_args!("{value}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // `log` metadata fields are shown by the event format itself (this crate turns on
        // tracing-subscriber's `tracing-log` feature, under which the default skips them too).
        if name.starts_with("log.") {
            return;
        }
        self.pad();
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if name == "message" {
                // Cut as a field's value is (never inside an escape that `Debug` wrote), but
                // not closed with a quote: the message is not a quoted value.
                return self.cut_value(format_args!("{value:?}"), false);
            }
            self.name(name)?;
            self.quoted_value(format_args!("{value:?}"))
        })();
    }
}

/// What stands for the rest of a value whose `Debug` or `Display` failed.
const FMT_ERROR_MARKER: &str = "<fmt error>";

thread_local! {
    /// The buffer a field's value is formatted into before it is written (see
    /// [`EscapedVisitor::quoted_value`]).
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl EscapedVisitor<'_> {
    /// Writes a field's `Debug` value through the escaper, bounded, as [`value`](Self::value)
    /// does, except that a cut value never ends inside an escape (`\u{20` of `\u{202e}`) and
    /// keeps its quotes balanced (`a="AAA…"`): a `Debug` string (`?value`, a `HeaderValue`, an
    /// `Option<&str>`) left open would have a logfmt reader read on past the cut, through the
    /// next field's quote, and take its content for top-level fields.
    fn quoted_value(&mut self, args: fmt::Arguments<'_>) -> fmt::Result {
        self.cut_value(args, true)
    }

    /// As [`quoted_value`](Self::quoted_value); `balance` closes a quote the cut left open.
    fn cut_value(&mut self, args: fmt::Arguments<'_>, balance: bool) -> fmt::Result {
        // `try_with`: a thread-local's destructor may log or make a span after `SCRATCH` is
        // gone (a panic there would abort the process); it gets a buffer of its own.
        let mut args = Some(args);
        let scratch = SCRATCH.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                let args = args.take().expect("taken once");
                buf.clear();
                let result = self.write_cut_safe(&mut buf, args, balance);
                buf.clear();
                buf.shrink_to(4 * 1024);
                Some(result)
            }
            // Formatting a value logged (a `Debug` that logs): a buffer of its own.
            Err(_) => None,
        });
        match (scratch, args) {
            (Ok(Some(result)), _) => result,
            (_, Some(args)) => self.write_cut_safe(&mut String::new(), args, balance),
            (_, None) => Ok(()),
        }
    }

    fn write_cut_safe(
        &mut self,
        buf: &mut String,
        args: fmt::Arguments<'_>,
        balance: bool,
    ) -> fmt::Result {
        let mut out = TextValue::new(&mut *buf, self.max_value_len);
        let written = out.write_fmt(args);
        let truncated = out.truncated();
        if truncated {
            buf.truncate(buf.len() - TRUNCATED_MARKER.len());
            crate::escape::trim_open_escape(buf);
            let open = balance && has_open_quote(buf);
            buf.push_str(TRUNCATED_MARKER);
            if open {
                buf.push('"');
            }
        } else if written.is_err() {
            // A `Debug` or `Display` that fails: what it wrote, then a marker, and the line
            // goes on. An error here would make tracing-subscriber drop the event, or, for a
            // span, print its raw field values to stderr.
            crate::escape::trim_open_escape(buf);
            let open = balance && has_open_quote(buf);
            buf.push_str(FMT_ERROR_MARKER);
            if open {
                buf.push('"');
            }
        }
        self.writer.write_str(buf)
    }
}

/// Whether `s` ends inside a double-quoted string (quotes escaped with `\` do not count, nor
/// does the quote of a `char`'s `Debug`, `'"'`).
fn has_open_quote(s: &str) -> bool {
    let bytes = s.as_bytes();
    let (mut open, mut i) = (false, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'"' => open = !open,
            b'\'' if !open && bytes.get(i + 1..i + 3) == Some(b"\"'".as_slice()) => i += 2,
            _ => {}
        }
        i += 1;
    }
    open
}

impl VisitOutput<fmt::Result> for EscapedVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapedVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// An error and its sources as `[a, b]`, each by its `Display`. The walk stops at the value's
/// bound (the first failed write) and after [`MAX_SOURCES`] sources, so a chain that loops
/// back on itself (a `source()` returning an ancestor) cannot hang the logging thread.
struct SourceList<'a>(&'a (dyn std::error::Error + 'static));

/// The most errors of one chain a value lists; then `...`.
const MAX_SOURCES: usize = 64;

impl fmt::Display for SourceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        let mut next = Some(self.0);
        let mut listed = 0;
        while let Some(error) = next {
            if listed == MAX_SOURCES {
                f.write_str(", ...")?;
                break;
            }
            if listed > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{error}")?;
            listed += 1;
            next = error.source();
        }
        f.write_str("]")
    }
}
