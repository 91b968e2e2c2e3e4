//! The transactional outbox: what must happen after an order is paid (its confirmation, its
//! `order.confirmed` event), written in the same transaction that marks it paid, and delivered
//! later by the outbox worker ([`crate::outbox`]). A committed payment therefore always has
//! its rows, whatever happens to the request afterwards.

use contextflow_sqlx::TxPool;
use sqlx::{Any, Row as _};
use tracing::Instrument as _;

use super::{current_tenant, statement, RepoError};

/// Writes and claims outbox rows.
#[derive(Clone, Debug)]
pub struct OutboxRepository {
    pool: TxPool<Any>,
    /// Cross-tenant queries (the outbox worker's, the resolver's).
    admin: TxPool<Any>,
    /// Which database: the batch claim is written for each.
    backend: super::Backend,
}

/// An undelivered outbox row, with the context of the request that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its id (also the delivered message's id).
    pub id: i64,
    /// The order's tenant (trusted: written by authenticated code).
    pub tenant: String,
    /// The order.
    pub order_id: i64,
    /// What to do: [`crate::outbox::CONFIRMATION`] or [`crate::queue::ORDER_CONFIRMED`].
    pub topic: String,
    /// The JSON payload.
    pub payload: String,
    /// The request id of the request that paid the order.
    pub request_id: Option<String>,
    /// The `traceparent` of that request's span.
    pub traceparent: Option<String>,
}

impl OutboxRepository {
    /// A repository over `db`'s pool.
    pub fn new(db: &super::Db) -> Self {
        OutboxRepository {
            pool: db.pool().clone(),
            admin: db.admin().clone(),
            backend: db.backend(),
        }
    }

    /// Adds rows `(topic, payload)` for one of the current tenant's orders, with the current
    /// request's context, in one statement. Call it inside the transaction that changes the
    /// order.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn add(&self, order_id: i64, rows: &[(&str, &str)]) -> Result<(), RepoError> {
        let tenant = current_tenant()?;
        let request_id = crate::context::request_id().map(|id| id.as_str().to_owned());
        let traceparent = crate::context::traceparent();
        let values: Vec<String> = (0..rows.len())
            .map(|i| {
                let p = i * 6;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO outbox (tenant_id, order_id, topic, payload, request_id, traceparent) VALUES {}",
            values.join(", ")
        );
        async {
            let mut query = sqlx::query(&sql);
            for (topic, payload) in rows {
                query = query
                    .bind(tenant.as_str().to_owned())
                    .bind(order_id)
                    .bind((*topic).to_owned())
                    .bind((*payload).to_owned())
                    .bind(request_id.clone())
                    .bind(traceparent.clone());
            }
            statement("INSERT outbox", self.pool.execute(query)).await?;
            Ok(())
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "outbox.add",
            rows = rows.len()
        ))
        .await
    }

    /// Claims the oldest `limit` undelivered rows of every tenant (marks them delivered) and
    /// returns them, oldest first: the outbox worker's batch, read and claimed in one
    /// statement through the admin pool ([`super::Db::admin`]), which reads across tenants on
    /// purpose (the worker binds each row's own tenant to deliver it). With `topic`, only rows
    /// of that topic. Call it in the admin pool's transaction of the deliveries' effects, so
    /// each effect happens once: a row that another transaction claims first is not returned
    /// (its `delivered = 0` no longer holds once that one commits; on PostgreSQL, rows another
    /// instance's batch holds are skipped rather than waited for), and a batch that does not
    /// commit leaves its rows undelivered.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_oldest(
        &self,
        limit: i64,
        topic: Option<&str>,
    ) -> Result<Vec<OutboxRow>, RepoError> {
        // SQLite has one writer at a time: its transaction holds the whole database.
        let lock = match self.backend {
            super::Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let of_topic = if topic.is_some() {
            "AND topic = $2"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE outbox SET delivered = 1
             WHERE delivered = 0 AND id IN
                 (SELECT id FROM outbox WHERE delivered = 0 {of_topic} ORDER BY id LIMIT $1 {lock})
             RETURNING id, tenant_id, order_id, topic, payload, request_id, traceparent"
        );
        let mut query = sqlx::query(&sql).bind(limit);
        if let Some(topic) = topic {
            query = query.bind(topic.to_owned());
        }
        let rows = self.admin.fetch_all(query).await?;
        let mut rows = rows
            .iter()
            .map(|row| {
                Ok(OutboxRow {
                    id: row.try_get("id")?,
                    tenant: row.try_get("tenant_id")?,
                    order_id: row.try_get("order_id")?,
                    topic: row.try_get("topic")?,
                    payload: row.try_get("payload")?,
                    request_id: row.try_get("request_id")?,
                    traceparent: row.try_get("traceparent")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(RepoError::Sqlx)?;
        // `RETURNING` promises no order.
        rows.sort_unstable_by_key(|row| row.id);
        Ok(rows)
    }

    /// Sets the claimed rows `ids` aside as undeliverable (`delivered = 2`: a payload that does
    /// not parse, a topic this version does not know), so that they no longer hold up the rows
    /// behind them; they stay in the table for an operator. Through the admin pool, in the
    /// batch's transaction.
    ///
    /// # Errors
    /// Database errors.
    pub async fn set_aside(&self, ids: &[i64]) -> Result<(), RepoError> {
        if ids.is_empty() {
            return Ok(());
        }
        let batch =
            super::orders::ids_query("UPDATE outbox SET delivered = 2 WHERE id IN ({ids})", ids);
        self.admin.execute(batch.query()).await?;
        Ok(())
    }

    /// Gives the claimed rows `ids` back (undelivered again), in the batch's transaction: rows
    /// whose event the broker did not take this time, for a later pass.
    ///
    /// # Errors
    /// Database errors.
    pub async fn release(&self, ids: &[i64]) -> Result<(), RepoError> {
        if ids.is_empty() {
            return Ok(());
        }
        let batch =
            super::orders::ids_query("UPDATE outbox SET delivered = 0 WHERE id IN ({ids})", ids);
        self.admin.execute(batch.query()).await?;
        Ok(())
    }

    /// Marks one of the current tenant's rows delivered; `false` when it already was (someone
    /// else delivered it). Call it in the transaction of the delivery's own effect, so the
    /// effect happens exactly once.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn claim(&self, id: i64) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        let done = statement(
            "UPDATE outbox",
            self.pool.execute(
                sqlx::query(
                    "UPDATE outbox SET delivered = 1 WHERE tenant_id = $1 AND id = $2 AND delivered = 0",
                )
                .bind(tenant.as_str().to_owned())
                .bind(id),
            ),
        )
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// How many rows are not delivered yet, over all tenants (admin pool).
    ///
    /// # Errors
    /// Database errors.
    pub async fn backlog(&self) -> Result<i64, RepoError> {
        let row = self
            .admin
            .fetch_one(sqlx::query(
                "SELECT COUNT(*) AS n FROM outbox WHERE delivered = 0",
            ))
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }
}
