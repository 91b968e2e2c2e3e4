//! Proof: 1,000 concurrent requests on a multi-thread runtime, with spawned children and
//! `spawn_blocking`; every text line carries exactly its own request's fields.
//! Installs a global subscriber, hence its own test binary.

mod common;

use common::{expected, parse_prefix, proof_fields, run_requests, Capture};
use tracing_subscriber::fmt::format;

#[test]
fn every_text_line_has_its_own_request_fields() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .event_format(proof_fields().text(format().without_time().with_target(false)))
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
        let i_field = line.rsplit_once(" i=").expect("every event has i").1;
        let i: u64 = i_field.parse().unwrap();
        if i == u64::MAX {
            assert!(
                !line.starts_with('['),
                "no context outside requests: {line}"
            );
            continue;
        }
        let (fields, _rest) = parse_prefix(line).unwrap_or_else(|| panic!("no prefix: {line}"));
        let (id, tenant, user) = expected(i);
        assert_eq!(
            fields,
            [
                (String::new(), id),
                ("tenant".to_owned(), tenant),
                ("user_id".to_owned(), user.to_string()),
            ],
            "{line}"
        );
        per_request[i as usize] += 1;
    }
    assert!(per_request.iter().all(|n| *n == common::EVENTS_PER_REQUEST));
}
