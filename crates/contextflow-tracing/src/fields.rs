//! The list of contextflow variables that every log event carries.

use std::{
    cell::RefCell,
    fmt::{self, Write},
    sync::Arc,
};

use contextflow::AsyncLocal;

use crate::{
    escape::{self, Bounded},
    format::Mode,
    layer::ContextLayer,
    ContextFormat, EscapedFields,
};

/// Which contextflow variables appear in every log event, and under which names.
///
/// Declare it once at start-up, then hand it to the `fmt` layer through
/// [`text`](ContextFields::text) or [`json`](ContextFields::json). Each field is any
/// `&'static AsyncLocal<T>` whose `T` implements [`Display`](fmt::Display); the value is read
/// when the event is formatted, on the thread (and poll) that emitted it, so no span and no
/// argument is needed at the call site. Variables that are not set, or whose value displays as
/// nothing (an OpenTelemetry context without a valid span), are left out.
///
/// Text output starts with `[first other=value ...] `: the first declared field shows its value
/// alone (it is usually the request id; see [`name_every_field`](Self::name_every_field)), the
/// others as `name=value`. JSON output gets one top-level key per field.
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_tracing::ContextFields;
///
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
/// static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");
///
/// let fields = ContextFields::new()
///     .field("request_id", &REQUEST_ID)
///     .field("tenant", &TENANT);
/// REQUEST_ID.sync_scope("req-123".into(), || {
///     TENANT.sync_scope("acme", || assert_eq!(fields.text_prefix(), "[req-123 tenant=acme] "));
/// });
/// assert_eq!(fields.text_prefix(), "");
/// ```
#[derive(Clone)]
pub struct ContextFields {
    fields: Arc<[Field]>,
    max_len: usize,
    max_value_len: usize,
    max_line_len: usize,
    bare_first: bool,
}

/// The default bound on a value's length, in characters.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<String> = AsyncLocal::named("id");
/// let fields = contextflow_tracing::ContextFields::new().field("id", &ID);
/// let prefix = ID.sync_scope("x".repeat(1000), || fields.text_prefix());
/// assert_eq!(prefix.chars().count(), "[] ".len() + contextflow_tracing::DEFAULT_MAX_LEN + 1);
/// ```
pub const DEFAULT_MAX_LEN: usize = 256;

/// The marker appended to a value cut at the length bound (one character, U+2026).
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_tracing::{ContextFields, TRUNCATED_MARKER};
/// static ID: AsyncLocal<String> = AsyncLocal::named("id");
/// let fields = ContextFields::new().field("id", &ID).max_len(2);
/// let prefix = ID.sync_scope("abc".into(), || fields.text_prefix());
/// assert_eq!(prefix, format!("[ab{TRUNCATED_MARKER}] "));
/// ```
pub const TRUNCATED_MARKER: &str = "…";

/// The default bound on each event or span field value (the message included), in characters
/// of output, escapes included: 2048.
///
/// ```
/// assert_eq!(contextflow_tracing::DEFAULT_MAX_VALUE_LEN, 2048);
/// ```
pub const DEFAULT_MAX_VALUE_LEN: usize = 2048;

/// The default bound on a whole log line, in bytes, the final newline included: 8192 (below
/// the 16 KiB at which container runtimes split a line into two records).
///
/// ```
/// assert_eq!(contextflow_tracing::DEFAULT_MAX_LINE_LEN, 8192);
/// ```
pub const DEFAULT_MAX_LINE_LEN: usize = 8192;

#[derive(Clone)]
pub(crate) struct Field {
    pub(crate) name: &'static str,
    source: SourceRef,
}

#[derive(Clone)]
enum SourceRef {
    Var(&'static dyn Source),
    Fn(Arc<dyn Source>),
}

impl SourceRef {
    fn get(&self) -> &dyn Source {
        match self {
            SourceRef::Var(var) => *var,
            SourceRef::Fn(f) => &**f,
        }
    }
}

/// A closure field: called for each event, `None` leaves the field out.
struct FnSource<F>(F);

impl<T, F> Source for FnSource<F>
where
    T: fmt::Display,
    F: Fn() -> Option<T> + Send + Sync,
{
    fn with_value(&self, f: &mut dyn FnMut(&dyn fmt::Display)) -> bool {
        match (self.0)() {
            Some(value) => {
                f(&value);
                true
            }
            None => false,
        }
    }
}

/// A variable whose current value can be displayed. Implemented for every `AsyncLocal<T>` with
/// `T: Display`, so the field list holds plain `'static` references and no boxes.
trait Source: Send + Sync {
    /// Calls `f` with the current value; returns `false` (without calling it) when not set.
    fn with_value(&self, f: &mut dyn FnMut(&dyn fmt::Display)) -> bool;
}

impl<T: fmt::Display + Send + Sync + 'static> Source for AsyncLocal<T> {
    fn with_value(&self, f: &mut dyn FnMut(&dyn fmt::Display)) -> bool {
        self.with(|v| match v {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        })
    }
}

// ===== impl ContextFields =====

impl ContextFields {
    /// An empty list; add fields with [`field`](ContextFields::field).
    ///
    /// ```
    /// let fields = contextflow_tracing::ContextFields::new();
    /// assert!(fields.is_empty());
    /// ```
    pub fn new() -> Self {
        ContextFields {
            fields: Arc::new([]),
            max_len: DEFAULT_MAX_LEN,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_line_len: DEFAULT_MAX_LINE_LEN,
            bare_first: true,
        }
    }

    /// Adds `var` under `name`. Fields appear in the order they are added.
    ///
    /// # Panics
    /// When `name` is empty or has a character other than ASCII letters, digits, `_`, `-` and
    /// `.` (names are code, not input; this keeps them valid as JSON keys and readable in text),
    /// or is already the name of a field of the list.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static USER_ID: AsyncLocal<u64> = AsyncLocal::named("user_id");
    ///
    /// let fields = contextflow_tracing::ContextFields::new().field("user_id", &USER_ID);
    /// assert_eq!(fields.names().collect::<Vec<_>>(), ["user_id"]);
    /// ```
    #[track_caller]
    pub fn field<T>(self, name: &'static str, var: &'static AsyncLocal<T>) -> Self
    where
        T: fmt::Display + Send + Sync + 'static,
    {
        self.push(name, SourceRef::Var(var))
    }

    /// Adds a field whose value `value` computes for each event (`None` leaves it out): for
    /// what does not live in a contextflow variable, such as the trace and span ids of
    /// OpenTelemetry's current context. `value` runs on the thread that logs, must be cheap and
    /// must not log itself.
    ///
    /// # Panics
    /// When `name` is invalid or taken, as [`field`](Self::field).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    ///
    /// let fields = contextflow_tracing::ContextFields::new()
    ///     .field_fn("attempt", || match ATTEMPT.load(Ordering::Relaxed) {
    ///         0 => None,
    ///         n => Some(n),
    ///     });
    /// assert_eq!(fields.text_prefix(), "");
    /// ATTEMPT.store(3, Ordering::Relaxed);
    /// assert_eq!(fields.text_prefix(), "[3] ");
    /// ```
    #[track_caller]
    pub fn field_fn<T, F>(self, name: &'static str, value: F) -> Self
    where
        T: fmt::Display,
        F: Fn() -> Option<T> + Send + Sync + 'static,
    {
        self.push(name, SourceRef::Fn(Arc::new(FnSource(value))))
    }

    #[track_caller]
    fn push(self, name: &'static str, source: SourceRef) -> Self {
        assert!(
            is_valid_name(name),
            "contextflow-tracing: invalid field name {name:?} (use ASCII letters, digits, `_`, `-`, `.`)"
        );
        // Two context fields of one name would be told apart by renaming one as if it were
        // the event's own field (`event.<name>`): a record would show a context value under
        // an event field's name.
        assert!(
            !self.fields.iter().any(|field| field.name == name),
            "contextflow-tracing: the context field {name:?} is given twice"
        );
        let mut fields = self.fields.to_vec();
        fields.push(Field { name, source });
        ContextFields {
            fields: fields.into(),
            ..self
        }
    }

    /// Sets the bound on each value's length, in characters (default [`DEFAULT_MAX_LEN`]).
    /// A longer value is cut and [`TRUNCATED_MARKER`] appended; the value's `Display` impl
    /// is stopped at the bound, so a huge value costs no more than a short one.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static ID: AsyncLocal<String> = AsyncLocal::named("id");
    ///
    /// let fields = contextflow_tracing::ContextFields::new().field("id", &ID).max_len(4);
    /// ID.sync_scope("abcdefgh".into(), || assert_eq!(fields.text_prefix(), "[abcd…] "));
    /// ```
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// Sets the bound on each event and span field value, the message included, in characters
    /// of output, escapes included (default [`DEFAULT_MAX_VALUE_LEN`]). It applies to JSON
    /// output through [`json`](Self::json) and to text output through
    /// [`escaped_fields`](Self::escaped_fields).
    ///
    /// ```
    /// use contextflow_tracing::{ContextFields, MemoryWriter};
    /// let fields = ContextFields::new().max_value_len(5);
    /// let log = MemoryWriter::new();
    /// let subscriber = tracing_subscriber::fmt()
    ///     .json()
    ///     .without_time()
    ///     .with_writer(log.clone())
    ///     .map_event_format(|f| fields.json(f))
    ///     .finish();
    /// tracing::subscriber::with_default(subscriber, || tracing::info!(reference = "R1234567", "hi"));
    /// let line: serde_json::Value = serde_json::from_str(&log.contents()).unwrap();
    /// assert_eq!(line["fields"]["reference"], "R1234…");
    /// ```
    pub fn max_value_len(mut self, max_value_len: usize) -> Self {
        self.max_value_len = max_value_len;
        self
    }

    /// Sets the bound on a whole line, in bytes, the final newline included (default
    /// [`DEFAULT_MAX_LINE_LEN`]). A longer text line is cut and ends with
    /// [`TRUNCATED_MARKER`]; a longer JSON line is replaced by a short valid object with the
    /// context fields, `timestamp`, `level`, the message (cut), `target` and
    /// `"truncated":true`; under a bound too small for that, the context values are cut
    /// shorter, then the message and the context are left out, then the target (a JSON line
    /// is never shorter than `{"level":"DEBUG","truncated":true}` and its newline, 36 bytes,
    /// whatever the bound).
    ///
    /// ```
    /// use contextflow_tracing::{ContextFields, MemoryWriter};
    /// let fields = ContextFields::new().max_line_len(40);
    /// let log = MemoryWriter::new();
    /// let subscriber = tracing_subscriber::fmt()
    ///     .without_time()
    ///     .with_ansi(false)
    ///     .with_writer(log.clone())
    ///     .event_format(fields.text(tracing_subscriber::fmt::format().without_time()))
    ///     .finish();
    /// tracing::subscriber::with_default(subscriber, || tracing::info!(reference = "R1".repeat(50)));
    /// let line = log.contents();
    /// assert_eq!(line.len(), 40);
    /// assert!(line.ends_with("…\n"));
    /// ```
    pub fn max_line_len(mut self, max_line_len: usize) -> Self {
        self.max_line_len = max_line_len;
        self
    }

    /// The field formatter for text output that escapes and bounds every event and span field
    /// value with this list's [`max_value_len`](Self::max_value_len); see [`EscapedFields`].
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_tracing::{ContextFields, MemoryWriter};
    /// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
    ///
    /// let fields = ContextFields::new().field("tenant", &TENANT).name_every_field();
    /// let log = MemoryWriter::new();
    /// let subscriber = tracing_subscriber::fmt()
    ///     .with_ansi(false)
    ///     .with_writer(log.clone())
    ///     .fmt_fields(fields.escaped_fields())
    ///     .event_format(fields.text(tracing_subscriber::fmt::format().without_time().with_target(false)))
    ///     .finish();
    /// tracing::subscriber::with_default(subscriber, || {
    ///     TENANT.sync_scope("acme".into(), || tracing::info!(note = %"a\nb", "saved"));
    /// });
    /// assert_eq!(log.contents(), "[tenant=acme]  INFO saved note=a\\nb\n");
    /// ```
    pub fn escaped_fields(&self) -> EscapedFields {
        EscapedFields::new().max_value_len(self.max_value_len)
    }

    /// Wraps any [`Layer`](tracing_subscriber::Layer) so that every event it sees carries the
    /// context fields as ordinary event fields: OpenTelemetry's log appender, a JSON layer, an
    /// error tracker's layer. See [`ContextLayer`].
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_tracing::{ContextFields, MemoryWriter};
    /// use tracing_subscriber::prelude::*;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    ///
    /// let fields = ContextFields::new().field("request_id", &REQUEST_ID);
    /// let log = MemoryWriter::new();
    /// let json = tracing_subscriber::fmt::layer().json().without_time().with_writer(log.clone());
    /// let subscriber = tracing_subscriber::registry().with(fields.layer(json));
    /// tracing::subscriber::with_default(subscriber, || {
    ///     REQUEST_ID.sync_scope("req-1".into(), || tracing::info!(order = 7, "placed"));
    /// });
    /// let line: serde_json::Value = serde_json::from_str(&log.contents()).unwrap();
    /// assert_eq!(line["fields"]["request_id"], "req-1");
    /// assert_eq!(line["fields"]["order"], 7);
    /// ```
    pub fn layer<L>(&self, inner: L) -> ContextLayer<L> {
        ContextLayer::new(self.clone(), inner)
    }

    /// Prints every field as `name=value` in text output, the first one included
    /// (`[request_id=req-1 tenant=acme]` instead of `[req-1 tenant=acme]`).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    ///
    /// let fields = contextflow_tracing::ContextFields::new()
    ///     .field("request_id", &REQUEST_ID)
    ///     .name_every_field();
    /// REQUEST_ID.sync_scope("req-1".into(), || {
    ///     assert_eq!(fields.text_prefix(), "[request_id=req-1] ");
    /// });
    /// ```
    pub fn name_every_field(mut self) -> Self {
        self.bare_first = false;
        self
    }

    /// Whether no field was added.
    ///
    /// ```
    /// assert!(contextflow_tracing::ContextFields::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The field names, in order.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static A: AsyncLocal<u8> = AsyncLocal::new();
    /// static B: AsyncLocal<u8> = AsyncLocal::new();
    /// let fields = contextflow_tracing::ContextFields::new().field("a", &A).field("b", &B);
    /// assert_eq!(fields.names().collect::<Vec<_>>(), ["a", "b"]);
    /// ```
    pub fn names(&self) -> impl Iterator<Item = &'static str> + Clone + '_ {
        self.fields.iter().map(|f| f.name)
    }

    /// Wraps a text event format (such as `tracing_subscriber::fmt::format()`) so that each
    /// line starts with the context prefix (see [`write_text_prefix`](Self::write_text_prefix))
    /// and the whole line is escaped and bounded (see [`ContextFormat`]).
    ///
    /// Also registers [`SpanCarrier`](crate::SpanCarrier), so that spawned tasks log inside
    /// their parent's span.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_tracing::MemoryWriter;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    ///
    /// let fields = contextflow_tracing::ContextFields::new().field("request_id", &REQUEST_ID);
    /// let log = MemoryWriter::new();
    /// let subscriber = tracing_subscriber::fmt()
    ///     .event_format(fields.text(tracing_subscriber::fmt::format().without_time()))
    ///     .with_writer(log.clone())
    ///     .finish();
    /// tracing::subscriber::with_default(subscriber, || {
    ///     REQUEST_ID.sync_scope("req-9".into(), || tracing::warn!("low stock"));
    /// });
    /// assert_eq!(log.lines(), ["[req-9]  WARN rust_out: low stock"]);
    /// ```
    pub fn text<F>(&self, inner: F) -> ContextFormat<F> {
        crate::carry_spans();
        ContextFormat::new(self.clone(), inner, Mode::Text)
    }

    /// Wraps a JSON event format (such as `tracing_subscriber::fmt::format().json()`) so that
    /// each object gets one top-level key per field that is set, and every string of the line
    /// is escaped and bounded (see [`ContextFormat`]).
    ///
    /// Also registers [`SpanCarrier`](crate::SpanCarrier), so that spawned tasks log inside
    /// their parent's span.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// use contextflow_tracing::MemoryWriter;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    ///
    /// let fields = contextflow_tracing::ContextFields::new().field("request_id", &REQUEST_ID);
    /// let log = MemoryWriter::new();
    /// let subscriber = tracing_subscriber::fmt()
    ///     .json()
    ///     .without_time()
    ///     .map_event_format(|json| fields.json(json))
    ///     .with_writer(log.clone())
    ///     .finish();
    /// tracing::subscriber::with_default(subscriber, || {
    ///     REQUEST_ID.sync_scope("req-9".into(), || tracing::warn!("low\u{2028}stock"));
    /// });
    /// assert_eq!(
    ///     log.contents(),
    ///     "{\"request_id\":\"req-9\",\"level\":\"WARN\",\"fields\":{\"message\":\"low\\u2028stock\"},\"target\":\"rust_out\"}\n"
    /// );
    /// ```
    pub fn json<F>(&self, inner: F) -> ContextFormat<F> {
        crate::carry_spans();
        ContextFormat::new(self.clone(), inner, Mode::Json)
    }

    /// Writes the text prefix for the current context: `[value1 name2=value2] `, or nothing at
    /// all when no field is set. Values with spaces, `=`, brackets, quotes, control or invisible
    /// characters are quoted and escaped (`"acme corp"`, `"a\nb"`, `"\x1b\x5b31m"`): brackets
    /// and `=` too (`\x5b`, `\x5d`, `\x3d`), so the first `]` of a line is the end of its
    /// prefix and no `name=value` hides in a value, quotes or not.
    ///
    /// # Errors
    /// When `w` fails.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    /// let fields = contextflow_tracing::ContextFields::new().field("request_id", &REQUEST_ID);
    ///
    /// let mut out = String::new();
    /// REQUEST_ID.sync_scope("evil\n[req-2] forged".into(), || fields.write_text_prefix(&mut out))?;
    /// assert_eq!(out, "[\"evil\\n\\x5breq-2\\x5d forged\"] ");
    /// # Ok::<(), std::fmt::Error>(())
    /// ```
    pub fn write_text_prefix(&self, w: &mut dyn Write) -> fmt::Result {
        let mut result = Ok(());
        let mut any = false;
        with_scratch(|scratch| {
            for (i, field) in self.fields.iter().enumerate() {
                if !self.render(field, scratch) {
                    continue;
                }
                result = (|| {
                    w.write_str(if any { " " } else { "[" })?;
                    if i > 0 || !self.bare_first {
                        w.write_str(field.name)?;
                        w.write_char('=')?;
                    }
                    escape::write_text(w, scratch)
                })();
                any = true;
                if result.is_err() {
                    return;
                }
            }
        });
        result?;
        if any {
            w.write_str("] ")?;
        }
        Ok(())
    }

    /// The text prefix for the current context, as a `String` (see
    /// [`write_text_prefix`](Self::write_text_prefix)).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    /// let fields = contextflow_tracing::ContextFields::new()
    ///     .field("request_id", &REQUEST_ID)
    ///     .field("tenant", &TENANT);
    /// TENANT.sync_scope("acme corp".into(), || {
    ///     assert_eq!(fields.text_prefix(), "[tenant=\"acme corp\"] ");
    /// });
    /// ```
    pub fn text_prefix(&self) -> String {
        let mut out = String::new();
        // Writing to a `String` cannot fail.
        let _ = self.write_text_prefix(&mut out);
        out
    }

    /// Writes the JSON object members for the current context, `"name":"value"` separated by
    /// commas, without braces; returns whether anything was written. Values are JSON strings,
    /// escaped as JSON requires plus DEL, C1 controls and invisible characters (`\u2028`).
    ///
    /// # Errors
    /// When `w` fails.
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
    /// let fields = contextflow_tracing::ContextFields::new().field("request_id", &REQUEST_ID);
    ///
    /// let mut out = String::new();
    /// REQUEST_ID.sync_scope("a\"b".into(), || fields.write_json_members(&mut out))?;
    /// assert_eq!(out, r#""request_id":"a\"b""#);
    /// # Ok::<(), std::fmt::Error>(())
    /// ```
    pub fn write_json_members(&self, w: &mut dyn Write) -> Result<bool, fmt::Error> {
        let mut result = Ok(());
        let mut any = false;
        with_scratch(|scratch| {
            for field in self.fields.iter() {
                if !self.render(field, scratch) {
                    continue;
                }
                result = (|| {
                    if any {
                        w.write_char(',')?;
                    }
                    // Names are checked to be `[A-Za-z0-9_.-]+` in `field`.
                    w.write_char('"')?;
                    w.write_str(field.name)?;
                    w.write_str("\":")?;
                    escape::write_json(w, scratch)
                })();
                any = true;
                if result.is_err() {
                    return;
                }
            }
        });
        result.map(|()| any)
    }

    /// Renders `field`'s current value, bounded, into `scratch`; `false` when it is not set, or
    /// when its `Display` writes nothing (an empty value says nothing: an OpenTelemetry context
    /// without a valid span has no trace id to show, not an all-zero one).
    ///
    /// A value whose `Display` logs an event renders [`RECURSIVE_VALUE`] in that event's line:
    /// under a global subscriber tracing does not stop the nested event, which would render
    /// the same value again, without end (a stack overflow).
    pub(crate) fn render(&self, field: &Field, scratch: &mut String) -> bool {
        scratch.clear();
        if RENDERING.with(|r| r.replace(true)) {
            scratch.push_str(RECURSIVE_VALUE);
            return true;
        }
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                RENDERING.with(|r| r.set(false));
            }
        }
        let _done = Done;
        let mut bounded = Bounded {
            buf: scratch,
            remaining: self.max_len,
            truncated: false,
        };
        let set = field.source.get().with_value(&mut |value| {
            // An error is either our own stop at the bound (recorded in `truncated`) or a
            // failing `Display` impl, whose partial output is still worth logging.
            let _ = write!(bounded, "{value}");
        });
        if bounded.truncated {
            scratch.push_str(TRUNCATED_MARKER);
        }
        set && !scratch.is_empty()
    }
}

/// What a context value renders as in an event logged while that value was being rendered.
const RECURSIVE_VALUE: &str = "<recursive>";

thread_local! {
    /// Whether this thread is rendering a context value (see `render`).
    static RENDERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// ===== crate-internal accessors =====

impl ContextFields {
    pub(crate) fn list(&self) -> &[Field] {
        &self.fields
    }

    pub(crate) fn value_cap(&self) -> usize {
        self.max_value_len
    }

    pub(crate) fn line_cap(&self) -> usize {
        self.max_line_len
    }
}

/// Field names are code, not input: ASCII letters, digits, `_`, `-`, `.`, not empty.
const fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
            return false;
        }
        i += 1;
    }
    true
}

impl Default for ContextFields {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ContextFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextFields")
            .field("names", &self.names().collect::<Vec<_>>())
            .field("max_len", &self.max_len)
            .field("max_value_len", &self.max_value_len)
            .field("max_line_len", &self.max_line_len)
            .field("bare_first", &self.bare_first)
            .finish()
    }
}

// ===== scratch buffer =====

thread_local! {
    /// Reused buffer for rendering one value, so that formatting does not allocate per event.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Calls `f` with this thread's scratch buffer, or with a fresh one when the buffer is in use
/// (a value's `Display` impl that itself logs) or the thread is being torn down.
pub(crate) fn with_scratch(f: impl FnOnce(&mut String)) {
    let mut f = Some(f);
    let _ = SCRATCH.try_with(|cell| {
        if let Ok(mut buf) = cell.try_borrow_mut() {
            if let Some(f) = f.take() {
                f(&mut buf);
            }
            // Do not keep a huge buffer alive after one unusual value.
            if buf.capacity() > 4 * 1024 {
                *buf = String::new();
            }
        }
    });
    if let Some(f) = f {
        f(&mut String::new());
    }
}
