//! Test databases: a PostgreSQL server from the environment, or SQLite in a temp file.

use std::{
    hash::BuildHasher,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use contextflow_sqlx::TxPool;
use sqlx::{
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
    Database, Postgres, Sqlite,
};

/// A pool over a fresh table `table (id BIGINT, tag BIGINT)`.
pub(crate) struct Ctx<DB: Database> {
    pub(crate) db: TxPool<DB>,
    pub(crate) table: String,
    _dir: Option<tempfile::TempDir>,
}

const TABLE_SQL: &str = "(id BIGINT NOT NULL, tag BIGINT NOT NULL)";

/// A table name no other test, run or process uses.
fn unique_table() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = std::collections::hash_map::RandomState::new().hash_one((n, std::process::id()));
    format!("cf_sqlx_{random:016x}")
}

/// PostgreSQL from `CONTEXTFLOW_PG_URL`, or `None` (after saying why) when it is not set.
///
/// # Panics
/// When the variable is unset but `CONTEXTFLOW_REQUIRE_SERVICES=1`, or the server is unusable.
pub(crate) async fn postgres(max_connections: u32) -> Option<Ctx<Postgres>> {
    let Ok(url) = std::env::var("CONTEXTFLOW_PG_URL") else {
        if std::env::var("CONTEXTFLOW_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!(
                "CONTEXTFLOW_PG_URL is not set, but CONTEXTFLOW_REQUIRE_SERVICES=1 requires the \
                 PostgreSQL tests to run (e.g. CONTEXTFLOW_PG_URL=postgres://postgres@127.0.0.1:5432/test)"
            );
        }
        eprintln!("skipped: CONTEXTFLOW_PG_URL is not set (set it to run the PostgreSQL tests)");
        return None;
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(120))
        .connect(&url)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to CONTEXTFLOW_PG_URL: {err}"));
    let table = unique_table();
    sqlx::query(&format!("CREATE TABLE {table} {TABLE_SQL}"))
        .execute(&pool)
        .await
        .unwrap();
    Some(Ctx {
        db: TxPool::new(pool),
        table,
        _dir: None,
    })
}

/// SQLite in a fresh temporary file, in WAL mode so that readers do not wait for writers.
pub(crate) async fn sqlite(max_connections: u32) -> Ctx<Sqlite> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.sqlite");
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .unwrap()
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // Writers queue for SQLite's single write lock; a loaded machine may take a while.
        .busy_timeout(Duration::from_secs(120));
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(120))
        .connect_with(options)
        .await
        .unwrap();
    let table = unique_table();
    sqlx::query(&format!("CREATE TABLE {table} {TABLE_SQL}"))
        .execute(&pool)
        .await
        .unwrap();
    Ctx {
        db: TxPool::new(pool),
        table,
        _dir: Some(dir),
    }
}

impl Ctx<Postgres> {
    /// Drops the table (a failed test leaves it behind; its name is unique, so that is harmless).
    pub(crate) async fn finish(self) {
        sqlx::query(&format!("DROP TABLE {}", self.table))
            .execute(self.db.pool())
            .await
            .unwrap();
        self.db.pool().close().await;
    }
}

impl Ctx<Sqlite> {
    /// Closes the pool; the temporary directory goes with `self`.
    pub(crate) async fn finish(self) {
        self.db.pool().close().await;
    }
}
