//! The order repository: orders and their lines, always restricted to the current tenant.

use contextflow_sqlx::TxPool;
use serde::{Deserialize, Serialize};
use sqlx::{any::AnyRow, Any, Row as _};
use tracing::Instrument as _;

use super::{current_tenant, statement, RepoError};

/// Writes and reads the current tenant's orders.
#[derive(Clone, Debug)]
pub struct OrderRepository {
    pool: TxPool<Any>,
    /// Cross-tenant queries (the outbox worker's, the resolver's).
    admin: TxPool<Any>,
}

/// A stored order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id.
    pub id: i64,
    /// The client's reference for it.
    pub reference: String,
    /// `pending` while its payment is undecided, then `paid` or `cancelled`.
    pub status: String,
    /// The total, in cents.
    pub total_cents: i64,
    /// The payment provider's id, once paid.
    pub payment_id: Option<String>,
    /// How many times its confirmation was sent (exactly once, eventually, when paid).
    pub confirmation_sent: i64,
    /// Its lines.
    pub items: Vec<OrderItem>,
}

/// A `pending` order for the resolver, with the context of the request that placed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingOrder {
    /// Its id.
    pub id: i64,
    /// Its tenant (trusted: written by authenticated code).
    pub tenant: String,
    /// Its client reference.
    pub reference: String,
    /// The request id of the request that placed it.
    pub request_id: Option<String>,
    /// The `traceparent` of that request's span.
    pub traceparent: Option<String>,
    /// The idempotency key its charge was asked with; `None` for an order placed by an older
    /// build, which used `order-<id>`.
    pub payment_key: Option<String>,
}

impl PendingOrder {
    /// The key to ask the provider with again: the one the first call used.
    ///
    /// ```
    /// let legacy = order_service::db::PendingOrder {
    ///     id: 7,
    ///     tenant: "acme".into(),
    ///     reference: "r-7".into(),
    ///     request_id: None,
    ///     traceparent: None,
    ///     payment_key: None,
    /// };
    /// assert_eq!(legacy.payment_key(), "order-7");
    /// ```
    pub fn payment_key(&self) -> String {
        match &self.payment_key {
            Some(key) => key.clone(),
            None => format!("order-{}", self.id),
        }
    }
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    /// The product code.
    pub sku: String,
    /// Units ordered.
    pub quantity: i64,
    /// Unit price, in cents, when ordered.
    pub price_cents: i64,
}

impl OrderRepository {
    /// A repository over `db`'s pool.
    pub fn new(db: &super::Db) -> Self {
        OrderRepository {
            pool: db.pool().clone(),
            admin: db.admin().clone(),
        }
    }

    /// Inserts a `pending` order for the current tenant and returns its id, with the request
    /// context that placed it (so the resolver can finish it in that context).
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors, a unique
    /// violation ([`RepoError::is_unique_violation`]) when the tenant has an order with this
    /// reference already.
    pub async fn insert(&self, reference: &str) -> Result<i64, RepoError> {
        let tenant = current_tenant()?;
        let request_id = crate::context::request_id().map(|id| id.as_str().to_owned());
        let traceparent = crate::context::traceparent();
        async {
            let row = statement(
                "INSERT orders",
                self.pool.fetch_one(
                    sqlx::query(
                        "INSERT INTO orders
                            (tenant_id, reference, status, total_cents, request_id, traceparent, created_ms, payment_key)
                         VALUES ($1, $2, 'pending', 0, $3, $4, $5, $6) RETURNING id",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(reference.to_owned())
                    .bind(request_id)
                    .bind(traceparent)
                    .bind(super::now_ms())
                    .bind(crate::payment::idempotency_key(tenant.as_str(), reference)),
                ),
            )
            .await?;
            Ok(row.try_get::<i64, _>("id")?)
        }
        .instrument(tracing::info_span!("repository", op = "orders.insert"))
        .await
    }

    /// PostgreSQL only: step 1 of an order in one statement (one round trip, so the stock
    /// rows stay locked only until the `COMMIT` that follows; they are locked in sku order,
    /// so two orders of the same products never wait for each other in a cycle): inserts the `pending` order as
    /// [`insert`](Self::insert) does, takes each line's stock as
    /// [`InventoryRepository::take_priced`](super::InventoryRepository::take_priced) does, and
    /// adds the lines that got their stock. Returns the order id and, per line of `lines`
    /// (`(sku, quantity)`, each sku once), its unit price, or `None` when it was not taken
    /// (unknown product or too little stock: then roll the transaction back).
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    pub async fn reserve(
        &self,
        reference: &str,
        lines: &[(&str, i64)],
    ) -> Result<(i64, Vec<Option<i64>>), RepoError> {
        let tenant = current_tenant()?;
        let request_id = crate::context::request_id().map(|id| id.as_str().to_owned());
        let traceparent = crate::context::traceparent();
        let values: Vec<String> = (0..lines.len())
            .map(|i| format!("(${}::text, ${}::bigint, {i})", 6 + 2 * i, 7 + 2 * i))
            .collect();
        // The payment key is the last parameter, after the lines'.
        let key_param = 6 + 2 * lines.len();
        let sql = format!(
            "WITH o AS (
                INSERT INTO orders
                    (tenant_id, reference, status, total_cents, request_id, traceparent, created_ms, payment_key)
                VALUES ($1, $2, 'pending', 0, $3, $4, $5, ${key_param}) RETURNING id
             ), v (sku, quantity, line) AS (VALUES {}),
             locked AS (
                SELECT i.sku FROM inventory i
                WHERE i.tenant_id = $1 AND i.sku IN (SELECT sku FROM v)
                ORDER BY i.sku COLLATE \"C\" FOR UPDATE
             ),
             taken AS (
                UPDATE inventory i SET stock = i.stock - v.quantity FROM v, locked
                WHERE i.tenant_id = $1 AND i.sku = v.sku AND locked.sku = v.sku
                  AND i.stock >= v.quantity
                RETURNING i.sku, i.price_cents, v.quantity, v.line
             ),
             items AS (
                INSERT INTO order_items (order_id, tenant_id, sku, quantity, price_cents)
                SELECT o.id, $1, taken.sku, taken.quantity, taken.price_cents FROM o, taken
             )
             SELECT o.id, taken.line, taken.price_cents FROM o LEFT JOIN taken ON true",
            values.join(", ")
        );
        async {
            let mut query = sqlx::query(&sql)
                .bind(tenant.as_str().to_owned())
                .bind(reference.to_owned())
                .bind(request_id)
                .bind(traceparent)
                .bind(super::now_ms());
            for (sku, quantity) in lines {
                query = query.bind((*sku).to_owned()).bind(*quantity);
            }
            let query = query.bind(crate::payment::idempotency_key(tenant.as_str(), reference));
            let rows = statement(
                "INSERT orders, UPDATE inventory, INSERT order_items",
                self.pool.fetch_all(query),
            )
            .await?;
            let mut prices = vec![None; lines.len()];
            let mut order_id = None;
            for row in &rows {
                order_id = Some(row.try_get::<i64, _>(0)?);
                if let Some(line) = row.try_get::<Option<i32>, _>(1)? {
                    if let Some(price) = usize::try_from(line).ok().and_then(|l| prices.get_mut(l))
                    {
                        *price = Some(row.try_get::<i64, _>(2)?);
                    }
                }
            }
            let order_id = order_id.ok_or(RepoError::Sqlx(sqlx::Error::RowNotFound))?;
            Ok((order_id, prices))
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "orders.reserve",
            lines = lines.len()
        ))
        .await
    }

    /// PostgreSQL only: step 3 of a paid order in one statement: marks one of the current
    /// tenant's orders paid, if it is still `pending`, and adds its outbox rows `(topic,
    /// payload)` with the current request's context, as [`mark_paid`](Self::mark_paid) and
    /// [`OutboxRepository::add`](super::OutboxRepository::add) do. `false` (nothing written)
    /// when it was decided already.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn mark_paid_with_outbox(
        &self,
        order_id: i64,
        total_cents: i64,
        payment_id: &str,
        rows: &[(&str, &str)],
    ) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        let request_id = crate::context::request_id().map(|id| id.as_str().to_owned());
        let traceparent = crate::context::traceparent();
        let values: Vec<String> = (0..rows.len())
            .map(|i| format!("(${}::text, ${}::text)", 7 + 2 * i, 8 + 2 * i))
            .collect();
        let sql = format!(
            "WITH paid AS (
                UPDATE orders SET status = 'paid', total_cents = $1, payment_id = $2
                WHERE tenant_id = $3 AND id = $4 AND status = 'pending'
                RETURNING id, tenant_id
             )
             INSERT INTO outbox (tenant_id, order_id, topic, payload, request_id, traceparent)
             SELECT paid.tenant_id, paid.id, v.topic, v.payload, $5, $6
             FROM paid, (VALUES {}) AS v (topic, payload)",
            values.join(", ")
        );
        async {
            let mut query = sqlx::query(&sql)
                .bind(total_cents)
                .bind(payment_id.to_owned())
                .bind(tenant.as_str().to_owned())
                .bind(order_id)
                .bind(request_id)
                .bind(traceparent);
            for (topic, payload) in rows {
                query = query.bind((*topic).to_owned()).bind((*payload).to_owned());
            }
            let done = statement("UPDATE orders, INSERT outbox", self.pool.execute(query)).await?;
            Ok(done.rows_affected() > 0)
        }
        .instrument(tracing::info_span!("repository", op = "orders.mark_paid"))
        .await
    }

    /// The current tenant's order with client reference `reference`, if any.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn find_by_reference(&self, reference: &str) -> Result<Option<Order>, RepoError> {
        let tenant = current_tenant()?;
        let row = self
            .pool
            .fetch_optional(
                sqlx::query("SELECT id FROM orders WHERE tenant_id = $1 AND reference = $2")
                    .bind(tenant.as_str().to_owned())
                    .bind(reference.to_owned()),
            )
            .await?;
        match row {
            Some(row) => self.find(row.try_get::<i64, _>("id")?).await,
            None => Ok(None),
        }
    }

    /// Marks one of the current tenant's orders `cancelled`, if it is still `pending`.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn cancel(&self, order_id: i64) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        async {
            let done = statement(
                "UPDATE orders",
                self.pool.execute(
                    sqlx::query(
                        "UPDATE orders SET status = 'cancelled'
                         WHERE tenant_id = $1 AND id = $2 AND status = 'pending'",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id),
                ),
            )
            .await?;
            Ok(done.rows_affected() == 1)
        }
        .instrument(tracing::info_span!("repository", op = "orders.cancel"))
        .await
    }

    /// Every tenant's `pending` orders created before `before_ms` with an id above `after_id`, oldest first, at most
    /// `limit`: the resolver's work list. This reads across tenants on purpose, through the
    /// admin pool ([`super::Db::admin`]); the resolver binds each order's own tenant before
    /// acting on it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn pending_before(
        &self,
        before_ms: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<PendingOrder>, RepoError> {
        let rows = self
            .admin
            .fetch_all(
                sqlx::query(
                    "SELECT id, tenant_id, reference, request_id, traceparent, payment_key FROM orders
                     WHERE status = 'pending' AND created_ms < $1 AND id > $2
                     ORDER BY id LIMIT $3",
                )
                .bind(before_ms)
                .bind(after_id)
                .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PendingOrder {
                    id: row.try_get("id")?,
                    tenant: row.try_get("tenant_id")?,
                    reference: row.try_get("reference")?,
                    request_id: row.try_get("request_id")?,
                    traceparent: row.try_get("traceparent")?,
                    payment_key: row.try_get("payment_key")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(RepoError::Sqlx)
    }

    /// Adds a line to one of the current tenant's orders.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn add_item(&self, order_id: i64, item: &OrderItem) -> Result<(), RepoError> {
        let tenant = current_tenant()?;
        async {
            statement(
                "INSERT order_items",
                self.pool.execute(
                    sqlx::query(
                        "INSERT INTO order_items (order_id, tenant_id, sku, quantity, price_cents)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(order_id)
                    .bind(tenant.as_str().to_owned())
                    .bind(item.sku.clone())
                    .bind(item.quantity)
                    .bind(item.price_cents),
                ),
            )
            .await?;
            Ok(())
        }
        .instrument(tracing::info_span!("repository", op = "orders.add_item", sku = %item.sku))
        .await
    }

    /// Adds lines to one of the current tenant's orders, in one statement.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn add_items(&self, order_id: i64, items: &[OrderItem]) -> Result<(), RepoError> {
        let tenant = current_tenant()?;
        if items.is_empty() {
            return Ok(());
        }
        let values: Vec<String> = (0..items.len())
            .map(|i| {
                let p = i * 5;
                format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO order_items (order_id, tenant_id, sku, quantity, price_cents) VALUES {}",
            values.join(", ")
        );
        async {
            let mut query = sqlx::query(&sql);
            for item in items {
                query = query
                    .bind(order_id)
                    .bind(tenant.as_str().to_owned())
                    .bind(item.sku.clone())
                    .bind(item.quantity)
                    .bind(item.price_cents);
            }
            statement("INSERT order_items", self.pool.execute(query)).await?;
            Ok(())
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "orders.add_items",
            lines = items.len()
        ))
        .await
    }

    /// Raises `confirmation_sent` of the orders `ids`, of any tenant, once per appearance: the
    /// outbox worker's batch (one id per confirmation row delivered), in the admin pool's
    /// transaction that claims the batch's rows. An order with two confirmation rows in one
    /// batch is raised by two, so the "confirmed exactly once" checks see a double
    /// confirmation (an `IN` list would raise it once and hide it). One statement per distinct
    /// count: one in the normal case.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_confirmed_batch(&self, ids: &[i64]) -> Result<(), RepoError> {
        let mut counts: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
        for id in ids {
            *counts.entry(*id).or_default() += 1;
        }
        let mut by_count: std::collections::BTreeMap<i64, Vec<i64>> =
            std::collections::BTreeMap::new();
        for (id, count) in counts {
            by_count.entry(count).or_default().push(id);
        }
        for (count, ids) in by_count {
            // `count` is a number we computed, not input: safe to write into the statement.
            let batch = ids_query(
                &format!(
                    "UPDATE orders SET confirmation_sent = confirmation_sent + {count} WHERE id IN ({{ids}})"
                ),
                &ids,
            );
            self.admin.execute(batch.query()).await?;
        }
        Ok(())
    }

    /// Marks one of the current tenant's orders paid, if it is still `pending`.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn mark_paid(
        &self,
        order_id: i64,
        total_cents: i64,
        payment_id: &str,
    ) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        async {
            let done = statement(
                "UPDATE orders",
                self.pool.execute(
                    sqlx::query(
                        "UPDATE orders SET status = 'paid', total_cents = $1, payment_id = $2
                         WHERE tenant_id = $3 AND id = $4 AND status = 'pending'",
                    )
                    .bind(total_cents)
                    .bind(payment_id.to_owned())
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id),
                ),
            )
            .await?;
            Ok(done.rows_affected() == 1)
        }
        .instrument(tracing::info_span!("repository", op = "orders.mark_paid"))
        .await
    }

    /// Records that the confirmation of one of the current tenant's orders went out (a count,
    /// so a second confirmation would show).
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn mark_confirmed(&self, order_id: i64) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        async {
            let done = statement(
                "UPDATE orders",
                self.pool.execute(
                    sqlx::query(
                        "UPDATE orders SET confirmation_sent = confirmation_sent + 1
                         WHERE tenant_id = $1 AND id = $2",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id),
                ),
            )
            .await?;
            Ok(done.rows_affected() == 1)
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "orders.mark_confirmed"
        ))
        .await
    }

    /// One of the current tenant's orders, with its lines; `None` for another tenant's.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn find(&self, order_id: i64) -> Result<Option<Order>, RepoError> {
        let tenant = current_tenant()?;
        async {
            let Some(row) = statement(
                "SELECT orders",
                self.pool.fetch_optional(
                    sqlx::query(
                        "SELECT id, reference, status, total_cents, payment_id, confirmation_sent
                         FROM orders WHERE tenant_id = $1 AND id = $2",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id),
                ),
            )
            .await?
            else {
                return Ok(None);
            };
            let items = statement(
                "SELECT order_items",
                self.pool.fetch_all(
                    sqlx::query(
                        "SELECT sku, quantity, price_cents FROM order_items
                         WHERE tenant_id = $1 AND order_id = $2 ORDER BY sku",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id),
                ),
            )
            .await?;
            Ok(Some(order_from_rows(&row, &items)?))
        }
        .instrument(tracing::info_span!("repository", op = "orders.find"))
        .await
    }

    /// Of the current tenant's orders whose reference starts with `prefix`: how many are paid,
    /// how many were confirmed exactly once, and how many more than once.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn count_with_prefix(&self, prefix: &str) -> Result<(i64, i64, i64), RepoError> {
        let tenant = current_tenant()?;
        let row = self
            .pool
            .fetch_one(
                sqlx::query(
                    "SELECT
                        COUNT(CASE WHEN status = 'paid' THEN 1 END) AS paid,
                        COUNT(CASE WHEN confirmation_sent = 1 THEN 1 END) AS confirmed,
                        COUNT(CASE WHEN confirmation_sent > 1 THEN 1 END) AS repeated
                     FROM orders WHERE tenant_id = $1 AND reference LIKE $2",
                )
                .bind(tenant.as_str().to_owned())
                .bind(format!("{prefix}%")),
            )
            .await?;
        Ok((
            row.try_get::<i64, _>("paid")?,
            row.try_get::<i64, _>("confirmed")?,
            row.try_get::<i64, _>("repeated")?,
        ))
    }

    /// How many orders of any tenant (any `tenant_id`, a known one or not) have a reference
    /// that starts with `prefix`: read through the admin pool, across tenants on purpose (the
    /// demo's check that no copy of an order sits under a tenant nobody reads as).
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_all_tenants_with_prefix(&self, prefix: &str) -> Result<i64, RepoError> {
        let row = self
            .admin
            .fetch_one(
                sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE reference LIKE $1")
                    .bind(format!("{prefix}%")),
            )
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }

    /// The current tenant's orders whose reference starts with `prefix`: `(reference, status,
    /// confirmation_sent)` each (the demo's check that every order sits under the tenant whose
    /// request created it).
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn list_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String, i64)>, RepoError> {
        let tenant = current_tenant()?;
        let rows = self
            .pool
            .fetch_all(
                sqlx::query(
                    "SELECT reference, status, confirmation_sent FROM orders
                     WHERE tenant_id = $1 AND reference LIKE $2",
                )
                .bind(tenant.as_str().to_owned())
                .bind(format!("{prefix}%")),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get::<String, _>("reference")?,
                    row.try_get::<String, _>("status")?,
                    row.try_get::<i64, _>("confirmation_sent")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(RepoError::Sqlx)
    }

    /// How many rows of the current tenant's orders and order lines exist in total (the
    /// tests' "nothing was written" check).
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn count_rows(&self) -> Result<(i64, i64), RepoError> {
        let tenant = current_tenant()?;
        let orders = self
            .pool
            .fetch_one(
                sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE tenant_id = $1")
                    .bind(tenant.as_str().to_owned()),
            )
            .await?
            .try_get::<i64, _>("n")?;
        let items = self
            .pool
            .fetch_one(
                sqlx::query("SELECT COUNT(*) AS n FROM order_items WHERE tenant_id = $1")
                    .bind(tenant.as_str().to_owned()),
            )
            .await?
            .try_get::<i64, _>("n")?;
        Ok((orders, items))
    }
}

/// `$1, $2, ..., $n`.
pub(crate) fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sql` (written with `{ids}` where the list goes, for example `WHERE id IN ({ids})`) with
/// one placeholder per id, and the query that binds them: for the batch statements that
/// name rows by id.
pub(crate) fn ids_query(sql: &str, ids: &[i64]) -> IdsQuery {
    IdsQuery {
        sql: sql.replace("{ids}", &placeholders(ids.len())),
        ids: ids.to_vec(),
    }
}

/// A statement over a list of ids; see [`ids_query`].
pub(crate) struct IdsQuery {
    sql: String,
    ids: Vec<i64>,
}

impl IdsQuery {
    /// The query, with every id bound.
    pub(crate) fn query(&self) -> sqlx::query::Query<'_, Any, sqlx::any::AnyArguments<'_>> {
        self.ids
            .iter()
            .fold(sqlx::query(&self.sql), |query, id| query.bind(*id))
    }
}

fn order_from_rows(row: &AnyRow, items: &[AnyRow]) -> Result<Order, sqlx::Error> {
    let mut order = Order {
        id: row.try_get("id")?,
        reference: row.try_get("reference")?,
        status: row.try_get("status")?,
        total_cents: row.try_get("total_cents")?,
        payment_id: row.try_get("payment_id")?,
        confirmation_sent: row.try_get::<i64, _>("confirmation_sent")?,
        items: items
            .iter()
            .map(|r| {
                Ok(OrderItem {
                    sku: r.try_get("sku")?,
                    quantity: r.try_get("quantity")?,
                    price_cents: r.try_get("price_cents")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?,
    };
    // In byte order, as the service sorts an order's lines (a database's `ORDER BY` follows
    // its collation, which may not): a retry returns the lines as the first answer did.
    order.items.sort_by(|a, b| a.sku.cmp(&b.sku));
    Ok(order)
}
