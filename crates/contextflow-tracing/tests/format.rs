//! Context fields in text and JSON output, with subscribers set per thread.

mod common;

use common::Capture;
use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use tracing::{info, subscriber::with_default, warn};
use tracing_subscriber::fmt::format;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");
static USER_ID: AsyncLocal<u64> = AsyncLocal::named("user_id");

fn fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT)
        .field("user_id", &USER_ID)
}

fn text_subscriber(capture: &Capture) -> impl tracing::Subscriber + Send + Sync {
    let inner = format().without_time().with_target(false).with_level(false);
    tracing_subscriber::fmt()
        .event_format(fields().text(inner))
        .with_writer(capture.clone())
        .finish()
}

fn json_subscriber(capture: &Capture) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .json()
        .without_time()
        .map_event_format(|json| fields().json(json))
        .with_writer(capture.clone())
        .finish()
}

fn json_lines(capture: &Capture) -> Vec<serde_json::Value> {
    capture
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON {l:?}: {e}")))
        .collect()
}

const HOSTILE: &str = "evil\n[req-2] forged line\r\x1b[31mred\x1b[0m \"quoted\" \\ \u{2028}sep\u{2029}\u{202E}rtl\u{85}\0\x07end";

#[test]
fn text_prefix_with_one_field() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        REQUEST_ID.sync_scope("req-123".into(), || info!("Order creation started"));
    });
    assert_eq!(capture.contents(), "[req-123] Order creation started\n");
}

#[test]
fn text_prefix_with_several_fields_in_declaration_order() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        USER_ID.sync_scope(7, || {
            TENANT.sync_scope("acme", || {
                REQUEST_ID.sync_scope("req-1".into(), || info!(order = 42, "created"));
                info!("no request id");
            })
        });
    });
    assert_eq!(
        capture.lines(),
        [
            "[req-1 tenant=acme user_id=7] created order=42",
            "[tenant=acme user_id=7] no request id",
        ]
    );
}

#[test]
fn no_context_prints_normally() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || warn!("outside any request"));
    assert_eq!(capture.contents(), "outside any request\n");

    let capture = Capture::default();
    with_default(json_subscriber(&capture), || warn!("outside any request"));
    let lines = json_lines(&capture);
    assert_eq!(lines.len(), 1);
    let obj = lines[0].as_object().unwrap();
    assert!(!obj.contains_key("request_id"));
    assert_eq!(obj["fields"]["message"], "outside any request");
}

#[test]
fn json_fields_are_top_level_keys() {
    let capture = Capture::default();
    with_default(json_subscriber(&capture), || {
        REQUEST_ID.sync_scope("req-9".into(), || {
            TENANT.sync_scope("acme", || info!(order = 1, "created"));
        });
    });
    let lines = json_lines(&capture);
    assert_eq!(lines.len(), 1);
    let obj = lines[0].as_object().unwrap();
    assert_eq!(obj["request_id"], "req-9");
    assert_eq!(obj["tenant"], "acme");
    assert!(!obj.contains_key("user_id"));
    assert_eq!(obj["level"], "INFO");
    assert_eq!(obj["fields"]["message"], "created");
    assert_eq!(obj["fields"]["order"], 1);
    // Our keys come first, then the inner format's.
    assert!(capture
        .contents()
        .starts_with(r#"{"request_id":"req-9","tenant":"acme","#));
}

#[test]
fn json_with_flattened_event_and_numbers_as_strings() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .map_event_format(|json| fields().json(json))
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || USER_ID.sync_scope(5, || info!("hi")));
    let lines = json_lines(&capture);
    assert_eq!(lines[0]["user_id"], "5");
    assert_eq!(lines[0]["message"], "hi");
}

/// With `flatten_event(true)` an event field named like a context field is a top-level key
/// too: it is renamed `event.<name>`, so that the line has one `request_id` and one `tenant`,
/// the context's (JSON readers keep the last of two keys, which was the event's).
#[test]
fn json_event_fields_cannot_shadow_context_fields() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .map_event_format(|json| fields().json(json))
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || {
        REQUEST_ID.sync_scope("req-1".into(), || {
            TENANT.sync_scope(
                "acme",
                || info!(request_id = "req-2", tenant = "globex", nested = ?["tenant"], "refund"),
            )
        })
    });
    let out = capture.contents();
    assert_eq!(out.matches("\"request_id\":").count(), 1, "{out}");
    assert_eq!(out.matches("\"tenant\":").count(), 1, "{out}");
    let lines = json_lines(&capture);
    assert_eq!(lines[0]["request_id"], "req-1");
    assert_eq!(lines[0]["tenant"], "acme");
    assert_eq!(lines[0]["event.request_id"], "req-2");
    assert_eq!(lines[0]["event.tenant"], "globex");
    assert_eq!(lines[0]["message"], "refund");

    // No context at all on the line (a background task): the event's fields are still not
    // the line's request id and tenant.
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .map_event_format(|json| fields().json(json))
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || {
        info!(request_id = "req-2", tenant = "globex", "refund")
    });
    let lines = json_lines(&capture);
    let obj = lines[0].as_object().unwrap();
    assert!(!obj.contains_key("request_id"), "{obj:?}");
    assert!(!obj.contains_key("tenant"), "{obj:?}");
    assert_eq!(obj["event.request_id"], "req-2");
    assert_eq!(obj["event.tenant"], "globex");
}

/// The renaming adds 6 bytes per renamed key: a line that fit before it still fits the cap
/// after it, or is cut (the short object), never longer.
#[test]
fn renamed_json_lines_stay_within_the_cap() {
    const CAP: usize = 300;
    for pad in 150..260 {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .without_time()
            .map_event_format(|json| fields().max_line_len(CAP).json(json))
            .with_writer(capture.clone())
            .finish();
        let message = "m".repeat(pad);
        with_default(subscriber, || {
            TENANT.sync_scope("acme", || {
                info!(tenant = "globex", request_id = "r", "{message}")
            })
        });
        let out = capture.contents();
        assert!(out.len() <= CAP, "pad {pad}: {} bytes: {out}", out.len());
        let line: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(line["tenant"], "acme", "pad {pad}: {out}");
    }
}

/// A value whose `Display` writes nothing (an OpenTelemetry context without a valid span has
/// no trace id) is left out of the line, in text and JSON, as an unset one.
#[test]
fn a_value_that_displays_as_nothing_is_left_out() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        REQUEST_ID.sync_scope("req-1".into(), || {
            TENANT.sync_scope("", || info!("empty tenant"))
        })
    });
    assert_eq!(capture.contents(), "[req-1] empty tenant\n");

    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .map_event_format(|json| fields().json(json))
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || {
        TENANT.sync_scope("", || info!("empty tenant"))
    });
    let lines = json_lines(&capture);
    assert!(
        !lines[0].as_object().unwrap().contains_key("tenant"),
        "{}",
        lines[0]
    );
}

#[test]
fn hostile_value_cannot_forge_a_text_line() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        REQUEST_ID.sync_scope(HOSTILE.into(), || info!("one event"));
    });
    let out = capture.contents();
    assert_eq!(out.matches('\n').count(), 1, "{out:?}");
    assert!(out.ends_with("one event\n"));
    for forbidden in [
        '\r', '\x1b', '\u{2028}', '\u{2029}', '\u{202E}', '\u{85}', '\0', '\x07',
    ] {
        assert!(!out.contains(forbidden), "{forbidden:?} in {out:?}");
    }
    assert_eq!(
        out,
        "[\"evil\\n\\x5breq-2\\x5d forged line\\r\\x1b\\x5b31mred\\x1b\\x5b0m \\\"quoted\\\" \\\\ \\u{2028}sep\\u{2029}\\u{202e}rtl\\u{85}\\x00\\x07end\"] one event\n"
    );
}

#[test]
fn hostile_value_is_valid_escaped_json() {
    let capture = Capture::default();
    with_default(json_subscriber(&capture), || {
        REQUEST_ID.sync_scope(HOSTILE.into(), || info!("one event"));
    });
    let out = capture.contents();
    assert_eq!(out.matches('\n').count(), 1, "{out:?}");
    for forbidden in [
        '\r', '\x1b', '\u{2028}', '\u{2029}', '\u{202E}', '\u{85}', '\0', '\x07',
    ] {
        assert!(!out.contains(forbidden), "{forbidden:?} in {out:?}");
    }
    let lines = json_lines(&capture);
    assert_eq!(lines[0]["request_id"], HOSTILE, "round-trips exactly");
    assert_eq!(lines[0]["fields"]["message"], "one event");
}

#[test]
fn long_values_are_truncated_with_a_marker() {
    let capture = Capture::default();
    with_default(json_subscriber(&capture), || {
        REQUEST_ID.sync_scope("x".repeat(100_000), || info!("big"));
    });
    let id = json_lines(&capture)[0]["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id, format!("{}…", "x".repeat(256)));

    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        REQUEST_ID.sync_scope("y".repeat(1000), || info!("big"));
    });
    assert_eq!(capture.contents(), format!("[{}…] big\n", "y".repeat(256)));
}

/// A value whose `Display` logs: formatting must neither panic nor deadlock.
struct Chatty;
impl std::fmt::Display for Chatty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        info!("from inside Display");
        f.write_str("chatty")
    }
}
static CHATTY: AsyncLocal<Chatty> = AsyncLocal::named("chatty");

#[test]
fn display_that_logs_is_tolerated() {
    for json in [false, true] {
        let capture = Capture::default();
        let fields = ContextFields::new().field("chatty", &CHATTY);
        let builder = tracing_subscriber::fmt()
            .without_time()
            .with_writer(capture.clone());
        let dispatch: tracing::Dispatch = if json {
            builder
                .json()
                .map_event_format(|f| fields.json(f))
                .finish()
                .into()
        } else {
            builder
                .event_format(fields.text(format().without_time()))
                .finish()
                .into()
        };
        tracing::dispatcher::with_default(&dispatch, || {
            CHATTY.sync_scope(Chatty, || info!("outer"));
        });
        let out = capture.contents();
        assert!(out.contains("outer") && out.contains("chatty"), "{out}");
    }
}

#[test]
fn concurrent_requests_on_one_thread_keep_their_own_fields() {
    let capture = Capture::default();
    with_default(json_subscriber(&capture), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let requests = (0..50).map(|i| {
                REQUEST_ID.scope(format!("req-{i}"), async move {
                    for step in 0..3 {
                        info!(i, step, "working");
                        tokio::task::yield_now().await;
                    }
                })
            });
            let handles: Vec<_> = requests.map(tokio::spawn).collect();
            for h in handles {
                h.await.unwrap();
            }
        });
    });
    let lines = json_lines(&capture);
    assert_eq!(lines.len(), 150);
    for line in lines {
        let i = line["fields"]["i"].as_u64().unwrap();
        assert_eq!(line["request_id"], format!("req-{i}"));
    }
}

#[test]
fn works_as_a_layer_of_a_registry() {
    use tracing_subscriber::prelude::*;

    let text = Capture::default();
    let json = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .without_time()
                .with_target(false)
                .map_event_format(|f| fields().text(f))
                .with_writer(text.clone()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .map_event_format(|f| fields().json(f))
                .with_writer(json.clone()),
        );
    with_default(subscriber, || {
        TENANT.sync_scope("acme", || {
            let _span = tracing::info_span!("checkout", cart = 3).entered();
            info!("paid");
        });
    });
    assert_eq!(
        text.contents(),
        "[tenant=acme]  INFO checkout{cart=3}: paid\n"
    );
    let line = &json_lines(&json)[0];
    assert_eq!(line["tenant"], "acme");
    assert_eq!(line["span"]["cart"], 3);
}

/// Logs from its destructor.
struct LogOnDrop;
impl Drop for LogOnDrop {
    fn drop(&mut self) {
        info!("cleanup");
    }
}

#[test]
fn aborted_and_panicking_requests_keep_fields_and_leak_nothing() {
    let capture = Capture::default();
    with_default(text_subscriber(&capture), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            // Aborted: the request's destructors still log with its fields.
            let aborted = tokio::spawn(REQUEST_ID.scope("req-abort".into(), async {
                let _guard = LogOnDrop;
                info!("waiting forever");
                std::future::pending::<()>().await;
            }));
            tokio::task::yield_now().await;
            aborted.abort();
            assert!(aborted.await.unwrap_err().is_cancelled());

            // Panicking: the spawned child logs with its fields, then nothing leaks.
            let panicked = REQUEST_ID
                .scope("req-panic".into(), async {
                    contextflow::spawn(async {
                        let _guard = LogOnDrop;
                        info!("about to panic");
                        panic!("handler bug");
                    })
                    .await
                })
                .await;
            assert!(panicked.unwrap_err().is_panic());
            info!("after");
        });
    });
    assert_eq!(
        capture.lines(),
        [
            "[req-abort] waiting forever",
            "[req-abort] cleanup",
            "[req-panic] about to panic",
            "[req-panic] cleanup",
            "after",
        ]
    );
}

/// A text field value cut at its bound still ends in a closing quote, and never inside an
/// escape: a logfmt reader (Loki's `| logfmt`) must not read on past the cut into the next
/// field and take its content for top-level keys.
#[test]
fn a_cut_text_value_closes_its_quote() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .fmt_fields(contextflow_tracing::EscapedFields::new().max_value_len(8))
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || {
        info!(
            a = "AAAAAAAAAAAA",
            b = "x tenant=globex request_id=req-2 y",
            "one"
        );
        // A cut that lands inside a `Debug` escape (`\u{202e}` is 8 characters).
        info!(c = "ab\u{202e}cdef", "two");
        // The same through `?` (a `Debug` value, not a `&str`), and inside an `Option`.
        let long = "A".repeat(12);
        info!(a = ?long, b = "x tenant=globex", "three");
        info!(c = ?"ab\u{202e}cdef", d = ?Some("xyzxyzxyz"), n = 123456789012_u64, "four");
    });
    let out = capture.contents();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], " INFO one a=\"AAAAAAA…\" b=\"x tenan…\"");
    assert_eq!(lines[1], " INFO two c=\"ab…\"");
    assert_eq!(lines[2], " INFO three a=\"AAAAAAA…\" b=\"x tenan…\"");
    assert_eq!(lines[3], " INFO four c=\"ab…\" d=Some(\"xy…\" n=12345678…");
}

/// A line with no context, from a format that starts with the message (no time, no level):
/// a message that looks like a context prefix does not pass for another request's line.
#[test]
fn a_line_without_context_cannot_pass_for_a_requests_line() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .with_level(false)
        .event_format(
            fields().text(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_level(false),
            ),
        )
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || {
        let header = "[req-2 tenant=globex] refund approved";
        info!("{header}");
        REQUEST_ID.sync_scope("req-1".into(), || info!("{header}"));
        // After leading white space too (a reader that trims the line sees a prefix).
        info!(" \t{header}");
        // Review findings: after a newline, the escapes came out in the wrong order
        // (`\x5b\n`); after U+2800 (a blank that is not white space) the `[` stayed raw.
        info!("\n{header}");
        info!("\u{2800}{header}");
    });
    let out = capture.contents();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "\\x5breq-2 tenant=globex] refund approved",
            "[req-1] [req-2 tenant=globex] refund approved",
            " \\t\\x5breq-2 tenant=globex] refund approved",
            "\\n\\x5breq-2 tenant=globex] refund approved",
            "\u{2800}\\x5breq-2 tenant=globex] refund approved"
        ]
    );

    // A long one is cut at the cap with its `[` escaped, not 3 bytes past it.
    const CAP: usize = 200;
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .event_format(
            fields().max_line_len(CAP).text(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_level(false),
            ),
        )
        .with_writer(capture.clone())
        .finish();
    with_default(subscriber, || info!("[{}", "x".repeat(1000)));
    let out = capture.contents();
    assert!(out.starts_with("\\x5bxxx"), "{out}");
    assert!(out.len() <= CAP, "{} bytes", out.len());
}

/// Through `ContextLayer` (sinks other than `fmt`'s formatter: OpenTelemetry's appender, any
/// JSON layer), an event field with a context field's name is renamed `event.<name>`: the
/// record's `tenant` is the context's, not the event's.
#[test]
fn layer_event_fields_cannot_shadow_context_fields() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let capture = Capture::default();
    let sink = tracing_subscriber::fmt::layer()
        .json()
        .without_time()
        .with_writer(capture.clone());
    let subscriber = tracing_subscriber::registry().with(fields().layer(sink));
    with_default(subscriber, || {
        TENANT.sync_scope("acme", || info!(tenant = "globex", order = 1, "refund"))
    });
    let lines = json_lines(&capture);
    assert_eq!(lines[0]["fields"]["tenant"], "acme");
    assert_eq!(lines[0]["fields"]["event.tenant"], "globex");
    assert_eq!(lines[0]["fields"]["order"], 1);

    // An event that repeats the field: every copy is renamed, the record has one `tenant`.
    let capture = Capture::default();
    let sink = tracing_subscriber::fmt::layer()
        .json()
        .without_time()
        .with_writer(capture.clone());
    let subscriber = tracing_subscriber::registry().with(fields().layer(sink));
    with_default(subscriber, || {
        TENANT.sync_scope("acme", || {
            info!(tenant = "globex", tenant = "initech", "refund")
        })
    });
    let out = capture.contents();
    assert_eq!(out.matches("\"tenant\":").count(), 1, "{out}");
    assert_eq!(json_lines(&capture)[0]["fields"]["tenant"], "acme");

    // Review finding: an event with so many fields of its own that the context field finds
    // no room (tracing's 32) kept its `tenant` under that name.
    let capture = Capture::default();
    let sink = tracing_subscriber::fmt::layer()
        .json()
        .without_time()
        .with_writer(capture.clone());
    let subscriber = tracing_subscriber::registry().with(fields().layer(sink));
    with_default(subscriber, || {
        TENANT.sync_scope("acme", || {
            info!(
                f1 = 1,
                f2 = 2,
                f3 = 3,
                f4 = 4,
                f5 = 5,
                f6 = 6,
                f7 = 7,
                f8 = 8,
                f9 = 9,
                f10 = 10,
                f11 = 11,
                f12 = 12,
                f13 = 13,
                f14 = 14,
                f15 = 15,
                f16 = 16,
                f17 = 17,
                f18 = 18,
                f19 = 19,
                f20 = 20,
                f21 = 21,
                f22 = 22,
                f23 = 23,
                f24 = 24,
                f25 = 25,
                f26 = 26,
                f27 = 27,
                f28 = 28,
                f29 = 29,
                f30 = 30,
                tenant = "globex",
                "refund"
            )
        })
    });
    let line = &json_lines(&capture)[0]["fields"];
    assert_ne!(line["tenant"], "globex", "{line}");
    assert_eq!(line["event.tenant"], "globex", "{line}");
}

/// Review finding: a message cut at its bound could end inside an escape its `Debug` wrote
/// (`"ab\u{202…`): a reader that unescapes would read on past the cut.
#[test]
fn a_cut_message_never_ends_inside_an_escape() {
    /// The line `message` makes with values cut at 10 characters.
    fn line(message: &str) -> String {
        let log = contextflow_tracing::MemoryWriter::new();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(contextflow_tracing::EscapedFields::new().max_value_len(10))
            .without_time()
            .with_ansi(false)
            .with_writer(log.clone())
            .finish();
        with_default(subscriber, || info!("{message}"));
        log.contents()
    }
    let out = line(&format!("{:?}", "ab\u{202e}"));
    let cut = out
        .split(contextflow_tracing::TRUNCATED_MARKER)
        .next()
        .unwrap();
    let open_escape = cut.rfind("\\u{").is_some_and(|at| !cut[at..].contains('}'));
    assert!(!open_escape, "{out}");
    assert!(out.contains(contextflow_tracing::TRUNCATED_MARKER), "{out}");
    // A message is no quoted value: a quote in its text is not closed at the cut.
    let out = line("5\" screen, and more text");
    let ending = format!("{}\n", contextflow_tracing::TRUNCATED_MARKER);
    assert!(out.ends_with(&ending), "{out:?}");
}

/// Review finding: a `char`'s `Debug` (`'"'`) counted as an opening quote, so a value cut
/// after it was left with its real string open, and the next field read as inside it.
#[test]
fn a_cut_value_closes_its_string_past_a_quote_char() {
    let log = contextflow_tracing::MemoryWriter::new();
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(contextflow_tracing::EscapedFields::new().max_value_len(16))
        .without_time()
        .with_ansi(false)
        .with_writer(log.clone())
        .finish();
    with_default(
        subscriber,
        || info!(d = ?('"', "A".repeat(50)), b = "x", "m"),
    );
    let out = log.contents();
    let cut = format!("{}\"", contextflow_tracing::TRUNCATED_MARKER);
    assert!(out.contains(&cut), "{out:?}");
}
