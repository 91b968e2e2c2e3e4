//! Children started with contextflow's spawn helpers log inside their parent's span.
//! Installs a global subscriber, hence its own test binary.

mod common;

use common::Capture;
use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use tracing::{info, info_span, Instrument};

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");

fn events_by_message(capture: &Capture) -> Vec<(String, serde_json::Value)> {
    capture
        .lines()
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["fields"]["message"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// One request: the children get no `.in_current_span()`, yet log inside the request span.
async fn request() {
    info!("parent");
    contextflow::spawn(async { info!("spawned") })
        .await
        .unwrap();
    contextflow::spawn_blocking(|| info!("blocking"))
        .await
        .unwrap();
    contextflow::thread::spawn(|| info!("thread"))
        .join()
        .unwrap();
    // A plain tokio::spawn carries neither the context nor the span.
    tokio::spawn(async { info!("plain") }).await.unwrap();
}

#[test]
fn spawned_children_log_inside_the_parent_span() {
    let capture = Capture::default();
    let fields = ContextFields::new().field("request_id", &REQUEST_ID);
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .map_event_format(|json| fields.json(json))
        .with_writer(capture.clone())
        .init();

    for multi_thread in [false, true] {
        capture.clear();
        let rt = if multi_thread {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread().build()
        }
        .unwrap();
        rt.block_on(async {
            let mut handles = Vec::new();
            for n in 0..4u32 {
                let span = info_span!("request", n);
                handles.push(contextflow::spawn(
                    REQUEST_ID.scope(format!("req-{n}"), request().instrument(span)),
                ));
            }
            for h in handles {
                h.await.unwrap();
            }
        });

        let events = events_by_message(&capture);
        assert_eq!(events.len(), 4 * 5, "{events:#?}");
        for (message, event) in events {
            if message == "plain" {
                assert!(event.get("span").is_none(), "{event}");
                assert!(event.get("request_id").is_none(), "{event}");
                continue;
            }
            let span = &event["span"];
            assert_eq!(span["name"], "request", "{message}: {event}");
            let n = span["n"].as_u64().unwrap();
            assert_eq!(
                event["request_id"],
                format!("req-{n}"),
                "{message}: {event}"
            );
            assert_eq!(event["spans"].as_array().unwrap().len(), 1, "{event}");
        }
    }
}

#[test]
fn carrier_is_registered_once() {
    // `ContextFields::text`/`json` register it; calling again is harmless.
    let _ = ContextFields::new().text(tracing_subscriber::fmt::format());
    assert!(!contextflow_tracing::carry_spans());
    assert!(contextflow::carry::is_active());
}
