//! Property tests for every parser and writer: inputs are mostly *valid* values, mutated
//! (a byte inserted, removed or replaced, a case flipped) in about half the cases, so both the
//! accept path and the reject path run. Each test prints the share of accepted cases and
//! asserts a floor on it, so a generator that stops reaching the assertions fails. The number
//! of cases follows `PROPTEST_CASES` (default 256).

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use contextflow_otel::{
    carrier::Pairs, default_propagator, Baggage, RequestId, TraceParent, TraceState,
};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{SpanId, TraceFlags, TraceId},
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

// ===== generators =====

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Mutation {
    Insert(usize, u8),
    Remove(usize),
    Replace(usize, u8),
    FlipCase(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"0123456789abcdefABCDEF-=,;@% \t\"\\\x00\x7f\xff".to_vec()),
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<usize>().prop_map(Mutation::FlipCase),
    ]
}

/// `valid`, left alone in about half the cases, else with one to three mutations. Also says
/// whether it was left alone.
fn mutated(valid: impl Strategy<Value = String>) -> impl Strategy<Value = (Vec<u8>, bool)> {
    (
        valid,
        prop_oneof![Just(Vec::new()), prop::collection::vec(mutation(), 1..4)],
    )
        .prop_map(|(valid, mutations)| {
            let pristine = mutations.is_empty();
            let mut bytes = valid.into_bytes();
            for m in mutations {
                let len = bytes.len();
                match m {
                    Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
                    Mutation::Remove(i) if len > 0 => {
                        bytes.remove(i % len);
                    }
                    Mutation::Replace(i, b) if len > 0 => bytes[i % len] = b,
                    Mutation::FlipCase(i) if len > 0 => bytes[i % len] ^= 0x20,
                    _ => {}
                }
            }
            (bytes, pristine)
        })
}

fn hex(len: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), len)
        .prop_map(|v| String::from_utf8(v).unwrap())
}

fn valid_traceparent() -> impl Strategy<Value = String> {
    (
        prop_oneof![4 => Just("00".to_owned()), 1 => hex(2)],
        hex(32),
        hex(16),
        hex(2),
        prop_oneof![Just(String::new()), "-[a-z0-9-]{0,20}"],
        "[ \t]{0,2}",
    )
        .prop_map(|(version, trace, span, flags, tail, ows)| {
            // Version 00 takes no tail; a future version may.
            let tail = if version == "00" { String::new() } else { tail };
            format!("{ows}{version}-{trace}-{span}-{flags}{tail}{ows}")
        })
}

fn tracestate_key() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_*/@-]{0,30}"
}

fn tracestate_value() -> impl Strategy<Value = String> {
    "[ -+\\--<>-~]{0,20}[!-+\\--<>-~]"
}

fn valid_tracestate() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((tracestate_key(), tracestate_value()), 0..12),
        "[ \t]{0,2}",
    )
        .prop_map(|(members, ows)| {
            members
                .iter()
                .map(|(k, v)| format!("{ows}{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$&'*+.^_`|~-]{1,12}"
}

/// A baggage value as sent: baggage octets and percent escapes.
fn baggage_value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[!#-+\\--:<-\\[\\]-~&&[^%]]",
            hex(2).prop_map(|h| format!("%{h}")),
        ],
        0..10,
    )
    .prop_map(|parts| parts.concat())
}

fn valid_baggage() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            token(),
            baggage_value(),
            prop::collection::vec((token(), prop::option::of(baggage_value())), 0..3),
        ),
        1..10,
    )
    .prop_map(|members| {
        members
            .iter()
            .map(|(k, v, props)| {
                let mut m = format!("{k} = {v}");
                for (pk, pv) in props {
                    match pv {
                        Some(pv) => m.push_str(&format!(";{pk}={pv}")),
                        None => m.push_str(&format!(" ; {pk}")),
                    }
                }
                m
            })
            .collect::<Vec<_>>()
            .join(",")
    })
}

fn valid_request_id() -> impl Strategy<Value = String> {
    "[!-~]{1,128}"
}

// ===== runner =====

/// Runs `test` on `strategy` with the configured number of cases; `test` says whether the
/// case was accepted. Prints the accepted share and asserts it is at least `floor`.
fn run_counting<S: Strategy>(
    name: &str,
    strategy: S,
    floor: f64,
    test: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    let accepted = AtomicUsize::new(0);
    let total = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config::default());
    let result = runner.run(&strategy, |value| {
        total.fetch_add(1, Ordering::Relaxed);
        if test(value)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
    let (accepted, total) = (accepted.into_inner(), total.into_inner());
    let share = accepted as f64 / total.max(1) as f64;
    println!(
        "{name}: accepted {accepted} of {total} ({:.0}%)",
        share * 100.0
    );
    assert!(
        share >= floor,
        "{name}: only {accepted} of {total} cases accepted (floor {:.0}%)",
        floor * 100.0
    );
}

// ===== parsers =====

/// The W3C trace-context rules for `traceparent`, written independently of the parser (no
/// shared code): `(trace id, parent id, flags)` when `bytes` is valid.
fn traceparent_oracle(bytes: &[u8]) -> Option<(u128, u64, u8)> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !ows(b))?;
    let end = bytes.iter().rposition(|b| !ows(b))? + 1;
    let v = &bytes[start..end];
    if v.len() < 55 {
        return None;
    }
    // The 55 characters of the known fields; after them, a future version's own data (any
    // bytes, behind a '-'), which a parser of version 00 ignores.
    let (head, tail) = v.split_at(55);
    let head = std::str::from_utf8(head).ok()?;
    let lower_hex = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let parts: Vec<&str> = head.split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else {
        return None;
    };
    let sizes_ok =
        version.len() == 2 && trace.len() == 32 && parent.len() == 16 && flags.len() == 2;
    if !sizes_ok || ![version, trace, parent, flags].iter().all(|p| lower_hex(p)) {
        return None;
    }
    if *version == "ff"
        || (*version == "00" && !tail.is_empty())
        || !(tail.is_empty() || tail[0] == b'-')
    {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    Some((trace, parent, u8::from_str_radix(flags, 16).ok()?))
}

#[test]
fn traceparent_parses_valid_values_and_survives_mutations() {
    run_counting(
        "traceparent",
        mutated(valid_traceparent()),
        0.3,
        |(bytes, pristine)| {
            let oracle = traceparent_oracle(&bytes);
            let text = String::from_utf8_lossy(&bytes);
            match TraceParent::parse_bytes(&bytes) {
                Ok(tp) => {
                    prop_assert_eq!(
                        Some((tp.trace_id(), tp.parent_id(), tp.flags().to_u8())),
                        oracle.map(|(t, p, f)| (TraceId::from(t), SpanId::from(p), f)),
                        "accepted against the rules: {:?}",
                        text
                    );
                    let again: TraceParent = tp.to_propagated().parse().map_err(|e| {
                        TestCaseError::fail(format!("written value does not parse: {e}"))
                    })?;
                    prop_assert_eq!(again.trace_id(), tp.trace_id());
                    prop_assert_eq!(again.parent_id(), tp.parent_id());
                    prop_assert_eq!(again.flags().to_u8(), tp.flags().to_u8() & 0x03);
                    Ok(true)
                }
                Err(err) => {
                    prop_assert!(oracle.is_none(), "valid value rejected: {text:?}: {err}");
                    // The oracle itself: a pristine value is valid unless an id happened to be
                    // all zeros or the version happened to be ff.
                    let unlucky = text.contains(&"0".repeat(16)) || text.trim().starts_with("ff");
                    prop_assert!(
                        !pristine || unlucky,
                        "valid value rejected: {text:?}: {err}"
                    );
                    Ok(false)
                }
            }
        },
    );
}

#[test]
fn tracestate_parses_valid_lists_and_survives_mutations() {
    run_counting(
        "tracestate",
        mutated(valid_tracestate()),
        0.3,
        |(bytes, pristine)| match TraceState::parse_bytes(&bytes) {
            Ok(state) => {
                prop_assert!(state.len() <= 32);
                let text = state.to_string();
                prop_assert!(text.len() <= 512);
                let again: TraceState = text.parse().map_err(|e| {
                    TestCaseError::fail(format!("written list does not parse: {e}"))
                })?;
                prop_assert_eq!(&again, &state);
                Ok(true)
            }
            Err(err) => {
                prop_assert!(
                    !pristine,
                    "valid list rejected: {:?}: {err}",
                    String::from_utf8_lossy(&bytes)
                );
                Ok(false)
            }
        },
    );
}

#[test]
fn baggage_parses_valid_lists_and_survives_mutations() {
    run_counting(
        "baggage",
        mutated(valid_baggage()),
        0.5,
        |(bytes, pristine)| {
            let baggage = Baggage::parse_bytes(&bytes);
            prop_assert!(baggage.len() <= 64);
            let text = baggage.to_string();
            prop_assert!(text.len() <= 8192);
            // What it keeps is valid: formatting and parsing again gives the same baggage.
            prop_assert_eq!(&Baggage::parse(&text), &baggage);
            if pristine {
                prop_assert!(!baggage.is_empty(), "valid list dropped whole");
            }
            Ok(!baggage.is_empty())
        },
    );
}

#[test]
fn request_id_accepts_visible_ascii_and_survives_mutations() {
    run_counting(
        "request id",
        mutated(valid_request_id()),
        0.3,
        |(bytes, pristine)| match RequestId::parse_bytes(&bytes) {
            Ok(id) => {
                // The value without the spaces and tabs around it (HTTP's optional whitespace).
                let ows = |b: &u8| *b == b' ' || *b == b'\t';
                let start = bytes.iter().position(|b| !ows(b)).unwrap_or(bytes.len());
                let end = bytes.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
                prop_assert_eq!(id.as_str().as_bytes(), &bytes[start..end]);
                prop_assert_eq!(id.as_str().parse::<RequestId>().ok(), Some(id.clone()));
                Ok(true)
            }
            Err(_) => {
                prop_assert!(!pristine);
                Ok(false)
            }
        },
    );
}

// ===== writers =====

#[test]
fn traceparent_round_trips() {
    run_counting(
        "traceparent round trip",
        (1u128.., 1u64.., any::<u8>()),
        1.0,
        |(trace, span, flags)| {
            let tp = TraceParent::new(
                TraceId::from(trace),
                SpanId::from(span),
                TraceFlags::new(flags),
            )
            .unwrap();
            let text = tp.to_string();
            prop_assert_eq!(text.len(), 55);
            let parsed: TraceParent = text.parse().unwrap();
            prop_assert_eq!(parsed, tp);
            prop_assert_eq!(parsed.to_string(), text);
            Ok(true)
        },
    );
}

#[test]
fn tracestate_inserts_round_trip() {
    run_counting(
        "tracestate round trip",
        prop::collection::vec((tracestate_key(), tracestate_value()), 0..40),
        1.0,
        |members| {
            let mut state = TraceState::new();
            for (k, v) in members.iter().rev() {
                state.insert(k, v).unwrap();
            }
            prop_assert!(state.len() <= 32);
            let text = state.to_string();
            prop_assert!(text.len() <= 512);
            let parsed: TraceState = text.parse().unwrap();
            prop_assert_eq!(parsed.to_string(), text);
            prop_assert_eq!(&parsed, &state);
            Ok(true)
        },
    );
}

#[test]
fn baggage_inserts_round_trip_through_text_and_otel() {
    run_counting(
        "baggage round trip",
        prop::collection::vec((token(), any::<String>()), 1..30),
        0.9,
        |members| {
            let mut baggage = Baggage::new();
            for (k, v) in &members {
                let _ = baggage.insert(k, v);
            }
            let text = baggage.to_string();
            let parsed = Baggage::parse(&text);
            prop_assert_eq!(&parsed, &baggage);
            prop_assert_eq!(parsed.to_string(), text);
            let back = Baggage::from_otel(&baggage.to_otel());
            prop_assert_eq!(back.len(), baggage.len());
            for member in baggage.iter() {
                prop_assert_eq!(back.get(member.key()), Some(member.value()));
            }
            Ok(!baggage.is_empty())
        },
    );
}

#[test]
fn propagators_round_trip() {
    let propagator = default_propagator();
    run_counting(
        "propagator round trip",
        (
            valid_traceparent(),
            valid_tracestate(),
            valid_baggage(),
            valid_request_id(),
        ),
        0.9,
        |(tp, ts, bg, id)| {
            let cx = propagator.extract(&Pairs::new([
                ("traceparent", tp.as_str()),
                ("tracestate", ts.as_str()),
                ("baggage", bg.as_str()),
                ("x-request-id", id.as_str()),
            ]));
            let mut out: HashMap<String, String> = HashMap::new();
            propagator.inject_context(&cx, &mut out);
            prop_assert_eq!(out.get("x-request-id"), Some(&id));
            let Ok(parsed) = TraceParent::parse_bytes(tp.as_bytes()) else {
                prop_assert!(!out.contains_key("traceparent"));
                return Ok(false);
            };
            prop_assert_eq!(out.get("traceparent"), Some(&parsed.to_propagated()));
            let state = TraceState::parse_bytes(ts.as_bytes()).unwrap().to_string();
            prop_assert_eq!(out.get("tracestate").cloned().unwrap_or_default(), state);
            let baggage = Baggage::parse(&bg);
            let sent = Baggage::parse(out.get("baggage").map_or("", String::as_str));
            prop_assert_eq!(sent.len(), baggage.len());
            for member in baggage.iter() {
                prop_assert_eq!(sent.member(member.key()), Some(member));
            }
            Ok(true)
        },
    );
}

// ===== large inputs =====

proptest! {
    // Fuzz-style: few cases, large inputs.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn large_inputs_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40_000)) {
        let _ = TraceParent::parse_bytes(&bytes);
        let _ = TraceState::parse_bytes(&bytes);
        let baggage = Baggage::parse_bytes(&bytes);
        prop_assert!(baggage.to_string().len() <= 8192);
    }

    #[test]
    fn many_small_members(n in 0usize..400, key in "[a-z][a-z0-9_*/-]{0,20}") {
        let raw = (0..n).map(|i| format!("{key}{i}=v")).collect::<Vec<_>>().join(",");
        prop_assert!(Baggage::parse(&raw).len() <= 64);
        let state = TraceState::parse_bytes(raw.as_bytes());
        prop_assert_eq!(state.is_ok(), n <= 32 && format!("{key}0").len() <= 256);
    }
}
