//! Tenant A never reads tenant B's orders, one request at a time and under concurrency.

use std::sync::Arc;

use order_service::{
    context::{TenantId, TENANT},
    db::{OrderRepository, RepoError},
};
use reqwest::StatusCode;
use tokio::task::JoinSet;

use crate::{order, start_sqlite, TestService};

const TOKENS: [(&str, &str); 3] = [
    ("token-acme", "acme"),
    ("token-globex", "globex"),
    ("token-initech", "initech"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_reads_only_its_own_orders() {
    let svc = start_sqlite().await;
    let (status, acme) = svc
        .post_order("token-acme", order("iso-acme-1", &[("sku-apple", 2)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{acme}");
    let id = acme["id"].to_string();

    let (status, own) = svc.get_order("token-acme", &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(own["reference"], "iso-acme-1");
    assert_eq!(own["items"][0]["sku"], "sku-apple");

    let (status, other) = svc.get_order("token-globex", &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{other}");
    assert!(other["error"].is_string());

    // Stock is per tenant too: acme's order did not touch globex's apples.
    assert_eq!(svc.stock("acme", "sku-apple").await, 1_000_000 - 2);
    assert_eq!(svc.stock("globex", "sku-apple").await, 1_000_000);
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_refuses_to_run_without_a_tenant() {
    let svc = start_sqlite().await;
    let orders = OrderRepository::new(&svc.service.state.db);
    assert!(matches!(orders.find(1).await, Err(RepoError::NoTenant)));
    assert!(matches!(orders.insert("x").await, Err(RepoError::NoTenant)));
    let as_acme = TENANT.scope(TenantId::new("acme"), orders.find(1)).await;
    assert!(matches!(as_acme, Ok(None)));
    svc.service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_holds_under_concurrency() {
    let svc = start_sqlite().await;
    isolation_under_concurrency(svc).await;
}

/// 60 concurrent creates (3 tenants), then every tenant reads every order concurrently with
/// 30 more creates: each read of its own order sees its reference, each read of another
/// tenant's order is a 404.
pub(crate) async fn isolation_under_concurrency(svc: TestService) {
    let svc = Arc::new(svc);
    let mut creates = JoinSet::new();
    for i in 0..60 {
        let svc = svc.clone();
        let (token, tenant) = TOKENS[i % 3];
        creates.spawn(async move {
            let reference = format!("iso-{tenant}-{i}");
            let (status, body) = svc
                .post_order(token, order(&reference, &[("sku-pear", 1)]))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            (tenant, body["id"].as_i64().expect("id"), reference)
        });
    }
    let mut created = Vec::new();
    while let Some(done) = creates.join_next().await {
        created.push(done.expect("create task"));
    }
    assert_eq!(created.len(), 60);

    let mut reads = JoinSet::new();
    for (i, (owner, id, reference)) in created.iter().cloned().enumerate() {
        for (token, reader) in TOKENS {
            let svc = svc.clone();
            let reference = reference.clone();
            reads.spawn(async move {
                let (status, body) = svc.get_order(token, &id.to_string()).await;
                if reader == owner {
                    assert_eq!(status, StatusCode::OK, "{reader} reads its own order {id}");
                    assert_eq!(body["reference"], reference.as_str());
                } else {
                    assert_eq!(
                        status,
                        StatusCode::NOT_FOUND,
                        "{reader} must not read {owner}'s order {id}: {body}"
                    );
                }
            });
        }
        if i % 2 == 0 {
            // Writes interleaved with the reads.
            let svc = svc.clone();
            let (token, _) = TOKENS[i % 3];
            reads.spawn(async move {
                let (status, body) = svc
                    .post_order(token, order(&format!("iso-late-{i}"), &[("sku-apple", 1)]))
                    .await;
                assert_eq!(status, StatusCode::CREATED, "{body}");
            });
        }
    }
    while let Some(done) = reads.join_next().await {
        done.expect("read task");
    }
    for (_, tenant) in TOKENS {
        // 20 orders of one pear each, plus 10 late ones of one apple each, one line apiece.
        assert_eq!(svc.rows(tenant).await, (30, 30), "{tenant}");
        assert_eq!(svc.stock(tenant, "sku-pear").await, 1_000_000 - 20);
    }
    match Arc::try_unwrap(svc) {
        Ok(svc) => svc.service.shutdown().await.expect("clean shutdown"),
        Err(_) => unreachable!("every task has finished"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_baggage_never_set_the_tenant() {
    let svc = start_sqlite().await;
    let response = svc
        .client
        .post(format!("{}/orders", svc.base))
        .header("authorization", "Bearer token-acme")
        .header("x-tenant", "globex")
        .header("baggage", "tenant=globex")
        .json(&order("hdr-1", &[("sku-apple", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        svc.rows("acme").await,
        (1, 1),
        "stored for the token's tenant"
    );
    assert_eq!(svc.rows("globex").await, (0, 0));
    svc.service.shutdown().await.expect("clean shutdown");
}
