//! `log`-crate records bridged through `tracing-log` get the same context fields.
//! Installs the global `log` logger, hence its own test binary.

mod common;

use common::Capture;
use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use tracing::subscriber::with_default;
use tracing_subscriber::fmt::format;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

#[test]
fn log_records_carry_context_fields() {
    tracing_log::LogTracer::init().unwrap();
    let fields = ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT);

    let text = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .event_format(fields.text(format().without_time().with_target(false)))
        .with_writer(text.clone())
        .finish();
    with_default(subscriber, || {
        REQUEST_ID.sync_scope("req-7".into(), || {
            TENANT.sync_scope("acme\nINFO forged".into(), || {
                log::info!("from the log crate")
            });
        });
        log::warn!("no request");
    });
    let lines = text.lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].starts_with("[req-7 tenant=\"acme\\nINFO forged\"]  INFO from the log crate"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with(" WARN no request"), "{}", lines[1]);

    // With `EscapedFields` too: the bridge's `log.*` metadata fields are the event format's
    // business, never printed as fields.
    let escaped = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(contextflow_tracing::EscapedFields::new())
        .event_format(fields.text(format().without_time().with_target(false)))
        .with_writer(escaped.clone())
        .finish();
    with_default(subscriber, || {
        REQUEST_ID.sync_scope("req-9".into(), || log::info!("escaped fields"))
    });
    let lines = escaped.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0], "[req-9]  INFO escaped fields");

    let json = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .map_event_format(|f| fields.json(f))
        .with_writer(json.clone())
        .finish();
    with_default(subscriber, || {
        REQUEST_ID.sync_scope("req-8".into(), || log::error!("boom"));
    });
    let line: serde_json::Value = serde_json::from_str(&json.lines()[0]).unwrap();
    assert_eq!(line["request_id"], "req-8");
    assert_eq!(line["fields"]["message"], "boom");
    assert_eq!(line["level"], "ERROR");
}
