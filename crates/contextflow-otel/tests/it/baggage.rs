//! `baggage`: grammar, percent-encoding, properties and limits.

use contextflow_otel::Baggage;

#[test]
fn spec_example_with_properties() {
    let baggage = Baggage::parse(
        "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue",
    );
    assert_eq!(baggage.len(), 3);
    assert_eq!(baggage.get("key2"), Some("value2"));
    let props: Vec<_> = baggage.member("key1").unwrap().properties().collect();
    assert_eq!(props, [("property1", None), ("property2", None)]);
    let props: Vec<_> = baggage.member("key3").unwrap().properties().collect();
    assert_eq!(props, [("propertyKey", Some("propertyValue"))]);
    assert_eq!(
        baggage.to_string(),
        "key1=value1;property1;property2,key2=value2,key3=value3;propertyKey=propertyValue"
    );
}

#[test]
fn percent_encoding() {
    let cases = [
        ("k=%20", " ", "encoded space"),
        ("k=a%2Cb%3Bc", "a,b;c", "encoded separators"),
        (
            "k=%e2%82%ac",
            "\u{20ac}",
            "lower-case hex, multi-byte UTF-8",
        ),
        ("k=100%", "100%", "a lone '%' stays"),
        ("k=%zz", "%zz", "an invalid escape stays"),
        ("k=%ff", "\u{fffd}", "invalid UTF-8 becomes U+FFFD"),
        ("k=", "", "an empty value"),
    ];
    for (raw, value, reason) in cases {
        assert_eq!(Baggage::parse(raw).get("k"), Some(value), "{reason}");
    }
    let mut baggage = Baggage::new();
    baggage.insert("k", "a b,c;d=e%f\"g\\h\u{e9}").unwrap();
    let formatted = baggage.to_string();
    assert_eq!(formatted, "k=a%20b%2Cc%3Bd=e%25f%22g%5Ch%C3%A9");
    assert_eq!(Baggage::parse(&formatted), baggage, "round trip");
}

#[test]
fn invalid_members_are_dropped_and_the_rest_kept() {
    let cases = [
        ("=v", "empty key"),
        ("k", "no '='"),
        ("k v=1", "space in key"),
        ("k(=1", "separator in key"),
        ("k=a b", "space in value"),
        ("k=\"q\"", "double quote in value"),
        ("k=a\\b", "backslash in value"),
        ("k=1;=p", "property with an empty key"),
        ("k=1;p=a b", "property value with a space"),
        ("k\u{e9}=1", "non-ASCII key"),
    ];
    for (member, reason) in cases {
        let baggage = Baggage::parse(&format!("good=1,{member},also=2"));
        assert_eq!(baggage.len(), 2, "{reason}: {baggage:?}");
        assert_eq!(baggage.get("good"), Some("1"), "{reason}");
        assert_eq!(baggage.get("also"), Some("2"), "{reason}");
    }
    assert_eq!(
        Baggage::parse_bytes(b"a=\xff\xfe,b=1").len(),
        1,
        "raw non-ASCII"
    );
}

#[test]
fn repeated_key_keeps_position_and_last_value() {
    let baggage = Baggage::parse("a=1,b=2,a=3");
    assert_eq!(baggage.to_string(), "a=3,b=2");
}

#[test]
fn member_limit() {
    let raw = (0..100)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    let baggage = Baggage::parse(&raw);
    assert_eq!(baggage.len(), 64);
    assert_eq!(baggage.get("k63"), Some("v"));
    assert_eq!(baggage.get("k64"), None, "members past 64 are dropped");
    let mut baggage = baggage;
    assert!(baggage.insert("one-more", "v").is_err());
    assert!(
        baggage.insert("k0", "replaced").is_ok(),
        "replacing does not add"
    );
}

#[test]
fn byte_limit() {
    // 60 members of 200 bytes: 60 * 200 + 59 > 8192.
    let raw = (0..60)
        .map(|i| format!("k{i:03}={}", "v".repeat(195)))
        .collect::<Vec<_>>()
        .join(",");
    let baggage = Baggage::parse(&raw);
    assert!(baggage.to_string().len() <= 8192);
    assert_eq!(baggage.len(), 40, "40 * 201 - 1 = 8039 bytes fit");
    // Every kept member is whole.
    assert!(baggage.iter().all(|m| m.value().len() == 195));
    let mut small = Baggage::new();
    assert!(small.insert("k", &"x".repeat(8190)).is_ok());
    assert!(small.insert("k2", "x").is_err(), "8192 bytes reached");
}

#[test]
fn properties_are_normalized() {
    let baggage = Baggage::parse("k = v ; p1 = x ;; p2 ");
    assert_eq!(baggage.to_string(), "k=v;p1=x;p2");
}

#[test]
fn property_values_are_decoded_and_encoded_again() {
    let baggage = Baggage::parse("k=v;p=a%20b%3Bc;q=%FF;flag");
    let props: Vec<_> = baggage.member("k").unwrap().properties().collect();
    assert_eq!(
        props,
        [
            ("p", Some("a b;c")),
            ("q", Some("\u{fffd}")),
            ("flag", None)
        ]
    );
    assert_eq!(baggage.to_string(), "k=v;p=a%20b%3Bc;q=%EF%BF%BD;flag");
    assert_eq!(Baggage::parse(&baggage.to_string()), baggage, "round trip");
}

#[test]
fn otel_round_trip_keeps_values_and_properties() {
    let baggage = Baggage::parse("user=al%20ice;p=x%2Cy,env=prod");
    let otel = baggage.to_otel();
    assert_eq!(otel.get("user").map(|v| v.as_str()), Some("al ice"));
    let back = Baggage::from_otel(&otel);
    assert_eq!(back.get("user"), Some("al ice"));
    let props: Vec<_> = back.member("user").unwrap().properties().collect();
    assert_eq!(props, [("p", Some("x,y"))]);
    assert_eq!(back.len(), 2);
}

/// The vectors of the W3C baggage repository's tests (`test/test_baggage.py`, which checks
/// its Python reference implementation; the repository has no service harness yet).
#[test]
fn w3c_baggage_test_vectors() {
    type Props<'a> = Vec<(&'a str, Option<&'a str>)>;
    type Member<'a> = (&'a str, &'a str, Props<'a>);
    let cases: Vec<(&str, Vec<Member<'_>>)> = vec![
        ("SomeKey=SomeValue", vec![("SomeKey", "SomeValue", vec![])]),
        (
            "SomeKey=SomeValue;SomeProp,SomeKey2=SomeValue2;ValueProp=PropVal",
            vec![
                ("SomeKey", "SomeValue", vec![("SomeProp", None)]),
                ("SomeKey2", "SomeValue2", vec![("ValueProp", Some("PropVal"))]),
            ],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t , \t SomeKey2 \t = \t SomeValue2 \t ; \t ValueProp \t = \t PropVal",
            vec![
                ("SomeKey", "SomeValue", vec![("SomeProp", None)]),
                ("SomeKey2", "SomeValue2", vec![("ValueProp", Some("PropVal"))]),
            ],
        ),
        (
            "SomeKey=SomeValue;SomePropKey=SomePropValue,SomeKey2=SomeValue2;SomePropKey2=SomePropValue2",
            vec![
                ("SomeKey", "SomeValue", vec![("SomePropKey", Some("SomePropValue"))]),
                ("SomeKey2", "SomeValue2", vec![("SomePropKey2", Some("SomePropValue2"))]),
            ],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomePropKey=SomePropValue \t , \t SomeKey2 \t = \t SomeValue2 \t ; \t SomePropKey2 \t = \t SomePropValue2",
            vec![
                ("SomeKey", "SomeValue", vec![("SomePropKey", Some("SomePropValue"))]),
                ("SomeKey2", "SomeValue2", vec![("SomePropKey2", Some("SomePropValue2"))]),
            ],
        ),
        ("SomeKey=SomeValue=equals", vec![("SomeKey", "SomeValue=equals", vec![])]),
        (
            "SomeKey=SomeValue;SomeProp;SecondProp=PropValue",
            vec![("SomeKey", "SomeValue", vec![("SomeProp", None), ("SecondProp", Some("PropValue"))])],
        ),
        ("SomeKey \t = \t SomeValue \t ", vec![("SomeKey", "SomeValue", vec![])]),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t ; \t SecondProp \t = \t PropValue",
            vec![("SomeKey", "SomeValue", vec![("SomeProp", None), ("SecondProp", Some("PropValue"))])],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomePropKey \t = \t SomePropValue",
            vec![("SomeKey", "SomeValue", vec![("SomePropKey", Some("SomePropValue"))])],
        ),
    ];
    for (raw, want) in cases {
        let baggage = Baggage::parse(raw);
        let got: Vec<_> = baggage
            .iter()
            .map(|m| (m.key(), m.value(), m.properties().collect::<Vec<_>>()))
            .collect();
        assert_eq!(got, want, "{raw:?}");
    }
    // Percent-encoded values (Python's `urllib.parse.quote` of the value), with and without OWS.
    let value = "\t \"';=asdf!@#$%^&*()";
    let quoted = "%09%20%22%27%3B%3Dasdf%21%40%23%24%25%5E%26%2A%28%29";
    for raw in [
        format!("SomeKey={quoted}"),
        format!("SomeKey \t = \t {quoted} \t "),
    ] {
        let baggage = Baggage::parse(&raw);
        assert_eq!(baggage.get("SomeKey"), Some(value), "{raw:?}");
        // Written again, every byte outside the baggage octets is encoded (the reference
        // implementation also encodes some octets that may go raw); it reads back the same.
        let written = baggage.to_string();
        assert_eq!(written, "SomeKey=%09%20%22'%3B=asdf!@#$%25^&*()");
        assert_eq!(Baggage::parse(&written).get("SomeKey"), Some(value));
    }
    // Limits: 64 members, and one member of 8,192 bytes, are propagated whole.
    let mut baggage = Baggage::new();
    for i in 0..64 {
        baggage.insert(&format!("key{i}"), "value").unwrap();
    }
    assert_eq!(baggage.to_string().split(',').count(), 64);
    let mut long = Baggage::new();
    long.insert("a", &"0123456789".repeat(819)).unwrap();
    assert_eq!(long.to_string().len(), 8192);
}

/// Review findings: a member whose OpenTelemetry metadata is not W3C properties was dropped
/// whole (now it goes without the metadata); a `baggage` value is parsed up to a bound, not
/// to its end.
#[test]
fn otel_metadata_and_raw_bounds() {
    let mut otel = opentelemetry::baggage::Baggage::new();
    otel.insert_with_metadata("user", "alice", "ttl 60");
    otel.insert_with_metadata("k", "v", "p=1");
    let ours = Baggage::from_otel(&otel);
    assert_eq!(ours.get("user"), Some("alice"));
    assert_eq!(
        ours.member("k").map(|m| m.to_string()).as_deref(),
        Some("k=v;p=1")
    );
    // 40 KiB of members (each replacing the last), then one more: the bound stops the parse.
    let mut raw = "a=1,".repeat(10 * 1024);
    raw.push_str("late=1");
    let (parsed, dropped) = Baggage::from_values([raw.as_bytes()]);
    assert_eq!(parsed.get("late"), None);
    assert_eq!(parsed.get("a"), Some("1"));
    assert!(dropped > 0);
}
