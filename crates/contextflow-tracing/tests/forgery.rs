//! Unforgeable logs (issue 13, item 6): every value of every event, the message included, is
//! escaped and bounded in text and JSON output, not only the context fields.

use contextflow::AsyncLocal;
use contextflow_tracing::{
    ContextFields, MemoryWriter, DEFAULT_MAX_LINE_LEN, DEFAULT_MAX_VALUE_LEN, TRUNCATED_MARKER,
};
use tracing::{info, info_span, subscriber::with_default, Dispatch};
use tracing_subscriber::fmt::format;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

/// The order reference of issue 13: a newline, then a whole forged line for another tenant.
const FORGED: &str = "R1\n[FORGED-ID trace_id=0af7651916cd43dd8448eb211c80319c tenant=globex] 2026-11-26T00:00:00Z INFO forged line";

/// Every character that must never reach a line raw.
const RAW_FORBIDDEN: &[char] = &[
    '\r',
    '\x1b',
    '\x07',
    '\x08',
    '\x0c',
    '\x7f',
    '\0',
    '\u{85}',
    '\u{9b}',
    '\u{2028}',
    '\u{2029}',
    '\u{202A}',
    '\u{202B}',
    '\u{202C}',
    '\u{202D}',
    '\u{202E}',
    '\u{2066}',
    '\u{2067}',
    '\u{2068}',
    '\u{2069}',
    '\u{200B}',
    '\u{200E}',
    '\u{FEFF}',
    '\u{E0041}',
];

fn fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT)
}

/// Text as most applications set it up: `fmt`'s full format, default field formatter.
fn text(log: &MemoryWriter) -> Dispatch {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(log.clone())
        .event_format(fields().text(format().without_time()))
        .finish()
        .into()
}

/// Text with the escaping field formatter too (per-value bounds).
fn text_escaped(log: &MemoryWriter) -> Dispatch {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(log.clone())
        .fmt_fields(fields().escaped_fields())
        .event_format(fields().text(format().without_time()))
        .finish()
        .into()
}

fn json(log: &MemoryWriter) -> Dispatch {
    tracing_subscriber::fmt()
        .json()
        .without_time()
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(log.clone())
        .map_event_format(|f| fields().json(f))
        .finish()
        .into()
}

/// Logs the forged reference every way a value reaches a line, inside a request.
fn log_forged_reference_every_way() {
    REQUEST_ID.sync_scope("req-1".into(), || {
        TENANT.sync_scope("acme".into(), || {
            let reference = FORGED;
            info!(%reference, "display field");
            info!(?reference, "debug field");
            info!(reference, "str field");
            info!("in the message: {reference}");
            let span = info_span!("controller", %reference);
            span.in_scope(|| info!("in a span field"));
        })
    });
}

fn assert_clean(out: &str) {
    for c in RAW_FORBIDDEN {
        assert!(!out.contains(*c), "raw {c:?} in {out:?}");
    }
}

#[test]
fn forged_reference_stays_on_one_line_in_text() {
    for (name, make) in [
        ("default fields", text as fn(&MemoryWriter) -> Dispatch),
        ("escaped fields", text_escaped),
    ] {
        let log = MemoryWriter::new();
        tracing::dispatcher::with_default(&make(&log), log_forged_reference_every_way);
        let lines = log.lines();
        assert_eq!(lines.len(), 5, "{name}: {lines:#?}");
        let forged_prefix = "\\n[FORGED-ID trace_id=0af7651916cd43dd8448eb211c80319c tenant=globex] 2026-11-26T00:00:00Z INFO forged line";
        for line in &lines {
            assert!(
                line.starts_with("[req-1 tenant=acme]  INFO "),
                "{name}: {line}"
            );
            assert!(line.contains(forged_prefix), "{name}: {line}");
            // The real prefix's tenant and the forged text's, escaped inside a value: no other.
            assert_eq!(line.matches("tenant=").count(), 2, "{name}: {line}");
        }
        assert_eq!(
            lines[0],
            format!("[req-1 tenant=acme]  INFO forgery: display field reference=R1{forged_prefix}"),
            "{name}"
        );
        assert_eq!(
            lines[1],
            format!(
                "[req-1 tenant=acme]  INFO forgery: debug field reference=\"R1{forged_prefix}\""
            ),
            "{name}"
        );
        assert_eq!(
            lines[3],
            format!("[req-1 tenant=acme]  INFO forgery: in the message: R1{forged_prefix}"),
            "{name}"
        );
        assert_eq!(
            lines[4],
            format!(
                "[req-1 tenant=acme]  INFO controller{{reference=R1{forged_prefix}}}: forgery: in a span field"
            ),
            "{name}"
        );
    }
}

#[test]
fn forged_reference_stays_one_valid_json_object() {
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&json(&log), log_forged_reference_every_way);
    let contents = log.contents();
    assert_eq!(contents.matches('\n').count(), 5, "{contents}");
    for line in &log.lines()[..4] {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON {line}: {e}"));
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["tenant"], "acme");
        let shown = v["fields"]["reference"]
            .as_str()
            .or(v["fields"]["message"].as_str())
            .unwrap();
        assert!(
            shown.contains(FORGED) || shown.contains(&format!("{FORGED:?}")),
            "{line}"
        );
    }
    let span_line: serde_json::Value = serde_json::from_str(&log.lines()[4]).unwrap();
    assert_eq!(span_line["span"]["reference"], FORGED);
}

const HOSTILE: &str = "\x1b[2J\x1b[31mred\x1b[0m \u{202E}txt.exe\u{202C} \u{2066}iso\u{2069} a\u{2028}b\u{2029}c\r\u{85}\u{9b}31m\x07\x08\x0c\x7f\0\u{200B}\u{200E}\u{FEFF}\u{E0041}tag";

#[test]
fn ansi_escapes_and_bidi_controls_are_escaped_everywhere() {
    for (name, make) in [
        ("text", text as fn(&MemoryWriter) -> Dispatch),
        ("text escaped", text_escaped),
        ("json", json),
    ] {
        let log = MemoryWriter::new();
        tracing::dispatcher::with_default(&make(&log), || {
            TENANT.sync_scope(HOSTILE.into(), || {
                let span = info_span!("s", v = %HOSTILE);
                span.in_scope(|| info!(display = %HOSTILE, debug = ?HOSTILE, "{HOSTILE}"));
            });
        });
        let out = log.contents();
        assert_eq!(out.matches('\n').count(), 1, "{name}: {out:?}");
        assert_clean(&out);
        if name == "json" {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["tenant"], HOSTILE, "round-trips");
            assert_eq!(v["fields"]["display"], HOSTILE, "round-trips");
            assert_eq!(v["fields"]["message"], HOSTILE, "round-trips");
            assert_eq!(v["span"]["v"], HOSTILE, "round-trips");
        } else {
            assert!(out.contains("\\x1b[2J\\x1b[31mred"), "{name}: {out}");
            assert!(out.contains("\\u{202e}txt.exe\\u{202c}"), "{name}: {out}");
        }
    }
}

#[test]
fn huge_value_gives_a_bounded_line() {
    let huge = "x".repeat(1_900_000);
    let event = || {
        REQUEST_ID.sync_scope("req-big".into(), || {
            info!(reference = %huge, "order {huge}");
        })
    };

    // Text, default field formatter: the line is cut at the line bound.
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&text(&log), event);
    let out = log.contents();
    assert_eq!(out.len(), DEFAULT_MAX_LINE_LEN, "bytes, newline included");
    assert!(out.starts_with("[req-big]  INFO forgery: order xxx"));
    assert!(out.ends_with(&format!("x{TRUNCATED_MARKER}\n")));

    // Text, escaping field formatter: each value is cut at the value bound.
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&text_escaped(&log), event);
    let out = log.contents();
    let value = format!("{}{TRUNCATED_MARKER}", "x".repeat(DEFAULT_MAX_VALUE_LEN));
    let message = format!(
        "order {}{TRUNCATED_MARKER}",
        "x".repeat(DEFAULT_MAX_VALUE_LEN - 6)
    );
    let expected = format!("[req-big]  INFO forgery: {message} reference={value}\n");
    assert!(
        out == expected,
        "{} bytes, want {}",
        out.len(),
        expected.len()
    );

    // JSON: each string is cut at the value bound; the line stays valid JSON.
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&json(&log), event);
    let out = log.contents();
    assert!(out.len() < DEFAULT_MAX_LINE_LEN, "{}", out.len());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["request_id"], "req-big");
    assert!(v["fields"]["reference"] == value.as_str());
    assert!(v["fields"]["message"] == message.as_str());
}

#[test]
fn json_line_over_the_line_bound_is_replaced_by_a_valid_short_object() {
    let log = MemoryWriter::new();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(log.clone())
        .map_event_format(|f| fields().max_line_len(1024).json(f))
        .finish();
    let big = "y".repeat(600);
    with_default(subscriber, || {
        REQUEST_ID.sync_scope(
            "req-2".into(),
            || info!(a = %big, b = %big, c = %big, "three big \u{202E} values"),
        );
    });
    let out = log.contents();
    assert!(out.len() <= 1024, "{}", out.len());
    assert_clean(&out);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["request_id"], "req-2");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "forgery");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["fields"]["message"], "three big \u{202E} values");
    assert!(v["timestamp"].as_str().unwrap().starts_with("20"), "{v}");
}

/// A context value so large (escaped: a tag character is 12 bytes) that even the short object
/// with it does not fit: the replacement still names the request, its value cut shorter.
#[test]
fn json_short_object_keeps_the_context_of_a_huge_value() {
    let log = MemoryWriter::new();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(log.clone())
        .map_event_format(|f| fields().max_len(4096).max_line_len(1024).json(f))
        .finish();
    let huge: String = std::iter::repeat_n('\u{E0041}', 300).collect();
    let id = format!("req-{huge}");
    with_default(subscriber, || {
        REQUEST_ID.sync_scope(id, || info!(a = %"y".repeat(2000), "big"));
    });
    let out = log.contents();
    assert!(out.len() <= 1024, "{}", out.len());
    assert_clean(&out);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["request_id"].as_str().unwrap_or_else(|| panic!("{out}"));
    assert!(id.starts_with("req-"), "{v}");
    assert_eq!(v["truncated"], true);
    assert_eq!(v["level"], "INFO");
}

/// The order service's demo and other readers parse `fmt`'s layout: for ordinary values the
/// escaping leaves every byte as `fmt` writes it.
#[test]
fn harmless_lines_are_byte_identical_to_fmt() {
    let events = || {
        info!(id = %"ord-1", lines = 2, "order received");
        info!(
            reference = "ord-2",
            total = 1.5,
            ok = true,
            "placing order: ünïcødé 日本 😀"
        );
        let err = std::io::Error::other("connection refused");
        info!(
            error = &err as &(dyn std::error::Error + 'static),
            "query failed"
        );
        let span = info_span!("http.request", method = "POST", path = "/orders");
        span.in_scope(|| info!(r#type = "x", status = 201u16, "request finished"));
        tracing::warn!(statement = "SELECT * FROM t WHERE a = $1", "slow query");
    };
    let plain = MemoryWriter::new();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_writer(plain.clone())
        .finish();
    with_default(subscriber, events);
    for make in [text as fn(&MemoryWriter) -> Dispatch, text_escaped] {
        let ours = MemoryWriter::new();
        tracing::dispatcher::with_default(&make(&ours), events);
        assert_eq!(ours.contents(), plain.contents());
    }
}

/// `tracing_subscriber` turns colours on by default: the line must be escaped and bounded all
/// the same, whatever the field formatter and the wrapped format.
#[test]
fn colours_on_the_line_is_escaped_and_bounded_all_the_same() {
    // Each value within its own bound, the line far over the line's: cut at the line's.
    let value = "\u{1F600}".repeat(DEFAULT_MAX_VALUE_LEN);
    for escaped_fields in [false, true] {
        let log = MemoryWriter::new();
        let builder = tracing_subscriber::fmt()
            .with_ansi(true)
            .with_writer(log.clone());
        let subscriber: Dispatch = if escaped_fields {
            builder
                .fmt_fields(fields().escaped_fields())
                .event_format(fields().text(format().without_time()))
                .finish()
                .into()
        } else {
            builder
                .event_format(fields().text(format().without_time()))
                .finish()
                .into()
        };
        tracing::dispatcher::with_default(&subscriber, || {
            info!(a = %value, b = %value, c = %value, "three long values");
            let span = info_span!("request", path = %"/orders");
            span.in_scope(|| info!(v = %"a\x1b[31mb\nc", "hi"));
        });
        let out = log.contents();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{escaped_fields}: {out:?}");
        assert!(
            lines[0].len() < DEFAULT_MAX_LINE_LEN,
            "{escaped_fields}: {}",
            lines[0].len()
        );
        assert!(lines[0].ends_with(TRUNCATED_MARKER), "{escaped_fields}");
        assert!(
            !out.contains('\x1b'),
            "{escaped_fields}: no colour code, no raw ESC: {out:?}"
        );
        assert!(
            lines[1].contains("a\\x1b[31mb\\nc"),
            "{escaped_fields}: {out:?}"
        );
        if escaped_fields {
            // Span fields stored without colour codes, so they print cleanly.
            assert!(lines[1].contains("request{path=/orders}"), "{out:?}");
        }
    }

    // A format that prints event fields with its own visitor (`Pretty`) is escaped too.
    let log = MemoryWriter::new();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(true)
        .with_writer(log.clone())
        .fmt_fields(fields().escaped_fields())
        .event_format(fields().text(format().pretty().without_time()))
        .finish();
    with_default(subscriber, || info!(reference = %FORGED, "order placed"));
    let out = log.contents();
    assert!(!out.contains("\n[FORGED-ID"), "{out:?}");
    assert!(out.contains("R1\\n[FORGED-ID"), "{out:?}");
    assert!(!out.contains('\x1b'), "{out:?}");
}

#[test]
#[should_panic(expected = "contextflow-tracing: invalid field name \"tenant id\"")]
fn invalid_field_name_panics_with_a_clear_message() {
    let _ = ContextFields::new().field("tenant id", &TENANT);
}

#[test]
#[should_panic(expected = "contextflow-tracing: invalid field name \"\"")]
fn empty_field_name_panics() {
    let _ = ContextFields::new().field_fn("", || Some(1));
}

/// Review finding: two context fields of one name were told apart by renaming the first as
/// the event's own (`event.tenant`): a record showed a context value under an event field's
/// name.
#[test]
#[should_panic(expected = "contextflow-tracing: the context field \"tenant\" is given twice")]
fn a_context_field_name_given_twice_panics() {
    let _ = ContextFields::new()
        .field("tenant", &TENANT)
        .field_fn("tenant", || Some(1));
}

/// An error whose `source()` is itself: listing its chain must end.
#[derive(Debug)]
struct SelfSourced;

impl std::fmt::Display for SelfSourced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("e")
    }
}

impl std::error::Error for SelfSourced {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self)
    }
}

#[test]
fn an_error_chain_that_loops_is_listed_up_to_a_bound() {
    let log = MemoryWriter::new();
    with_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(log.clone())
            .fmt_fields(fields().escaped_fields())
            .event_format(fields().text(format().without_time()))
            .finish(),
        || {
            info!(
                error = &SelfSourced as &(dyn std::error::Error + 'static),
                "failed"
            )
        },
    );
    let out = log.contents();
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(out.contains("error.sources=[e, e, "), "{out:?}");
    assert!(out.contains(", e, ...]"), "{out:?}");
}

/// Review finding: `json` over a format that does not write JSON (`fields.json(format())`, a
/// misconfiguration that compiles) passed the inner text through raw: a message with a newline
/// made a forged second line, and the context was lost. Now the text is one escaped string
/// member of an object with the context.
#[test]
fn json_over_a_text_format_still_makes_one_object_per_event() {
    let log = MemoryWriter::new();
    let dispatch: Dispatch = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(log.clone())
        .event_format(fields().json(format().without_time()))
        .finish()
        .into();
    tracing::dispatcher::with_default(&dispatch, log_forged_reference_every_way);
    let lines = log.lines();
    assert_eq!(lines.len(), 5, "{}", log.contents());
    for line in &lines {
        assert_clean(line);
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON {line}: {e}"));
        assert_eq!(v["request_id"], "req-1", "{line}");
        assert_eq!(v["tenant"], "acme", "{line}");
        assert!(
            v["line"].as_str().is_some_and(|l| l.contains("INFO")),
            "{line}"
        );
    }
}

/// Review finding: with a text format that starts with the message, a message starting with
/// `{` passed the one-object check: its raw newline and the look-alike object after it made a
/// forged JSON record. Now anything but one object on one line is the escaped `"line"`.
#[test]
fn json_over_a_text_format_with_a_brace_message_makes_one_object() {
    let log = MemoryWriter::new();
    let dispatch: Dispatch = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(log.clone())
        .event_format(fields().json(format().without_time().with_level(false).with_target(false)))
        .finish()
        .into();
    let forged = "{}\n{\"request\\u005fid\":\"req-2\",\"level\":\"ERROR\",\"fields\":{\"message\":\"forged\"}}";
    tracing::dispatcher::with_default(&dispatch, || {
        REQUEST_ID.sync_scope("req-1".into(), || {
            info!("{forged}");
            info!("{{}} {{\"request_id\":\"req-3\"}}");
            // Balanced, one line, not JSON: a shipper would drop the line.
            info!("{{x}}");
        })
    });
    let lines = log.lines();
    assert_eq!(lines.len(), 3, "{}", log.contents());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON {line}: {e}"));
        assert_eq!(v["request_id"], "req-1", "{line}");
        assert!(v["line"].is_string(), "{line}");
    }
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(first["line"].as_str().unwrap().contains("forged"));
}

/// Review finding: a field whose `Display` fails made `EscapedFields` return the error, and
/// tracing-subscriber then dropped the event (or, for a span, printed the span's raw field
/// values to stderr). Now the value shows a marker and the line goes on, escaped.
#[test]
fn a_value_whose_display_fails_is_marked_and_the_line_goes_on() {
    struct Fails;
    impl std::fmt::Display for Fails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("part")?;
            Err(std::fmt::Error)
        }
    }
    impl std::fmt::Debug for Fails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            std::fmt::Display::fmt(self, f)
        }
    }
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&text_escaped(&log), || {
        REQUEST_ID.sync_scope("req-1".into(), || {
            let reference = FORGED;
            let span = info_span!("controller", %reference, bad = %Fails);
            span.in_scope(|| info!(bad = ?Fails, %reference, "after a failing value"));
        })
    });
    let lines = log.lines();
    assert_eq!(lines.len(), 1, "{}", log.contents());
    let line = &lines[0];
    assert_clean(line);
    assert!(line.starts_with("[req-1]"), "{line}");
    assert!(line.contains("after a failing value"), "{line}");
    assert_eq!(line.matches("<fmt error>").count(), 2, "{line}");
    assert!(!line.contains('\n'), "{line}");
}

/// Review finding: in JSON, a value whose `Display` fails (a date formatted with a bad
/// pattern) made the JSON serializer under tracing-subscriber's formatter panic inside the
/// caller's `info!`. Now the event becomes the short object with the context.
#[test]
fn json_survives_a_value_whose_display_fails() {
    struct Fails;
    impl std::fmt::Display for Fails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("part")?;
            Err(std::fmt::Error)
        }
    }
    let log = MemoryWriter::new();
    let logged = std::panic::catch_unwind(|| {
        tracing::dispatcher::with_default(&json(&log), || {
            REQUEST_ID.sync_scope("req-1".into(), || info!(when = %Fails, "a failing value"))
        })
    });
    assert!(logged.is_ok(), "logging does not panic");
    let lines = log.lines();
    assert_eq!(lines.len(), 1, "{}", log.contents());
    let v: serde_json::Value = serde_json::from_str(&lines[0])
        .unwrap_or_else(|e| panic!("invalid JSON {}: {e}", lines[0]));
    assert_eq!(v["request_id"], "req-1", "{}", lines[0]);
    assert_eq!(v["level"], "INFO", "{}", lines[0]);
    assert_eq!(
        v["error"], "the event could not be formatted",
        "{}",
        lines[0]
    );
}

/// Review finding: under a small bound, the last JSON fallback (level and target) was written
/// whatever its length: 75 bytes under a bound of 48.
#[test]
fn a_json_line_keeps_a_small_bound() {
    let log = MemoryWriter::new();
    let dispatch: Dispatch = tracing_subscriber::fmt()
        .json()
        .without_time()
        .with_writer(log.clone())
        .map_event_format(|f| fields().max_line_len(48).json(f))
        .finish()
        .into();
    tracing::dispatcher::with_default(&dispatch, || {
        REQUEST_ID.sync_scope(
            "req-1".into(),
            || info!(target: "order_service::http::handlers", "{}", "m".repeat(500)),
        )
    });
    let lines = log.lines();
    assert_eq!(lines.len(), 1, "{}", log.contents());
    assert!(lines[0].len() < 48, "{:?}", lines[0]);
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["truncated"], true);
}

/// Review finding: U+2800 (braille blank), which shows as a space, was written bare in the
/// text prefix: `req-9⠀tenant=globex` read as a second field.
#[test]
fn a_blank_that_is_not_white_space_is_quoted_in_the_prefix() {
    let log = MemoryWriter::new();
    tracing::dispatcher::with_default(&text(&log), || {
        REQUEST_ID.sync_scope("req-9\u{2800}tenant\u{A78A}globex".into(), || {
            info!("hello")
        })
    });
    let line = log.contents();
    assert!(line.starts_with("[\"req-9"), "{line}");
}
