//! The order service through its HTTP API, on a fresh database per test.
//!
//! Log capture installs a global subscriber, so the demo's check lives in its own files
//! (`demo_check.rs`, `demo_check_json.rs`); nothing here installs one.

mod bad_input;
mod cancellation;
mod idempotency;
mod postgres;
mod rollback;
mod row_level_security;
mod tenant_isolation;

use order_service::{
    app::{self, Config, RunningService},
    context::{TenantId, TENANT},
    db::{InventoryRepository, OrderRepository},
};
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

/// A service on 127.0.0.1 with a client for it.
pub(crate) struct TestService {
    pub(crate) service: RunningService,
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    _dir: Option<TempDir>,
}

/// A service on a fresh SQLite file.
pub(crate) async fn start_sqlite() -> TestService {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = app::sqlite_url(&dir.path().join("orders.db"));
    let mut service = start_url(&url).await;
    service._dir = Some(dir);
    service
}

/// A service on the database at `url`.
pub(crate) async fn start_url(url: &str) -> TestService {
    let service = app::start(Config::local(url))
        .await
        .expect("service starts");
    TestService {
        base: format!("http://{}", service.addr),
        service,
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("client"),
        _dir: None,
    }
}

impl TestService {
    /// `POST /orders` with `body` (raw text) and optional token; the status and JSON answer.
    pub(crate) async fn post_raw(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(format!("{}/orders", self.base))
            .body(body.to_string());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("request");
        json_answer(response).await
    }

    /// `POST /orders` with a JSON body as `token`.
    pub(crate) async fn post_order(&self, token: &str, body: Value) -> (StatusCode, Value) {
        self.post_raw(Some(token), Some("application/json"), &body.to_string())
            .await
    }

    /// `GET /orders/{id}` as `token`.
    pub(crate) async fn get_order(&self, token: &str, id: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}/orders/{id}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("request");
        json_answer(response).await
    }

    /// Units of `sku` left for `tenant`.
    pub(crate) async fn stock(&self, tenant: &str, sku: &str) -> i64 {
        let inventory = InventoryRepository::new(&self.service.state.db);
        TENANT
            .scope(TenantId::new(tenant), inventory.find(sku))
            .await
            .expect("query")
            .expect("product")
            .stock
    }

    /// `(orders, order lines)` rows of `tenant`.
    pub(crate) async fn rows(&self, tenant: &str) -> (i64, i64) {
        let orders = OrderRepository::new(&self.service.state.db);
        TENANT
            .scope(TenantId::new(tenant), orders.count_rows())
            .await
            .expect("query")
    }
}

/// The status and JSON body of `response`; panics, showing the body, when it is not JSON with
/// a JSON content type: every answer of the service, errors included, is JSON.
pub(crate) async fn json_answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.expect("read the body");
    assert!(
        content_type.starts_with("application/json"),
        "{status}: content type {content_type:?}, body {body:?}"
    );
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {body:?}"));
    (status, value)
}

/// An order body.
pub(crate) fn order(reference: &str, items: &[(&str, i64)]) -> Value {
    serde_json::json!({
        "reference": reference,
        "items": items.iter().map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity})).collect::<Vec<_>>(),
    })
}

/// The SQLite file runs in WAL mode with `synchronous = FULL` (sqlx sets no journal mode of
/// its own; SQLite's default rollback journal writes, fsyncs and deletes a `-journal` file per
/// write transaction, which once cut the demo's throughput to a quarter; `NORMAL` may lose the
/// last commits to a power cut, an order whose charge was already asked for among them).
async fn sqlite_file_is_in_wal_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orders.db");
    let db = order_service::db::Db::connect(&app::sqlite_url(&path))
        .await
        .expect("connects");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(sync, 2, "FULL");
    db.pool()
        .transaction(|| async {
            db.pool()
                .execute(sqlx::query("CREATE TABLE wal_probe (v INTEGER)"))
                .await
        })
        .await
        .unwrap();
    assert!(dir.path().join("orders.db-wal").exists());
    assert!(!dir.path().join("orders.db-journal").exists());
    db.close().await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_file_is_in_wal_mode_current_thread() {
    sqlite_file_is_in_wal_mode().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_is_in_wal_mode_multi_thread() {
    sqlite_file_is_in_wal_mode().await;
}
