//! Property tests of every escaper (issue 14): realistic log values (ids, references, tenant
//! names, messages, paths, unicode text, the forged reference of issue 13) mutated with
//! control, bidirectional and invisible characters, quotes and brackets, forged lines and
//! repetition past the bounds. Each test prints the share of cases that exercised escaping,
//! cutting and the untouched path, and asserts a floor on each. `PROPTEST_CASES` sets the
//! number of cases (256 by default).

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};

use crate::{
    escape::{is_escaped, write_json, write_text, JsonLine, JsonWatch, TextLine, TextValue},
    TRUNCATED_MARKER,
};

/// Characters the mutations insert: every class the escapers care about, and some they must
/// leave alone.
const SPICE: &[char] = &[
    '\n',
    '\r',
    '\t',
    '\0',
    '\x1b',
    '\x07',
    '\x7f',
    '\u{85}',
    '\u{9b}',
    '\u{2028}',
    '\u{2029}',
    '\u{202A}',
    '\u{202E}',
    '\u{2066}',
    '\u{2069}',
    '\u{200B}',
    '\u{200D}',
    '\u{200E}',
    '\u{FEFF}',
    '\u{AD}',
    '\u{FE0F}',
    '\u{E0041}',
    '\u{E0100}',
    '"',
    '\\',
    '[',
    ']',
    '=',
    ' ',
    '{',
    '}',
    ':',
    ',',
    'é',
    '日',
    '😀',
    '…',
    '\u{A0}',
];

/// Realistic values as they reach logs.
fn realistic() -> impl Strategy<Value = String> {
    prop_oneof![
        "ord-[0-9]{1,8}",
        "req-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}",
        "[0-9a-f]{32}",
        "[a-z]{3,10}( [a-z]{2,10}){0,2}",
        "/orders/[0-9]{1,6}(\\?page=[0-9])?",
        "(Order|Payment|Query) (created|failed|placed|declined) for [a-z]{3,8}",
        "SELECT \\* FROM [a-z]{3,8} WHERE id = \\$1",
        "[a-zA-Zéü日本 ._:/-]{0,40}",
        Just("R1\n[FORGED-ID trace_id=0af7651916cd43dd8448eb211c80319c tenant=globex] 2026-11-26T00:00:00Z INFO forged line".to_owned()),
        Just(String::new()),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, char),
    ForgedLine(usize),
    Ansi(usize),
    Repeat(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), proptest::sample::select(SPICE)).prop_map(|(at, c)| Mutation::Insert(at, c)),
        1 => any::<usize>().prop_map(Mutation::ForgedLine),
        1 => any::<usize>().prop_map(Mutation::Ansi),
        1 => (2usize..40).prop_map(Mutation::Repeat),
    ]
}

fn apply(mut value: String, mutations: Vec<Mutation>) -> String {
    for m in mutations {
        let at = |value: &String, at: usize| {
            let n = value.chars().count();
            let k = if n == 0 { 0 } else { at % (n + 1) };
            value.char_indices().nth(k).map_or(value.len(), |(i, _)| i)
        };
        match m {
            Mutation::Insert(i, c) => {
                let i = at(&value, i);
                value.insert(i, c);
            }
            Mutation::ForgedLine(i) => {
                let i = at(&value, i);
                value.insert_str(
                    i,
                    "\n[req-2 tenant=globex] 2026-01-01T00:00:00Z  INFO forged",
                );
            }
            Mutation::Ansi(i) => {
                let i = at(&value, i);
                value.insert_str(i, "\x1b[31m\x1b[2J\u{9b}0m");
            }
            Mutation::Repeat(n) => value = value.repeat(n),
        }
    }
    value
}

/// Mostly valid values: a third untouched, the rest mutated.
fn value() -> impl Strategy<Value = String> {
    (
        realistic(),
        prop_oneof![1 => Just(Vec::new()), 2 => proptest::collection::vec(mutation(), 1..4)],
    )
        .prop_map(|(v, m)| apply(v, m))
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    })
}

/// Counts of the kinds of cases a property exercised.
#[derive(Default)]
struct Share {
    total: AtomicUsize,
    escaped: AtomicUsize,
    cut: AtomicUsize,
    untouched: AtomicUsize,
}

impl Share {
    fn record(&self, escaped: bool, cut: bool, untouched: bool) {
        self.total.fetch_add(1, Relaxed);
        self.escaped.fetch_add(escaped as usize, Relaxed);
        self.cut.fetch_add(cut as usize, Relaxed);
        self.untouched.fetch_add(untouched as usize, Relaxed);
    }

    /// Prints the shares and asserts each is at least `floor`.
    fn check(&self, name: &str, floor: f64, with_cut: bool) {
        let total = self.total.load(Relaxed).max(1) as f64;
        let share = |n: &AtomicUsize| n.load(Relaxed) as f64 / total;
        let (escaped, cut, untouched) = (
            share(&self.escaped),
            share(&self.cut),
            share(&self.untouched),
        );
        println!(
            "{name}: {} cases, {:.0}% with characters to escape, {:.0}% cut at the bound, {:.0}% unchanged",
            total,
            escaped * 100.0,
            cut * 100.0,
            untouched * 100.0
        );
        assert!(
            escaped >= floor,
            "{name}: too few cases with characters to escape"
        );
        assert!(untouched >= floor, "{name}: too few clean cases");
        if with_cut {
            assert!(cut >= floor, "{name}: too few cases cut at the bound");
        }
    }
}

fn has_escaped(s: &str) -> bool {
    s.chars().any(is_escaped)
}

/// Reads back the quoted form of the text prefix escaper.
fn unescape_text(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
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

/// Splits `s` into chunks at the given char positions (as a formatter's writes would).
fn chunks(s: &str, cuts: &[usize]) -> Vec<String> {
    let n = s.chars().count();
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| if n == 0 { 0 } else { c % n })
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    let byte = |k: usize| s.char_indices().nth(k).map_or(s.len(), |(i, _)| i);
    for p in points {
        let b = byte(p);
        out.push(s[last..b].to_owned());
        last = b;
    }
    out.push(s[last..].to_owned());
    out
}

#[test]
fn text_prefix_escaper_never_lets_a_character_through_and_reads_back() {
    let share = Share::default();
    runner()
        .run(&value(), |v| {
            let mut out = String::new();
            write_text(&mut out, &v).unwrap();
            prop_assert!(!has_escaped(&out), "{out:?}");
            if out == v {
                prop_assert!(!v.is_empty() && !v.contains([' ', '"', '\\', '=', '[', ']']));
            } else {
                prop_assert_eq!(unescape_text(&out), Some(v.clone()), "reversible");
                // The prefix's first `]` is its end, also for a reader that ignores quotes.
                prop_assert!(!out.contains(['[', ']']), "{out:?}");
            }
            share.record(has_escaped(&v), false, out == v);
            Ok(())
        })
        .unwrap();
    share.check("text prefix", 0.08, false);
}

#[test]
fn json_value_escaper_parses_back_to_the_value() {
    let share = Share::default();
    runner()
        .run(&value(), |v| {
            let mut out = String::new();
            write_json(&mut out, &v).unwrap();
            prop_assert!(!has_escaped(&out), "{out:?}");
            let back: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(&back, &v);
            share.record(
                has_escaped(&v),
                false,
                out == serde_json::to_string(&v).unwrap(),
            );
            Ok(())
        })
        .unwrap();
    share.check("JSON value", 0.2, false);
}

const CAP: usize = 64;

fn text_value_cut(v: &str, cap: usize, cuts: &[usize]) -> (String, bool) {
    let mut out = String::new();
    let mut w = TextValue::new(&mut out, cap);
    for chunk in chunks(v, cuts) {
        if w.write_str(&chunk).is_err() {
            assert!(w.truncated());
            break;
        }
    }
    let cut = w.truncated();
    (out, cut)
}

fn text_value(v: &str, cap: usize, cuts: &[usize]) -> String {
    text_value_cut(v, cap, cuts).0
}

#[test]
fn field_value_escaper_is_bounded_idempotent_and_untouched_when_clean() {
    let share = Share::default();
    let input = (value(), proptest::collection::vec(any::<usize>(), 0..4));
    runner()
        .run(&input, |(v, cuts)| {
            let (out, cut) = text_value_cut(&v, CAP, &cuts);
            prop_assert!(!has_escaped(&out), "{out:?}");
            let marker = TRUNCATED_MARKER.chars().count();
            prop_assert!(out.chars().count() <= CAP + marker);
            // Chunking does not matter.
            prop_assert_eq!(&out, &text_value(&v, CAP, &[]));
            let full = text_value(&v, usize::MAX, &[]);
            if cut {
                let kept = out.strip_suffix(TRUNCATED_MARKER).unwrap();
                prop_assert!(full.starts_with(kept), "a cut keeps a prefix");
            } else {
                prop_assert_eq!(&out, &full);
            }
            if !has_escaped(&v) && v.chars().count() <= CAP {
                prop_assert_eq!(&out, &v, "clean values are untouched");
            }
            prop_assert_eq!(
                text_value(&full, usize::MAX, &[]),
                full.clone(),
                "idempotent"
            );
            share.record(has_escaped(&v), cut, out == v);
            Ok(())
        })
        .unwrap();
    share.check("text field value", 0.1, true);
}

const LINE_CAP: usize = 100;

fn text_line(line: &str, cap: usize, cuts: &[usize]) -> String {
    text_line_cut(line, cap, cuts).0
}

/// The escaped line, and whether the escaper cut it.
fn text_line_cut(line: &str, cap: usize, cuts: &[usize]) -> (String, bool) {
    let mut out = String::new();
    let mut w = TextLine::new(&mut out, cap);
    for chunk in chunks(line, cuts) {
        w.write_str(&chunk).unwrap();
    }
    let cut = w.was_cut();
    w.finish();
    (out, cut)
}

#[test]
fn line_escaper_gives_one_bounded_line_and_is_idempotent() {
    let share = Share::default();
    // Many small writes, as formatters make them.
    let input = (value(), proptest::collection::vec(any::<usize>(), 0..40));
    runner()
        .run(&input, |(v, cuts)| {
            let line = format!("[req-1]  INFO app: {v}\n");
            let (out, was_cut) = text_line_cut(&line, LINE_CAP, &cuts);
            prop_assert!(out.len() <= LINE_CAP, "{}", out.len());
            let body = out.strip_suffix('\n').expect("one final newline");
            prop_assert!(!has_escaped(body), "{out:?}");
            prop_assert_eq!(
                &out,
                &text_line(&line, LINE_CAP, &[]),
                "chunking does not matter"
            );
            // The line escaper keeps room for the marker: a line is cut when its text before
            // the newline is longer than the cap less the marker and the newline.
            let fits = line.len() + TRUNCATED_MARKER.len() <= LINE_CAP;
            // (A cut line may be longer than its input: escapes widen what comes before it.)
            let cut = was_cut;
            prop_assert!(!cut || body.ends_with(TRUNCATED_MARKER), "{out:?}");
            if !has_escaped(&v) && fits {
                prop_assert_eq!(&out, &line, "clean lines are untouched");
            }
            if !cut {
                prop_assert_eq!(text_line(&out, LINE_CAP, &[]), out.clone(), "idempotent");
            }
            share.record(has_escaped(&v), cut, out == line);
            Ok(())
        })
        .unwrap();
    share.check("text line", 0.1, true);
}

fn json_line(line: &str, cap: usize, max: usize, cuts: &[usize]) -> (String, bool) {
    let mut w = JsonLine::new(cap, max);
    for chunk in chunks(line, cuts) {
        w.write_str(&chunk).unwrap();
    }
    let overflow = w.overflowed();
    (w.into_inner(), overflow)
}

#[test]
fn json_line_rewriter_keeps_valid_json_and_bounds_every_string() {
    let share = Share::default();
    let input = (
        value(),
        value(),
        proptest::collection::vec(any::<usize>(), 0..6),
    );
    runner()
        .run(&input, |(a, b, cuts)| {
            let original = serde_json::json!({
                "timestamp": "2026-11-26T00:00:00Z",
                "fields": {"message": a, "n": 12, "ok": true},
                "spans": [{"name": "request", "reference": b}],
            });
            let line = format!("{original}\n");
            let (out, overflow) = json_line(&line, usize::MAX, CAP, &cuts);
            prop_assert!(!overflow);
            prop_assert_eq!(
                &out,
                &json_line(&line, usize::MAX, CAP, &[]).0,
                "chunking does not matter"
            );
            let body = out.strip_suffix('\n').expect("final newline kept");
            prop_assert!(!has_escaped(body), "{out:?}");
            let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
            let mut any_cut = false;
            for (got, want) in [
                (&parsed["fields"]["message"], &a),
                (&parsed["spans"][0]["reference"], &b),
            ] {
                let got = got.as_str().unwrap();
                // Counted on the escaped form: DEL, C1 and invisible characters become
                // `\uXXXX` too.
                let mut escaped = String::new();
                write_json(&mut escaped, want).unwrap();
                if escaped.chars().count() - 2 <= CAP {
                    prop_assert_eq!(got, want.as_str(), "round-trips when short");
                } else {
                    any_cut = true;
                    let kept = got.strip_suffix(TRUNCATED_MARKER).expect("marker");
                    prop_assert!(want.starts_with(kept), "a cut keeps a prefix");
                }
            }
            prop_assert_eq!(&parsed["fields"]["n"], 12);
            prop_assert_eq!(&parsed["spans"][0]["name"], "request");
            // The line writer (straight copy while plain and short, else this rewriter) agrees.
            let mut watched = String::from("{\"request_id\":\"r\",");
            let mut watch = JsonWatch::new(&mut watched, usize::MAX, CAP);
            for chunk in chunks(&line, &cuts) {
                watch.write_str(&chunk).unwrap();
            }
            prop_assert!(watch.finish());
            prop_assert_eq!(&watched["{\"request_id\":\"r\",".len()..], out.as_str());
            // With a value bound above the line's length, a plain ASCII line takes the
            // watcher's straight copy (never reached with `CAP`: every line here is longer):
            // it must agree with the rewriter as well.
            let roomy = line.len();
            let mut copied = String::new();
            let mut watch = JsonWatch::new(&mut copied, usize::MAX, roomy);
            for chunk in chunks(&line, &cuts) {
                watch.write_str(&chunk).unwrap();
            }
            prop_assert!(watch.finish());
            prop_assert_eq!(&copied, &json_line(&line, usize::MAX, roomy, &[]).0);
            let (again, _) = json_line(&out, usize::MAX, usize::MAX, &[]);
            prop_assert_eq!(&again, &out, "idempotent");
            // A line cap: either the whole line or an overflow, never a partial line.
            let (capped, overflow) = json_line(&line, 150, CAP, &[]);
            prop_assert!(overflow || capped == out);
            prop_assert!(capped.len() <= 150);
            let clean = !has_escaped(&a) && !has_escaped(&b);
            share.record(!clean, any_cut, out == line);
            Ok(())
        })
        .unwrap();
    share.check("JSON line", 0.06, true);
}

#[test]
fn unescape_reads_every_text_escape() {
    let mut s = String::new();
    for c in SPICE {
        s.push(*c);
    }
    let mut out = String::new();
    write_text(&mut out, &s).unwrap();
    assert_eq!(unescape_text(&out).as_deref(), Some(s.as_str()));
}
