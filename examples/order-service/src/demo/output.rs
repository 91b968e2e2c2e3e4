//! The log stream check: the service wrote exactly one line per event, and with `--json`
//! every line is a JSON record carrying the same context and message as the event.
//!
//! This is the only place that reads formatted lines, and only the JSON format, whose layout
//! is a data format: text lines are counted, never parsed.

use std::collections::HashMap;

use serde_json::Value;

use super::check::{Check, Run, Verdict};
use crate::logging::{CapturedEvent, EventContext, LogFormat};

/// Checks the log stream against the captured events.
#[derive(Clone, Copy, Debug)]
pub struct OutputCheck;

/// What a JSON log line says, as far as the check compares it with the event.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JsonLine {
    /// The context members.
    pub context: EventContext,
    /// `level`.
    pub level: String,
    /// `fields.message`.
    pub message: String,
}

/// Why a line is not a JSON log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotARecord(pub String);

impl Check for OutputCheck {
    fn name(&self) -> &'static str {
        "log stream"
    }

    fn check(&self, run: &Run) -> Verdict {
        let lines = run.output.len();
        let events = run.events.len();
        let mut verdict = Verdict {
            name: self.name(),
            ok: lines == events,
            summary: String::new(),
            counts: vec![("lines", lines), ("events", events)],
            examples: Vec::new(),
        };
        if lines != events {
            verdict.example(|| format!("{lines} lines written for {events} events"));
        }
        match run.format {
            LogFormat::Text => {
                let unmatched = compare_text(&run.output, &run.events, &mut verdict);
                verdict.ok &= unmatched == 0;
                verdict.counts.push(("unmatched", unmatched));
                verdict.summary = format!(
                    "{lines} text lines for {events} events (one line per event; {unmatched} context prefixes without their event)"
                );
            }
            LogFormat::Json => {
                let (unreadable, unmatched) = compare_json(&run.output, &run.events, &mut verdict);
                verdict.ok &= unreadable == 0 && unmatched == 0;
                verdict.counts.push(("not_json", unreadable));
                verdict.counts.push(("unmatched", unmatched));
                verdict.summary = format!(
                    "{lines} JSON lines for {events} events: {unreadable} not a JSON record, {unmatched} without their event (context, level and message compared)"
                );
            }
        }
        verdict
    }
}

/// The context prefix a text line must start with for an event of context `cx`, as
/// `ContextFields::text` writes it (`[<request id> trace_id=<trace> tenant=<tenant>] `, the
/// first field bare, fields not set left out; nothing when none is set); `None` when a value
/// would be quoted or escaped (the demo's values never are).
fn text_prefix(cx: &EventContext) -> Option<String> {
    let plain = |v: &str| {
        !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
    };
    let mut parts = Vec::new();
    for (i, (name, value)) in [
        ("request_id", &cx.request_id),
        ("trace_id", &cx.trace_id),
        ("tenant", &cx.tenant),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(value) = value else { continue };
        if !plain(value) {
            return None;
        }
        parts.push(if i == 0 {
            value.clone()
        } else {
            format!("{name}={value}")
        });
    }
    Some(if parts.is_empty() {
        String::new()
    } else {
        format!("[{}] ", parts.join(" "))
    })
}

/// Matches the text lines' context prefixes with the events' contexts, as multisets: a line
/// whose prefix names another request, a stale one or none where its event had one is a
/// line without its event. Returns how many lines and events were left without a partner.
fn compare_text(lines: &[String], events: &[CapturedEvent], verdict: &mut Verdict) -> usize {
    let mut balance: HashMap<String, isize> = HashMap::with_capacity(events.len());
    for event in events {
        let Some(prefix) = text_prefix(&event.context) else {
            continue;
        };
        *balance.entry(prefix).or_default() += 1;
    }
    for line in lines {
        // A prefix of ours ends at the first "] " (a line without context never starts with
        // `[`: the escaper writes `\x5b` for a message's own).
        let prefix = match line.strip_prefix('[').and_then(|rest| rest.find("] ")) {
            Some(end) => line[..end + 3].to_owned(),
            None => String::new(),
        };
        *balance.entry(prefix).or_default() -= 1;
    }
    unmatched(&balance, "context prefix ", verdict)
}

/// How many events and lines `balance` (events counted up, lines down) left without a
/// partner, with an example of each kind in `verdict`.
fn unmatched<K: std::fmt::Debug>(
    balance: &HashMap<K, isize>,
    what: &str,
    verdict: &mut Verdict,
) -> usize {
    let mut unmatched = 0;
    for (key, count) in balance.iter().filter(|(_, c)| **c != 0) {
        unmatched += count.unsigned_abs();
        verdict.example(|| {
            let side = if *count > 0 {
                "event without its line"
            } else {
                "line without its event"
            };
            format!("{side} (x{}): {what}{key:?}", count.unsigned_abs())
        });
    }
    unmatched
}

/// Parses every line and matches the lines with the events, as multisets; returns the count
/// of lines that are not JSON records and of lines and events left without a partner.
fn compare_json(
    lines: &[String],
    events: &[CapturedEvent],
    verdict: &mut Verdict,
) -> (usize, usize) {
    let mut balance: HashMap<JsonLine, isize> = HashMap::with_capacity(events.len());
    for event in events {
        let key = JsonLine {
            context: event.context.clone(),
            level: event.level.to_string(),
            message: event.message.clone(),
        };
        *balance.entry(key).or_default() += 1;
    }
    let mut unreadable = 0;
    for line in lines {
        match parse_json_line(line) {
            Ok(record) => *balance.entry(record).or_default() -= 1,
            Err(NotARecord(why)) => {
                unreadable += 1;
                verdict.example(|| format!("not a JSON record ({why}): {line}"));
            }
        }
    }
    (unreadable, unmatched(&balance, "", verdict))
}

/// The first key of a JSON object that comes twice, if any (the values are skipped).
struct TopLevelKeys {
    repeated: Option<String>,
}

impl<'de> serde::Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = TopLevelKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopLevelKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut repeated = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if !seen.insert(key.clone()) && repeated.is_none() {
                        repeated = Some(key);
                    }
                }
                Ok(TopLevelKeys { repeated })
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// Reads one line of the JSON log format: an object with string members `level` and
/// `fields.message`, and optional string members `request_id`, `trace_id`, `tenant`.
///
/// # Errors
/// [`NotARecord`] when the line is anything else.
pub fn parse_json_line(line: &str) -> Result<JsonLine, NotARecord> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| NotARecord(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(NotARecord("not an object".into()));
    };
    // A key twice at the top level: readers disagree on which one counts (serde_json keeps the
    // last, others the first), so a second `tenant` could pass for the line's.
    let keys: TopLevelKeys =
        serde_json::from_str(line).map_err(|e| NotARecord(format!("invalid JSON: {e}")))?;
    if let Some(key) = keys.repeated {
        return Err(NotARecord(format!("the key {key:?} is repeated")));
    }
    let optional = |key: &str| match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(NotARecord(format!("{key} is not a string"))),
    };
    let level = optional("level")?.ok_or_else(|| NotARecord("no level".into()))?;
    let message = match obj.get("fields").and_then(|f| f.get("message")) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(NotARecord("fields.message is not a string".into())),
        None => String::new(),
    };
    Ok(JsonLine {
        context: EventContext {
            request_id: optional("request_id")?,
            trace_id: optional("trace_id")?,
            tenant: optional("tenant")?,
        },
        level,
        message,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::{
        context::{RequestId, TenantId, REQUEST_ID, TENANT},
        logging::{context_fields, fmt_layer, EventCapture, LogSink},
    };

    /// Emits one event with `request_id`, `tenant` and `message` through the real JSON layer
    /// and the capture; returns both sides.
    fn emit(
        request_id: Option<&str>,
        tenant: Option<&str>,
        message: &str,
    ) -> (Vec<String>, Vec<CapturedEvent>) {
        emit_in(LogFormat::Json, request_id, tenant, message)
    }

    /// As [`emit`], through the real layer of `format`.
    fn emit_in(
        format: LogFormat,
        request_id: Option<&str>,
        tenant: Option<&str>,
        message: &str,
    ) -> (Vec<String>, Vec<CapturedEvent>) {
        let sink = LogSink::new();
        let capture = EventCapture::new(context_fields());
        let subscriber = tracing_subscriber::registry()
            .with(capture.clone())
            .with(fmt_layer(format, sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let log = || tracing::info!("{message}");
            let with_tenant = || match tenant {
                Some(t) => TENANT.sync_scope(TenantId::new(t), log),
                None => log(),
            };
            match request_id {
                Some(id) => REQUEST_ID.sync_scope(id.parse::<RequestId>().unwrap(), with_tenant),
                None => with_tenant(),
            }
        });
        (sink.lines(), capture.events())
    }

    proptest! {
        /// Whatever the values (quotes, line breaks, controls, any Unicode, over-long), the
        /// JSON line is one line, parses, and says what the captured event says.
        #[test]
        fn json_lines_read_back_as_their_event(
            request_id in proptest::option::of("[!-~]{1,128}"),
            tenant in proptest::option::of(any::<String>()),
            message in any::<String>(),
        ) {
            let (lines, events) = emit(request_id.as_deref(), tenant.as_deref(), &message);
            prop_assert_eq!(lines.len(), 1, "{:?}", lines);
            prop_assert_eq!(events.len(), 1);
            let record = parse_json_line(&lines[0]).map_err(|e| TestCaseError::fail(e.0))?;
            prop_assert_eq!(&record.context, &events[0].context);
            prop_assert_eq!(&record.message, &message);
            prop_assert_eq!(record.context.request_id, request_id);
            let mut verdict = blank_verdict();
            prop_assert_eq!(compare_json(&lines, &events, &mut verdict), (0, 0));
        }

        /// Arbitrary text never panics the parser, and is a record only if it is a JSON
        /// object with a string level.
        #[test]
        fn arbitrary_lines_never_panic(line in any::<String>()) {
            if parse_json_line(&line).is_ok() {
                prop_assert!(line.trim_start().starts_with('{'), "{}", line);
            }
        }
    }

    /// A verdict to collect a comparison's examples in.
    fn blank_verdict() -> Verdict {
        Verdict {
            name: "t",
            ok: true,
            summary: String::new(),
            counts: vec![],
            examples: vec![],
        }
    }

    #[test]
    fn not_records_say_why() {
        for (line, why) in [
            ("order-service listening on http://x", "invalid JSON"),
            ("[1,2]", "not an object"),
            (r#"{"fields":{"message":"m"}}"#, "no level"),
            (
                r#"{"level":"INFO","request_id":7}"#,
                "request_id is not a string",
            ),
            (
                r#"{"level":"INFO","fields":{"message":1}}"#,
                "fields.message is not a string",
            ),
            (
                r#"{"tenant":"acme","level":"INFO","tenant":"globex"}"#,
                "the key \"tenant\" is repeated",
            ),
        ] {
            let err = parse_json_line(line).expect_err(line);
            assert!(err.0.contains(why), "{line}: {err:?}");
        }
    }

    /// The text lines' context prefixes, through the real text layer, match their events;
    /// a line whose prefix names another tenant does not.
    #[test]
    fn text_prefixes_match_their_events_and_a_changed_one_does_not() {
        let (mut lines, mut events) = emit_in(LogFormat::Text, None, None, "no context");
        let (more_lines, more_events) =
            emit_in(LogFormat::Text, Some("req-1"), Some("acme"), "hello");
        lines.extend(more_lines);
        events.extend(more_events);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let mut verdict = blank_verdict();
        assert_eq!(compare_text(&lines, &events, &mut verdict), 0, "{lines:?}");
        lines[1] = lines[1].replace("tenant=acme", "tenant=globex");
        assert_eq!(compare_text(&lines, &events, &mut verdict), 2);
    }

    #[test]
    fn a_changed_line_is_unmatched() {
        let (mut lines, events) = emit(Some("req-1"), Some("acme"), "hello");
        lines[0] = lines[0].replace("acme", "globex");
        let mut verdict = blank_verdict();
        assert_eq!(compare_json(&lines, &events, &mut verdict), (0, 2));
        lines.push("plain text".into());
        assert_eq!(compare_json(&lines, &events, &mut verdict).0, 1);
    }
}
