//! The demo's correctness check, smaller: every log line of 200 concurrent orders belongs to
//! the request that caused it, and every order is committed. Its own process: it installs
//! the global log capture.

use order_service::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_belongs_to_its_request() {
    let report = demo::run(DemoOptions {
        orders: 200,
        concurrency: 32,
        progress: false,
        ..DemoOptions::default()
    })
    .await
    .expect("demo runs");
    println!("{report}");
    assert_eq!(report.requests, 200);
    assert_eq!(report.created, 200);
    assert_eq!(report.mismatches, 0, "{:#?}", report.mismatch_examples);
    assert_eq!(report.committed, 200);
    assert_eq!(
        report.jobs_logged, 200,
        "every confirmation job logged under its request"
    );
    assert_eq!(
        report.payments_logged, 200,
        "every payment logged under the caller's trace"
    );
    assert_eq!(
        report.events_logged, 200,
        "every queue event consumed under its request"
    );
    assert!(
        report.lines_with_reference >= 200 * 10,
        "{}",
        report.lines_with_reference
    );
    // The tree shows the whole path, the spawned job under the request.
    for level in [
        "http.request",
        "controller",
        "service",
        "repository",
        "db{",
        "job{",
        "http.client",
        "payment",
        "queue.publish",
        "queue.consume",
    ] {
        assert!(
            report.tree.contains(level),
            "tree lacks {level}:\n{}",
            report.tree
        );
    }
    assert!(report.is_correct());
}
