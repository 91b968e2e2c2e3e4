//! The demo's correctness check with JSON log lines. Its own process: it installs the global
//! log capture.

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
    assert_eq!(report.mismatches, 0, "{:#?}", report.mismatch_examples);
    assert!(report.is_correct(), "{report}");
    assert!(
        report.tree.contains("job{") && report.tree.contains("send_confirmation"),
        "{}",
        report.tree
    );
}
