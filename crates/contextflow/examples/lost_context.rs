//! The mistakes `docs/lost-context.md` walks through, made on purpose, with the feature
//! `diagnostics` on: a background worker started from inside a request with
//! `spawn_without_context` reads the tenant, and the request ends while a job it started is
//! still running. Run with:
//!
//! ```text
//! cargo run -p contextflow --features diagnostics --example lost_context
//! ```

use contextflow::{diagnostics, tree::Root, AsyncLocal, Inherit};

/// As the order service's: ids flow everywhere, the tenant only through contextflow's spawns.
static REQUEST_ID: AsyncLocal<String> =
    AsyncLocal::named("request_id").inherit(Inherit::Everywhere);
static TENANT: AsyncLocal<String> = AsyncLocal::named("order_service.tenant");

/// The repository: reads the tenant for its query.
fn insert_confirmation() -> String {
    match TENANT.get() {
        Some(tenant) => format!("INSERT ... for tenant {tenant}"),
        None => "INSERT ... without a tenant".to_string(),
    }
}

/// The request handler: starts a delivery worker the wrong way (it keeps nothing of the
/// request, so the repository finds no tenant), and a job it never awaits.
async fn place_order() -> tokio::task::JoinHandle<String> {
    let _slow_job = contextflow::spawn(std::future::pending::<()>());
    contextflow::spawn_without_context(async { insert_confirmation() })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    diagnostics::set_sink(|report| println!("report: {report}\n"));
    let root = Root::new("POST /orders");
    let worker = REQUEST_ID
        .scope(
            "req-1".into(),
            TENANT.scope("acme".into(), root.scope(place_order())),
        )
        .await;
    println!("worker: {}", worker.await.unwrap());
}
