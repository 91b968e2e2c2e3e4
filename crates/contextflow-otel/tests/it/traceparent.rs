//! `traceparent`: the spec's examples and a reason for every rejected vector.

use contextflow_otel::{carrier::Pairs, TraceContextPropagator, TraceParent};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState},
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Valid values, with the flags byte they carry.
const VALID: &[(&str, u8, &str)] = &[
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        0x01,
        "spec example, sampled",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        0x00,
        "spec example, not sampled",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
        0x03,
        "level 2 random trace id flag",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",
        0xff,
        "unknown flag bits are kept when parsing",
    ),
    (
        " \t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\t ",
        0x01,
        "optional white space around the value",
    ),
    (
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        0x01,
        "future version, exactly 55 characters",
    ),
    (
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
        0x01,
        "future version with more fields after a dash",
    ),
    (
        "fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-",
        0x09,
        "future version, trailing dash",
    ),
];

/// Invalid values, each with the reason it must be rejected.
const INVALID: &[(&str, &str)] = &[
    ("", "empty"),
    ("00", "version only"),
    (
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "version ff is forbidden",
    ),
    (
        "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "upper-case version",
    ),
    (
        "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "version not hex",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "version 00 longer than 55 characters",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
        "version 00 with extra fields",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "flags one digit short",
    ),
    (
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "future version: flags followed by something other than a dash",
    ),
    (
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "future version shorter than 55 characters",
    ),
    (
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "upper-case trace id",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
        "upper-case parent id",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
        "upper-case flags",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "flags not hex",
    ),
    (
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "all-zero trace id",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "all-zero parent id",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        "trace id not hex",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        "parent id not hex",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        "trace id one digit short",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e47366-0f067aa0ba902b7-01",
        "trace id one digit long",
    ),
    (
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "wrong separator",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7 01",
        "space instead of dash",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-.1",
        "punctuation in flags",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e473\u{e9}-00f067aa0ba902b7-01",
        "non-ASCII in trace id",
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{0}",
        "trailing NUL",
    ),
    (
        "00 -4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "white space inside the value",
    ),
];

#[test]
fn valid_vectors_parse() {
    for &(value, flags, reason) in VALID {
        let tp = TraceParent::parse_bytes(value.as_bytes())
            .unwrap_or_else(|err| panic!("{reason}: {value:?} rejected: {err}"));
        assert_eq!(tp.trace_id().to_string(), TRACE, "{reason}");
        assert_eq!(tp.parent_id().to_string(), PARENT, "{reason}");
        assert_eq!(tp.flags().to_u8(), flags, "{reason}");
        // Written back as version 00 whatever version came in.
        assert_eq!(
            tp.to_string(),
            format!("00-{TRACE}-{PARENT}-{:02x}", flags),
            "{reason}"
        );
        assert_eq!(
            tp.to_propagated(),
            format!("00-{TRACE}-{PARENT}-{:02x}", flags & 0x03),
            "{reason}"
        );
    }
}

#[test]
fn invalid_vectors_are_rejected() {
    for &(value, reason) in INVALID {
        let parsed = TraceParent::parse_bytes(value.as_bytes());
        assert!(
            parsed.is_err(),
            "{reason}: {value:?} accepted as {parsed:?}"
        );
        // The error names a rule, never the value.
        let message = parsed.unwrap_err().to_string();
        assert!(message.starts_with("invalid traceparent: "), "{reason}");
        assert!(!message.contains(TRACE), "{reason}");
    }
}

#[test]
fn ids_and_flags() {
    assert!(TraceParent::new(TraceId::INVALID, SpanId::from(1u64), TraceFlags::SAMPLED).is_err());
    assert!(TraceParent::new(TraceId::from(1u128), SpanId::INVALID, TraceFlags::SAMPLED).is_err());
    let tp: TraceParent = format!("00-{TRACE}-{PARENT}-ff").parse().unwrap();
    let sc = tp.to_remote_span_context(TraceState::default());
    assert_eq!(
        sc.trace_flags().to_u8(),
        0x03,
        "unknown bits are cleared when propagating"
    );
    assert!(sc.is_remote());
    assert_eq!(
        TraceParent::from_span_context(&sc).unwrap().flags().to_u8(),
        0x03
    );
}

#[test]
fn propagator_reads_one_value_and_rejects_two() {
    let value = format!("00-{TRACE}-{PARENT}-01");
    let extract = |pairs: Vec<(&str, &str)>| {
        let cx = TraceContextPropagator::new().extract(&Pairs::new(pairs));
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id().to_string())
    };
    assert_eq!(extract(vec![]), None, "missing");
    assert_eq!(
        extract(vec![("traceparent", &value)]).as_deref(),
        Some(TRACE)
    );
    assert_eq!(
        extract(vec![("traceparent", &value), ("traceparent", &value)]),
        None,
        "two values, even equal, are invalid"
    );
    let joined = format!("{value},{value}");
    assert_eq!(
        extract(vec![("traceparent", &joined)]),
        None,
        "two values joined by a comma are invalid"
    );
    assert_eq!(
        extract(vec![("TraceParent", &value)]).as_deref(),
        Some(TRACE),
        "header names are case-insensitive"
    );
}
