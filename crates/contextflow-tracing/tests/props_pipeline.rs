//! Property test of the whole pipeline (issue 14): realistic values, mutated with control,
//! bidirectional and invisible characters and forged lines, logged as a context field, an
//! event field (`Display` and `Debug`), the message and a span field, through the text format
//! (default and escaping field formatter) and the JSON format. Every output is one bounded
//! line with nothing raw to escape; JSON parses back to the values and the text prefix to the
//! context value (or to a cut of them); a value with nothing to
//! escape prints exactly as plain `tracing_subscriber` prints it. The share of cases of each
//! kind is printed and has a floor. `PROPTEST_CASES` sets the number of cases.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use contextflow::AsyncLocal;
use contextflow_tracing::{ContextFields, MemoryWriter, TRUNCATED_MARKER};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use tracing::Dispatch;
use tracing_subscriber::fmt::format;

static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

const LINE_CAP: usize = 600;
const VALUE_CAP: usize = 80;

/// Characters that must never reach a line raw (a sample of the escaped set).
const RAW: &[char] = &[
    '\r',
    '\x1b',
    '\x07',
    '\x7f',
    '\0',
    '\u{85}',
    '\u{9b}',
    '\u{2028}',
    '\u{2029}',
    '\u{202A}',
    '\u{202E}',
    '\u{2066}',
    '\u{2069}',
    '\u{200B}',
    '\u{200E}',
    '\u{FEFF}',
    '\u{E0041}',
];

fn value() -> impl Strategy<Value = String> {
    let base = prop_oneof![
        "ord-[0-9]{1,8}",
        "[a-z]{3,10}( [a-z]{2,10}){0,2}",
        "(Order|Payment) (created|failed) for [a-z]{3,8}",
        "[a-zA-Zéü日 ._:/=-]{0,30}",
    ];
    let spice = proptest::sample::select(vec![
        "\n",
        "\r\n",
        "\x1b[31m",
        "\u{202E}",
        "\u{2066}",
        "\u{2028}",
        "\u{85}",
        "\u{200B}",
        "\0",
        "\u{E0041}",
        "\"",
        "\\",
        "]",
        "\n[req-2 tenant=globex] INFO forged",
    ]);
    let mutation = (any::<usize>(), spice);
    (
        base,
        prop_oneof![1 => Just(Vec::new()), 2 => proptest::collection::vec(mutation, 1..3)],
        prop_oneof![3 => Just(1usize), 1 => 2usize..12],
    )
        .prop_map(|(mut v, muts, repeat)| {
            for (at, s) in muts {
                let n = v.chars().count();
                let k = if n == 0 { 0 } else { at % (n + 1) };
                let i = v.char_indices().nth(k).map_or(v.len(), |(i, _)| i);
                v.insert_str(i, s);
            }
            v.repeat(repeat)
        })
}

fn fields() -> ContextFields {
    ContextFields::new()
        .field("tenant", &TENANT)
        .max_value_len(VALUE_CAP)
        .max_line_len(LINE_CAP)
}

fn log(v: &str) {
    TENANT.sync_scope(v.to_owned(), || {
        let span = tracing::info_span!("request", reference = %v);
        span.in_scope(|| tracing::info!(display = %v, debug = ?v, "msg {v}"));
    });
}

/// The same event with no context, for the byte-for-byte comparison.
fn log_plain(v: &str) {
    let span = tracing::info_span!("request", reference = %v);
    span.in_scope(|| tracing::info!(display = %v, debug = ?v, "msg {v}"));
}

/// Whether `shown` is `want`, or a start of it followed by the truncation marker.
fn same_or_cut(shown: &str, want: &str) -> bool {
    shown == want
        || shown
            .strip_suffix(TRUNCATED_MARKER)
            .is_some_and(|kept| want.starts_with(kept))
}

/// A text prefix value read back: bare, or quoted with `\n`, `\r`, `\t`, `\\`, `\"`, `\xNN`
/// and `\u{hex}` escapes; `None` when it is neither.
fn unescape_text(value: &str) -> Option<String> {
    let Some(quoted) = value.strip_prefix('"') else {
        return Some(value.to_owned());
    };
    let inner = quoted.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '\\' => out.push('\\'),
            '"' => out.push('"'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(char::from(u8::from_str_radix(&hex, 16).ok()?));
            }
            'u' => {
                if chars.next()? != '{' {
                    return None;
                }
                let hex: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn has_raw(s: &str) -> bool {
    s.contains(RAW)
}

#[test]
fn every_output_is_one_bounded_clean_line() {
    let text = MemoryWriter::new();
    let text_dispatch: Dispatch = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(text.clone())
        .event_format(fields().text(format().without_time()))
        .finish()
        .into();
    let escaped = MemoryWriter::new();
    let escaped_dispatch: Dispatch = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(escaped.clone())
        .fmt_fields(fields().escaped_fields())
        .event_format(fields().text(format().without_time()))
        .finish()
        .into();
    let json = MemoryWriter::new();
    let json_dispatch: Dispatch = tracing_subscriber::fmt()
        .json()
        .without_time()
        .with_writer(json.clone())
        .map_event_format(|f| fields().json(f))
        .finish()
        .into();
    let plain = MemoryWriter::new();
    let plain_dispatch: Dispatch = tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_writer(plain.clone())
        .finish()
        .into();

    let (total, dirty, cut, identical) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&value(), |v| {
            for w in [&text, &escaped, &json, &plain] {
                w.clear();
            }
            tracing::dispatcher::with_default(&text_dispatch, || log(&v));
            tracing::dispatcher::with_default(&escaped_dispatch, || log(&v));
            tracing::dispatcher::with_default(&json_dispatch, || log(&v));
            tracing::dispatcher::with_default(&plain_dispatch, || log_plain(&v));
            let is_dirty = v.contains(RAW) || v.contains('\n');
            let mut was_cut = false;
            for (name, out) in [("text", text.contents()), ("escaped", escaped.contents())] {
                prop_assert_eq!(out.matches('\n').count(), 1, "{}: {:?}", name, out);
                prop_assert!(out.ends_with('\n'));
                prop_assert!(!has_raw(&out), "{}: {:?}", name, out);
                prop_assert!(out.len() <= LINE_CAP, "{}: {}", name, out.len());
                was_cut |= out.contains(TRUNCATED_MARKER) && !v.contains(TRUNCATED_MARKER);
            }
            // The text prefix reads back to the tenant (or to a cut of it).
            if !v.is_empty() {
                for (name, out) in [("text", text.contents()), ("escaped", escaped.contents())] {
                    let prefix = out
                        .strip_prefix('[')
                        .and_then(|rest| rest.split_once("] "))
                        .map(|(prefix, _)| prefix);
                    let back = prefix.and_then(unescape_text);
                    prop_assert!(
                        back.as_deref().is_some_and(|back| same_or_cut(back, &v)),
                        "{}: prefix {:?} of {:?} does not read back to {:?}",
                        name,
                        back,
                        out,
                        v
                    );
                }
            }
            let out = json.contents();
            prop_assert_eq!(out.matches('\n').count(), 1, "{:?}", out);
            prop_assert!(!has_raw(&out), "{:?}", out);
            prop_assert!(out.len() <= LINE_CAP);
            let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
            if parsed["truncated"] != true {
                let shown = parsed["fields"]["display"].as_str().unwrap();
                if shown != v {
                    let kept = shown.strip_suffix(TRUNCATED_MARKER);
                    prop_assert!(kept.is_some_and(|k| v.starts_with(k)), "{:?}", shown);
                    was_cut = true;
                }
                // The other values parse back too: the tenant, the message, the span's field.
                let message = format!("msg {v}");
                for (shown, want) in [
                    (&parsed["tenant"], &v),
                    (&parsed["fields"]["message"], &message),
                    (&parsed["span"]["reference"], &v),
                ] {
                    if want.is_empty() && shown.is_null() {
                        continue;
                    }
                    let shown = shown.as_str();
                    prop_assert!(
                        shown.is_some_and(|shown| same_or_cut(shown, want)),
                        "{:?} for {:?} in {}",
                        shown,
                        want,
                        out
                    );
                }
            }
            // Nothing to escape and short: exactly what plain fmt prints, after the prefix.
            let plain_line = plain.contents();
            let prefix = format!("[{v}] ");
            if !is_dirty
                && !v.is_empty()
                && !v.contains([' ', '"', '\\', '=', '[', ']'])
                && plain_line.len() + prefix.len() + TRUNCATED_MARKER.len() <= LINE_CAP
                && v.chars().count() * 2 + 6 <= VALUE_CAP
            {
                prop_assert_eq!(text.contents(), format!("{prefix}{plain_line}"));
                prop_assert_eq!(escaped.contents(), format!("{prefix}{plain_line}"));
                identical.fetch_add(1, Relaxed);
            }
            total.fetch_add(1, Relaxed);
            dirty.fetch_add(is_dirty as usize, Relaxed);
            cut.fetch_add(was_cut as usize, Relaxed);
            Ok(())
        })
        .unwrap();
    let total = total.load(Relaxed) as f64;
    let share = |n: &AtomicUsize| n.load(Relaxed) as f64 / total;
    let (dirty, cut, identical) = (share(&dirty), share(&cut), share(&identical));
    println!(
        "pipeline: {total} cases, {:.0}% with characters to escape, {:.0}% cut at a bound, {:.0}% byte-identical to plain fmt",
        dirty * 100.0,
        cut * 100.0,
        identical * 100.0
    );
    assert!(dirty >= 0.3, "too few cases with characters to escape");
    assert!(cut >= 0.05, "too few cases cut at a bound");
    assert!(
        identical >= 0.05,
        "too few clean cases compared with plain fmt"
    );
}
