//! A request dropped half-way (the client went away, a timeout fired) commits nothing: the
//! transaction the service was running in rolls back when its future is dropped.

use std::net::SocketAddr;

use axum::{routing::post, Router};
use order_service::{
    context::{TenantId, TENANT},
    db::{Db, InventoryRepository, OrderRepository},
    payment::PaymentClient,
    service::{NewOrder, NewOrderItem, OrderService},
};
use tokio::sync::mpsc;

/// A payment provider that reports each call on `calls`, then never answers.
async fn hanging_provider(calls: mpsc::UnboundedSender<()>) -> SocketAddr {
    let router = Router::new().route(
        "/payments",
        post(move || {
            let calls = calls.clone();
            async move {
                let _ = calls.send(());
                std::future::pending::<()>().await;
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_request_rolls_back_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Db::connect(&order_service::app::sqlite_url(&dir.path().join("c.db")))
        .await
        .expect("db");
    let acme = TenantId::new("acme");
    let inventory = InventoryRepository::new(&db);
    let orders = OrderRepository::new(&db);
    TENANT
        .scope(acme.clone(), inventory.seed("sku-apple", "Apple", 100, 120))
        .await
        .expect("seed");

    let (calls, mut called) = mpsc::unbounded_channel();
    let provider = hanging_provider(calls).await;
    let service = OrderService::new(&db, PaymentClient::new(&format!("http://{provider}")));
    let order = NewOrder {
        reference: "cancel-1".into(),
        items: vec![NewOrderItem {
            sku: "sku-apple".into(),
            quantity: 7,
        }],
    };

    // The whole request, as the controller runs it: tenant, transaction, service.
    let mut request = {
        let (db, service, order, acme) = (db.clone(), service.clone(), order.clone(), acme.clone());
        tokio::spawn(TENANT.scope(acme, async move {
            db.transaction(|| service.place_order(&order)).await
        }))
    };
    // The order row, the line and the stock reservation are written; the payment hangs.
    tokio::select! {
        call = called.recv() => call.expect("the provider is alive"),
        done = &mut request => panic!("the request ended before the payment call: {done:?}"),
    }
    request.abort();
    assert!(request.await.expect_err("aborted").is_cancelled());

    let stock = TENANT
        .scope(acme.clone(), inventory.find("sku-apple"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stock.stock, 100, "reservation rolled back");
    let rows = TENANT
        .scope(acme.clone(), orders.count_rows())
        .await
        .unwrap();
    assert_eq!(rows, (0, 0), "no order rows");
}
