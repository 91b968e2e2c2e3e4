//! Property tests: parsers never panic, and formatting round-trips.

use contextflow_http::{Baggage, RequestId, SpanId, TraceFlags, TraceId, TraceParent, TraceState};
use proptest::prelude::*;

/// Bytes biased towards the characters the grammars care about, so inputs get deep.
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let interesting =
        prop::sample::select(b"0123456789abcdefABCDEF-=,;@% \t\"\\\x00\x7f\xff".to_vec());
    prop::collection::vec(prop_oneof![any::<u8>(), interesting], 0..max)
}

fn simple_key() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_*/-]{0,20}"
}

fn tracestate_key() -> impl Strategy<Value = String> {
    prop_oneof![
        simple_key(),
        ("[a-z0-9][a-z0-9_*/-]{0,10}", "[a-z][a-z0-9_*/-]{0,13}")
            .prop_map(|(t, s)| format!("{t}@{s}")),
    ]
}

fn tracestate_value() -> impl Strategy<Value = String> {
    "[ -+\\--<>-~]{0,30}[!-+\\--<>-~]"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn traceparent_never_panics(bytes in header_bytes(120)) {
        let _ = TraceParent::parse_bytes(&bytes);
    }

    #[test]
    fn traceparent_near_valid_never_panics(
        trace in "[0-9a-fA-F-]{28,36}",
        tail in "[0-9a-f-]{0,30}",
        version in "[0-9a-fA-F]{2}",
    ) {
        let _ = TraceParent::parse_bytes(format!("{version}-{trace}-00f067aa0ba902b7-01{tail}").as_bytes());
    }

    #[test]
    fn tracestate_never_panics(bytes in header_bytes(600)) {
        if let Ok(state) = TraceState::parse_bytes(&bytes) {
            prop_assert!(state.len() <= 32);
            prop_assert!(state.to_string().len() <= 512);
        }
    }

    #[test]
    fn baggage_never_panics(bytes in header_bytes(600)) {
        let baggage = Baggage::parse_bytes(&bytes);
        prop_assert!(baggage.len() <= 180);
        prop_assert!(baggage.to_string().len() <= 8192);
        // What it keeps is valid: formatting and parsing again gives the same baggage.
        prop_assert_eq!(Baggage::parse(&baggage.to_string()), baggage);
    }

    #[test]
    fn request_id_never_panics(s in any::<String>()) {
        if let Ok(id) = s.parse::<RequestId>() {
            prop_assert_eq!(id.as_str(), s.as_str());
        }
    }

    #[test]
    fn traceparent_round_trips(trace in 1u128.., span in 1u64.., flags in any::<u8>()) {
        let tp = TraceParent::new(
            TraceId::from_bytes(trace.to_be_bytes()).unwrap(),
            SpanId::from_bytes(span.to_be_bytes()).unwrap(),
            TraceFlags::from_bits(flags),
        );
        let text = tp.to_string();
        prop_assert_eq!(text.len(), 55);
        let parsed: TraceParent = text.parse().unwrap();
        prop_assert_eq!(parsed, tp);
        prop_assert_eq!(parsed.to_string(), text);
    }

    #[test]
    fn tracestate_round_trips(members in prop::collection::vec((tracestate_key(), tracestate_value()), 0..40)) {
        let mut state = TraceState::new();
        for (k, v) in members.iter().rev() {
            state.insert(k, v).unwrap();
        }
        prop_assert!(state.len() <= 32);
        let text = state.to_string();
        prop_assert!(text.len() <= 512);
        let parsed: TraceState = text.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), text);
        prop_assert_eq!(parsed, state);
    }

    #[test]
    fn baggage_round_trips(members in prop::collection::vec(("[A-Za-z0-9!#$&'*+.^_`|~-]{1,12}", any::<String>()), 0..30)) {
        let mut baggage = Baggage::new();
        for (k, v) in &members {
            let _ = baggage.insert(k, v);
        }
        let text = baggage.to_string();
        let parsed = Baggage::parse(&text);
        prop_assert_eq!(&parsed, &baggage);
        prop_assert_eq!(parsed.to_string(), text);
        prop_assert!(baggage.to_header_value().is_some() || baggage.is_empty());
    }
}

proptest! {
    // Fuzz-style: few cases, large inputs.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn large_inputs_never_panic(bytes in header_bytes(40_000)) {
        let _ = TraceParent::parse_bytes(&bytes);
        let _ = TraceState::parse_bytes(&bytes);
        let baggage = Baggage::parse_bytes(&bytes);
        prop_assert!(baggage.to_string().len() <= 8192);
    }

    #[test]
    fn many_small_members(n in 0usize..400, key in simple_key()) {
        let raw = (0..n).map(|i| format!("{key}{i}=v")).collect::<Vec<_>>().join(",");
        prop_assert!(Baggage::parse(&raw).len() <= 180);
        let state = TraceState::parse_bytes(raw.as_bytes());
        prop_assert_eq!(state.is_ok(), n <= 32 && format!("{key}0").len() <= 256);
    }
}
