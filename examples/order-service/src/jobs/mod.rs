//! Background work started by a request.
//!
//! [`Jobs::send_confirmation`] starts the confirmation sender with [`contextflow::spawn`]: the
//! task keeps the request's id, trace and tenant (so its log lines and its tenant-scoped query
//! belong to the request) and its tracing span nests under the request's, but it does *not*
//! get the request's database transaction, which has been committed by then anyway: its query
//! runs on the pool. It then publishes an `order.confirmed` event to the [`Queue`], which
//! carries the context to its consumer the way an HTTP call would.

use std::sync::Arc;

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn, Instrument as _};

use crate::{
    context,
    db::{Db, OrderRepository},
    queue::{OrderConfirmed, Queue, ORDER_CONFIRMED},
};

/// Starts background jobs and knows how many are still running.
#[derive(Clone, Debug)]
pub struct Jobs {
    db: Db,
    orders: OrderRepository,
    queue: Queue,
    inflight: Arc<Inflight>,
}

/// How many jobs are running, in a `watch` channel: a waiter sees the current count whenever
/// it looks, so no wake-up can be missed.
#[derive(Debug)]
struct Inflight(watch::Sender<usize>);

impl Default for Inflight {
    fn default() -> Self {
        Inflight(watch::channel(0).0)
    }
}

/// Decrements the in-flight count when a job ends, however it ends.
struct InflightGuard(Arc<Inflight>);

impl Jobs {
    /// Jobs over `db`, publishing their events to `queue`.
    pub fn new(db: &Db, queue: Queue) -> Self {
        Jobs {
            db: db.clone(),
            orders: OrderRepository::new(db),
            queue,
            inflight: Arc::default(),
        }
    }

    /// Sends the confirmation of order `order_id` (client reference `reference`) in the
    /// background, in the current context, then publishes [`ORDER_CONFIRMED`].
    pub fn send_confirmation(&self, order_id: i64, reference: &str) -> JoinHandle<()> {
        self.inflight.0.send_modify(|n| *n += 1);
        let guard = InflightGuard(self.inflight.clone());
        let (db, orders, queue) = (self.db.clone(), self.orders.clone(), self.queue.clone());
        let reference = reference.to_owned();
        contextflow::spawn(async move {
            let _guard = guard;
            // Created inside the task: its parent is the request's span, carried by the spawn.
            let span = tracing::info_span!("job", kind = "send_confirmation", order_id);
            async {
                info!(
                    in_transaction = db.pool().in_transaction(),
                    "sending confirmation"
                );
                match orders.mark_confirmed(order_id).await {
                    Ok(true) => info!("confirmation sent"),
                    Ok(false) => {
                        warn!("order not found for this tenant");
                        return;
                    }
                    Err(err) => {
                        warn!(error = %err, "confirmation failed");
                        return;
                    }
                }
                let event = OrderConfirmed {
                    order_id,
                    reference,
                    tenant: context::tenant().map(|t| t.to_string()).unwrap_or_default(),
                };
                queue.publish(ORDER_CONFIRMED, &event).await;
            }
            .instrument(span)
            .await;
        })
    }

    /// The queue the jobs publish to.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// How many jobs are still running.
    pub fn in_flight(&self) -> usize {
        *self.inflight.0.borrow()
    }

    /// Waits until no job is running and every message they published has been handled.
    pub async fn wait_idle(&self) {
        let mut count = self.inflight.0.subscribe();
        // The sender lives in `self.inflight`: `wait_for` cannot fail while we hold it.
        let _ = count.wait_for(|n| *n == 0).await;
        self.queue.wait_idle().await;
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n -= 1);
    }
}
