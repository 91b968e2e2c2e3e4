//! Proof: 1,000 concurrent requests on a multi-thread runtime, with spawned children and
//! `spawn_blocking`; every JSON line carries exactly its own request's fields.
//! Installs a global subscriber, hence its own test binary.

mod common;

use common::{expected, proof_fields, run_requests, Capture};

#[test]
fn every_json_line_has_its_own_request_fields() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .map_event_format(|json| proof_fields().json(json))
        .with_writer(capture.clone())
        .init();

    run_requests();

    let lines = capture.lines();
    assert_eq!(
        lines.len(),
        common::REQUESTS as usize * common::EVENTS_PER_REQUEST + 2
    );
    let mut per_request = vec![0usize; common::REQUESTS as usize];
    for line in &lines {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON {line}: {e}"));
        let obj = event.as_object().unwrap();
        let i = event["fields"]["i"].as_u64().unwrap();
        if i == u64::MAX {
            for key in ["request_id", "tenant", "user_id"] {
                assert!(
                    !obj.contains_key(key),
                    "no context outside requests: {line}"
                );
            }
            continue;
        }
        let (id, tenant, user) = expected(i);
        assert_eq!(event["request_id"], id, "{line}");
        assert_eq!(event["tenant"], tenant, "{line}");
        assert_eq!(event["user_id"], user.to_string(), "{line}");
        per_request[i as usize] += 1;
    }
    assert!(per_request.iter().all(|n| *n == common::EVENTS_PER_REQUEST));
}
