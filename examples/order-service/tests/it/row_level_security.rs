//! PostgreSQL row-level security through the service's real pool set-up (issue 9): a query
//! that forgets its `WHERE tenant_id = ..` still sees and changes only the context's tenant's
//! rows, runs nowhere without a tenant, cannot write another tenant's rows; and the service
//! refuses to serve through a role that could bypass the policies.
//!
//! Needs `CONTEXTFLOW_PG_URL` (a superuser); each test has a schema (and so roles) of its own.

use order_service::{
    app::{self, Config},
    context::{TenantId, TENANT},
    db::postgres::TENANT_TABLES,
};
use reqwest::StatusCode;
use sqlx::{Any, Row as _};

use crate::{
    order,
    postgres::{drop_schema, fresh_schema},
    start_url, TestService,
};

/// `SELECT DISTINCT tenant_id FROM <table>` with no `WHERE`, through the tenant pool, as
/// `tenant`.
async fn tenants_seen(svc: &TestService, tenant: &str, table: &str) -> Vec<String> {
    let pool = svc.service.state.db.pool();
    let sql = format!("SELECT DISTINCT tenant_id FROM {table} ORDER BY tenant_id");
    TENANT
        .scope(TenantId::new(tenant), async {
            pool.fetch_all(sqlx::query::<Any>(&sql)).await
        })
        .await
        .expect("query as a tenant")
        .iter()
        .map(|row| row.try_get::<String, _>(0).expect("tenant_id"))
        .collect()
}

async fn query_without_where_sees_only_its_tenant() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    for (token, reference) in [("token-acme", "rls-a"), ("token-globex", "rls-g")] {
        let (status, body) = svc
            .post_order(
                token,
                order(reference, &[("sku-apple", 1), ("sku-pear", 2)]),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    svc.service.state.outbox.wait_delivered().await;
    let db = &svc.service.state.db;

    // The foreign rows are there: the admin pool (the tables' owner) sees every tenant.
    for table in TENANT_TABLES {
        let sql = format!("SELECT count(DISTINCT tenant_id) FROM {table}");
        let tenants: i64 = sqlx::query_scalar::<Any, i64>(&sql)
            .fetch_one(db.admin())
            .await
            .expect("admin count");
        let want = if table == "inventory" { 3 } else { 2 };
        assert_eq!(tenants, want, "{table}: rows of {want} tenants exist");
    }
    // The tenant pool, with no WHERE: only the context's tenant, in every table.
    for table in TENANT_TABLES {
        assert_eq!(tenants_seen(&svc, "acme", table).await, ["acme"], "{table}");
        assert_eq!(
            tenants_seen(&svc, "globex", table).await,
            ["globex"],
            "{table}"
        );
        // initech placed no order: its own inventory only, nothing elsewhere.
        let initech: &[&str] = if table == "inventory" {
            &["initech"]
        } else {
            &[]
        };
        assert_eq!(
            tenants_seen(&svc, "initech", table).await,
            initech,
            "{table}"
        );
    }
    let roles = db.roles().expect("roles on PostgreSQL").clone();
    TENANT
        .scope(TenantId::new("acme"), async {
            let pool = db.pool();
            // It serves as the application role, not the superuser of the URL.
            let user: String = sqlx::query_scalar::<Any, String>("SELECT current_user::text")
                .fetch_one(pool)
                .await
                .expect("current_user");
            assert_eq!(user, roles.app);
            // An UPDATE with no WHERE changes the tenant's three products, not all nine.
            let done = pool
                .execute(sqlx::query::<Any>("UPDATE inventory SET stock = stock"))
                .await
                .expect("update");
            assert_eq!(done.rows_affected(), 3);
            // Writing another tenant's row fails the policy's WITH CHECK.
            let foreign = pool
                .execute(sqlx::query::<Any>(
                    "INSERT INTO inventory (tenant_id, sku, name, stock, price_cents)
                     VALUES ('globex', 'sku-planted', 'x', 1, 1)",
                ))
                .await
                .expect_err("a row of another tenant is refused");
            assert!(
                foreign.to_string().contains("row-level security"),
                "{foreign}"
            );
        })
        .await;
    // No tenant in the context: nothing runs.
    let Err(err) = db
        .pool()
        .fetch_all(sqlx::query::<Any>("SELECT id FROM orders"))
        .await
    else {
        panic!("a statement ran without a tenant");
    };
    assert!(err.to_string().contains("tenant"), "{err}");

    svc.service.shutdown().await.expect("clean shutdown");
    drop_schema(&base, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn query_without_where_sees_only_its_tenant_multi_thread() {
    query_without_where_sees_only_its_tenant().await;
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn query_without_where_sees_only_its_tenant_current_thread() {
    query_without_where_sees_only_its_tenant().await;
}

/// The service made its application role; someone then gave it a way past the policies: the
/// next start refuses to serve (the set-up never changes an existing role's attributes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn refuses_to_serve_through_a_role_that_bypasses_rls() {
    let (base, schema, url) = fresh_schema().await;
    let svc = start_url(&url).await;
    let app_role = svc.service.state.db.roles().expect("roles").app.clone();
    svc.service.shutdown().await.expect("clean shutdown");

    for (grant, revoke, refusal) in [
        ("BYPASSRLS", "NOBYPASSRLS", "BYPASSRLS"),
        ("SUPERUSER", "NOSUPERUSER", "superuser"),
    ] {
        let alter = |attribute: &str| format!("ALTER ROLE \"{app_role}\" {attribute}");
        superuser_execute(&base, &alter(grant)).await;
        let err = app::start(Config::local(&url))
            .await
            .expect_err("refuses to serve");
        assert!(
            err.to_string().contains("refusing to serve") && err.to_string().contains(refusal),
            "{grant}: {err}"
        );
        superuser_execute(&base, &alter(revoke)).await;
    }
    // Put right, it serves again.
    let again = start_url(&url).await;
    again.service.shutdown().await.expect("clean shutdown");
    drop_schema(&base, &schema).await;
}

async fn superuser_execute(url: &str, sql: &str) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query(sql).execute(&mut conn).await.expect(sql);
}
