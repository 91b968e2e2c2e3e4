//! What contextflow-sqlx's safety costs on PostgreSQL, measured side by side in one run:
//! transactions per second for the acquire-time idle check (with and without sqlx's own ping)
//! and for a tenant pool's `set_config` per transaction.
//!
//! Run with: `CONTEXTFLOW_PG_URL=postgres://postgres@127.0.0.1:5432/test cargo run --release
//! -p contextflow-sqlx --features postgres --example tx_cost` (the server must let the roles
//! `cf_sqlx_owner` and `cf_sqlx_app` log in without a password, as the tests do).

use std::time::{Duration, Instant};

use contextflow::AsyncLocal;
use contextflow_sqlx::{AdminPool, TenantPool, TxPool, DEFAULT_COLUMN, DEFAULT_SETTING};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Postgres,
};

static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");

const TX_PER_ROUND: u32 = 1_000;
const ROUNDS: u32 = 5;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("CONTEXTFLOW_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let options: PgConnectOptions = url.parse()?;
    let superuser = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    sqlx::raw_sql(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cf_sqlx_owner') THEN
             CREATE ROLE cf_sqlx_owner LOGIN NOSUPERUSER NOBYPASSRLS; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cf_sqlx_app') THEN
             CREATE ROLE cf_sqlx_app LOGIN NOSUPERUSER NOBYPASSRLS; END IF;
         END $$;
         DROP SCHEMA IF EXISTS cf_sqlx_bench CASCADE;
         CREATE SCHEMA cf_sqlx_bench AUTHORIZATION cf_sqlx_owner;
         GRANT USAGE ON SCHEMA cf_sqlx_bench TO cf_sqlx_app;",
    )
    .execute(&superuser)
    .await?;
    let owner = AdminPool::new(pool(&options, "cf_sqlx_owner", true).await?);
    sqlx::raw_sql(
        "CREATE TABLE cf_sqlx_bench.items (id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL, v BIGINT NOT NULL);
         INSERT INTO cf_sqlx_bench.items (tenant_id, v) SELECT 't' || (g % 8), g FROM generate_series(1, 800) g;
         GRANT SELECT, INSERT, UPDATE, DELETE ON cf_sqlx_bench.items TO cf_sqlx_app;",
    )
    .execute(owner.pool())
    .await?;
    owner
        .enable_row_level_security("cf_sqlx_bench.items", DEFAULT_COLUMN, DEFAULT_SETTING)
        .await?;

    let app = |ping| pool(&options, "cf_sqlx_app", ping);
    let modes: Vec<(&str, Mode)> = vec![
        (
            "no check, sqlx ping (sqlx default)",
            Mode::Plain(
                TxPool::builder(app(true).await?)
                    .check_on_acquire(false)
                    .build(),
            ),
        ),
        (
            "check, sqlx ping (TxPool::new default)",
            Mode::Plain(TxPool::new(app(true).await?)),
        ),
        (
            "check, no sqlx ping (recommended)",
            Mode::Plain(TxPool::new(app(false).await?)),
        ),
        (
            "no check, no sqlx ping",
            Mode::Plain(
                TxPool::builder(app(false).await?)
                    .check_on_acquire(false)
                    .build(),
            ),
        ),
        (
            "tenant pool: check, no ping, set_config",
            Mode::Tenant(TenantPool::new(app(false).await?, &TENANT).await?),
        ),
        (
            "tenant pool: no check, no ping, set_config",
            Mode::Tenant(
                TenantPool::builder(app(false).await?, &TENANT)
                    .check_on_acquire(false)
                    .build()
                    .await?,
            ),
        ),
    ];
    let mut totals = vec![Duration::ZERO; modes.len()];
    for _ in 0..ROUNDS {
        for (i, (_, mode)) in modes.iter().enumerate() {
            totals[i] += TENANT.scope("t3".into(), mode.run(TX_PER_ROUND)).await?;
        }
    }
    let rate = |d: Duration| f64::from(TX_PER_ROUND * ROUNDS) / d.as_secs_f64();
    let base = rate(totals[0]);
    println!("PostgreSQL, 1 connection, serial transactions (BEGIN; SELECT count(*) .. ; COMMIT), {} per mode, interleaved rounds", TX_PER_ROUND * ROUNDS);
    for ((name, _), total) in modes.iter().zip(&totals) {
        println!(
            "{name:<45} {:>8.0} tx/s  {:>5.2}x",
            rate(*total),
            rate(*total) / base
        );
    }
    sqlx::raw_sql("DROP SCHEMA cf_sqlx_bench CASCADE")
        .execute(&superuser)
        .await?;
    Ok(())
}

enum Mode {
    Plain(TxPool<Postgres>),
    Tenant(TenantPool<Postgres>),
}

impl Mode {
    async fn run(&self, n: u32) -> Result<Duration, sqlx::Error> {
        let db: &TxPool<Postgres> = match self {
            Mode::Plain(db) => db,
            Mode::Tenant(db) => db,
        };
        let start = Instant::now();
        for _ in 0..n {
            db.transaction(|| async {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM cf_sqlx_bench.items")
                    .fetch_one(db)
                    .await
            })
            .await?;
        }
        Ok(start.elapsed())
    }
}

async fn pool(options: &PgConnectOptions, role: &str, ping: bool) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(ping)
        .connect_with(options.clone().username(role))
        .await
}
