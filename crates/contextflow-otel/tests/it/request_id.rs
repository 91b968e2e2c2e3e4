//! The request id's validation.

use contextflow_otel::RequestId;
use contextflow_otel::{carrier::Pairs, RequestIdPropagator};

#[test]
fn valid_and_invalid_ids() {
    let visible: String = (0x21u8..=0x7e).map(char::from).collect();
    let valid = [
        ("a".to_string(), "one character"),
        ("x".repeat(128), "128 bytes"),
        (visible[..94].to_string(), "every visible ASCII character"),
        ("3f2c6a0e-6b1f-4c1e-9a53-0c2a0a6f8e11".to_string(), "a UUID"),
    ];
    for (id, reason) in valid {
        let parsed: RequestId = id.parse().unwrap_or_else(|e| panic!("{reason}: {e}"));
        assert_eq!(parsed.as_str(), id, "{reason}");
    }
    // Review finding: a Kafka, MQTT or NATS header, or an environment variable, keeps the
    // spaces an HTTP parser drops: the same id was rejected there and replaced (a new id at
    // that hop).
    for (raw, id) in [(" r-1", "r-1"), ("r-1 \t", "r-1"), ("\tr 1 ", "")] {
        match RequestId::parse_bytes(raw.as_bytes()) {
            Ok(parsed) => assert_eq!(parsed.as_str(), id, "{raw:?}"),
            Err(_) => assert!(id.is_empty(), "{raw:?} rejected"),
        }
    }
    assert_eq!(
        RequestIdPropagator::extract_id(&Pairs::new([("x-request-id", "r-1 ")])).as_str(),
        "r-1"
    );
    let invalid: [(&[u8], &str); 7] = [
        (b"", "empty"),
        (b" \t ", "only spaces"),
        (&[b'x'; 129], "129 bytes"),
        (b"a b", "space"),
        (b"a\tb", "tab"),
        (b"caf\xc3\xa9", "non-ASCII"),
        (b"\xff", "a raw high byte"),
    ];
    for (bytes, reason) in invalid {
        assert!(RequestId::parse_bytes(bytes).is_err(), "{reason}");
        if let Ok(s) = std::str::from_utf8(bytes) {
            assert!(s.parse::<RequestId>().is_err(), "{reason}");
        }
    }
    assert!(
        "a\nb".parse::<RequestId>().is_err(),
        "newline (log forging)"
    );
    assert!(
        "a\u{1b}[31m".parse::<RequestId>().is_err(),
        "terminal escape"
    );
}

#[test]
fn generated_ids_are_uuid_v4() {
    let ids: Vec<RequestId> = (0..100).map(|_| RequestId::new()).collect();
    for id in &ids {
        let s = id.as_str();
        assert_eq!(s.len(), 36);
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23]);
        assert_eq!(&s[14..15], "4", "version 4");
        assert!("89ab".contains(&s[19..20]), "RFC 9562 variant");
        assert!(s
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[test]
fn duplicate_values_are_replaced() {
    let id = RequestIdPropagator::extract_id(&Pairs::new([
        ("x-request-id", "a"),
        ("x-request-id", "b"),
    ]));
    assert_ne!(id.as_str(), "a");
    assert_ne!(id.as_str(), "b");
    assert_eq!(id.as_str().len(), 36);
}

/// Review finding: extraction from a carrier with no usable request id replaced the one the
/// context already had with a fresh one; OpenTelemetry asks a propagator that reads nothing
/// to keep what is there.
#[test]
fn a_carrier_without_a_usable_id_keeps_the_contexts() {
    use opentelemetry::{propagation::TextMapPropagator, Context};
    let outer = Context::new().with_value(RequestId::parse_bytes(b"r-outer").unwrap());
    let propagator = RequestIdPropagator::new();
    for carrier in [
        Pairs::new([("other", "1")]),
        Pairs::new([("x-request-id", "two words")]),
        Pairs::new([("x-request-id", "a"), ("x-request-id", "b")]),
    ] {
        let cx = propagator.extract_with_context(&outer, &carrier);
        assert_eq!(cx.get::<RequestId>().unwrap().as_str(), "r-outer");
    }
    let cx = propagator.extract_with_context(&outer, &Pairs::new([("x-request-id", "r-new")]));
    assert_eq!(cx.get::<RequestId>().unwrap().as_str(), "r-new");
    let fresh = propagator.extract_with_context(&Context::new(), &Pairs::new([("other", "1")]));
    assert_eq!(fresh.get::<RequestId>().unwrap().as_str().len(), 36);
}
