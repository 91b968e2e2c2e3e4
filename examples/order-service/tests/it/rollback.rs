//! Nothing is written when an order fails: the whole transaction rolls back.

use reqwest::StatusCode;

use crate::{order, start_sqlite, TestService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_orders_write_nothing() {
    let svc = start_sqlite().await;
    failed_orders_roll_back(&svc).await;
    svc.service.shutdown().await.expect("clean shutdown");
}

/// Insufficient stock on the second line, an unknown product, a declined payment (after every
/// write): each leaves stock and rows as they were. Then the limited stock sells out exactly.
pub(crate) async fn failed_orders_roll_back(svc: &TestService) {
    let apples = svc.stock("acme", "sku-apple").await;
    let rows = svc.rows("acme").await;

    // The first line reserves 2 apples and writes an order line before the second fails.
    let (status, body) = svc
        .post_order(
            "token-acme",
            order("rb-stock", &[("sku-apple", 2), ("sku-limited", 6)]),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("insufficient stock"),
        "{body}"
    );
    assert!(body["request_id"].is_string());
    assert_eq!(
        svc.stock("acme", "sku-apple").await,
        apples,
        "apples restored"
    );
    assert_eq!(svc.stock("acme", "sku-limited").await, 5);
    assert_eq!(svc.rows("acme").await, rows, "no order rows");

    let (status, body) = svc
        .post_order(
            "token-acme",
            order("rb-unknown", &[("sku-apple", 1), ("sku-nope", 1)]),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown product"),
        "{body}"
    );
    assert_eq!(svc.stock("acme", "sku-apple").await, apples);
    assert_eq!(svc.rows("acme").await, rows);

    // The stub declines references starting with "decline": the order was recorded and its
    // stock reserved before the call; the decline cancels it and puts the stock back.
    let (status, body) = svc
        .post_order("token-acme", order("decline-1", &[("sku-apple", 3)]))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(
        svc.stock("acme", "sku-apple").await,
        apples,
        "stock released"
    );
    let rows = (rows.0 + 1, rows.1 + 1);
    assert_eq!(svc.rows("acme").await, rows, "the cancelled order is kept");
    let (status, cancelled) = svc
        .post_order("token-acme", order("decline-1", &[("sku-apple", 3)]))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a retry sees the decision: {cancelled}"
    );
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(svc.service.payment_stub.charges(), 0, "nothing was charged");

    // The limited edition sells out, exactly.
    let (status, body) = svc
        .post_order("token-acme", order("rb-all-five", &[("sku-limited", 5)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = svc
        .post_order("token-acme", order("rb-one-more", &[("sku-limited", 1)]))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(svc.stock("acme", "sku-limited").await, 0);
    assert_eq!(svc.rows("acme").await, (rows.0 + 1, rows.1 + 1));
}
