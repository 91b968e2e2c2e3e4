//! The inventory repository: per-tenant stock and prices.

use contextflow_sqlx::TxPool;
use sqlx::{Any, Row as _};
use tracing::Instrument as _;

use super::{current_tenant, statement, RepoError};

/// Reads and reserves stock of the current tenant's products.
#[derive(Clone, Debug)]
pub struct InventoryRepository {
    pool: TxPool<Any>,
}

/// One product of the current tenant.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StockItem {
    /// The product code.
    pub sku: String,
    /// Its display name.
    pub name: String,
    /// Units in stock.
    pub stock: i64,
    /// Unit price in cents.
    pub price_cents: i64,
}

impl InventoryRepository {
    /// A repository over `db`'s pool.
    pub fn new(db: &super::Db) -> Self {
        InventoryRepository {
            pool: db.pool().clone(),
        }
    }

    /// The current tenant's product `sku`, if it has one.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn find(&self, sku: &str) -> Result<Option<StockItem>, RepoError> {
        let tenant = current_tenant()?;
        async {
            let row = statement(
                "SELECT inventory",
                self.pool.fetch_optional(
                    sqlx::query(
                        "SELECT sku, name, stock, price_cents FROM inventory
                         WHERE tenant_id = $1 AND sku = $2",
                    )
                    .bind(tenant.as_str().to_owned())
                    .bind(sku.to_owned()),
                ),
            )
            .await?;
            row.map(|row| {
                Ok(StockItem {
                    sku: row.try_get("sku")?,
                    name: row.try_get("name")?,
                    stock: row.try_get("stock")?,
                    price_cents: row.try_get("price_cents")?,
                })
            })
            .transpose()
            .map_err(RepoError::Sqlx)
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "inventory.find",
            sku
        ))
        .await
    }

    /// Takes `quantity` units of `sku` from the current tenant's stock; `false` (and nothing
    /// changed) when there are fewer left, so concurrent orders can never oversell.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn take(&self, sku: &str, quantity: i64) -> Result<bool, RepoError> {
        let tenant = current_tenant()?;
        async {
            let done = statement(
                "UPDATE inventory",
                self.pool.execute(
                    sqlx::query(
                        "UPDATE inventory SET stock = stock - $1
                         WHERE tenant_id = $2 AND sku = $3 AND stock >= $1",
                    )
                    .bind(quantity)
                    .bind(tenant.as_str().to_owned())
                    .bind(sku.to_owned()),
                ),
            )
            .await?;
            Ok(done.rows_affected() == 1)
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "inventory.take",
            sku,
            quantity
        ))
        .await
    }

    /// Takes `quantity` units of `sku` from the current tenant's stock and returns its unit
    /// price, in one statement; `None` (and nothing changed) when the product is unknown or
    /// has fewer units left, so concurrent orders can never oversell.
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn take_priced(&self, sku: &str, quantity: i64) -> Result<Option<i64>, RepoError> {
        let tenant = current_tenant()?;
        async {
            let row = statement(
                "UPDATE inventory",
                self.pool.fetch_optional(
                    sqlx::query(
                        "UPDATE inventory SET stock = stock - $1
                         WHERE tenant_id = $2 AND sku = $3 AND stock >= $1
                         RETURNING price_cents",
                    )
                    .bind(quantity)
                    .bind(tenant.as_str().to_owned())
                    .bind(sku.to_owned()),
                ),
            )
            .await?;
            row.map(|row| row.try_get::<i64, _>("price_cents"))
                .transpose()
                .map_err(RepoError::Sqlx)
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "inventory.take",
            sku,
            quantity
        ))
        .await
    }

    /// Puts `quantity` units of `sku` back into the current tenant's stock (a cancelled order).
    ///
    /// # Errors
    /// [`RepoError::NoTenant`] outside an authenticated context; database errors.
    pub async fn release(&self, sku: &str, quantity: i64) -> Result<(), RepoError> {
        let tenant = current_tenant()?;
        async {
            statement(
                "UPDATE inventory",
                self.pool.execute(
                    sqlx::query(
                        "UPDATE inventory SET stock = stock + $1 WHERE tenant_id = $2 AND sku = $3",
                    )
                    .bind(quantity)
                    .bind(tenant.as_str().to_owned())
                    .bind(sku.to_owned()),
                ),
            )
            .await?;
            Ok(())
        }
        .instrument(tracing::info_span!(
            "repository",
            op = "inventory.release",
            sku,
            quantity
        ))
        .await
    }
}
