//! `traceparent`: the spec's examples and a reason for every rejected vector.

use contextflow_http::{SpanId, TraceContext, TraceFlags, TraceId, TraceParent, TraceState};
use http::HeaderMap;

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
        assert_eq!(tp.flags().bits(), flags, "{reason}");
        // Written back as version 00 whatever version came in.
        assert_eq!(
            tp.to_string(),
            format!("00-{TRACE}-{PARENT}-{:02x}", flags),
            "{reason}"
        );
        assert_eq!(tp.to_header_value(), tp.to_string().as_str(), "{reason}");
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
    assert!(TraceId::from_bytes([0; 16]).is_none());
    assert!(SpanId::from_bytes([0; 8]).is_none());
    assert!("".parse::<TraceId>().is_err());
    assert!(PARENT.parse::<SpanId>().is_ok());
    assert!(TRACE.parse::<SpanId>().is_err(), "too long for a span id");
    let flags = TraceFlags::from_bits(0xfd);
    assert!(flags.is_sampled());
    assert!(!flags.is_random());
    assert_eq!(flags.known(), TraceFlags::SAMPLED);
    assert_eq!(flags.with_sampled(false).bits(), 0xfc);
}

#[test]
fn child_keeps_trace_and_known_flags_only() {
    let tp: TraceParent = format!("00-{TRACE}-{PARENT}-ff").parse().unwrap();
    let ctx = TraceContext::child_of(&tp, TraceState::new());
    assert_eq!(ctx.trace_id(), tp.trace_id());
    assert_eq!(ctx.parent_span_id(), Some(tp.parent_id()));
    assert_ne!(ctx.span_id(), tp.parent_id());
    assert_eq!(
        ctx.flags().bits(),
        0x03,
        "unknown bits are cleared when propagating"
    );
    let out = ctx.child_traceparent();
    assert_eq!(out.flags().bits(), 0x03);
    assert_ne!(out.parent_id(), ctx.span_id());
}

#[test]
fn new_trace_sets_random_flag() {
    let ctx = TraceContext::new_trace(false);
    assert_eq!(ctx.flags(), TraceFlags::RANDOM);
    assert!(TraceContext::new_trace(true).flags().is_sampled());
    assert_ne!(ctx.trace_id(), TraceContext::new_trace(false).trace_id());
}

#[test]
fn headers_missing_single_and_duplicated() {
    let value = format!("00-{TRACE}-{PARENT}-01");
    let mut headers = HeaderMap::new();
    assert_eq!(TraceParent::from_headers(&headers), Ok(None), "missing");
    headers.append("traceparent", value.parse().unwrap());
    assert!(
        TraceParent::from_headers(&headers).unwrap().is_some(),
        "one header"
    );
    headers.append("traceparent", value.parse().unwrap());
    assert!(
        TraceParent::from_headers(&headers).is_err(),
        "two headers, even equal, are invalid"
    );
    let mut headers = HeaderMap::new();
    headers.append("traceparent", format!("{value},{value}").parse().unwrap());
    assert!(
        TraceParent::from_headers(&headers).is_err(),
        "two values joined by a comma are invalid"
    );
}
