//! Two concurrent requests on a 2-worker runtime, each logging its own request id through
//! controller -> service -> repository, a spawned background task and `spawn_blocking`, with no
//! parameter plumbing.
//!
//! Run with: `cargo run -p contextflow --example two_requests`

use std::time::Duration;

use contextflow::AsyncLocal;

static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");

/// Prints a log line prefixed with the current request id, as a log formatter would.
fn log(msg: &str) {
    REQUEST_ID.with(|id| match id {
        Some(id) => println!("[{id}] {msg}"),
        None => println!("{msg}"),
    });
}

async fn controller(item: &'static str) -> u32 {
    log(&format!("Order creation started ({item})"));
    let total = service(item).await;
    // Background work started by the request keeps its context.
    let confirmation = contextflow::spawn(async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        log("Confirmation sent (background task)");
    });
    confirmation
        .await
        .expect("the confirmation task does not panic");
    log("Order created");
    total
}

async fn service(item: &'static str) -> u32 {
    tokio::time::sleep(Duration::from_millis(10)).await;
    log("Inventory validated");
    repository(item).await
}

async fn repository(item: &'static str) -> u32 {
    // Blocking work (a synchronous driver, hashing) keeps it too.
    let price = contextflow::spawn_blocking(move || {
        log("Row inserted (spawn_blocking)");
        item.len() as u32 * 10
    })
    .await
    .expect("the blocking task does not panic");
    tokio::task::yield_now().await;
    price
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    log("server started (no request context)");
    let a = tokio::spawn(REQUEST_ID.scope("req-123".into(), controller("keyboard")));
    let b = tokio::spawn(REQUEST_ID.scope("req-456".into(), controller("mouse")));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    log(&format!("both requests done: totals {a} and {b}"));
}
