//! Two concurrent requests whose log lines carry their own request id and tenant, including
//! lines from spawned tasks and blocking work, with no span and no argument at the call sites.
//!
//! Run with: `cargo run -p contextflow-tracing --example requests` (add `-- --json` for JSON).

use std::time::Duration;

use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use tracing::{info, info_span, warn, Instrument};

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

#[tokio::main]
async fn main() {
    let fields = ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT);
    if std::env::args().any(|a| a == "--json") {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .map_event_format(|f| fields.json(f))
            .init();
    } else {
        tracing_subscriber::fmt()
            .event_format(fields.text(tracing_subscriber::fmt::format()))
            .init();
    }

    info!("server started");
    let a = contextflow::spawn(handle("req-1", "acme", 30));
    let b = contextflow::spawn(handle("req-2", "globex\n[req-1] INFO forged line", 10));
    a.await.unwrap();
    b.await.unwrap();
    info!("server stopped");
}

/// What a middleware does per request: bind the context, then call the handler.
async fn handle(id: &str, tenant: &str, delay_ms: u64) {
    REQUEST_ID
        .scope(
            id.to_owned(),
            TENANT.scope(tenant.to_owned(), create_order(delay_ms)),
        )
        .instrument(info_span!("request", method = "POST", path = "/orders"))
        .await
}

/// Application code: plain `tracing` calls, no ids passed around.
async fn create_order(delay_ms: u64) {
    info!("Order creation started");
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let audit = contextflow::spawn(async { info!("audit record written") });
    let total = contextflow::spawn_blocking(|| {
        info!("pricing in the blocking pool");
        42
    })
    .await
    .unwrap();
    audit.await.unwrap();
    if total > 40 {
        warn!(total, "large order");
    }
    info!("Order created");
}
