//! `tracestate`: grammar, limits, order and updates.

use contextflow_otel::TraceState;

fn all_value_chars() -> String {
    // Every allowed value character: printable ASCII but ',' and '=', the space inside only.
    (0x20u8..=0x7e)
        .filter(|&b| b != b',' && b != b'=')
        .map(char::from)
        .chain(std::iter::once('~'))
        .collect()
}

#[test]
fn valid_vectors() {
    let key256 = format!("a{}", "b".repeat(255));
    let tenant_system = format!("{}@{}", "t".repeat(241), "s".repeat(14));
    let value256 = "v".repeat(256);
    let all_key_chars = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
    let cases: Vec<(String, usize, &str)> = vec![
        (
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into(),
            2,
            "spec example",
        ),
        ("congo=t61rcWkgMzE".into(), 1, "one member"),
        ("".into(), 0, "empty header"),
        (" , ,\t".into(), 0, "only empty members"),
        (
            "rojo=00f067aa0ba902b7 ,\tcongo=BleGNlZWRzIHRohbCBwbGVhc3VyZS4".into(),
            2,
            "white space around members",
        ),
        ("a=1,,b=2".into(), 2, "an empty member in between"),
        ("fw529a3039@dt=ZmFyZWdyb3VuZA".into(), 1, "multi-tenant key"),
        ("0tenant@sys=1".into(), 1, "tenant may start with a digit"),
        ("1a=1".into(), 1, "a key may start with a digit"),
        ("foo@=1".into(), 1, "'@' at the end of a key"),
        ("foo@@bar=1".into(), 1, "two '@' in a row"),
        ("foo@bar@baz=1".into(), 1, "two '@'"),
        ("t@1sys=1".into(), 1, "a digit after '@'"),
        (
            format!("{}@v=1", "t".repeat(242)),
            1,
            "242 characters before '@'",
        ),
        (
            format!("t@{}=1", "v".repeat(15)),
            1,
            "15 characters after '@'",
        ),
        (
            format!("{}@{}=1", "a".repeat(200), "b".repeat(55)),
            1,
            "256-character key with '@'",
        ),
        ("a=1,a=2".into(), 1, "a repeated key keeps its first member"),
        ("a=1 , a=1".into(), 1, "a repeated member is kept once"),
        (format!("{all_key_chars}=1"), 1, "every key character"),
        (
            format!("k={}", all_value_chars()),
            1,
            "every value character",
        ),
        ("a=b c".into(), 1, "space inside a value"),
        (
            "a= b".into(),
            1,
            "a value may start with a space (chr includes it)",
        ),
        (format!("{key256}=1"), 1, "256-character simple key"),
        (
            format!("{tenant_system}=1"),
            1,
            "241-character tenant, 14-character system",
        ),
        (format!("k={value256}"), 1, "256-character value"),
        (
            (0..32)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(","),
            32,
            "32 members",
        ),
    ];
    for (value, len, reason) in cases {
        let state = TraceState::parse_bytes(value.as_bytes())
            .unwrap_or_else(|err| panic!("{reason}: rejected: {err}"));
        assert_eq!(state.len(), len, "{reason}");
    }
}

#[test]
fn invalid_vectors() {
    let cases: Vec<(String, &str)> = vec![
        ("Foo=1".into(), "upper-case key"),
        ("_a=1".into(), "simple key starting with '_'"),
        ("a=".into(), "empty value"),
        ("=1".into(), "empty key"),
        ("a".into(), "member without '='"),
        ("a=1,b".into(), "second member without '='"),
        ("@sys=1".into(), "a key starting with '@'"),
        ("t@Sys=1".into(), "upper-case letter after '@'"),
        (format!("a{}=1", "b".repeat(256)), "257-character key"),
        (
            format!("{}@s=1", "t".repeat(255)),
            "257-character key with '@'",
        ),
        (format!("k={}", "v".repeat(257)), "257-character value"),
        ("a=b=c".into(), "'=' in value"),
        ("a=b\tc".into(), "tab in value"),
        ("foo =1".into(), "space before '='"),
        ("a=caf\u{e9}".into(), "non-ASCII value"),
        ("a=1;b=2".into(), "';' is not a separator"),
        (
            (0..33)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(","),
            "33 members",
        ),
    ];
    for (value, reason) in cases {
        let parsed = TraceState::parse_bytes(value.as_bytes());
        assert!(parsed.is_err(), "{reason}: accepted as {parsed:?}");
        assert!(parsed
            .unwrap_err()
            .to_string()
            .starts_with("invalid tracestate: "));
    }
    assert!(TraceState::parse_bytes(b"a=\x7f").is_err(), "DEL in value");
    assert!(
        TraceState::parse_bytes(b"a=\x01").is_err(),
        "control character in value"
    );
}

#[test]
fn order_is_kept_and_formatting_round_trips() {
    let state: TraceState = "z=1, a=2,m@x=3".parse().unwrap();
    assert_eq!(state.to_string(), "z=1,a=2,m@x=3");
    assert_eq!(
        state.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        ["z", "a", "m@x"]
    );
    assert_eq!(state.to_string().parse::<TraceState>().unwrap(), state);
}

#[test]
fn multiple_values_are_one_list() {
    let state = TraceState::from_values([&b"a=1,b=2"[..], b"c=3"]).unwrap();
    assert_eq!(state.to_string(), "a=1,b=2,c=3");
    let state = TraceState::from_values([&b"a=1,b=2"[..], b"c=3", b"a=4"]).unwrap();
    assert_eq!(
        state.to_string(),
        "a=1,b=2,c=3",
        "a key repeated across values keeps its first member"
    );
    let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    assert!(
        TraceState::from_values(many.iter().map(|m| m.as_bytes())).is_err(),
        "33 members over many values"
    );
}

#[test]
fn duplicates_keep_the_first_member() {
    for (raw, want) in [
        ("foo=1,foo=1", "foo=1"),
        ("foo=1,foo=2", "foo=1"),
        ("foo=2,bar=3,foo=1", "foo=2,bar=3"),
    ] {
        assert_eq!(
            TraceState::parse_bytes(raw.as_bytes()).unwrap().to_string(),
            want,
            "{raw}"
        );
    }
}

#[test]
fn otel_projection_keeps_what_otel_accepts() {
    let state: TraceState = "a=1,foo@@bar=2,t@v=3".parse().unwrap();
    assert_eq!(state.to_otel().header(), "a=1,t@v=3");
    assert_eq!(
        TraceState::from_otel(&state.to_otel()).to_string(),
        "a=1,t@v=3"
    );
}

#[test]
fn update_moves_member_to_front() {
    let mut state: TraceState = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse().unwrap();
    state.insert("rojo", "00f067aa0ba902b8").unwrap();
    assert_eq!(state.to_string(), "rojo=00f067aa0ba902b8,congo=t61rcWkgMzE");
    state.insert("congo", "x").unwrap();
    assert_eq!(state.to_string(), "congo=x,rojo=00f067aa0ba902b8");
    assert!(state.insert("Bad", "x").is_err(), "invalid key");
    assert!(state.insert("ok", "bad,value").is_err(), "invalid value");
    assert_eq!(state.len(), 2, "a rejected insert changes nothing");
    assert_eq!(state.remove("congo").as_deref(), Some("x"));
    assert_eq!(state.remove("congo"), None);
}

#[test]
fn insert_into_full_list_drops_the_last() {
    let full = (0..32)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    let mut state: TraceState = full.parse().unwrap();
    state.insert("new", "1").unwrap();
    assert_eq!(state.len(), 32);
    assert_eq!(state.iter().next(), Some(("new", "1")));
    assert_eq!(state.get("k31"), None, "the right-most member is dropped");
    assert_eq!(state.get("k30"), Some("v"));
}

#[test]
fn long_lists_drop_large_members_first_then_from_the_end() {
    // 9 members of 60 characters (k0=...): 9 * 60 + 8 = 548 > 512.
    let members: Vec<String> = (0..9).map(|i| format!("k{i}={}", "v".repeat(57))).collect();
    let state: TraceState = members.join(",").parse().unwrap();
    assert_eq!(state.len(), 8, "one member dropped from the end");
    assert_eq!(state.get("k8"), None);
    assert!(state.to_string().len() <= 512);

    // A large member (> 128 characters) in the middle goes first, even if it is not last.
    let large = format!("big={}", "x".repeat(200));
    let mut list: Vec<String> = (0..6).map(|i| format!("k{i}={}", "v".repeat(57))).collect();
    list.insert(2, large);
    let state: TraceState = list.join(",").parse().unwrap();
    assert_eq!(state.get("big"), None, "the large member is dropped");
    assert_eq!(state.len(), 6, "the small ones all fit");

    // An inserted member is never the one dropped.
    let mut state: TraceState = members[..8].join(",").parse().unwrap();
    state.insert("mine", &"m".repeat(200)).unwrap();
    assert_eq!(state.iter().next().map(|(k, _)| k), Some("mine"));
    assert!(state.to_string().len() <= 512);
}

#[test]
fn empty_state_is_not_sent() {
    assert_eq!(TraceState::new().to_string(), "");
    assert!(TraceState::new().is_empty());
}

#[test]
fn insert_refuses_a_member_longer_than_the_whole_header() {
    // The longest key and the longest value the grammar allows: 513 characters with the '='.
    let key = format!("a{}", "@".repeat(255));
    let value = "v".repeat(256);
    let mut state: TraceState = "a=1".parse().unwrap();
    assert!(state.insert(&key, &value).is_err());
    assert_eq!(state.to_string(), "a=1", "unchanged");
    // One character less fits, alone: every other member goes.
    state.insert(&key, &value[1..]).unwrap();
    assert_eq!(state.to_string().len(), 512);
    assert_eq!(state.len(), 1);
    // What insert writes parses back the same.
    let again: TraceState = state.to_string().parse().unwrap();
    assert_eq!(again.to_string(), state.to_string());
}
