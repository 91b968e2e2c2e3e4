//! The isolation and rollback scenarios on PostgreSQL, in a schema of their own.
//!
//! Needs `CONTEXTFLOW_PG_URL` (CI sets it). Without it the tests print why they skip, unless
//! `CONTEXTFLOW_REQUIRE_SERVICES=1`, where a missing service is a failure.

use sqlx::Connection as _;

use crate::{
    rollback::failed_orders_roll_back, start_url, tenant_isolation::isolation_under_concurrency,
};

/// The URL of a fresh schema (dropped by the returned guard's `drop_schema`), or `None` to skip.
async fn fresh_schema(test: &str) -> Option<(String, String, String)> {
    let Ok(base) = std::env::var("CONTEXTFLOW_PG_URL") else {
        assert!(
            std::env::var("CONTEXTFLOW_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "CONTEXTFLOW_PG_URL is not set but CONTEXTFLOW_REQUIRE_SERVICES=1"
        );
        eprintln!("skipping {test}: CONTEXTFLOW_PG_URL is not set");
        return None;
    };
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
    Some((base, schema, url))
}

async fn drop_schema(base: &str, schema: &str) {
    let mut conn = sqlx::PgConnection::connect(base).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_isolation_under_concurrency() {
    let Some((base, schema, url)) = fresh_schema("postgres_isolation_under_concurrency").await
    else {
        return;
    };
    let svc = start_url(&url).await;
    assert_eq!(
        svc.service.state.db.backend(),
        order_service::db::Backend::Postgres
    );
    isolation_under_concurrency(svc).await;
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_orders_write_nothing() {
    let Some((base, schema, url)) = fresh_schema("postgres_failed_orders_write_nothing").await
    else {
        return;
    };
    let svc = start_url(&url).await;
    failed_orders_roll_back(&svc).await;
    svc.service.shutdown().await;
    drop_schema(&base, &schema).await;
}
