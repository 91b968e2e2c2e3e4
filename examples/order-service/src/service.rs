//! The order service: business rules between the controllers and the repositories.
//!
//! [`OrderService::place_order`] runs in three steps, and the payment call is in none of the
//! transactions:
//!
//! 1. **reserve**: one transaction validates the inventory, takes the stock and records the
//!    order as `pending`, with the request's context (request id, trace). A reference the
//!    tenant used before violates a unique index: the first order is the answer (a retry);
//! 2. **charge**: the payment provider is called with the order's idempotency key, so asking
//!    again (a retry, the resolver after a crash) never charges twice;
//! 3. **decide**: one transaction marks the order `paid` and writes its outbox rows (the
//!    confirmation and the `order.confirmed` event), or, when declined, marks it `cancelled`
//!    and puts the stock back. When the provider cannot be reached, the order stays `pending`
//!    and the resolver ([`OrderService::resolve_pending`]) finishes it later, in the context
//!    of the request that placed it.
//!
//! Steps 2 and 3 run in a task of their own, with the request's context: a request cut off
//! after step 1 (its deadline, a client that went away) does not cut them off, so its order
//! is decided at once all the same.
//!
//! So no charge exists without an order (the order row commits before the call, and a charge
//! is keyed by it), and no order stays without a decision (the resolver decides every
//! `pending` order older than `Config::resolve_after`, 60 s, twice the request deadline).

use std::sync::{
    atomic::{AtomicI64, Ordering},
    Arc,
};

use serde::Deserialize;
use tracing::{debug, error, info, warn, Instrument as _};

/// The most pending orders one resolver pass asks the provider about.
pub const RESOLVE_BATCH: i64 = 100;

use crate::{
    context::{self, TenantId, TENANT},
    db::{
        Backend, Db, InventoryRepository, Order, OrderItem, OrderRepository, OutboxRepository,
        RepoError,
    },
    outbox::{OutboxSignal, CONFIRMATION},
    payment::{PaymentClient, PaymentError},
    queue::{OrderConfirmed, ORDER_CONFIRMED},
};

/// The most lines one order may have.
pub const MAX_ITEMS: usize = 20;
/// The most units of one product one line may order.
pub const MAX_QUANTITY: i64 = 1_000;

/// An order as a client submits it.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The client's own reference: 1 to 64 characters of `[A-Za-z0-9._:-]`, unique per tenant.
    pub reference: String,
    /// The lines: 1 to [`MAX_ITEMS`].
    pub items: Vec<NewOrderItem>,
}

/// One line of a [`NewOrder`].
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrderItem {
    /// The product code.
    pub sku: String,
    /// Units: 1 to [`MAX_QUANTITY`].
    pub quantity: i64,
}

/// What [`OrderService::place_order`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// A new order, paid.
    Created(Order),
    /// The tenant placed an order with this reference before: that order, as it stands.
    Existing(Order),
}

/// Why an order was not placed.
#[derive(Debug)]
pub enum ServiceError {
    /// The order itself is malformed (empty, too many lines, bad quantity, bad reference).
    Invalid(String),
    /// The tenant sells no such product.
    UnknownProduct(String),
    /// Not enough stock.
    InsufficientStock {
        /// The product.
        sku: String,
        /// Units asked for.
        requested: i64,
        /// Units left.
        available: i64,
    },
    /// The payment was declined: the order is cancelled and its stock released.
    Payment(PaymentError),
    /// The provider could not be reached: the order is recorded, `pending`, and will be
    /// decided by the resolver.
    PaymentPending {
        /// The pending order.
        order_id: i64,
        /// Why the provider did not answer.
        why: String,
    },
    /// The order was cancelled (by the resolver, after a decline) while its own call to the
    /// provider went on and charged it: the order stays cancelled, the charge must be voided
    /// by an operator (an `ERROR` line says so), and the client must not take it for a
    /// decline and pay again (`409`).
    CancelledAfterCharge {
        /// The cancelled order.
        order_id: i64,
    },
    /// The reference names an earlier order of the tenant whose lines differ from this
    /// request's: not a retry of it, and not placed (`422`).
    ReferenceReused {
        /// The reference.
        reference: String,
        /// The earlier order.
        order_id: i64,
    },
    /// The database failed, or a repository ran without a tenant.
    Repo(RepoError),
}

/// Places and reads orders.
#[derive(Clone, Debug)]
pub struct OrderService {
    db: Db,
    orders: OrderRepository,
    inventory: InventoryRepository,
    outbox: OutboxRepository,
    payments: PaymentClient,
    signal: OutboxSignal,
    /// Where the resolver's next pass starts (the id after the last order it asked about),
    /// so that orders the provider cannot decide do not keep the others from being asked.
    resolve_from: Arc<AtomicI64>,
    /// The charge-and-decide tasks of recorded orders (which outlive a request cut off by its
    /// deadline or its client): shutdown waits for them, a crash aborts them.
    settling: tokio_util::task::TaskTracker,
    /// Stops the settling tasks at once (a simulated crash): their orders stay pending.
    abandon: tokio_util::sync::CancellationToken,
}

/// What one resolver pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Orders decided (paid or cancelled).
    pub decided: usize,
    /// Orders the provider gave no answer for: still pending.
    pub undecided: usize,
    /// Whether the pass ended at its budget with orders it did not ask about.
    pub left: bool,
}

// ===== impl OrderService =====

impl OrderService {
    /// A service over `db`, charging through `payments`, waking the outbox worker through
    /// `signal` when it wrote outbox rows.
    pub fn new(db: &Db, payments: PaymentClient, signal: OutboxSignal) -> Self {
        OrderService {
            db: db.clone(),
            orders: OrderRepository::new(db),
            inventory: InventoryRepository::new(db),
            outbox: OutboxRepository::new(db),
            payments,
            signal,
            resolve_from: Arc::new(AtomicI64::new(0)),
            settling: tokio_util::task::TaskTracker::new(),
            abandon: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Validates and places `order` for the current tenant: reserve, charge, decide (see the
    /// module docs). Call it outside any transaction: it runs its own two.
    ///
    /// # Errors
    /// See [`ServiceError`]. Before the order is recorded nothing is written; after, the order
    /// is `cancelled` (declined) or `pending` (provider unreachable), never half-written.
    pub async fn place_order(&self, order: &NewOrder) -> Result<Placed, ServiceError> {
        async {
            validate(order)?;
            debug!(reference = %order.reference, lines = order.items.len(), "placing order");
            let reserved = self.db.transaction(|| self.reserve(order)).await;
            let (order_id, total_cents, items) = match reserved {
                Ok(reserved) => reserved,
                Err(ServiceError::Repo(err)) if err.is_unique_violation() => {
                    return self.existing(order).await;
                }
                Err(err) => return Err(err),
            };
            // The order exists from here: its charge and its decision run to their end in a
            // task of their own (with this request's context), whatever becomes of the
            // request: past its deadline (a `503`) or after its client went away, the order
            // is still decided at once, not left to the resolver a minute later, and a retry
            // with the same reference finds it decided.
            let service = self.clone();
            let reference = order.reference.clone();
            let abandon = self.abandon.clone();
            let settle = contextflow::spawn(self.settling.track_future(async move {
                let settled = tokio::select! {
                    settled = service.charge_and_decide(order_id, &reference, total_cents, items) => settled,
                    () = abandon.cancelled() => return Err(ServiceError::PaymentPending {
                        order_id,
                        why: "the service stopped".into(),
                    }),
                };
                if let Err(ServiceError::Repo(err)) = &settled {
                    // Logged here: the request that awaits this may be gone.
                    error!(order_id, error = %err, "deciding the order failed: it stays pending for the resolver");
                }
                settled
            }));
            let placed = match settle.await {
                Ok(placed) => placed?,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                // The runtime is shutting down: the order stays pending for the resolver.
                Err(_) => {
                    return Err(ServiceError::PaymentPending {
                        order_id,
                        why: "the service is shutting down".into(),
                    })
                }
            };
            if placed.status == "cancelled" {
                // The resolver cancelled it while this request waited for the provider, which
                // then charged it (`decide` logged the charge to void): not a `201` for a
                // cancelled order, nor a `402`, which would invite paying again.
                return Err(ServiceError::CancelledAfterCharge { order_id });
            }
            info!(reference = %order.reference, order_id, status = %placed.status, "order placed");
            Ok(Placed::Created(placed))
        }
        .instrument(tracing::info_span!("service", op = "place_order"))
        .await
    }

    /// Waits for the charge-and-decide tasks of recorded orders (those whose request was cut
    /// off included), for a graceful shutdown: after the order server's requests, before
    /// the outbox worker's last pass and the payment stub.
    pub async fn settled(&self) {
        self.settling.close();
        self.settling.wait().await;
    }

    /// Stops the charge-and-decide tasks at once, as a crash would: their orders stay
    /// pending, for the resolver after a restart.
    pub fn abandon_settling(&self) {
        self.abandon.cancel();
    }

    /// Steps 2 and 3 of a recorded order: the order's first call to the provider, then the
    /// decision.
    async fn charge_and_decide(
        &self,
        order_id: i64,
        reference: &str,
        total_cents: i64,
        items: Vec<OrderItem>,
    ) -> Result<Order, ServiceError> {
        let key = payment_key(
            &context::tenant().map(|t| t.to_string()).unwrap_or_default(),
            reference,
        );
        let decision = match self.payments.authorize(&key, reference, total_cents).await {
            // The order's first call: nothing was charged with its key before, so a refused
            // request is a decision, not a reason to keep it pending and ask again forever.
            Err(PaymentError::Refused(status)) => {
                warn!(status, "payment provider refused the request: declined");
                Err(PaymentError::Declined)
            }
            decision => decision,
        };
        self.decide(order_id, reference, total_cents, items, decision)
            .await
    }

    /// Step 1, inside a transaction: the order row, each line's stock, the lines.
    async fn reserve(&self, order: &NewOrder) -> Result<(i64, i64, Vec<OrderItem>), ServiceError> {
        let distinct = order
            .items
            .iter()
            .enumerate()
            .all(|(i, line)| order.items[..i].iter().all(|l| l.sku != line.sku));
        if self.db.backend() == Backend::Postgres && distinct {
            // One statement (one round trip) for all of it: the stock rows, which every order
            // of the tenant takes, stay locked only until the COMMIT.
            let lines: Vec<(&str, i64)> = order
                .items
                .iter()
                .map(|line| (line.sku.as_str(), line.quantity))
                .collect();
            let (order_id, prices) = self.orders.reserve(&order.reference, &lines).await?;
            let mut total_cents = 0;
            let mut items = Vec::with_capacity(order.items.len());
            for (line, price) in order.items.iter().zip(prices) {
                let Some(price_cents) = price else {
                    return Err(self.not_taken(&line.sku, line.quantity).await);
                };
                total_cents += line.quantity * price_cents;
                items.push(OrderItem {
                    sku: line.sku.clone(),
                    quantity: line.quantity,
                    price_cents,
                });
            }
            info!(reference = %order.reference, total_cents, "inventory validated and reserved");
            return Ok((order_id, total_cents, items));
        }
        let order_id = self.orders.insert(&order.reference).await?;
        let mut total_cents = 0;
        // Stock rows are taken (and, on PostgreSQL, locked) in sku order, as the one-statement
        // path does: two orders of the same products never wait for each other in a cycle.
        let mut by_sku: Vec<usize> = (0..order.items.len()).collect();
        by_sku.sort_by(|a, b| order.items[*a].sku.cmp(&order.items[*b].sku));
        let mut prices = vec![0; order.items.len()];
        for i in by_sku {
            let line = &order.items[i];
            let Some(price_cents) = self.inventory.take_priced(&line.sku, line.quantity).await?
            else {
                return Err(self.not_taken(&line.sku, line.quantity).await);
            };
            total_cents += line.quantity * price_cents;
            prices[i] = price_cents;
        }
        let items: Vec<OrderItem> = order
            .items
            .iter()
            .zip(prices)
            .map(|(line, price_cents)| OrderItem {
                sku: line.sku.clone(),
                quantity: line.quantity,
                price_cents,
            })
            .collect();
        self.orders.add_items(order_id, &items).await?;
        info!(reference = %order.reference, total_cents, "inventory validated and reserved");
        Ok((order_id, total_cents, items))
    }

    /// Why a line's stock was not taken: an unknown product or too little stock (only on this
    /// rare path is the product read again). The transaction is rolled back after it.
    async fn not_taken(&self, sku: &str, quantity: i64) -> ServiceError {
        match self.inventory.find(sku).await {
            Err(err) => ServiceError::Repo(err),
            Ok(None) => {
                warn!(sku = %sku, "unknown product");
                ServiceError::UnknownProduct(sku.to_owned())
            }
            Ok(Some(product)) => {
                warn!(sku = %sku, requested = quantity, available = product.stock, "insufficient stock");
                ServiceError::InsufficientStock {
                    sku: sku.to_owned(),
                    requested: quantity,
                    available: product.stock,
                }
            }
        }
    }

    /// Step 3: records the provider's answer; `items` are the order's lines.
    async fn decide(
        &self,
        order_id: i64,
        reference: &str,
        total_cents: i64,
        mut items: Vec<OrderItem>,
        decision: Result<String, PaymentError>,
    ) -> Result<Order, ServiceError> {
        match decision {
            Ok(payment_id) => {
                let paid = self
                    .db
                    .transaction(|| async {
                        let event = OrderConfirmed {
                            order_id,
                            reference: reference.to_owned(),
                            tenant: context::tenant().map(|t| t.to_string()).unwrap_or_default(),
                        };
                        let payload = serde_json::to_string(&event)
                            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
                        let rows = [
                            (CONFIRMATION, payload.as_str()),
                            (ORDER_CONFIRMED, payload.as_str()),
                        ];
                        if self.db.backend() == Backend::Postgres {
                            // One statement: the order and its outbox rows.
                            return Ok::<_, ServiceError>(
                                self.orders
                                    .mark_paid_with_outbox(
                                        order_id,
                                        total_cents,
                                        &payment_id,
                                        &rows,
                                    )
                                    .await?,
                            );
                        }
                        if !self
                            .orders
                            .mark_paid(order_id, total_cents, &payment_id)
                            .await?
                        {
                            // Decided already (by the resolver): its outbox rows exist.
                            return Ok(false);
                        }
                        self.outbox.add(order_id, &rows).await?;
                        Ok(true)
                    })
                    .await?;
                if !paid {
                    let current = self.current(order_id).await?;
                    if current.status == "cancelled" {
                        // Decided already, the other way: the provider charged an order that
                        // was cancelled (a decline answered to another caller of the same
                        // key). Nothing here can take the money back: an operator must.
                        error!(
                            order_id,
                            payment_id = %payment_id,
                            "payment authorized for an order already cancelled: the charge must be voided"
                        );
                    }
                    return Ok(current);
                }
                self.signal.wake();
                items.sort_by(|a, b| a.sku.cmp(&b.sku));
                Ok(Order {
                    id: order_id,
                    reference: reference.to_owned(),
                    status: "paid".into(),
                    total_cents,
                    payment_id: Some(payment_id),
                    confirmation_sent: 0,
                    items,
                })
            }
            Err(PaymentError::Declined) => {
                // In sku order, the order in which reservations lock the same rows: no cycle.
                items.sort_by(|a, b| a.sku.cmp(&b.sku));
                let cancelled = self
                    .db
                    .transaction(|| async {
                        if !self.orders.cancel(order_id).await? {
                            return Ok::<_, ServiceError>(false);
                        }
                        for item in &items {
                            self.inventory.release(&item.sku, item.quantity).await?;
                        }
                        Ok(true)
                    })
                    .await?;
                if !cancelled {
                    let current = self.current(order_id).await?;
                    if current.status == "paid" {
                        // Decided already, the other way (the provider answered another
                        // caller of the same key with a charge): the order stands, paid.
                        error!(
                            order_id,
                            "payment declined for an order already paid: the order stands"
                        );
                        return Ok(current);
                    }
                }
                warn!(
                    order_id,
                    "payment declined: order cancelled, stock released"
                );
                Err(ServiceError::Payment(PaymentError::Declined))
            }
            Err(PaymentError::Unavailable(why)) => {
                warn!(order_id, error = %why, "payment undecided: the order stays pending for the resolver");
                Err(ServiceError::PaymentPending { order_id, why })
            }
            // The callers turn a refusal into a decline or leave it undecided; undecided is
            // the safe reading.
            Err(refused @ PaymentError::Refused(_)) => {
                let why = refused.to_string();
                warn!(order_id, error = %why, "payment undecided: the order stays pending for the resolver");
                Err(ServiceError::PaymentPending { order_id, why })
            }
        }
    }

    /// The first order placed with `new`'s reference, when `new` is a retry of it: the same
    /// quantity of each product, in any order of lines. Otherwise the reference is reused for
    /// another order, which is refused: answering with the first order would tell the client
    /// that this one was placed.
    async fn existing(&self, new: &NewOrder) -> Result<Placed, ServiceError> {
        let order = self
            .orders
            .find_by_reference(&new.reference)
            .await?
            .ok_or_else(|| ServiceError::Repo(RepoError::Sqlx(sqlx::Error::RowNotFound)))?;
        let requested = new
            .items
            .iter()
            .map(|line| (line.sku.as_str(), line.quantity));
        let recorded = order
            .items
            .iter()
            .map(|line| (line.sku.as_str(), line.quantity));
        if quantities_by_sku(requested) != quantities_by_sku(recorded) {
            warn!(
                order_id = order.id,
                "reference already used by an order with other lines: refused"
            );
            return Err(ServiceError::ReferenceReused {
                reference: new.reference.clone(),
                order_id: order.id,
            });
        }
        info!(order_id = order.id, status = %order.status, "order already placed with this reference");
        Ok(Placed::Existing(order))
    }

    async fn current(&self, order_id: i64) -> Result<Order, ServiceError> {
        self.orders
            .find(order_id)
            .await?
            .ok_or_else(|| ServiceError::Repo(RepoError::Sqlx(sqlx::Error::RowNotFound)))
    }

    /// Decides up to [`RESOLVE_BATCH`] `pending` orders created more than `min_age` ago (their
    /// request is over: answered, timed out or lost in a crash): asks the provider again with
    /// each order's key and records the answer, each in the context of the request that placed
    /// the order and as its tenant. A pass starts after the last order the previous one asked
    /// about (and wraps around), so orders the provider cannot decide do not hold up the
    /// others.
    ///
    /// # Errors
    /// When the work list cannot be read; an order that cannot be decided yet stays pending.
    pub async fn resolve_pending(
        &self,
        min_age: std::time::Duration,
    ) -> Result<Resolved, ServiceError> {
        self.resolve_pending_within(min_age, std::time::Duration::MAX)
            .await
    }

    /// [`resolve_pending`](Self::resolve_pending), asking about no more orders once `budget`
    /// has passed (it asks about one at least): the pass then ends after the call in
    /// progress, which is never cut off (a call cut off at a budget shorter than the
    /// provider's answer would leave every order pending while the provider is slow, and
    /// might have charged it), so a pass takes at most `budget` plus one call's timeout.
    ///
    /// # Errors
    /// As [`resolve_pending`](Self::resolve_pending).
    pub async fn resolve_pending_within(
        &self,
        min_age: std::time::Duration,
        budget: std::time::Duration,
    ) -> Result<Resolved, ServiceError> {
        let started = tokio::time::Instant::now();
        let before = crate::db::now_ms() - min_age.as_millis() as i64;
        let from = self.resolve_from.load(Ordering::Relaxed);
        let mut pending = self
            .orders
            .pending_before(before, from, RESOLVE_BATCH)
            .await?;
        let full = pending.len() as i64 == RESOLVE_BATCH;
        if !full && from > 0 {
            // Wrap around: the oldest ones, up to where this pass started.
            let room = RESOLVE_BATCH - pending.len() as i64;
            let older = self.orders.pending_before(before, 0, room).await?;
            pending.extend(older.into_iter().filter(|order| order.id <= from));
        }
        if !full && pending.is_empty() {
            self.resolve_from.store(0, Ordering::Relaxed);
        }
        let mut resolved = Resolved::default();
        for order in pending {
            // At least one order per pass, however long reading the list took.
            if resolved.decided + resolved.undecided > 0 && started.elapsed() >= budget {
                resolved.left = true;
                break;
            }
            // Before asking: a pass cut short (its time budget) starts after this order next
            // time, so one order the provider hangs on does not keep the others from being asked.
            self.resolve_from.store(order.id, Ordering::Relaxed);
            let cx =
                context::stored_context(order.request_id.as_deref(), order.traceparent.as_deref());
            let span =
                tracing::info_span!("resolver", order_id = order.id, reference = %order.reference);
            let work = TENANT.scope(TenantId::new(order.tenant.clone()), async {
                let current = self.current(order.id).await?;
                if current.status != "pending" {
                    // Decided since the list was read (its request, or another instance's
                    // resolver): asking the provider again could charge a cancelled order.
                    info!(status = %current.status, "pending order decided meanwhile");
                    return Ok(true);
                }
                let total_cents = current
                    .items
                    .iter()
                    .map(|i| i.quantity * i.price_cents)
                    .sum();
                info!(total_cents, "resolving a pending order");
                let decision = match self
                    .payments
                    .authorize(&order.payment_key(), &order.reference, total_cents)
                    .await
                {
                    // Not a decision here: an earlier call with this key (whose answer was
                    // lost) may have charged it, and cancelling would leave that charge
                    // without an order. The order stays pending until the provider answers.
                    Err(PaymentError::Refused(status)) => {
                        error!(
                            status,
                            "payment provider refused the request while resolving: the order \
                             stays pending (an earlier call with its key may have charged it)"
                        );
                        Err(PaymentError::Unavailable(format!(
                            "the provider refused the request (status {status})"
                        )))
                    }
                    decision => decision,
                };
                match self
                    .decide(
                        order.id,
                        &order.reference,
                        total_cents,
                        current.items,
                        decision,
                    )
                    .await
                {
                    Ok(order) => {
                        info!(status = %order.status, "pending order resolved");
                        Ok(true)
                    }
                    Err(ServiceError::Payment(PaymentError::Declined)) => Ok(true),
                    Err(ServiceError::PaymentPending { .. }) => Ok(false),
                    Err(err) => Err(err),
                }
            });
            match contextflow_otel::scope(cx, work.instrument(span)).await {
                Ok(true) => resolved.decided += 1,
                Ok(false) => resolved.undecided += 1,
                Err(err) => {
                    resolved.undecided += 1;
                    warn!(order_id = order.id, error = %err, "resolving failed; will retry")
                }
            }
        }
        Ok(resolved)
    }

    /// The current tenant's order `id`; `None` if it does not exist *for this tenant*.
    ///
    /// # Errors
    /// [`ServiceError::Repo`] when the database fails.
    pub async fn order(&self, id: i64) -> Result<Option<Order>, ServiceError> {
        async {
            let order = self.orders.find(id).await?;
            info!(order_id = id, found = order.is_some(), "order looked up");
            Ok(order)
        }
        .instrument(tracing::info_span!("service", op = "get_order"))
        .await
    }
}

pub use crate::payment::idempotency_key as payment_key;

/// Whether `s` is 1 to 64 characters of `[A-Za-z0-9._:-]` (references and SKUs).
fn is_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The shape rules: reference, SKUs, number of lines, quantities.
fn validate(order: &NewOrder) -> Result<(), ServiceError> {
    if !is_identifier(&order.reference) {
        return Err(ServiceError::Invalid(
            "reference must be 1 to 64 characters of [A-Za-z0-9._:-]".into(),
        ));
    }
    if order.items.is_empty() || order.items.len() > MAX_ITEMS {
        return Err(ServiceError::Invalid(format!(
            "an order has 1 to {MAX_ITEMS} items"
        )));
    }
    for item in &order.items {
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(ServiceError::Invalid(format!(
                "quantity must be 1 to {MAX_QUANTITY}"
            )));
        }
        // The reference's alphabet: a SKU is looked up in the database, and PostgreSQL refuses
        // some text outright (a NUL byte), which would otherwise answer 500, not 422.
        if !is_identifier(&item.sku) {
            return Err(ServiceError::Invalid(
                "sku must be 1 to 64 characters of [A-Za-z0-9._:-]".into(),
            ));
        }
    }
    Ok(())
}

// ===== impl ServiceError =====

impl From<RepoError> for ServiceError {
    fn from(err: RepoError) -> Self {
        ServiceError::Repo(err)
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(err: sqlx::Error) -> Self {
        ServiceError::Repo(RepoError::Sqlx(err))
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::Invalid(why) => write!(f, "invalid order: {why}"),
            ServiceError::UnknownProduct(sku) => write!(f, "unknown product {sku:?}"),
            ServiceError::InsufficientStock {
                sku,
                requested,
                available,
            } => write!(
                f,
                "insufficient stock for {sku:?}: {requested} requested, {available} available"
            ),
            ServiceError::Payment(err) => write!(f, "{err}"),
            ServiceError::PaymentPending { order_id, why } => write!(
                f,
                "payment provider unavailable ({why}); order {order_id} is pending and will be completed or cancelled"
            ),
            ServiceError::CancelledAfterCharge { order_id } => write!(
                f,
                "order {order_id} was cancelled while its payment was processed; its charge will be voided"
            ),
            ServiceError::ReferenceReused {
                reference,
                order_id,
            } => write!(
                f,
                "reference {reference:?} is already used by order {order_id}, whose lines differ from this request's"
            ),
            ServiceError::Repo(err) => write!(f, "{err}"),
        }
    }
}

/// The units of each product in `lines`, by product: what makes two requests the same order
/// (lines may repeat a product or come in another order).
fn quantities_by_sku<'a>(
    lines: impl Iterator<Item = (&'a str, i64)>,
) -> std::collections::BTreeMap<&'a str, i64> {
    let mut total = std::collections::BTreeMap::new();
    for (sku, quantity) in lines {
        *total.entry(sku).or_insert(0) += quantity;
    }
    total
}

impl std::error::Error for ServiceError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(reference: &str, items: &[(&str, i64)]) -> NewOrder {
        NewOrder {
            reference: reference.into(),
            items: items
                .iter()
                .map(|(sku, quantity)| NewOrderItem {
                    sku: (*sku).into(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }

    fn invalid(order: &NewOrder) -> String {
        match validate(order) {
            Err(ServiceError::Invalid(why)) => why,
            other => panic!("{order:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn bounds_are_inclusive_and_one_past_is_refused() {
        let max_ref = "r".repeat(64);
        let max_sku = "s".repeat(64);
        let max_items: Vec<(&str, i64)> = vec![("sku-apple", 1); MAX_ITEMS];
        for ok in [
            order("r", &[("s", 1)]),
            order(&max_ref, &[("sku-apple", MAX_QUANTITY)]),
            order("A-z.0_9:x", &[(&max_sku, 1)]),
            order("r", &max_items),
        ] {
            assert!(validate(&ok).is_ok(), "{ok:?}");
        }

        let too_many: Vec<(&str, i64)> = vec![("sku-apple", 1); MAX_ITEMS + 1];
        let long_ref = "r".repeat(65);
        let long_sku = "s".repeat(65);
        for (bad, why) in [
            (order("", &[("s", 1)]), "reference"),
            (order(&long_ref, &[("s", 1)]), "reference"),
            (order("a b", &[("s", 1)]), "reference"),
            (order("é", &[("s", 1)]), "reference"),
            (order("r\n", &[("s", 1)]), "reference"),
            (order("r", &[]), "items"),
            (order("r", &too_many), "items"),
            (order("r", &[("s", 0)]), "quantity"),
            (order("r", &[("s", -1)]), "quantity"),
            (order("r", &[("s", MAX_QUANTITY + 1)]), "quantity"),
            (order("r", &[("s", i64::MAX)]), "quantity"),
            (order("r", &[("", 1)]), "sku"),
            (order("r", &[(&long_sku, 1)]), "sku"),
            (order("r", &[("s", 1), ("t", 0)]), "quantity"),
        ] {
            let message = invalid(&bad);
            assert!(message.contains(why), "{bad:?}: {message}");
        }
    }
}
