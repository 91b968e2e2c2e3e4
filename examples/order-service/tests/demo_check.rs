//! The demo's checks, smaller: every event of 200 concurrent orders belongs to the request
//! that caused it, every stage of every order happened once, every order is committed. Its
//! own process: it installs the global subscriber.

use order_service::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_belongs_to_its_request() {
    let report = demo::run(DemoOptions {
        orders: 200,
        concurrency: 32,
        progress: false,
        ..DemoOptions::default()
    })
    .await
    .expect("demo runs");
    println!("{report}");
    assert!(report.is_correct(), "{report}");
    let count = |check: &str, name: &str| {
        report
            .verdict(check)
            .and_then(|v| v.count(name))
            .unwrap_or_else(|| panic!("no count {check}/{name}"))
    };
    assert_eq!(count("requests", "created"), 200);
    assert_eq!(count("log context", "mismatched"), 0);
    assert_eq!(count("log context", "unattributed"), 0);
    assert!(count("log context", "matched") >= 200 * 8);
    assert!(count("log context", "with_reference") >= 200 * 4);
    assert_eq!(count("log stream", "lines"), count("log context", "events"));
    for milestone in ["payment calls", "confirmations", "queue events"] {
        assert_eq!(count("milestones", milestone), 200, "{milestone}");
    }
    assert_eq!(count("database", "paid"), 200);
    assert_eq!(count("database", "confirmed"), 200);
    assert_eq!(count("database", "repeated"), 0);
    // Every span went out over OTLP: one connected trace per order, across every process.
    assert_eq!(count("traces", "connected"), 200);
    assert_eq!(count("traces", "fragmented"), 0);
    assert_eq!(count("traces", "complete"), 200);
    assert_eq!(count("traces", "spans"), 200 * 6);
    // The tree shows the whole path, the spawned job under the request.
    for level in [
        "http.request",
        "controller",
        "service",
        "repository",
        "db{",
        "outbox.deliver",
        "http.client",
        "service=payment",
        "queue.publish",
        "queue.consume",
    ] {
        assert!(
            report.tree.contains(level),
            "tree lacks {level}:\n{}",
            report.tree
        );
    }
}
