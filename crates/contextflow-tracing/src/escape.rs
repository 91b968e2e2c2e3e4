//! Escaping of context values for text and JSON output.
//!
//! Values come from requests (a header, a message attribute), so they are untrusted: nothing
//! in them may start a new log line, move the cursor, change terminal colours or reorder the
//! text that follows (bidirectional overrides). Every such character is escaped, never dropped,
//! so the original value can still be read back from the log.

use std::fmt::{self, Write};

/// Whether `c` may appear in text output as it is, outside quotes.
fn is_plain(c: char) -> bool {
    !(c.is_whitespace()
        || c.is_control()
        || is_invisible(c)
        || matches!(c, '"' | '\\' | '=' | '[' | ']'))
}

/// Characters that are not control characters but still change how a terminal or an editor
/// shows a line: line and paragraph separators, zero-width characters, bidirectional controls.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// Writes `value` for text output: as it is when every character is plain, otherwise in double
/// quotes with `"`, `\`, control and invisible characters escaped (`\n`, `\r`, `\t`, `\x1b`,
/// `\u{2028}`).
pub(crate) fn write_text(w: &mut dyn Write, value: &str) -> fmt::Result {
    if !value.is_empty() && value.chars().all(is_plain) {
        return w.write_str(value);
    }
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in value.char_indices() {
        let escaped = c.is_control() || is_invisible(c) || matches!(c, '"' | '\\');
        if !escaped {
            continue;
        }
        w.write_str(&value[plain_from..i])?;
        plain_from = i + c.len_utf8();
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x80 => write!(w, "\\x{:02x}", c as u32)?,
            c => write!(w, "\\u{{{:x}}}", c as u32)?,
        }
    }
    w.write_str(&value[plain_from..])?;
    w.write_char('"')
}

/// Writes `value` as a JSON string, quotes included. Besides what JSON requires (`"`, `\` and
/// U+0000..U+001F), DEL, the C1 controls and the invisible characters are escaped as `\uXXXX`
/// too, so that the line is also safe to print on a terminal and to embed in JavaScript.
pub(crate) fn write_json(w: &mut dyn Write, value: &str) -> fmt::Result {
    w.write_char('"')?;
    let mut plain_from = 0;
    for (i, c) in value.char_indices() {
        let escaped = c.is_control() || is_invisible(c) || matches!(c, '"' | '\\');
        if !escaped {
            continue;
        }
        w.write_str(&value[plain_from..i])?;
        plain_from = i + c.len_utf8();
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            // Every escaped character is in the basic multilingual plane, so one `\uXXXX`
            // is enough.
            c => write!(w, "\\u{:04x}", c as u32)?,
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

    #[test]
    fn plain_values_are_bare() {
        assert_eq!(text("req-123"), "req-123");
        assert_eq!(text("ünïcødé/42:x"), "ünïcødé/42:x");
    }

    #[test]
    fn other_values_are_quoted_and_escaped() {
        assert_eq!(text(""), "\"\"");
        assert_eq!(text("acme corp"), "\"acme corp\"");
        assert_eq!(text("a=b"), "\"a=b\"");
        assert_eq!(text("x] fake"), "\"x] fake\"");
        assert_eq!(text("a\nb\rc\td"), "\"a\\nb\\rc\\td\"");
        assert_eq!(text("\x1b[31mred"), "\"\\x1b[31mred\"");
        assert_eq!(text("q\"\\"), "\"q\\\"\\\\\"");
        assert_eq!(
            text("a\u{2028}b\u{202E}c\u{85}"),
            "\"a\\u{2028}b\\u{202e}c\\u{85}\""
        );
        assert_eq!(text("\x7f\0"), "\"\\x7f\\x00\"");
    }

    #[test]
    fn json_escapes() {
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(json("\x1b\u{2028}\u{85}"), "\"\\u001b\\u2028\\u0085\"");
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
}
