//! The outbox worker: delivers what paid orders left in the outbox, each row in the context of
//! the request that paid the order, and has the resolver decide orders left `pending`.
//!
//! A row's context is rebuilt from the row: its request id and `traceparent` (validated like
//! incoming headers) and its tenant column (written by authenticated code, never taken from
//! input). So the worker's log lines, its queries and the events it publishes belong to the
//! order's request, even after a restart.
//!
//! Rows are delivered in batches, one transaction per batch. Delivery is exactly once for the
//! confirmation (the row is claimed in the same transaction as the order's
//! `confirmation_sent` count is raised) and at least once for the `order.confirmed` event
//! (claimed in the transaction that publishes it; if that transaction does not commit, the
//! event is published again, and the consumer handles a repeated message id once).
//!
//! The worker wakes when a request signals new rows ([`OutboxSignal::wake`]) and every
//! [`POLL`] otherwise; on shutdown it delivers what is left, then stops.

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};
use tracing::{error, info, warn, Instrument as _};

use crate::{
    context::{self, TenantId, TENANT},
    db::{Db, OrderRepository, OutboxRepository, OutboxRow, RepoError},
    http::server::Shutdown,
    queue::{OrderConfirmed, Queue, ORDER_CONFIRMED},
    service::OrderService,
};

/// The topic of the confirmation an order's customer gets.
pub const CONFIRMATION: &str = "order.confirmation";
/// How often the worker looks for rows nobody signalled (rows of a previous run).
pub const POLL: Duration = Duration::from_millis(500);
/// How long the worker waits, once woken, for more rows before a pass: a confirmation goes out
/// this much later, and under load one pass (two round trips to the database, one transaction)
/// serves the orders of this long.
pub const GATHER: Duration = Duration::from_millis(10);
/// How many rows one batch delivers.
const BATCH: i64 = 256;
/// The longest wait between resolver passes while the provider gives no answers.
const MAX_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// Wakes the worker; counts the worker's passes so a waiter can tell when the outbox was
/// empty after a given moment. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OutboxSignal {
    wake: watch::Sender<u64>,
    passes: watch::Sender<Pass>,
}

/// One pass of the worker over the outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pass {
    /// Which wake-up it served.
    served: u64,
    /// Whether the outbox was empty at its end.
    empty: bool,
}

/// What the worker needs.
#[derive(Debug)]
pub struct Worker {
    /// Where the rows are.
    pub db: Db,
    /// Where `order.confirmed` goes.
    pub queue: Queue,
    /// The resolver of pending orders.
    pub service: OrderService,
    /// How old a `pending` order must be before the resolver decides it.
    pub resolve_after: Duration,
    /// How long one resolver pass goes on asking about orders (see
    /// [`OrderService::resolve_pending_within`]).
    pub resolve_budget: Duration,
    /// When to stop.
    pub shutdown: Shutdown,
}

impl Default for OutboxSignal {
    fn default() -> Self {
        OutboxSignal {
            wake: watch::channel(0).0,
            passes: watch::channel(Pass::default()).0,
        }
    }
}

impl OutboxSignal {
    /// A signal nobody listens to yet.
    pub fn new() -> Self {
        OutboxSignal::default()
    }

    /// Tells the worker new rows were committed.
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n += 1);
    }

    /// Waits until the worker, after this call, found the outbox empty.
    pub async fn wait_delivered(&self) {
        let mut asked = 0;
        self.wake.send_modify(|n| {
            *n += 1;
            asked = *n;
        });
        let mut passes = self.passes.subscribe();
        // The sender lives in `self`: `wait_for` cannot fail while we hold it.
        let _ = passes.wait_for(|p| p.served >= asked && p.empty).await;
    }
}

impl Worker {
    /// Starts the worker on `signal`; the task ends after the shutdown's last delivery.
    pub fn start(self, signal: OutboxSignal) -> JoinHandle<()> {
        // The worker serves every order and none: it starts from an empty context and takes
        // each row's context from the row.
        contextflow::spawn_without_context(async move {
            let deliverer = Deliverer {
                db: &self.db,
                outbox: OutboxRepository::new(&self.db),
                orders: OrderRepository::new(&self.db),
                queue: &self.queue,
            };
            let mut wake = signal.wake.subscribe();
            let mut last_resolve = tokio::time::Instant::now();
            let mut resolve_every = POLL;
            loop {
                let mut stopping = tokio::select! {
                    biased;
                    () = self.shutdown.wait() => true,
                    _ = wake.changed() => false,
                    () = tokio::time::sleep(POLL) => false,
                };
                if !stopping {
                    // Under load, rows of many orders go in one pass rather than a pass each.
                    stopping = tokio::select! {
                        biased;
                        () = self.shutdown.wait() => true,
                        () = tokio::time::sleep(GATHER) => false,
                    };
                }
                let served = *wake.borrow_and_update();
                // Deliveries first: they never wait for the payment provider.
                let mut empty = deliverer.deliver_all().await;
                if last_resolve.elapsed() >= resolve_every || stopping {
                    last_resolve = tokio::time::Instant::now();
                    // Bounded: a provider that hangs costs the budget and one call's
                    // timeout per pass, not 10 s per pending order; the orders not asked
                    // about wait for the next pass.
                    match self
                        .service
                        .resolve_pending_within(self.resolve_after, self.resolve_budget)
                        .await
                    {
                        Ok(outcome) => {
                            resolve_every = if outcome.undecided > 0 && outcome.decided == 0 {
                                // The provider gives no answers: ask less often.
                                (resolve_every * 2).min(MAX_RESOLVE_INTERVAL)
                            } else {
                                POLL
                            };
                            if outcome.left {
                                warn!(
                                    budget_ms = self.resolve_budget.as_millis() as u64,
                                    "resolver pass ended at its budget: the rest next pass"
                                );
                            }
                            if outcome.decided > 0 {
                                // Their confirmations, now rather than next pass.
                                empty = deliverer.deliver_all().await;
                            }
                        }
                        Err(err) => warn!(error = %err, "resolver pass failed"),
                    }
                }
                signal.passes.send_replace(Pass { served, empty });
                if stopping {
                    info!(empty, "shutdown: outbox worker delivered what was left");
                    break;
                }
            }
        })
    }
}

/// Why a row was not delivered this time.
#[derive(Debug)]
enum DeliveryError {
    Repo(RepoError),
    Payload(serde_json::Error),
    QueueClosed,
    UnknownTopic(String),
}

impl From<sqlx::Error> for DeliveryError {
    fn from(err: sqlx::Error) -> Self {
        DeliveryError::Repo(RepoError::Sqlx(err))
    }
}

impl From<RepoError> for DeliveryError {
    fn from(err: RepoError) -> Self {
        DeliveryError::Repo(err)
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Repo(err) => write!(f, "{err}"),
            DeliveryError::Payload(err) => write!(f, "malformed payload: {err}"),
            DeliveryError::QueueClosed => f.write_str("the queue is closed"),
            DeliveryError::UnknownTopic(topic) => write!(f, "unknown topic {topic:?}"),
        }
    }
}

/// What delivering needs.
struct Deliverer<'a> {
    db: &'a Db,
    outbox: OutboxRepository,
    orders: OrderRepository,
    queue: &'a Queue,
}

impl Deliverer<'_> {
    /// Delivers batches until one is not full (the outbox had nothing more for this worker
    /// after it) or one fails; whether the outbox was found empty: of rows this worker could
    /// take (on PostgreSQL, rows another instance's batch holds are skipped; that instance
    /// delivers them, or gives them back for a later pass). Once the queue refuses an
    /// event, the events wait for a later pass while the confirmations, which need no queue,
    /// go on: batches of confirmations only, so that events given back (oldest first) cannot
    /// hold them up.
    async fn deliver_all(&self) -> bool {
        let mut topic = None;
        loop {
            match self.deliver_batch(topic).await {
                Ok(batch) if batch.broker_failed => {
                    if topic.is_none() {
                        warn!(
                            error = %DeliveryError::QueueClosed,
                            "outbox events not delivered; will retry (confirmations go on)"
                        );
                    }
                    topic = Some(CONFIRMATION);
                }
                Ok(batch) if batch.claimed < BATCH as usize => return topic.is_none(),
                Ok(_) => {}
                Err(err) => {
                    warn!(error = %err, "outbox delivery failed; will retry");
                    return false;
                }
            }
        }
    }

    /// One transaction for a batch, on the admin pool (the batch crosses tenants): claim the
    /// oldest rows not delivered yet (of `topic` only, when given; read and claimed by one
    /// statement), raise the confirmed
    /// orders' `confirmation_sent`, publish the events; each row's lines in its own context.
    /// The batch transaction itself belongs to no request: it logs nothing at INFO.
    async fn deliver_batch(&self, topic: Option<&str>) -> Result<Batch, DeliveryError> {
        let claimed = self
            .db
            .admin()
            .transaction(|| async {
                let rows = self.outbox.claim_oldest(BATCH, topic).await?;
                let mut confirmed = Vec::new();
                let mut aside = Vec::new();
                // Events the broker did not take (it refused one, or timed out): given back for
                // a later pass, while the confirmations, which need no broker, go on.
                let mut unpublished = Vec::new();
                for (i, row) in rows.iter().enumerate() {
                    match row.topic.as_str() {
                        CONFIRMATION => confirmed.push(row.order_id),
                        ORDER_CONFIRMED if !unpublished.is_empty() => unpublished.push(row.id),
                        ORDER_CONFIRMED => {
                            match serde_json::from_str::<OrderConfirmed>(&row.payload) {
                                Ok(event) => {
                                    let publish =
                                        self.queue.publish(ORDER_CONFIRMED, row.id, &event);
                                    if !in_row_context(row, publish).await {
                                        unpublished.push(row.id);
                                    }
                                }
                                Err(err) => {
                                    aside.push((i, DeliveryError::Payload(err).to_string()))
                                }
                            }
                        }
                        other => aside
                            .push((i, DeliveryError::UnknownTopic(other.to_owned()).to_string())),
                    }
                }
                // A row that can never be delivered must not hold up those behind it (the
                // batch is read oldest first): set aside, with an error line in its context.
                let aside_ids: Vec<i64> = aside.iter().map(|(i, _)| rows[*i].id).collect();
                self.outbox.set_aside(&aside_ids).await?;
                self.outbox.release(&unpublished).await?;
                self.orders.mark_confirmed_batch(&confirmed).await?;
                Ok::<_, DeliveryError>((rows, aside, !unpublished.is_empty()))
            })
            .await?;
        let (rows, aside, broker_failed) = claimed;
        for (i, err) in &aside {
            let row = &rows[*i];
            in_row_context(row, async {
                error!(
                    outbox_id = row.id,
                    error = %err,
                    "outbox row cannot be delivered: set aside (delivered = 2)"
                );
            })
            .await;
        }
        // Committed: now the confirmations are sent, exactly once.
        for row in rows.iter().filter(|r| r.topic == CONFIRMATION) {
            in_row_context(row, async { info!("confirmation sent") }).await;
        }
        Ok(Batch {
            claimed: rows.len(),
            broker_failed,
        })
    }
}

/// What one batch did.
struct Batch {
    /// How many rows it claimed (those given back included).
    claimed: usize,
    /// Whether the queue refused one of its events: those were given back for a later pass.
    broker_failed: bool,
}

/// Runs `fut` in `row`'s context: its request id and trace, its tenant, an `outbox.deliver`
/// span.
async fn in_row_context<F: std::future::Future>(row: &OutboxRow, fut: F) -> F::Output {
    let cx = context::stored_context(row.request_id.as_deref(), row.traceparent.as_deref());
    let span = tracing::info_span!("outbox.deliver", topic = %row.topic, order_id = row.order_id);
    let tenant = TenantId::new(row.tenant.clone());
    contextflow_otel::scope(cx, TENANT.scope(tenant, fut.instrument(span))).await
}
