//! The request id's validation.

use contextflow_http::RequestId;
use http::{HeaderMap, HeaderValue};

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
    let invalid: [(&[u8], &str); 6] = [
        (b"", "empty"),
        (&[b'x'; 129], "129 bytes"),
        (b"a b", "space"),
        (b"a\tb", "tab"),
        (b"caf\xc3\xa9", "non-ASCII"),
        (b"\xff", "a raw high byte"),
    ];
    for (bytes, reason) in invalid {
        let value = HeaderValue::from_bytes(bytes).unwrap();
        assert!(RequestId::from_header_value(&value).is_err(), "{reason}");
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
        let uuid = uuid::Uuid::parse_str(id.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(id.as_str(), uuid.hyphenated().to_string());
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
}

#[test]
fn duplicate_headers_are_invalid() {
    let mut headers = HeaderMap::new();
    headers.append("x-request-id", "a".parse().unwrap());
    headers.append("x-request-id", "b".parse().unwrap());
    assert!(RequestId::from_headers(&headers).is_err());
}
