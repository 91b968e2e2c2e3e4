//! Payment failures and crashes, step by step: whatever happens around the provider call, no
//! charge exists without an order, every order gets a decision, and every paid order is
//! confirmed exactly once, also across a restart of the service.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing, Json, Router,
};
use order_service::{
    app::{self, Config, RunningService},
    context::{TenantId, TENANT},
    db::{Order, OrderRepository, OutboxRepository},
    payment::{PaymentResponse, Stub, IDEMPOTENCY_KEY},
    service::payment_key,
};
use tokio::sync::mpsc;

use crate::{json_answer, order};

/// How the test provider answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Charges the key (once) and answers.
    Answer,
    /// `500` without charging.
    Fail,
    /// Charges, reports it, and never answers (the caller crashes before it learns).
    ChargeThenHang,
    /// `422` without charging: the provider refuses the request itself.
    Reject,
    /// `409` without charging: a request with the same key is still in progress.
    InProgress,
    /// Charges the key (once), then answers `500`: the charge's answer is lost.
    ChargeThenFail,
    /// Waits, then charges the key (once) and answers: a slow provider.
    AnswerAfter(Duration),
    /// `402`: declined.
    Decline,
}

/// A payment provider the test steers, charging through a [`Stub`] that outlives services.
#[derive(Clone)]
struct Provider {
    stub: Stub,
    mode: Arc<Mutex<Mode>>,
    charged: mpsc::UnboundedSender<String>,
}

impl Provider {
    async fn start(mode: Mode) -> (Provider, SocketAddr, mpsc::UnboundedReceiver<String>) {
        let (charged, reports) = mpsc::unbounded_channel();
        let provider = Provider {
            stub: Stub::new(),
            mode: Arc::new(Mutex::new(mode)),
            charged,
        };
        let router = Router::new()
            .route("/payments", routing::post(answer))
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (provider, addr, reports)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

async fn answer(State(p): State<Provider>, headers: HeaderMap) -> Response {
    let key = headers[IDEMPOTENCY_KEY].to_str().unwrap().to_owned();
    let mode = *p.mode.lock().unwrap();
    match mode {
        Mode::Answer => Json(PaymentResponse {
            payment_id: p.stub.charge(&key),
        })
        .into_response(),
        Mode::Fail => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Mode::Reject => StatusCode::UNPROCESSABLE_ENTITY.into_response(),
        Mode::ChargeThenFail => {
            p.stub.charge(&key);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Mode::InProgress => StatusCode::CONFLICT.into_response(),
        Mode::Decline => StatusCode::PAYMENT_REQUIRED.into_response(),
        Mode::AnswerAfter(delay) => {
            tokio::time::sleep(delay).await;
            Json(PaymentResponse {
                payment_id: p.stub.charge(&key),
            })
            .into_response()
        }
        Mode::ChargeThenHang => {
            p.stub.charge(&key);
            let _ = p.charged.send(key);
            std::future::pending().await
        }
    }
}

async fn start(url: &str, provider: &str, deliver_outbox: bool) -> RunningService {
    let mut config = Config::local(url);
    config.payment_url = Some(provider.to_owned());
    config.deliver_outbox = deliver_outbox;
    app::start(config).await.expect("service starts")
}

async fn post_order(service: &RunningService, reference: &str) -> (StatusCode, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/orders", service.addr))
        .header("authorization", "Bearer token-acme")
        .json(&order(reference, &[("sku-apple", 3)]))
        .send()
        .await
        .expect("send");
    json_answer(response).await
}

async fn as_acme<T>(fut: impl std::future::Future<Output = T>) -> T {
    TENANT.scope(TenantId::new("acme"), fut).await
}

/// Has the resolver decide every pending order now, whatever its age.
async fn resolve_now(service: &RunningService) {
    service
        .state
        .service
        .resolve_pending(Duration::ZERO)
        .await
        .unwrap();
}

async fn by_reference(service: &RunningService, reference: &str) -> Order {
    let orders = OrderRepository::new(&service.state.db);
    as_acme(orders.find_by_reference(reference))
        .await
        .unwrap()
        .expect("the order is recorded")
}

async fn apples(service: &RunningService) -> i64 {
    let inventory = order_service::db::InventoryRepository::new(&service.state.db);
    as_acme(inventory.find("sku-apple"))
        .await
        .unwrap()
        .unwrap()
        .stock
}

fn sqlite() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = app::sqlite_url(&dir.path().join("pay.db"));
    (dir, url)
}

/// Review finding: a request cut off by its deadline after its order was recorded took the
/// charge and the decision down with it: the client got a `503` while the provider charged,
/// and the order stayed pending until a resolver pass a minute later. Those steps now run to
/// their end in a task of their own: the order is paid without the resolver, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_still_decides_its_recorded_order() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::AnswerAfter(Duration::from_millis(600))).await;
    let mut config = Config::local(&url);
    config.payment_url = Some(format!("http://{addr}"));
    config.limits.request_timeout = Duration::from_millis(200);
    let service = app::start(config).await.expect("service starts");
    let (status, body) = post_order(&service, "late-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown"),
        "{body}"
    );
    // The resolver only looks at orders a minute old: a decision now is the request's own.
    let mut order = by_reference(&service, "late-1").await;
    for _ in 0..300 {
        if order.status != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        order = by_reference(&service, "late-1").await;
    }
    assert_eq!(order.status, "paid");
    assert_eq!(provider.stub.charges(), 1);
    service.shutdown().await.expect("clean shutdown");
}

/// The orders still being decided after their request was cut off: a graceful shutdown
/// waits for them (the order is paid when it completes), a crash stops them (the order stays
/// pending for the resolver), as a crash of the process would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_being_decided_are_finished_by_a_shutdown_and_dropped_by_a_crash() {
    for graceful in [true, false] {
        let (_dir, url) = sqlite();
        let (_provider, addr, _) =
            Provider::start(Mode::AnswerAfter(Duration::from_millis(500))).await;
        let mut config = Config::local(&url);
        config.payment_url = Some(format!("http://{addr}"));
        config.limits.request_timeout = Duration::from_millis(100);
        let service = app::start(config).await.expect("service starts");
        let (status, body) = post_order(&service, "cut-1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        if graceful {
            service.shutdown().await.expect("clean shutdown");
        } else {
            service.crash().await;
            // Longer than the provider's answer: a task left running would decide by now.
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        let db = order_service::db::Db::connect(&url).await.unwrap();
        let order = as_acme(OrderRepository::new(&db).find_by_reference("cut-1"))
            .await
            .unwrap()
            .expect("recorded");
        let want = if graceful { "paid" } else { "pending" };
        assert_eq!(order.status, want, "graceful: {graceful}");
        db.close().await;
    }
}

/// Two databases (a fresh one after a restore, a second instance) hand out the same order
/// ids; one provider keeps every idempotency key. Each order is charged for itself: a key made
/// of the order id got the second order the first one's payment, charging nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_of_two_databases_with_the_same_ids_are_charged_apart() {
    let (provider, addr, _) = Provider::start(Mode::Answer).await;
    let provider_url = format!("http://{addr}");
    let mut payments = Vec::new();
    for reference in ["first-db-1", "second-db-1"] {
        let (_dir, url) = sqlite();
        let service = start(&url, &provider_url, true).await;
        let (status, body) = post_order(&service, reference).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let order = by_reference(&service, reference).await;
        assert_eq!(order.status, "paid");
        payments.push((order.id, order.payment_id));
        service.shutdown().await.expect("clean shutdown");
    }
    assert_eq!(
        payments[0].0, payments[1].0,
        "the same order id in both databases"
    );
    assert_ne!(payments[0].1, payments[1].1, "one payment for two orders");
    assert_eq!(provider.stub.charges(), 2);
}

/// Review finding: the same tenant and reference in a second database (a restore, another
/// instance) is another order, for another amount; the stub answered the first order's
/// payment for its key, and the second order was marked paid with nothing charged. The stub
/// now refuses a key reused with another amount, as real providers do: the second order is
/// declined, never paid by the first one's charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_reused_in_another_database_is_not_paid_by_the_first_charge() {
    let stub = Stub::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider_url = format!("http://{}", listener.local_addr().unwrap());
    let router = stub.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut answers = Vec::new();
    for quantity in [1, 2] {
        let (_dir, url) = sqlite();
        let service = start(&url, &provider_url, true).await;
        let response = reqwest::Client::new()
            .post(format!("http://{}/orders", service.addr))
            .header("authorization", "Bearer token-acme")
            .json(&order("shared-1", &[("sku-apple", quantity)]))
            .send()
            .await
            .expect("send");
        let (status, body) = json_answer(response).await;
        let order = by_reference(&service, "shared-1").await;
        answers.push((status, body, order));
        service.shutdown().await.expect("clean shutdown");
    }
    assert_eq!(answers[0].0, StatusCode::CREATED, "{}", answers[0].1);
    assert_eq!(answers[0].2.status, "paid");
    assert_eq!(
        answers[1].0,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        answers[1].1
    );
    assert_eq!(answers[1].2.status, "cancelled");
    assert_eq!(answers[1].2.payment_id, None);
    assert_eq!(stub.charges(), 1);
}

/// An order left pending by an older build (no stored payment key: its charge was asked for
/// with `order-<id>`, and the answer was lost) is resolved with that key after the upgrade:
/// paid with the charge already made, never charged a second time under a new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_pending_from_an_older_build_is_resolved_with_its_old_key() {
    let (_dir, url) = sqlite();
    // The orders table as an older build made it (no `payment_key`), with one pending order.
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE orders (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant_id TEXT NOT NULL,
                reference TEXT NOT NULL,
                status TEXT NOT NULL,
                total_cents BIGINT NOT NULL,
                payment_id TEXT,
                confirmation_sent BIGINT NOT NULL DEFAULT 0,
                request_id TEXT,
                traceparent TEXT,
                created_ms BIGINT NOT NULL DEFAULT 0
             );
             INSERT INTO orders (tenant_id, reference, status, total_cents, created_ms)
             VALUES ('acme', 'old-1', 'pending', 0, 0);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let (provider, addr, _) = Provider::start(Mode::Answer).await;
    let first_charge = provider.stub.charge("order-1");
    let service = start(&url, &format!("http://{addr}"), true).await;
    resolve_now(&service).await;
    service.state.outbox.wait_delivered().await;
    let order = by_reference(&service, "old-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(order.payment_id.as_deref(), Some(first_charge.as_str()));
    assert_eq!(
        provider.stub.charges(),
        1,
        "charged a second time under a new key"
    );
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_refusing_connections_leaves_the_order_pending_until_a_restart_decides_it() {
    let (_dir, url) = sqlite();
    // A port nobody listens on: connections are refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let first = start(&url, &refused, true).await;
    let stock = apples(&first).await;
    let (status, body) = post_order(&first, "down-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("is pending"),
        "{body}"
    );
    let pending = by_reference(&first, "down-1").await;
    assert_eq!(pending.status, "pending");
    assert_eq!(
        apples(&first).await,
        stock - 3,
        "stock stays reserved while undecided"
    );
    first.shutdown().await.expect("clean shutdown");

    // The provider is back; after a restart the resolver decides the order.
    let (provider, addr, _) = Provider::start(Mode::Answer).await;
    let second = start(&url, &format!("http://{addr}"), true).await;
    resolve_now(&second).await;
    second.state.outbox.wait_delivered().await;
    let order = by_reference(&second, "down-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(provider.stub.charges(), 1);
    assert_eq!(
        order.payment_id,
        provider.stub.payment(&payment_key("acme", "down-1"))
    );
    assert_eq!(order.confirmation_sent, 1);
    second.shutdown().await.expect("clean shutdown");
}

/// A provider slower than the resolver's budget still gets its orders decided: the budget
/// stops the pass from asking about more orders, it never cuts off a call (which left every
/// order pending for as long as the provider stayed that slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_slower_than_the_resolver_budget_still_gets_its_orders_decided() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::Fail).await;
    let mut config = Config::local(&url);
    config.payment_url = Some(format!("http://{addr}"));
    config.resolve_after = Duration::ZERO;
    config.resolve_budget = Duration::from_millis(20);
    let service = app::start(config).await.expect("service starts");
    let (status, body) = post_order(&service, "slow-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    provider.set(Mode::AnswerAfter(Duration::from_millis(300)));
    // The worker's passes back off while the provider fails (0.5 s, doubling): a few seconds.
    let waited = tokio::time::Instant::now();
    while by_reference(&service, "slow-1").await.status == "pending" {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the worker's resolver never decided the order"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.state.outbox.wait_delivered().await;
    let order = by_reference(&service, "slow-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(order.confirmation_sent, 1);
    assert_eq!(provider.stub.charges(), 1);
    service.shutdown().await.expect("clean shutdown");
}

/// The resolver (of another instance, or one whose `resolve_after` is shorter than a request)
/// declines an order while its request still waits for the provider, which then charges it:
/// the order stays cancelled, and the request answers `409` saying the charge will be voided,
/// not `201` with a cancelled order, nor `402`, which would invite paying again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_while_its_request_waits_is_answered_409() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::AnswerAfter(Duration::from_secs(2))).await;
    let service = start(&url, &format!("http://{addr}"), false).await;
    let stock = apples(&service).await;
    let request = tokio::spawn({
        let addr = service.addr;
        async move {
            let response = reqwest::Client::new()
                .post(format!("http://{addr}/orders"))
                .header("authorization", "Bearer token-acme")
                .json(&order("raced-1", &[("sku-apple", 3)]))
                .send()
                .await
                .expect("send");
            json_answer(response).await
        }
    });
    let orders = OrderRepository::new(&service.state.db);
    while as_acme(orders.find_by_reference("raced-1"))
        .await
        .unwrap()
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    provider.set(Mode::Decline);
    resolve_now(&service).await;
    assert_eq!(by_reference(&service, "raced-1").await.status, "cancelled");
    let (status, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = body["error"].as_str().expect("a JSON error");
    assert!(message.contains("will be voided"), "{message}");
    assert_eq!(provider.stub.charges(), 1, "the request's call charged it");
    assert_eq!(by_reference(&service, "raced-1").await.status, "cancelled");
    assert_eq!(apples(&service).await, stock, "the stock is released once");
    service.shutdown().await.expect("clean shutdown");
}

/// A pass past its budget asks about no more orders and says so; the next pass asks about
/// the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_pass_past_its_budget_leaves_the_rest_to_the_next() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::Fail).await;
    let service = start(&url, &format!("http://{addr}"), false).await;
    for reference in ["budget-1", "budget-2"] {
        let (status, body) = post_order(&service, reference).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    provider.set(Mode::AnswerAfter(Duration::from_millis(50)));
    let resolver = &service.state.service;
    let first = resolver
        .resolve_pending_within(Duration::ZERO, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!((first.decided, first.undecided, first.left), (1, 0, true));
    let second = resolver
        .resolve_pending_within(Duration::ZERO, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!((second.decided, second.undecided), (1, 0), "{second:?}");
    for reference in ["budget-1", "budget-2"] {
        assert_eq!(by_reference(&service, reference).await.status, "paid");
    }
    assert_eq!(provider.stub.charges(), 2);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answering_5xx_leaves_the_order_pending_then_the_resolver_pays_it_once() {
    let (_dir, url) = sqlite();
    resolver_pays_once(&url).await;
}

/// On PostgreSQL the resolver reads its work list through the admin pool and decides each
/// order as its tenant through the tenant pool (row-level security): the order is found,
/// paid once, confirmed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_postgres),
    ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL"
)]
async fn postgres_provider_answering_5xx_then_the_resolver_pays_it_once() {
    let (base, schema, url) = crate::postgres::fresh_schema().await;
    resolver_pays_once(&url).await;
    crate::postgres::drop_schema(&base, &schema).await;
}

async fn resolver_pays_once(url: &str) {
    let (provider, addr, _) = Provider::start(Mode::Fail).await;
    let service = start(url, &format!("http://{addr}"), true).await;
    let (status, body) = post_order(&service, "fail-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(by_reference(&service, "fail-1").await.status, "pending");
    assert_eq!(provider.stub.charges(), 0, "no charge was made");

    // A retry of the same reference returns the order as it stands.
    let (status, body) = post_order(&service, "fail-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending");

    provider.set(Mode::Answer);
    resolve_now(&service).await;
    // Resolving again changes nothing: the order is decided.
    resolve_now(&service).await;
    service.state.outbox.wait_delivered().await;
    let order = by_reference(&service, "fail-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(provider.stub.charges(), 1);
    assert_eq!(order.confirmation_sent, 1);
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_charge_and_decision_is_paid_after_restart_without_a_second_charge() {
    let (_dir, url) = sqlite();
    let (provider, addr, mut charged) = Provider::start(Mode::ChargeThenHang).await;
    let provider_url = format!("http://{addr}");
    let first = start(&url, &provider_url, true).await;
    let stock = apples(&first).await;
    let base = format!("http://{}", first.addr);
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/orders"))
            .header("authorization", "Bearer token-acme")
            .json(&order("crash-1", &[("sku-apple", 3)]))
            .send()
            .await
    });
    let key = charged.recv().await.expect("the provider charged");
    // The service dies after the charge, before it could record the decision.
    first.crash().await;
    assert!(
        request.await.unwrap().is_err(),
        "the client never got an answer"
    );
    assert_eq!(provider.stub.charges(), 1);

    provider.set(Mode::Answer);
    let second = start(&url, &provider_url, true).await;
    let pending = by_reference(&second, "crash-1").await;
    assert_eq!(pending.status, "pending", "the crash left it undecided");
    assert_eq!(payment_key("acme", "crash-1"), key);
    resolve_now(&second).await;
    second.state.outbox.wait_delivered().await;
    let order = by_reference(&second, "crash-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(
        provider.stub.charges(),
        1,
        "asking again with the key did not charge again"
    );
    assert_eq!(order.payment_id, provider.stub.payment(&key));
    assert_eq!(order.confirmation_sent, 1);
    assert_eq!(apples(&second).await, stock - 3);
    second.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_commit_and_delivery_confirms_exactly_once() {
    // The outbox rows commit with the payment's decision, so once that transaction is done
    // nothing depends on the request any more: dropping it, or the whole process, changes
    // nothing. Here the first service never delivers, and crashes.
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::Answer).await;
    let provider_url = format!("http://{addr}");
    let first = start(&url, &provider_url, false).await;
    let (status, body) = post_order(&first, "restart-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let outbox = OutboxRepository::new(&first.state.db);
    assert_eq!(
        outbox.backlog().await.unwrap(),
        2,
        "confirmation and event wait in the outbox"
    );
    assert_eq!(by_reference(&first, "restart-1").await.confirmation_sent, 0);
    first.crash().await;

    let second = start(&url, &provider_url, true).await;
    second.state.outbox.wait_delivered().await;
    second.state.queue.wait_idle().await;
    let outbox = OutboxRepository::new(&second.state.db);
    assert_eq!(outbox.backlog().await.unwrap(), 0);
    assert_eq!(
        by_reference(&second, "restart-1").await.confirmation_sent,
        1
    );
    // Delivering again finds nothing to do.
    second.state.outbox.wait_delivered().await;
    assert_eq!(
        by_reference(&second, "restart-1").await.confirmation_sent,
        1
    );
    assert_eq!(provider.stub.charges(), 1);
    second.shutdown().await.expect("clean shutdown");
}

/// A row that can never be delivered (its payload does not parse, as after a bad hand edit or
/// a version skew) is set aside (`delivered = 2`) with an error line; the rows behind it are
/// delivered, instead of every batch failing on it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_outbox_row_is_set_aside_not_blocking() {
    let (_dir, url) = sqlite();
    let (_provider, addr, _) = Provider::start(Mode::Answer).await;
    let provider_url = format!("http://{addr}");
    let first = start(&url, &provider_url, false).await;
    let (status, body) = post_order(&first, "poison-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    first
        .state
        .db
        .admin()
        .execute(sqlx::query(
            "UPDATE outbox SET payload = 'not json' WHERE topic = 'order.confirmed'",
        ))
        .await
        .unwrap();
    let (status, body) = post_order(&first, "after-1").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    first.crash().await;

    let second = start(&url, &provider_url, true).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        second.state.outbox.wait_delivered(),
    )
    .await
    .expect("the outbox drains past the bad row");
    second.state.queue.wait_idle().await;
    let outbox = OutboxRepository::new(&second.state.db);
    assert_eq!(outbox.backlog().await.unwrap(), 0);
    for reference in ["poison-1", "after-1"] {
        assert_eq!(
            by_reference(&second, reference).await.confirmation_sent,
            1,
            "{reference}"
        );
    }
    let aside: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE delivered = 2")
        .fetch_one(second.state.db.admin())
        .await
        .unwrap();
    assert_eq!(aside, 1, "the bad row kept for an operator");
    second.shutdown().await.expect("clean shutdown");
}

/// Two instances of the service on one database, both delivering the outbox while orders
/// arrive at both: each batch claim takes only rows nobody else claimed, so every order is
/// confirmed exactly once and nothing stays behind.
pub(crate) async fn two_instances_confirm_each_order_once(url: &str) {
    let (_provider, addr, _) = Provider::start(Mode::Answer).await;
    let provider_url = format!("http://{addr}");
    let first = start(url, &provider_url, true).await;
    let second = start(url, &provider_url, true).await;
    let references: Vec<String> = (0..100).map(|i| format!("both-{i}")).collect();
    let posts = references.iter().enumerate().map(|(i, reference)| {
        let service = if i % 2 == 0 { &first } else { &second };
        post_order(service, reference)
    });
    for (status, body) in futures_util::future::join_all(posts).await {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    for service in [&first, &second] {
        tokio::time::timeout(
            Duration::from_secs(30),
            service.state.outbox.wait_delivered(),
        )
        .await
        .expect("the outbox drains");
    }
    assert_eq!(
        OutboxRepository::new(&first.state.db)
            .backlog()
            .await
            .unwrap(),
        0
    );
    for reference in &references {
        assert_eq!(
            by_reference(&first, reference).await.confirmation_sent,
            1,
            "{reference} confirmed once"
        );
    }
    first.shutdown().await.expect("clean shutdown");
    second.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_sqlite_confirm_each_order_once() {
    let (_dir, url) = sqlite();
    two_instances_confirm_each_order_once(&url).await;
}

/// The confirmation counter counts every confirmation delivered, so the "confirmed exactly
/// once" checks can fail: two confirmations of one order in one outbox batch raise it by two
/// (an `IN` list raised it by one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirmation_counter_counts_each_confirmation() {
    let (_dir, url) = sqlite();
    let (_provider, addr, _) = Provider::start(Mode::Answer).await;
    let service = start(&url, &format!("http://{addr}"), true).await;
    for reference in ["count-a", "count-b"] {
        let (status, body) = post_order(&service, reference).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    service.state.outbox.wait_delivered().await;
    let (a, b) = (
        by_reference(&service, "count-a").await,
        by_reference(&service, "count-b").await,
    );
    assert_eq!((a.confirmation_sent, b.confirmation_sent), (1, 1));
    OrderRepository::new(&service.state.db)
        .mark_confirmed_batch(&[a.id, b.id, a.id])
        .await
        .unwrap();
    assert_eq!(by_reference(&service, "count-a").await.confirmation_sent, 3);
    assert_eq!(by_reference(&service, "count-b").await.confirmation_sent, 2);
    service.shutdown().await.expect("clean shutdown");
}

/// A provider that refuses the request itself (a `4xx` other than `402`, `408`, `429`) charged
/// nothing: the order is decided at once (cancelled, its stock released, `402`), not left
/// pending for a resolver that would ask again forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_refusing_the_request_cancels_the_order() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::Reject).await;
    let service = start(&url, &format!("http://{addr}"), true).await;
    let stock = apples(&service).await;
    let (status, body) = post_order(&service, "refused-1").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    let order = by_reference(&service, "refused-1").await;
    assert_eq!(order.status, "cancelled");
    assert_eq!(apples(&service).await, stock, "stock released");
    assert_eq!(provider.stub.charges(), 0);
    service.shutdown().await.expect("clean shutdown");
}

/// The resolver asks again for an order whose first charge's answer was lost; a provider that
/// then refuses the request (`422`, a `401` after a key rotation) says nothing about that
/// earlier charge: the order stays pending (never cancelled with its charge left behind), and
/// is paid, once, when the provider answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_while_resolving_leaves_a_charged_order_pending() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::ChargeThenFail).await;
    let service = start(&url, &format!("http://{addr}"), true).await;
    let stock = apples(&service).await;
    let (status, body) = post_order(&service, "lost-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(provider.stub.charges(), 1, "charged, answer lost");

    provider.set(Mode::Reject);
    resolve_now(&service).await;
    let order = by_reference(&service, "lost-1").await;
    assert_eq!(order.status, "pending", "a charged order was cancelled");
    assert!(apples(&service).await < stock, "stock still reserved");

    provider.set(Mode::Answer);
    resolve_now(&service).await;
    service.state.outbox.wait_delivered().await;
    let order = by_reference(&service, "lost-1").await;
    assert_eq!(order.status, "paid");
    assert_eq!(
        provider.stub.charges(),
        1,
        "the same charge, not a second one"
    );
    service.shutdown().await.expect("clean shutdown");
}

/// `409` (a request with the same idempotency key still in progress: another resolver, a
/// retry) is no decision, as its own answer may be a charge: the order stays pending for the
/// resolver, never cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answering_409_leaves_the_order_pending() {
    let (_dir, url) = sqlite();
    let (provider, addr, _) = Provider::start(Mode::InProgress).await;
    let service = start(&url, &format!("http://{addr}"), true).await;
    let stock = apples(&service).await;
    let (status, body) = post_order(&service, "busy-1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let order = by_reference(&service, "busy-1").await;
    assert_eq!(order.status, "pending");
    assert!(apples(&service).await < stock, "stock still reserved");
    assert_eq!(provider.stub.charges(), 0);
    service.shutdown().await.expect("clean shutdown");
}
