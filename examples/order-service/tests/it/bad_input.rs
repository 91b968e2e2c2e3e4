//! Bad input gets a clear 4xx JSON error with the request id, and writes nothing.

use reqwest::StatusCode;
use serde_json::Value;

use crate::{order, start_sqlite};

/// `body` is the JSON error the README promises: `status` is `want`, `error` a string that
/// mentions `contains` (never empty), `request_id` a non-empty string.
pub(crate) fn assert_error(status: StatusCode, body: &Value, want: StatusCode, contains: &str) {
    assert!(!contains.is_empty(), "name what the error must say");
    assert_eq!(status, want, "{body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {body}"));
    assert!(
        error.contains(contains),
        "{error:?} should mention {contains:?}"
    );
    assert!(
        body["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_write_nothing() {
    let svc = start_sqlite().await;
    bad_requests_get_json_errors(&svc).await;
    svc.service.shutdown().await.expect("clean shutdown");
}

/// The bad requests of [`bad_requests_get_json_errors_and_write_nothing`], on `svc`'s database
/// (PostgreSQL refuses some text that SQLite stores: a NUL byte in a SKU must still be a 422).
pub(crate) async fn bad_requests_get_json_errors(svc: &crate::TestService) {
    let json = Some("application/json");
    let valid = order("bad-0", &[("sku-apple", 1)]).to_string();

    let (status, body) = svc.post_raw(None, json, &valid).await;
    assert_error(
        status,
        &body,
        StatusCode::UNAUTHORIZED,
        "missing bearer token",
    );
    let (status, body) = svc.post_raw(Some("token-nobody"), json, &valid).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unknown token");

    let (status, body) = svc
        .post_raw(Some("token-acme"), json, "{\"reference\":")
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "parse the request body as JSON",
    );
    let (status, body) = svc.post_raw(Some("token-acme"), None, &valid).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
    );
    let (status, body) = svc
        .post_raw(Some("token-acme"), json, r#"{"reference": 5, "items": []}"#)
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid type",
    );
    let (status, body) = svc
        .post_raw(
            Some("token-acme"),
            json,
            r#"{"reference": "r", "items": [], "tenant": "globex"}"#,
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown field",
    );

    for (body, reason) in [
        (order("bad-1", &[]), "items"),
        (order("bad-2", &[("sku-apple", 0)]), "quantity"),
        (order("has spaces", &[("sku-apple", 1)]), "reference"),
        (order("bad-3", &[("sku-apple\u{0}", 1)]), "sku"),
        (order("bad-4", &[("sku apple", 1)]), "sku"),
        (order("bad-5", &[(&"s".repeat(65), 1)]), "sku"),
    ] {
        let (status, answer) = svc.post_order("token-acme", body).await;
        assert_error(status, &answer, StatusCode::UNPROCESSABLE_ENTITY, reason);
    }

    let (status, body) = svc.get_order("token-acme", "abc").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "abc");
    let (status, body) = svc.get_order("token-acme", "999").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "no order");

    assert_eq!(svc.rows("acme").await, (0, 0), "nothing written");
    assert_eq!(svc.stock("acme", "sku-apple").await, 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_header_must_be_bearer() {
    let svc = start_sqlite().await;
    let response = svc
        .client
        .get(format!("{}/orders/1", svc.base))
        .header("authorization", "Basic dG9rZW4tYWNtZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "malformed authorization header");
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_echoed_or_replaced_when_malformed() {
    let svc = start_sqlite().await;
    let unauthenticated = |id: &'static str| {
        svc.client
            .get(format!("{}/orders/1", svc.base))
            .header("x-request-id", id)
            .send()
    };
    let response = unauthenticated("client-id-7").await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-id-7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["request_id"], "client-id-7");

    let response = unauthenticated("not valid; id").await.unwrap();
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(echoed, "not valid; id");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["request_id"],
        echoed.as_str(),
        "a fresh id, used consistently"
    );

    let response = svc
        .client
        .get(format!("{}/nope", svc.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "no such route");
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_has_a_json_body() {
    let svc = start_sqlite().await;
    let url = |path: &str| format!("{}{path}", svc.base);
    for (method, path) in [
        (reqwest::Method::PUT, "/orders"),
        (reqwest::Method::DELETE, "/orders/1"),
        (reqwest::Method::PATCH, "/orders/1"),
    ] {
        let response = svc
            .client
            .request(method.clone(), url(path))
            .header("authorization", "Bearer token-acme")
            .send()
            .await
            .unwrap();
        let (status, body) = crate::json_answer(response).await;
        assert_error(
            status,
            &body,
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        );
    }
    let response = svc.client.get(url("/nope")).send().await.unwrap();
    let (status, body) = crate::json_answer(response).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "no such route");
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_is_case_insensitive_and_a_repeated_header_is_refused() {
    let svc = start_sqlite().await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = svc
            .client
            .post(format!("{}/orders", svc.base))
            .header("authorization", format!("{scheme} token-acme"))
            .json(&order(&format!("case-{scheme}"), &[("sku-apple", 1)]))
            .send()
            .await
            .unwrap();
        let (status, body) = crate::json_answer(response).await;
        assert_eq!(status, StatusCode::CREATED, "{scheme}: {body}");
    }
    let response = svc
        .client
        .get(format!("{}/orders/1", svc.base))
        .header("authorization", "Bearer token-globex")
        .header("authorization", "Bearer token-acme")
        .send()
        .await
        .unwrap();
    let (status, body) = crate::json_answer(response).await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "more than one authorization header",
    );
    svc.service.shutdown().await.expect("clean shutdown");
}
