//! Rough cost of one log event carrying 3 request fields, to a sink: contextflow fields
//! (this crate) against the usual approach (the fields on an entered request span), in text
//! and JSON. Not a benchmark harness; the side-by-side numbers live in `contextflow-bench`.
//!
//! Run with: `cargo run --release -p contextflow-tracing --example cost`

use std::time::Instant;

use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;
use tracing::{info, info_span, Dispatch};
use tracing_subscriber::fmt::format;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
static USER_ID: AsyncLocal<u64> = AsyncLocal::named("user_id");

const N: u32 = 200_000;

fn fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT)
        .field("user_id", &USER_ID)
}

fn text() -> Dispatch {
    tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .event_format(format().without_time())
        .finish()
        .into()
}

fn text_ctx() -> Dispatch {
    tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .event_format(fields().text(format().without_time()))
        .finish()
        .into()
}

fn json() -> Dispatch {
    tracing_subscriber::fmt()
        .json()
        .without_time()
        .with_writer(std::io::sink)
        .finish()
        .into()
}

fn json_ctx() -> Dispatch {
    tracing_subscriber::fmt()
        .json()
        .without_time()
        .with_writer(std::io::sink)
        .map_event_format(|f| fields().json(f))
        .finish()
        .into()
}

/// ns per event: plain event, inside the 3 contextflow scopes.
fn with_context(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        REQUEST_ID.sync_scope("req-123456".into(), || {
            TENANT.sync_scope("acme".into(), || {
                USER_ID.sync_scope(42, || {
                    let start = Instant::now();
                    for i in 0..N {
                        info!(i, "Order creation started");
                    }
                    start.elapsed().as_nanos() as f64 / f64::from(N)
                })
            })
        })
    })
}

/// ns per event: inside an entered request span holding the 3 fields.
fn with_span(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let span = info_span!(
            "request",
            request_id = "req-123456",
            tenant = "acme",
            user_id = 42
        );
        let _entered = span.enter();
        let start = Instant::now();
        for i in 0..N {
            info!(i, "Order creation started");
        }
        start.elapsed().as_nanos() as f64 / f64::from(N)
    })
}

/// ns per event with no request fields at all.
fn bare(dispatch: &Dispatch) -> f64 {
    tracing::dispatcher::with_default(dispatch, || {
        let start = Instant::now();
        for i in 0..N {
            info!(i, "Order creation started");
        }
        start.elapsed().as_nanos() as f64 / f64::from(N)
    })
}

fn main() {
    for _warm_up in 0..2 {
        with_context(&text_ctx());
        with_span(&text());
    }
    let rows = [
        ("text, no fields", bare(&text())),
        ("text, 3 fields on a request span", with_span(&text())),
        ("text, 3 contextflow fields", with_context(&text_ctx())),
        ("json, no fields", bare(&json())),
        ("json, 3 fields on a request span", with_span(&json())),
        ("json, 3 contextflow fields", with_context(&json_ctx())),
    ];
    for (name, ns) in rows {
        println!("{name:<36} {ns:>8.0} ns/event");
    }
    println!(
        "ratio contextflow / span: text {:.2}, json {:.2}",
        rows[2].1 / rows[1].1,
        rows[5].1 / rows[4].1
    );
}
