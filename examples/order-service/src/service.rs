//! The order service: business rules between the controllers and the repositories.
//!
//! [`OrderService::place_order`] validates the order, then for each line validates the
//! inventory and reserves it, records the order, and has the payment authorized. It runs
//! inside the transaction the controller opened, without knowing it: if anything fails, the
//! controller's transaction rolls every write back.

use serde::Deserialize;
use tracing::{info, warn, Instrument as _};

use crate::{
    db::{Db, InventoryRepository, Order, OrderItem, OrderRepository, RepoError},
    payment::{PaymentClient, PaymentError},
};

/// The most lines one order may have.
pub const MAX_ITEMS: usize = 20;
/// The most units of one product one line may order.
pub const MAX_QUANTITY: i64 = 1_000;

/// An order as a client submits it.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The client's own reference: 1 to 64 characters of `[A-Za-z0-9._:-]`.
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
    /// The payment did not go through.
    Payment(PaymentError),
    /// The database failed, or a repository ran without a tenant.
    Repo(RepoError),
}

/// Places and reads orders.
#[derive(Clone, Debug)]
pub struct OrderService {
    orders: OrderRepository,
    inventory: InventoryRepository,
    payments: PaymentClient,
}

// ===== impl OrderService =====

impl OrderService {
    /// A service over `db`, charging through `payments`.
    pub fn new(db: &Db, payments: PaymentClient) -> Self {
        OrderService {
            orders: OrderRepository::new(db),
            inventory: InventoryRepository::new(db),
            payments,
        }
    }

    /// Validates and places `order` for the current tenant. Call it inside a transaction: it
    /// writes several rows that must commit or roll back together.
    ///
    /// # Errors
    /// See [`ServiceError`]; every write made before the error belongs to the caller's
    /// transaction and is rolled back with it.
    pub async fn place_order(&self, order: &NewOrder) -> Result<Order, ServiceError> {
        async {
            validate(order)?;
            info!(reference = %order.reference, lines = order.items.len(), "placing order");
            // The order row first: on SQLite, a transaction whose first statement writes
            // takes the write lock at once instead of upgrading a read lock later.
            let order_id = self.orders.insert(&order.reference).await?;
            let mut total_cents = 0;
            let mut items = Vec::with_capacity(order.items.len());
            for line in &order.items {
                let Some(product) = self.inventory.find(&line.sku).await? else {
                    warn!(sku = %line.sku, "unknown product");
                    return Err(ServiceError::UnknownProduct(line.sku.clone()));
                };
                if product.stock < line.quantity || !self.inventory.take(&line.sku, line.quantity).await? {
                    warn!(sku = %line.sku, requested = line.quantity, available = product.stock, "insufficient stock");
                    return Err(ServiceError::InsufficientStock {
                        sku: line.sku.clone(),
                        requested: line.quantity,
                        available: product.stock,
                    });
                }
                let item = OrderItem {
                    sku: line.sku.clone(),
                    quantity: line.quantity,
                    price_cents: product.price_cents,
                };
                self.orders.add_item(order_id, &item).await?;
                total_cents += item.quantity * item.price_cents;
                items.push(item);
            }
            info!(reference = %order.reference, total_cents, "inventory validated and reserved");
            let payment_id = self
                .payments
                .authorize(&order.reference, total_cents)
                .await
                .map_err(ServiceError::Payment)?;
            self.orders.mark_paid(order_id, total_cents, &payment_id).await?;
            info!(reference = %order.reference, order_id, "order placed");
            items.sort_by(|a, b| a.sku.cmp(&b.sku));
            Ok(Order {
                id: order_id,
                reference: order.reference.clone(),
                status: "paid".into(),
                total_cents,
                payment_id: Some(payment_id),
                confirmation_sent: false,
                items,
            })
        }
        .instrument(tracing::info_span!("service", op = "place_order"))
        .await
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

/// The shape rules: reference, number of lines, quantities.
fn validate(order: &NewOrder) -> Result<(), ServiceError> {
    let reference_ok = !order.reference.is_empty()
        && order.reference.len() <= 64
        && order
            .reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if !reference_ok {
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
        if item.sku.is_empty() || item.sku.len() > 64 {
            return Err(ServiceError::Invalid(
                "sku must be 1 to 64 characters".into(),
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
            ServiceError::Repo(err) => write!(f, "{err}"),
        }
    }
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
