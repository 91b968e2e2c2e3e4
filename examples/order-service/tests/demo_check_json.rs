//! The demo's checks with JSON log lines: besides the structured events, every line of the
//! log stream must be a JSON record that matches its event. Its own process: it installs the
//! global subscriber.

use order_service::{
    demo::{self, DemoOptions},
    logging::LogFormat,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_belong_to_their_request() {
    let report = demo::run(DemoOptions {
        orders: 100,
        concurrency: 16,
        format: LogFormat::Json,
        progress: false,
        ..DemoOptions::default()
    })
    .await
    .expect("demo runs");
    assert!(report.is_correct(), "{report}");
    let stream = report.verdict("log stream").expect("log stream check");
    assert_eq!(stream.count("not_json"), Some(0), "{stream}");
    assert_eq!(stream.count("unmatched"), Some(0), "{stream}");
    let context = report.verdict("log context").expect("log context check");
    assert_eq!(context.count("unattributed"), Some(0), "{context}");
    assert!(
        context.count("lifecycle").unwrap() <= demo::attribution::LIFECYCLE_BOUND,
        "{context}"
    );
    assert_eq!(stream.count("lines"), context.count("events"));
    assert!(
        report.tree.contains("outbox.deliver") && report.tree.contains("order.confirmation"),
        "{}",
        report.tree
    );
}
