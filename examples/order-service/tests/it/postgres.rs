//! The isolation and rollback scenarios on PostgreSQL, in a schema of their own.
//!
//! Needs `CONTEXTFLOW_PG_URL` (CI sets it): without it the tests are reported as ignored, with
//! the reason; with `CONTEXTFLOW_REQUIRE_SERVICES=1` they run and a missing server fails them.

use contextflow_testenv::Service;
use sqlx::Connection as _;

use crate::{
    cancellation::two_instances_confirm_each_order_once, rollback::failed_orders_roll_back,
    start_url, tenant_isolation::isolation_under_concurrency,
};

/// `(server URL, schema, URL of the schema)` for a fresh schema; drop it with `drop_schema`.
pub(crate) async fn fresh_schema() -> (String, String, String) {
    let base = contextflow_testenv::url(Service::Postgres);
    let schema = format!("order_service_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options%5Bsearch_path%5D={schema}");
    (base, schema, url)
}

/// Drops the schema and the two roles the service made for it.
///
/// A service that is still running (its outbox worker and resolver poll the tables) can take a
/// lock that `DROP SCHEMA ... CASCADE` waits for while holding others: PostgreSQL then fails
/// one side with "deadlock detected". Such a failure is retried; any other one fails the test.
pub(crate) async fn drop_schema(base: &str, schema: &str) {
    let mut attempts = 0;
    loop {
        match order_service::db::postgres::drop_schema_and_roles(base, schema).await {
            Ok(()) => return,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("40P01") && attempts < 20 =>
            {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("drop schema and roles: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_isolation_under_concurrency() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    assert_eq!(
        svc.service.state.db.backend(),
        order_service::db::Backend::Postgres
    );
    isolation_under_concurrency(svc).await;
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_failed_orders_write_nothing() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    failed_orders_roll_back(&svc).await;
    svc.service.shutdown().await.expect("clean shutdown");
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_bad_requests_get_json_errors_and_write_nothing() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    crate::bad_input::bad_requests_get_json_errors(&svc).await;
    svc.service.shutdown().await.expect("clean shutdown");
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_retries_and_concurrent_duplicates_make_one_order() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    crate::idempotency::retry_returns_first(&svc).await;
    crate::idempotency::concurrent_duplicates(std::sync::Arc::new(svc)).await;
    drop_schema(&base, &schema).await;
}

/// Concurrent orders of the same products, their lines in either order: every one is placed.
/// Each order locks the stock rows it takes; locking them in one order (by sku) is what keeps
/// two orders from waiting for each other in a cycle, which PostgreSQL breaks by failing one
/// of them ("deadlock detected", a 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_concurrent_orders_of_the_same_products_never_deadlock() {
    let (base, schema, url) = fresh_schema().await;
    let svc = std::sync::Arc::new(start_url(&url).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..96 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let lines: &[(&str, i64)] = if i % 2 == 0 {
                &[("sku-apple", 1), ("sku-pear", 1)]
            } else {
                &[("sku-pear", 1), ("sku-apple", 1)]
            };
            svc.post_order("token-acme", crate::order(&format!("dl-{i}"), lines))
                .await
        });
    }
    while let Some(answer) = tasks.join_next().await {
        let (status, body) = answer.expect("task");
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    }
    assert_eq!(svc.stock("acme", "sku-apple").await, 1_000_000 - 96);
    assert_eq!(svc.stock("acme", "sku-pear").await, 1_000_000 - 96);
    let svc = std::sync::Arc::into_inner(svc).expect("every task is done");
    svc.service.shutdown().await.expect("clean shutdown");
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_two_instances_confirm_each_order_once() {
    let (base, schema, url) = fresh_schema().await;
    two_instances_confirm_each_order_once(&url).await;
    drop_schema(&base, &schema).await;
}
