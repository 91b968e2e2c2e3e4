//! A reference names one order per tenant: a retry gets the first order back (`200`, same
//! id), never a second one, also when the duplicates arrive concurrently; a request with a used
//! reference and other lines is refused (`422`).

use std::sync::Arc;

use reqwest::StatusCode;
use tokio::task::JoinSet;

use crate::{order, start_sqlite, TestService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_returns_the_first_order() {
    let svc = start_sqlite().await;
    retry_returns_first(&svc).await;
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_make_one_order() {
    let svc = start_sqlite().await;
    concurrent_duplicates(Arc::new(svc)).await;
}

pub(crate) async fn retry_returns_first(svc: &TestService) {
    let stock = svc.stock("acme", "sku-apple").await;
    let (status, first) = svc
        .post_order("token-acme", order("idem-1", &[("sku-apple", 2)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // The same order again, its lines split and reordered: the first order, unchanged.
    let (status, again) = svc
        .post_order(
            "token-acme",
            order("idem-1", &[("sku-apple", 1), ("sku-apple", 1)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["items"], first["items"]);
    // Same reference, other lines: not a retry, refused, and nothing placed or charged.
    let pears = svc.stock("acme", "sku-pear").await;
    for lines in [
        &[("sku-pear", 5)][..],
        &[("sku-apple", 3)],
        &[("sku-apple", 2), ("sku-pear", 1)],
    ] {
        let (status, refused) = svc.post_order("token-acme", order("idem-1", lines)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{lines:?}: {refused}"
        );
        let message = refused["error"].as_str().expect("a JSON error");
        assert!(message.contains("already used by order"), "{message}");
        assert!(refused["request_id"].is_string(), "{refused}");
    }
    assert_eq!(svc.stock("acme", "sku-apple").await, stock - 2);
    assert_eq!(svc.stock("acme", "sku-pear").await, pears);
    // Another tenant may use the same reference.
    let (status, other) = svc
        .post_order("token-globex", order("idem-1", &[("sku-apple", 1)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    assert_ne!(other["id"], first["id"]);
    assert_eq!(svc.service.payment_stub.charges(), 2);
}

pub(crate) async fn concurrent_duplicates(svc: Arc<TestService>) {
    let stock = svc.stock("initech", "sku-pear").await;
    let rows = svc.rows("initech").await;
    let charges = svc.service.payment_stub.charges();
    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let svc = svc.clone();
        requests.spawn(async move {
            svc.post_order("token-initech", order("idem-burst", &[("sku-pear", 1)]))
                .await
        });
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    while let Some(done) = requests.join_next().await {
        let (status, body) = done.expect("request task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("{other}: {body}"),
        }
        ids.insert(body["id"].as_i64().expect("an order id"));
    }
    assert_eq!(created, 1, "exactly one request created the order");
    assert_eq!(ids.len(), 1, "every answer names the same order: {ids:?}");
    assert_eq!(svc.rows("initech").await, (rows.0 + 1, rows.1 + 1));
    assert_eq!(svc.stock("initech", "sku-pear").await, stock - 1);
    assert_eq!(svc.service.payment_stub.charges(), charges + 1);
    match Arc::try_unwrap(svc) {
        Ok(svc) => svc.service.shutdown().await.expect("clean shutdown"),
        Err(_) => unreachable!("every task has finished"),
    }
}
