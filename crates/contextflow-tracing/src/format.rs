//! `ContextFormat`: an event format that adds the context fields to another one.

use std::{
    cell::RefCell,
    fmt::{self, Write},
};

use tracing::{
    field::{Field, Visit},
    Event, Subscriber,
};
use tracing_subscriber::{
    fmt::{
        format::{FormatEvent, FormatFields, Writer},
        FmtContext,
    },
    registry::LookupSpan,
};

use crate::{
    escape::{self, Bounded, JsonWatch, TextLine},
    ContextFields,
};

/// A [`FormatEvent`] that adds the current context's fields to every event formatted by
/// `F`, and escapes and bounds the whole line; made by [`ContextFields::text`] or
/// [`ContextFields::json`].
///
/// - Text: the line starts with the prefix from [`ContextFields::write_text_prefix`], then
///   `F`'s output follows through the line escaper: `[req-123 tenant=acme] 2026-01-01T00:00:00Z
///   INFO app: Order creation started`. Only the final newline stays a newline; the line is cut
///   at [`ContextFields::max_line_len`] bytes (see the [crate docs](crate#security-escaping-and-bounding)).
/// - JSON: `F` must write one JSON object per event (as `tracing_subscriber`'s `Json` format
///   does); the fields become its first keys: `{"request_id":"req-123","tenant":"acme",
///   "timestamp":...}`, and every string of the line is escaped and cut at
///   [`ContextFields::max_value_len`] characters. Output that is not an object (a text format
///   given to `json` by mistake) becomes one escaped string member, `"line"`, of an object
///   with the context keys: still one JSON object per event, never a raw newline.
///
/// With no field set there is no prefix (no empty brackets) and no extra key.
///
/// ```
/// use contextflow::AsyncLocal;
/// use contextflow_tracing::{ContextFields, MemoryWriter};
///
/// static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
///
/// let fields = ContextFields::new().field("request_id", &REQUEST_ID);
/// let format = tracing_subscriber::fmt::format().without_time().with_target(false);
/// let log = MemoryWriter::new();
/// let subscriber = tracing_subscriber::fmt()
///     .event_format(fields.text(format))
///     .with_writer(log.clone())
///     .finish();
/// tracing::subscriber::with_default(subscriber, || {
///     REQUEST_ID.sync_scope("req-123".into(), || {
///         tracing::info!(note = %"two\nlines", "Order creation started")
///     });
/// });
/// assert_eq!(log.lines(), ["[req-123]  INFO Order creation started note=two\\nlines"]);
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
                // Even with colours on (`tracing_subscriber`'s default): the wrapped format
                // writes without them, through the line escaper and its bound. Writing straight
                // to the colour writer would leave the line unbounded, and a format that prints
                // event fields with its own visitor (`Pretty`) unescaped.
                let mut result = None;
                with_line(|line| {
                    result = Some(self.format_text(ctx, &mut writer, event, line));
                });
                match result {
                    Some(result) => result,
                    // The line buffer is busy (an event logged while formatting an event) or
                    // gone (thread teardown): use a fresh one.
                    None => self.format_text(ctx, &mut writer, event, &mut String::new()),
                }
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
    /// Formats a text line into `line` through the line escaper, then writes it out whole.
    fn format_text<S, N>(
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
        // Everything the wrapped format writes goes through the line escaper. Its `Writer` has
        // colours off: a colour code would be escaped like a value's.
        let mut escaper = TextLine::new(line, self.fields.line_cap());
        self.fields.write_text_prefix(&mut escaper)?;
        if escaper.written() == 0 {
            // No context, and a format that starts with the message (no time, no level): a
            // message `[req-2 tenant=globex] refund approved` would read as that request's
            // line. Its `[` is escaped, so only a prefix of ours starts a line with one.
            escaper.escape_leading_bracket();
        }
        self.inner
            .format_event(ctx, Writer::new(&mut escaper), event)?;
        escaper.finish();
        writer.write_str(line)
    }

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
        let any = self.fields.write_json_members(line)?;
        let inner_start = line.len();
        let mut watch = JsonWatch::new(line, self.fields.line_cap(), self.fields.value_cap());
        // `Writer::new` has ANSI colours off, which is what JSON wants. A value whose `Display`
        // or `Debug` fails (a date formatted with a bad pattern) makes the JSON serializer
        // under tracing-subscriber's formatter panic, in the caller's `info!`: the event
        // becomes the short object instead (the context, the level, the message).
        let formatted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.format_event(ctx, Writer::new(&mut watch), event)
        }));
        let fits = watch.finish();
        match formatted {
            Ok(result) => result?,
            Err(_) => {
                // Not through `write_cut_json`, which would format the message again (and
                // panic again, outside this catch, for a message that panics).
                let (members, _) = line.split_at(inner_start);
                return self.write_unformatted_json(writer, members, event);
            }
        }
        if !fits {
            let (members, partial) = line.split_at(inner_start);
            return self.write_cut_json(writer, members, partial, event);
        }
        let (members, inner) = line.split_at(inner_start);
        let object = is_one_json_object_line(inner)
            .then(|| inner.strip_prefix('{'))
            .flatten();
        let Some(rest) = object else {
            // Not one JSON object on one line (a text format given to `json`, whose text may
            // even start with `{`): written raw it would carry newlines and look-alike
            // prefixes or objects, without the context. It becomes one escaped string member
            // of an object with the context members instead.
            let mut out = String::with_capacity(members.len() + inner.len() + 16);
            out.push_str(members);
            if any {
                out.push(',');
            }
            out.push_str("\"line\":");
            escape::write_json(&mut out, inner.strip_suffix('\n').unwrap_or(inner))?;
            out.push_str("}\n");
            if out.len() > self.fields.line_cap() {
                return self.write_cut_json(writer, members, inner, event);
            }
            return writer.write_str(&out);
        };
        // An event field named as a context field is renamed `event.<name>` also when no
        // context is set (none of ours on the line): `info!(tenant = %input)` must not read as
        // the line's tenant.
        let renamed = rename_shadowing_keys(rest, self.fields.names());
        let rest = renamed.as_deref().unwrap_or(rest);
        let comma = any && !rest.trim_start().starts_with('}');
        // The renaming makes the line longer: still within the cap, or cut.
        if members.len() + usize::from(comma) + rest.len() > self.fields.line_cap() {
            return self.write_cut_json(writer, members, inner, event);
        }
        writer.write_str(members)?;
        if comma {
            writer.write_char(',')?;
        }
        writer.write_str(rest)
    }

    /// Writes the short object that replaces a JSON line longer than the cap: `members` (the
    /// opening brace and the context members), the timestamp found at the start of the cut
    /// line, the level, the message (cut), the target and `"truncated":true`.
    /// The record of an event whose formatting panicked: the context members, the level,
    /// the target and `"error":"the event could not be formatted"`, no value of the event's
    /// (formatting one again could panic again); the panic itself was reported by the panic
    /// hook.
    fn write_unformatted_json(
        &self,
        writer: &mut Writer<'_>,
        members: &str,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut out = String::with_capacity(members.len() + 160);
        out.push_str(members);
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str("\"level\":");
        escape::write_json(&mut out, meta.level().as_str())?;
        out.push_str(",\"target\":");
        let target: String = meta.target().chars().take(64).collect();
        escape::write_json(&mut out, &target)?;
        out.push_str(",\"error\":\"the event could not be formatted\"}\n");
        if out.len() > self.fields.line_cap() {
            // Huge context values under a small bound: the level and the error alone.
            out.clear();
            out.push_str("{\"level\":");
            escape::write_json(&mut out, meta.level().as_str())?;
            out.push_str(",\"error\":\"the event could not be formatted\"}\n");
        }
        writer.write_str(&out)
    }

    fn write_cut_json(
        &self,
        writer: &mut Writer<'_>,
        members: &str,
        partial: &str,
        event: &Event<'_>,
    ) -> fmt::Result {
        let cap = self.fields.line_cap();
        let meta = event.metadata();
        let mut message = String::new();
        event.record(&mut MessageVisitor {
            out: Bounded {
                buf: &mut message,
                remaining: self.fields.value_cap().min(cap / 16),
                truncated: false,
            },
        });
        let timestamp = partial
            .strip_prefix("{\"timestamp\":\"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(ts, _)| ts)
            .filter(|ts| ts.len() <= 64 && !ts.contains('\\'));

        let mut out = String::with_capacity(cap.min(4096));
        out.push_str(members);
        let member = |out: &mut String, key: &str| {
            if out.len() > 1 {
                out.push(',');
            }
            out.push('"');
            out.push_str(key);
            out.push_str("\":");
        };
        if let Some(ts) = timestamp {
            member(&mut out, "timestamp");
            escape::write_json(&mut out, ts)?;
        }
        member(&mut out, "level");
        escape::write_json(&mut out, meta.level().as_str())?;
        member(&mut out, "fields");
        out.push_str("{\"message\":");
        escape::write_json(&mut out, &message)?;
        out.push('}');
        member(&mut out, "target");
        escape::write_json(&mut out, meta.target())?;
        out.push_str(",\"truncated\":true}\n");
        if out.len() <= cap {
            return writer.write_str(&out);
        }
        // Still too long (huge context values or a tiny cap): the context members, each value
        // cut shorter, the level and the target; a line must not lose the request it belongs
        // to. Only when even that does not fit, the bare minimum.
        out.clear();
        let n = self.fields.names().count().max(1);
        // A character escapes to at most 12 bytes (`\\udb40\\udc41`): a quarter of the cap for
        // all values together, at worst.
        let short = self.fields.clone().max_len((cap / (48 * n)).max(8));
        // `{` and the members so far, then the level, the target if asked for, and the flag.
        let close = |out: &mut String, with_target: bool| -> fmt::Result {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str("\"level\":");
            escape::write_json(out, meta.level().as_str())?;
            if with_target {
                out.push_str(",\"target\":");
                let target: String = meta.target().chars().take(64).collect();
                escape::write_json(out, &target)?;
            }
            out.push_str(",\"truncated\":true}\n");
            Ok(())
        };
        out.push('{');
        short.write_json_members(&mut out)?;
        close(&mut out, true)?;
        if out.len() <= cap {
            return writer.write_str(&out);
        }
        out.clear();
        out.push('{');
        close(&mut out, true)?;
        if out.len() <= cap {
            return writer.write_str(&out);
        }
        // The shortest valid record (36 bytes at most): no bound can be smaller.
        out.clear();
        out.push('{');
        close(&mut out, false)?;
        writer.write_str(&out)
    }
}

/// The prefix given to an event's top-level key that has a context field's name.
const SHADOWED_PREFIX: &str = "event.";

/// Whether `line` is one JSON object (RFC 8259) on one line: the object, then nothing but a
/// final newline, with no raw newline or other control character anywhere (JSON allows none
/// inside strings, and only space, tab, CR and LF between tokens; CR and LF would break the
/// line). A text format given to `json` writes text that may start with `{` (its message) and
/// go on with a newline and a look-alike object, or just not be JSON (`{x}`). Nesting deeper
/// than 128 levels counts as not JSON (a bound on the work, and no JSON format of events
/// nests that deep).
fn is_one_json_object_line(line: &str) -> bool {
    let body = line.strip_suffix('\n').unwrap_or(line);
    let mut json = JsonCheck {
        bytes: body.as_bytes(),
        at: 0,
    };
    json.skip_space();
    if json.peek() != Some(b'{') || !json.value(0) {
        return false;
    }
    json.skip_space();
    json.at == json.bytes.len()
}

/// A strict JSON checker over bytes (see [`is_one_json_object_line`]).
struct JsonCheck<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonCheck<'_> {
    const MAX_DEPTH: usize = 128;

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        self.at += usize::from(found);
        found
    }

    /// Space and tab only: a CR or LF would end the line.
    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn value(&mut self, depth: usize) -> bool {
        match self.peek() {
            Some(b'{') => depth < Self::MAX_DEPTH && self.container(depth, b'}', true),
            Some(b'[') => depth < Self::MAX_DEPTH && self.container(depth, b']', false),
            Some(b'"') => self.string(),
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => false,
        }
    }

    /// An object (`keyed`: `"key": value` members) or an array, at the opening bracket.
    fn container(&mut self, depth: usize, close: u8, keyed: bool) -> bool {
        self.at += 1;
        self.skip_space();
        if self.eat(close) {
            return true;
        }
        loop {
            if keyed {
                if !self.string() {
                    return false;
                }
                self.skip_space();
                if !self.eat(b':') {
                    return false;
                }
                self.skip_space();
            }
            if !self.value(depth + 1) {
                return false;
            }
            self.skip_space();
            if self.eat(close) {
                return true;
            }
            if !self.eat(b',') {
                return false;
            }
            self.skip_space();
        }
    }

    fn string(&mut self) -> bool {
        if !self.eat(b'"') {
            return false;
        }
        while let Some(b) = self.peek() {
            self.at += 1;
            match b {
                b'"' => return true,
                b'\\' => match self.peek() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.at += 1,
                    Some(b'u') => {
                        // A surrogate must come in a pair (high, then low), as JSON readers
                        // require.
                        match self.unit(self.at + 1) {
                            Some(0xd800..=0xdbff) => {
                                let low = self.bytes.get(self.at + 5..self.at + 7) == Some(b"\\u")
                                    && matches!(self.unit(self.at + 7), Some(0xdc00..=0xdfff));
                                if !low {
                                    return false;
                                }
                                self.at += 11;
                            }
                            Some(0xdc00..=0xdfff) | None => return false,
                            Some(_) => self.at += 5,
                        }
                    }
                    _ => return false,
                },
                0..=0x1f => return false,
                _ => {}
            }
        }
        false
    }

    /// The four hex digits at `at`, as a UTF-16 code unit.
    fn unit(&self, at: usize) -> Option<u16> {
        let hex = std::str::from_utf8(self.bytes.get(at..at + 4)?).ok()?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u16::from_str_radix(hex, 16).ok()
    }

    fn word(&mut self, word: &[u8]) -> bool {
        let found = self.bytes[self.at..].starts_with(word);
        self.at += if found { word.len() } else { 0 };
        found
    }

    fn number(&mut self) -> bool {
        self.eat(b'-');
        let digits = |json: &mut Self| {
            let start = json.at;
            while json.peek().is_some_and(|b| b.is_ascii_digit()) {
                json.at += 1;
            }
            json.at - start
        };
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return false,
        }
        if self.eat(b'.') && digits(self) == 0 {
            return false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return false;
            }
        }
        true
    }
}

/// `rest` (a JSON object after its opening brace, as the inner format wrote it) with each
/// top-level key that is one of `names` renamed `event.<name>`; `None` when there is none (the
/// usual case, settled by one substring search per name).
///
/// With `flatten_event(true)` an event's fields are top-level keys: an event field named
/// `request_id` or `tenant` (say, `info!(tenant = %body.tenant)`) would be a second key of that
/// name after the context's, and JSON readers (serde_json, `JSON.parse`, jq) keep the last one:
/// the event's value would pass for the context's. Keys are written by the inner format from
/// field names (identifiers in the code), so their raw text is compared.
fn rename_shadowing_keys<'n>(
    rest: &str,
    names: impl Iterator<Item = &'n str> + Clone,
) -> Option<String> {
    if !names.clone().any(|name| {
        rest.match_indices(name)
            .any(|(at, _)| rest[..at].ends_with('"') && rest[at + name.len()..].starts_with('"'))
    }) {
        return None;
    }
    let bytes = rest.as_bytes();
    let mut inserts = Vec::new();
    // `rest` starts inside the object: depth 1.
    let (mut depth, mut i) = (1usize, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i + 1;
                i = start;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(bytes.len());
                i += 1;
                if depth == 1 {
                    let mut j = i;
                    while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    let key = &rest[start..end];
                    if bytes.get(j) == Some(&b':') && names.clone().any(|name| name == key) {
                        inserts.push(start);
                    }
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    if inserts.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(rest.len() + inserts.len() * SHADOWED_PREFIX.len());
    let mut from = 0;
    for at in inserts {
        out.push_str(&rest[from..at]);
        out.push_str(SHADOWED_PREFIX);
        from = at;
    }
    out.push_str(&rest[from..]);
    Some(out)
}

/// Collects the `message` field of an event, bounded.
struct MessageVisitor<'a> {
    out: Bounded<'a>,
}

impl Visit for MessageVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = self.out.write_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            // An error is our own stop at the bound.
            let _ = write!(self.out, "{value:?}");
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

#[cfg(test)]
mod tests {
    use super::is_one_json_object_line as one;

    #[test]
    fn one_json_object_on_one_line() {
        for ok in [
            "{}\n",
            "{}",
            r#"{"a":1,"b":[true,false,null,-0.5e+3,"x\"y\\z\u00e9"],"c":{"d":[]}}"#,
            "{ \"a\" :\t{ } }\n",
            "{\"é\":\"ü\"}",
            "{\"a\":\"\\ud83d\\ude00\",\"b\":-0.0,\"c\":1e-7}",
        ] {
            assert!(one(ok), "{ok:?}");
        }
        for bad in [
            "{x}",
            "{} {}",
            "{}\n{\"request_id\":\"req-2\"}",
            "{\"a\":\n1}",
            "{\"a\":\"b\nc\"}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":1,}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":\"\\ud800\\u0041\"}",
            "{\"a\":tru}",
            "[1]",
            "{",
            "",
            "{}\n\n",
        ] {
            assert!(!one(bad), "{bad:?}");
        }
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(!one(&deep));
        let fine = format!("{{\"a\":{}1{}}}", "[".repeat(100), "]".repeat(100));
        assert!(one(&fine));
    }
}
