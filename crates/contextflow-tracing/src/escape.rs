//! Escaping and bounding of everything that reaches a log line.
//!
//! Values come from requests (a header, a message attribute, an order reference), so they are
//! untrusted: nothing in them may start a new log line, move the cursor, change terminal
//! colours, hide text or reorder the text that follows (bidirectional controls). Every such
//! character is escaped, never dropped, so the original value can still be read from the log.
//!
//! The escaped set ([`is_escaped`]) is the same for every output:
//! - every control character (`char::is_control`: C0, DEL, C1, so newline, carriage return,
//!   tab, ESC and NEL among them);
//! - line and paragraph separators U+2028/U+2029;
//! - the bidirectional controls: embeddings and overrides U+202A..U+202E, isolates
//!   U+2066..U+2069, marks U+200E/U+200F/U+061C;
//! - invisible format characters: soft hyphen U+00AD, combining grapheme joiner U+034F,
//!   zero-width space/joiners U+200B..U+200D, word joiner and invisible operators
//!   U+2060..U+2064, deprecated format controls U+206A..U+206F, BOM U+FEFF, interlinear
//!   annotation U+FFF9..U+FFFB, Arabic/Syriac prepended marks (U+0600..U+0605, U+06DD, U+070F,
//!   U+0890, U+0891, U+08E2), Mongolian variation selectors and vowel separator U+180B..U+180F,
//!   variation selectors U+FE00..U+FE0F, Hangul fillers (U+115F, U+1160, U+3164, U+FFA0), Khmer
//!   inherent vowels U+17B4/U+17B5, other format controls (U+110BD, U+110CD, U+13430..U+1343F,
//!   U+1BCA0..U+1BCA3, U+1D173..U+1D17A) and the whole tag / variation-selector supplement
//!   block U+E0000..U+E0FFF (used to smuggle invisible text).
//!
//! Text escapes: `\n`, `\r`, `\t`, `\xNN` for the other ASCII controls and DEL, `\u{hex}` for
//! the rest (tracing-subscriber's own notation for C1 controls). JSON escapes: `\n`, `\r`, `\t`
//! and `\uXXXX` (a surrogate pair above U+FFFF), so a JSON line stays valid JSON and decodes to
//! the original character.

use std::fmt::{self, Write};

use crate::fields::TRUNCATED_MARKER;

/// Whether `c` is escaped in every output (see the module docs for the list).
pub(crate) fn is_escaped(c: char) -> bool {
    if (c as u32) < 0x80 {
        return c.is_ascii_control();
    }
    c.is_control() || is_invisible(c)
}

/// Characters that are not control characters but still change how a terminal or an editor
/// shows a line: separators, bidirectional controls, invisible format characters and fillers.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// Whether every byte of `s` is printable ASCII (no control, no DEL, nothing above). Written as
/// a reduction without early exit so that it vectorizes; the common log line takes this path.
#[inline]
pub(crate) fn is_plain_ascii(s: &[u8]) -> bool {
    !s.iter()
        .fold(false, |any, &b| any | !(0x20..0x7f).contains(&b))
}

/// The text escape of an escaped character (`\n`, `\x1b`, `\u{202e}`), at most 9 bytes.
fn text_escape(c: char) -> EscapeBuf {
    let mut buf = EscapeBuf::default();
    // Writing to an `EscapeBuf` cannot fail for these lengths (at most `\u{e0fff}`).
    let _ = match c {
        '\n' => buf.write_str("\\n"),
        '\r' => buf.write_str("\\r"),
        '\t' => buf.write_str("\\t"),
        c if (c as u32) < 0x80 => write!(buf, "\\x{:02x}", c as u32),
        c => write!(buf, "\\u{{{:x}}}", c as u32),
    };
    buf
}

/// The JSON escape of an escaped character (`\n`, `\u001b`, `\u202e`, or a surrogate pair),
/// at most 12 bytes.
fn json_escape(c: char) -> EscapeBuf {
    let mut buf = EscapeBuf::default();
    let mut units = [0u16; 2];
    // Writing to an `EscapeBuf` cannot fail for these lengths (at most 12 bytes).
    let _ = match c {
        '\n' => buf.write_str("\\n"),
        '\r' => buf.write_str("\\r"),
        '\t' => buf.write_str("\\t"),
        c => c
            .encode_utf16(&mut units)
            .iter()
            .try_for_each(|u| write!(buf, "\\u{u:04x}")),
    };
    buf
}

/// A small stack buffer for one escape sequence.
#[derive(Default)]
struct EscapeBuf {
    bytes: [u8; 12],
    len: usize,
}

impl EscapeBuf {
    fn as_str(&self) -> &str {
        // Only ASCII is ever written into it.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl Write for EscapeBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

// ===== context values (the `[...]` prefix and top-level JSON members) =====

/// Whether `c` may appear in the text prefix as it is, outside quotes.
fn is_bare(c: char) -> bool {
    // U+2800 (braille blank) is not white space, but shows as a space: bare, it would make
    // one value look like two fields.
    !(c.is_whitespace() || is_escaped(c) || matches!(c, '"' | '\\' | '=' | '[' | ']' | '\u{2800}'))
}

/// Writes a context value for the text prefix: as it is when every character is bare,
/// otherwise in double quotes with `"` and `\` backslash-escaped, `[`, `]` and `=` written
/// `\x5b`, `\x5d` and `\x3d` (so the prefix's first `]` is always its end, and no `name=value`
/// appears inside a value, even for a reader that ignores quotes) and every escaped character
/// in its text escape. The quoted form is reversible.
pub(crate) fn write_text(w: &mut dyn Write, value: &str) -> fmt::Result {
    if !value.is_empty() && value.chars().all(is_bare) {
        return w.write_str(value);
    }
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in value.char_indices() {
        if !(is_escaped(c) || matches!(c, '"' | '\\' | '[' | ']' | '=')) {
            continue;
        }
        w.write_str(&value[plain_from..i])?;
        plain_from = i + c.len_utf8();
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '[' => w.write_str("\\x5b")?,
            ']' => w.write_str("\\x5d")?,
            '=' => w.write_str("\\x3d")?,
            c => w.write_str(text_escape(c).as_str())?,
        }
    }
    w.write_str(&value[plain_from..])?;
    w.write_char('"')
}

/// Writes `value` as a JSON string, quotes included: `"` and `\` backslash-escaped, every
/// escaped character (which includes everything JSON requires) in its JSON escape.
pub(crate) fn write_json(w: &mut dyn Write, value: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in value.char_indices() {
        if !(is_escaped(c) || matches!(c, '"' | '\\')) {
            continue;
        }
        w.write_str(&value[plain_from..i])?;
        plain_from = i + c.len_utf8();
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            c => w.write_str(json_escape(c).as_str())?,
        }
    }
    w.write_str(&value[plain_from..])?;
    w.write_char('"')
}

/// A `fmt::Write` that keeps at most `limit` characters and then refuses more, so that a huge
/// value costs no more than `limit` characters of work.
pub(crate) struct Bounded<'a> {
    pub(crate) buf: &'a mut String,
    pub(crate) remaining: usize,
    pub(crate) truncated: bool,
}

impl Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() <= self.remaining {
            // Fast path: fewer bytes than the limit means fewer characters too.
            self.buf.push_str(s);
            self.remaining -= s.chars().count();
            return Ok(());
        }
        for c in s.chars() {
            if self.remaining == 0 {
                self.truncated = true;
                // Stops the value's `Display` impl early; the caller knows why.
                return Err(fmt::Error);
            }
            self.buf.push(c);
            self.remaining -= 1;
        }
        Ok(())
    }
}

// ===== event and span field values (text) =====

/// Escapes a field value on its way to `out` and bounds it: at most `remaining` characters are
/// written, escapes included (an escape is never split); past that, [`TRUNCATED_MARKER`] is
/// written once and every later write fails, which stops the value's `Debug`/`Display` impl.
/// The output never contains an escaped character, and is the input unchanged when the input
/// has none and fits.
pub(crate) struct TextValue<'a> {
    out: &'a mut dyn Write,
    remaining: usize,
    truncated: bool,
}

impl<'a> TextValue<'a> {
    pub(crate) fn new(out: &'a mut dyn Write, limit: usize) -> Self {
        TextValue {
            out,
            remaining: limit,
            truncated: false,
        }
    }

    /// Whether the value was cut (the caller then treats the write error as success).
    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    fn cut(&mut self) -> fmt::Result {
        self.truncated = true;
        self.out.write_str(TRUNCATED_MARKER)?;
        Err(fmt::Error)
    }
}

impl Write for TextValue<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.truncated {
            return Err(fmt::Error);
        }
        if s.len() <= self.remaining && is_plain_ascii(s.as_bytes()) {
            self.remaining -= s.len();
            return self.out.write_str(s);
        }
        let mut plain_from = 0;
        for (i, c) in s.char_indices() {
            if !is_escaped(c) {
                if self.remaining == 0 {
                    self.out.write_str(&s[plain_from..i])?;
                    return self.cut();
                }
                self.remaining -= 1;
                continue;
            }
            self.out.write_str(&s[plain_from..i])?;
            plain_from = i + c.len_utf8();
            let escape = text_escape(c);
            if escape.len > self.remaining {
                return self.cut();
            }
            self.remaining -= escape.len;
            self.out.write_str(escape.as_str())?;
        }
        self.out.write_str(&s[plain_from..])
    }
}

/// Removes an escape sequence left incomplete at the end of `buf`: what a cut leaves of a
/// `Debug` escape that arrived one character at a time (`\u{20` of `\u{202e}`, a lone `\`).
/// Escapes this module writes are never split; complete escapes are left alone.
pub(crate) fn trim_open_escape(buf: &mut String) {
    let bytes = buf.as_bytes();
    let tail = bytes.len().saturating_sub(12);
    let Some(rel) = bytes[tail..].iter().rposition(|&b| b == b'\\') else {
        return;
    };
    let at = tail + rel;
    // The second of `\\` (an escaped backslash) ends a complete escape.
    let run = bytes[..=at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    if run % 2 == 0 {
        return;
    }
    let escape = &bytes[at..];
    let complete = match escape.get(1) {
        None => false,
        Some(b'u') if escape.get(2) == Some(&b'{') => escape.contains(&b'}'),
        Some(b'u') => escape.len() >= 6,
        Some(b'x') => escape.len() >= 4,
        Some(_) => true,
    };
    if !complete {
        buf.truncate(at);
    }
}

// ===== whole text lines =====

/// The last line of defence for text output: every character of the line goes through it. It
/// escapes every escaped character except the line's final newline, and cuts the line at
/// `cap` bytes (marker and newline included). Identity on a line with nothing to escape that
/// fits.
pub(crate) struct TextLine<'a> {
    out: &'a mut String,
    written: usize,
    cap: usize,
    pending_newline: bool,
    truncated: bool,
    /// The next character written, if a `[`, is written `\x5b` (see
    /// [`escape_leading_bracket`](Self::escape_leading_bracket)).
    leading_bracket: bool,
}

impl<'a> TextLine<'a> {
    pub(crate) fn new(out: &'a mut String, cap: usize) -> Self {
        TextLine {
            out,
            written: 0,
            // The cut line still needs room for the marker and the newline.
            cap: cap.max(TRUNCATED_MARKER.len() + 1),
            pending_newline: false,
            truncated: false,
            leading_bracket: false,
        }
    }

    /// Has the first character written after any leading white space, if it is a `[`,
    /// written as `\x5b` (counted against the cap like any escape): a line without context
    /// must not start like a context prefix.
    pub(crate) fn escape_leading_bracket(&mut self) {
        self.leading_bracket = true;
    }

    /// Ends the line: the held-back final newline, or the marker and a newline after a cut.
    pub(crate) fn finish(self) {
        if self.truncated || self.pending_newline {
            self.out.push('\n');
        }
    }

    /// How many bytes of the line are written so far.
    pub(crate) fn written(&self) -> usize {
        self.written
    }

    /// Whether the line was cut.
    #[cfg(test)]
    pub(crate) fn was_cut(&self) -> bool {
        self.truncated
    }

    /// Room left before the cut, keeping space for the marker and the newline.
    fn room(&self) -> usize {
        (self.cap - TRUNCATED_MARKER.len() - 1).saturating_sub(self.written)
    }

    /// Writes `s` (already safe), or as much of it as fits and then the marker.
    fn emit(&mut self, s: &str, atomic: bool) -> fmt::Result {
        let room = self.room();
        if s.len() <= room {
            self.written += s.len();
            self.out.push_str(s);
            return Ok(());
        }
        if !atomic {
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.out.push_str(&s[..end]);
            // Not half of an escape the wrapped format wrote (its `Debug` output).
            trim_open_escape(self.out);
        }
        self.truncated = true;
        self.out.push_str(TRUNCATED_MARKER);
        Ok(())
    }
}

impl Write for TextLine<'_> {
    fn write_char(&mut self, c: char) -> fmt::Result {
        if self.leading_bracket {
            self.leading_bracket = false;
            if c == '[' {
                if std::mem::take(&mut self.pending_newline) {
                    // A newline held back (it might have ended the line) comes first.
                    self.emit("\\n", true)?;
                }
                if self.truncated {
                    return Ok(());
                }
                return self.emit("\\x5b", true);
            }
            // U+2800 (braille blank) is not white space, but shows as a space.
            if c.is_whitespace() || c == '\u{2800}' {
                // ` [req-2 tenant=globex]` reads as a prefix too (to a reader that trims the
                // line): the escape waits past leading white space.
                self.write_char(c)?;
                self.leading_bracket = true;
                return Ok(());
            }
        }
        // Hot path of tracing-subscriber's message sanitizer, which writes one char at a time.
        if (' '..='~').contains(&c)
            && !self.pending_newline
            && !self.truncated
            && self.written + 1 < self.cap - TRUNCATED_MARKER.len()
        {
            self.written += 1;
            self.out.push(c);
            return Ok(());
        }
        self.write_str(c.encode_utf8(&mut [0; 4]))
    }

    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.leading_bracket && !s.is_empty() {
            // Character by character until the escape is settled (past leading white space).
            let mut rest = s;
            while self.leading_bracket {
                let Some(c) = rest.chars().next() else {
                    return Ok(());
                };
                self.write_char(c)?;
                rest = &rest[c.len_utf8()..];
            }
            return self.write_str(rest);
        }
        // Hot path: formatters write many short pieces (tracing-subscriber's sanitizer writes
        // messages one character at a time).
        if !self.pending_newline
            && !self.truncated
            && self.written + s.len() < self.cap - TRUNCATED_MARKER.len()
            && is_plain_ascii(s.as_bytes())
        {
            self.written += s.len();
            self.out.push_str(s);
            return Ok(());
        }
        if self.truncated || s.is_empty() {
            return Ok(());
        }
        if self.pending_newline {
            // More follows the newline: it was inside a value after all.
            self.pending_newline = false;
            self.emit("\\n", true)?;
            if self.truncated {
                return Ok(());
            }
        }
        if is_plain_ascii(s.as_bytes()) {
            return self.emit(s, false);
        }
        let mut plain_from = 0;
        for (i, c) in s.char_indices() {
            if !is_escaped(c) {
                continue;
            }
            self.emit(&s[plain_from..i], false)?;
            plain_from = i + c.len_utf8();
            if self.truncated {
                return Ok(());
            }
            if c == '\n' && plain_from == s.len() {
                // Possibly the end of the line: decided by what comes next.
                self.pending_newline = true;
                return Ok(());
            }
            self.emit(text_escape(c).as_str(), true)?;
            if self.truncated {
                return Ok(());
            }
        }
        self.emit(&s[plain_from..], false)
    }
}

// ===== whole JSON lines =====

/// Rewrites a JSON text written through it, string by string: every escaped character inside
/// a string becomes its `\uXXXX` escape (outside strings valid JSON has none), and each string
/// keeps at most `max_value` characters of its escaped form (an escape is never split), then
/// [`TRUNCATED_MARKER`] and the closing quote. The result is valid JSON whenever the input is.
/// Past `cap` bytes it stops writing and records the overflow (the caller replaces the line).
pub(crate) struct JsonLine {
    out: String,
    cap: usize,
    max_value: usize,
    overflow: bool,
    in_string: bool,
    /// Characters of the current string still allowed.
    remaining: usize,
    /// The current string was cut: skip to its closing quote.
    skipping: bool,
    /// A backslash escape being read: its bytes, and how many are still expected.
    escape: EscapeBuf,
    escape_left: usize,
    /// A `\uXXXX` high surrogate read, waiting for its low half: the pair is one character,
    /// kept or cut whole (half a pair is JSON that readers refuse).
    high: Option<EscapeBuf>,
    /// Open containers: depth, and one bit per level (1 = object) for the first 64.
    depth: usize,
    objects: u64,
    /// The next string is an object key.
    expect_key: bool,
}

impl JsonLine {
    pub(crate) fn new(cap: usize, max_value: usize) -> Self {
        JsonLine {
            out: String::new(),
            cap,
            max_value,
            overflow: false,
            in_string: false,
            remaining: 0,
            skipping: false,
            escape: EscapeBuf::default(),
            escape_left: 0,
            high: None,
            depth: 0,
            objects: 0,
            expect_key: false,
        }
    }

    /// Enters an object (`true`) or an array.
    fn open(&mut self, object: bool) {
        if self.depth < 64 {
            let bit = 1u64 << self.depth;
            self.objects = if object {
                self.objects | bit
            } else {
                self.objects & !bit
            };
        }
        self.depth += 1;
        self.expect_key = object;
    }

    /// Whether the innermost open container is an object (deeper than 64: assumed).
    fn in_object(&self) -> bool {
        match self.depth {
            0 => false,
            d if d <= 64 => self.objects & (1u64 << (d - 1)) != 0,
            _ => true,
        }
    }

    /// Whether the line went past the cap (and is incomplete).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The rewritten text.
    pub(crate) fn into_inner(self) -> String {
        self.out
    }

    fn push(&mut self, s: &str) {
        if self.overflow {
            return;
        }
        if self.out.len() + s.len() > self.cap {
            self.overflow = true;
            return;
        }
        self.out.push_str(s);
    }

    /// A high surrogate left without its low half: a lone surrogate, which JSON readers
    /// refuse, written as U+FFFD.
    fn flush_high(&mut self) {
        if self.high.take().is_some() {
            self.push_unit("\\ufffd");
        }
    }

    /// A complete escape read from the string: a surrogate pair is put out whole, a lone
    /// surrogate as U+FFFD, any other escape as it is.
    fn escape_unit(&mut self, escape: EscapeBuf) {
        let code = escape
            .as_str()
            .strip_prefix("\\u")
            .and_then(|hex| u16::from_str_radix(hex, 16).ok());
        match (self.high.take(), code) {
            (None, Some(0xD800..=0xDBFF)) => self.high = Some(escape),
            (Some(high), Some(0xDC00..=0xDFFF)) => {
                let mut pair = EscapeBuf::default();
                // 6 + 6 bytes: exactly what the buffer holds.
                let _ = pair.write_str(high.as_str());
                let _ = pair.write_str(escape.as_str());
                self.push_unit(pair.as_str());
            }
            (Some(_), _) => {
                self.push_unit("\\ufffd");
                self.escape_unit(escape);
            }
            (None, Some(0xDC00..=0xDFFF)) => self.push_unit("\\ufffd"),
            (None, _) => self.push_unit(escape.as_str()),
        }
    }

    /// One unit of string content (a character or a whole escape) of `len` characters.
    fn push_unit(&mut self, s: &str) {
        if self.skipping {
            return;
        }
        if s.len() > self.remaining {
            self.skipping = true;
            self.push(TRUNCATED_MARKER);
            return;
        }
        self.remaining -= s.len();
        self.push(s);
    }

    /// A run of plain string content.
    fn push_run(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        self.flush_high();
        if self.skipping {
            return;
        }
        // Plain runs are ASCII except for characters checked by the caller; count characters.
        let count = if s.is_ascii() {
            s.len()
        } else {
            s.chars().count()
        };
        if count <= self.remaining {
            self.remaining -= count;
            self.push(s);
            return;
        }
        let end = s
            .char_indices()
            .nth(self.remaining)
            .map_or(s.len(), |(i, _)| i);
        self.remaining = 0;
        self.push(&s[..end]);
        self.skipping = true;
        self.push(TRUNCATED_MARKER);
    }

    fn string_content(&mut self, s: &str) -> usize {
        // Returns how many bytes of `s` were consumed (up to and including a closing quote).
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if self.escape_left > 0 {
                let b = bytes[i];
                let valid = if self.escape.len == 1 {
                    matches!(
                        b,
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' | b'u'
                    )
                } else {
                    b.is_ascii_hexdigit()
                };
                if !valid {
                    // Not a JSON escape (not from a JSON serializer): keep the backslash as
                    // an escaped backslash, the rest as ordinary content, and stay valid.
                    let escape = std::mem::take(&mut self.escape);
                    self.escape_left = 0;
                    self.flush_high();
                    self.push_unit("\\\\");
                    self.push_run(&escape.as_str()[1..]);
                    continue;
                }
                // `EscapeBuf` holds 12 bytes; an escape is at most 6, all ASCII.
                let _ = self.escape.write_char(b as char);
                self.escape_left -= 1;
                if self.escape.len == 2 && b == b'u' {
                    self.escape_left = 4;
                }
                i += 1;
                if self.escape_left == 0 {
                    let escape = std::mem::take(&mut self.escape);
                    self.escape_unit(escape);
                }
                continue;
            }
            let run = bytes[i..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b))
                .map_or(bytes.len(), |p| i + p);
            self.push_run(&s[i..run]);
            i = run;
            let Some(&b) = bytes.get(i) else { break };
            match b {
                b'"' => {
                    self.flush_high();
                    self.in_string = false;
                    self.skipping = false;
                    self.push("\"");
                    return i + 1;
                }
                b'\\' => {
                    self.escape = EscapeBuf::default();
                    let _ = self.escape.write_char('\\');
                    self.escape_left = 1;
                    i += 1;
                }
                _ => {
                    // A non-ASCII character, DEL, or a raw control (not valid JSON, but keep
                    // the output valid anyway).
                    let c = s[i..].chars().next().unwrap_or('\u{FFFD}');
                    let len = c.len_utf8();
                    if is_escaped(c) {
                        self.flush_high();
                        self.push_unit(json_escape(c).as_str());
                    } else {
                        self.push_run(&s[i..i + len]);
                    }
                    i += len;
                }
            }
        }
        bytes.len()
    }
}

/// Whether `s` is printable ASCII without `"` and `\`: string content to copy as it is.
#[inline]
fn is_plain_json_content(s: &[u8]) -> bool {
    !s.iter().fold(false, |any, &b| {
        any | (b == b'"') | (b == b'\\') | !(0x20..0x7f).contains(&b)
    })
}

impl Write for JsonLine {
    fn write_str(&mut self, mut s: &str) -> fmt::Result {
        // Hot path: a JSON serializer writes a string's plain content in one piece, apart
        // from its quotes and escapes.
        if self.in_string
            && self.escape_left == 0
            && !self.skipping
            && s.len() <= self.remaining
            && self.out.len() + s.len() <= self.cap
            && is_plain_json_content(s.as_bytes())
        {
            self.remaining -= s.len();
            self.out.push_str(s);
            return Ok(());
        }
        while !s.is_empty() {
            if self.overflow {
                return Ok(());
            }
            if self.in_string {
                let used = self.string_content(s);
                s = &s[used..];
                continue;
            }
            // Outside strings: follow the structure, to tell keys (code, not bounded) from
            // values.
            let mut quote = None;
            for (i, b) in s.bytes().enumerate() {
                match b {
                    b'"' => {
                        quote = Some(i);
                        break;
                    }
                    b'{' => self.open(true),
                    b'[' => self.open(false),
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        self.expect_key = false;
                    }
                    b',' => self.expect_key = self.in_object(),
                    b':' => self.expect_key = false,
                    _ => {}
                }
            }
            match quote {
                Some(at) => {
                    self.push(&s[..=at]);
                    self.in_string = true;
                    self.remaining = if self.expect_key {
                        usize::MAX
                    } else {
                        self.max_value
                    };
                    self.expect_key = false;
                    self.skipping = false;
                    s = &s[at + 1..];
                }
                None => {
                    self.push(s);
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The JSON line writer: the wrapped format writes straight into the line buffer while the
/// line is plain printable ASCII and its inner part is no longer than one value's bound (then
/// no string can need escaping or cutting: the common line costs a check per write). Past
/// that length it switches to the streaming [`JsonLine`] rewriter, replaying what was written,
/// so memory stays bounded; a short line with other characters is rewritten at the end.
pub(crate) struct JsonWatch<'a> {
    line: &'a mut String,
    start: usize,
    cap: usize,
    max_value: usize,
    slow: Option<JsonLine>,
}

impl<'a> JsonWatch<'a> {
    /// Watches what is appended to `line` from its current length on; the whole line (what is
    /// already there included) is bounded by `cap` bytes.
    pub(crate) fn new(line: &'a mut String, cap: usize, max_value: usize) -> Self {
        let start = line.len();
        JsonWatch {
            line,
            start,
            cap,
            max_value,
            slow: None,
        }
    }

    fn go_slow(&mut self) -> &mut JsonLine {
        let mut slow = JsonLine::new(self.cap.saturating_sub(self.start), self.max_value);
        // Writing into a `JsonLine` cannot fail.
        let _ = slow.write_str(&self.line[self.start..]);
        self.line.truncate(self.start);
        self.slow.insert(slow)
    }

    /// Finishes the line: rewritten in place when needed; `false` when it went past the cap
    /// (the line then holds an incomplete inner part).
    pub(crate) fn finish(mut self) -> bool {
        if self.slow.is_none() {
            // One vectorized check of the whole inner part, its final newline aside.
            let inner = &self.line.as_bytes()[self.start..];
            let body = inner.strip_suffix(b"\n").unwrap_or(inner);
            if is_plain_ascii(body) {
                return true;
            }
        }
        let slow = match self.slow.take() {
            Some(slow) => slow,
            None => {
                self.go_slow();
                self.slow.take().unwrap_or_else(|| JsonLine::new(0, 0))
            }
        };
        let overflow = slow.overflowed();
        self.line.truncate(self.start);
        self.line.push_str(&slow.into_inner());
        !overflow
    }
}

impl Write for JsonWatch<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(slow) = &mut self.slow {
            return slow.write_str(s);
        }
        if self.line.len() - self.start + s.len() > self.max_value
            || self.line.len() + s.len() > self.cap
        {
            return self.go_slow().write_str(s);
        }
        self.line.push_str(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> String {
        let mut s = String::new();
        write_text(&mut s, v).unwrap();
        s
    }

    fn json(v: &str) -> String {
        let mut s = String::new();
        write_json(&mut s, v).unwrap();
        s
    }

    fn text_value(v: &str, limit: usize) -> String {
        let mut s = String::new();
        let mut w = TextValue::new(&mut s, limit);
        let r = w.write_str(v);
        assert!(r.is_ok() || w.truncated());
        s
    }

    fn text_line(chunks: &[&str], cap: usize) -> String {
        let mut s = String::new();
        let mut w = TextLine::new(&mut s, cap);
        for c in chunks {
            w.write_str(c).unwrap();
        }
        w.finish();
        s
    }

    fn json_line(chunks: &[&str], cap: usize, max: usize) -> (String, bool) {
        let mut w = JsonLine::new(cap, max);
        for c in chunks {
            w.write_str(c).unwrap();
        }
        let overflow = w.overflowed();
        (w.into_inner(), overflow)
    }

    #[test]
    fn plain_values_are_bare() {
        assert_eq!(text("req-123"), "req-123");
        assert_eq!(text("ünïcødé/42:x"), "ünïcødé/42:x");
    }

    #[test]
    fn other_values_are_quoted_and_escaped() {
        assert_eq!(text(""), "\"\"");
        assert_eq!(text("acme corp"), "\"acme corp\"");
        assert_eq!(text("a=b"), "\"a\\x3db\"");
        // Review finding: `name=value` inside a quoted value read as a field by a reader
        // that ignores quotes.
        assert_eq!(text("r tenant=globex x"), "\"r tenant\\x3dglobex x\"");
        assert_eq!(text("x] fake"), "\"x\\x5d fake\"");
        assert_eq!(text("a\"] [req-2"), "\"a\\\"\\x5d \\x5breq-2\"");
        assert_eq!(text("a\nb\rc\td"), "\"a\\nb\\rc\\td\"");
        assert_eq!(text("\x1b[31mred"), "\"\\x1b\\x5b31mred\"");
        assert_eq!(text("q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(
            text("a\u{2028}b\u{202E}c\u{85}"),
            "\"a\\u{2028}b\\u{202e}c\\u{85}\""
        );
        assert_eq!(text("\x7f\0"), "\"\\x7f\\x00\"");
        assert_eq!(text("tag\u{E0041}"), "\"tag\\u{e0041}\"");
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(json("\x1b\u{2028}\u{85}"), "\"\\u001b\\u2028\\u0085\"");
        assert_eq!(json("\u{E0041}"), "\"\\udb40\\udc41\"");
    }

    #[test]
    fn escaped_set() {
        for c in [
            '\n',
            '\r',
            '\t',
            '\0',
            '\x1b',
            '\x7f',
            '\u{85}',
            '\u{9f}',
            '\u{2028}',
            '\u{2029}',
            '\u{202A}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{200B}',
            '\u{200F}',
            '\u{FEFF}',
            '\u{061C}',
            '\u{00AD}',
            '\u{E0001}',
            '\u{E007F}',
            '\u{FE0F}',
        ] {
            assert!(is_escaped(c), "{c:?}");
        }
        for c in ['a', ' ', '~', 'é', '€', '…', '\u{A0}', '日', '😀'] {
            assert!(!is_escaped(c), "{c:?}");
        }
    }

    #[test]
    fn bounded_stops_at_the_limit() {
        let mut buf = String::new();
        let mut b = Bounded {
            buf: &mut buf,
            remaining: 3,
            truncated: false,
        };
        assert!(b.write_str("héllo").is_err());
        assert!(b.truncated);
        assert_eq!(buf, "hél");
    }

    #[test]
    fn text_values_escape_and_cut_between_escapes() {
        assert_eq!(text_value("ord-1", 10), "ord-1");
        assert_eq!(text_value("a\nb", 10), "a\\nb");
        assert_eq!(text_value("abcdef", 3), "abc…");
        // `\n` needs two characters; only one is left: cut before it.
        assert_eq!(text_value("ab\ncd", 3), "ab…");
        assert_eq!(text_value("\u{202E}x", 8), "\\u{202e}…");
    }

    #[test]
    fn text_lines_keep_the_final_newline_only() {
        assert_eq!(text_line(&["a b c", "\n"], 100), "a b c\n");
        assert_eq!(text_line(&["a\nb", "\n"], 100), "a\\nb\n");
        assert_eq!(text_line(&["a\n", "b\n"], 100), "a\\nb\n");
        assert_eq!(text_line(&["no newline"], 100), "no newline");
        assert_eq!(text_line(&["\x1b[31m", "\n"], 100), "\\x1b[31m\n");
        assert_eq!(text_line(&["x".repeat(20).as_str(), "\n"], 10), "xxxxxx…\n");
        assert_eq!(text_line(&["x".repeat(20).as_str(), "\n"], 10).len(), 10);
        assert_eq!(text_line(&["xxxxx\u{202E}", "\n"], 10), "xxxxx…\n");
    }

    /// A surrogate pair written as two `\\uXXXX` escapes is one character: a cut keeps or
    /// drops it whole (half a pair makes the line JSON that serde_json refuses), in whatever
    /// pieces it arrives; a lone surrogate becomes U+FFFD.
    #[test]
    fn surrogate_pairs_are_never_split() {
        let line = r#"{"m":"ab\ud83d\ude00cd\ude00x\ud83dy\ud83d\ud83d\ude00"}"#;
        for max in 0..40 {
            for split in 0..line.len() {
                let (out, overflow) = json_line(&[&line[..split], &line[split..]], 1000, max);
                assert!(!overflow);
                let parsed: Result<serde_json::Value, _> = serde_json::from_str(&out);
                assert!(parsed.is_ok(), "max {max}, split {split}: {out}");
            }
        }
        let (out, _) = json_line(&[line], 1000, 1000);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            parsed["m"],
            "ab\u{1F600}cd\u{FFFD}x\u{FFFD}y\u{FFFD}\u{1F600}"
        );
    }

    #[test]
    fn json_lines_escape_inside_strings_and_cut_long_strings() {
        let (out, overflow) =
            json_line(&[r#"{"a":"x"#, "\u{2028}", r#"y","n":12}"#, "\n"], 100, 10);
        assert!(!overflow);
        assert_eq!(out, "{\"a\":\"x\\u2028y\",\"n\":12}\n");
        let (out, _) = json_line(
            &[r#"{"a":"abcdefgh","b":"\u001b","long_key":["abcdefgh"]}"#],
            100,
            4,
        );
        assert_eq!(out, r#"{"a":"abcd…","b":"…","long_key":["abcd…"]}"#);
        let (out, _) = json_line(&[r#"{"a":"ab\"#, r#"u001bc"}"#], 100, 20);
        assert_eq!(out, r#"{"a":"ab\u001bc"}"#);
        let (_, overflow) = json_line(&[r#"{"a":"abcdefgh"}"#], 8, 100);
        assert!(overflow);
    }
}
