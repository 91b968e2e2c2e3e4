//! Test databases (PostgreSQL and MariaDB from the environment, SQLite in a temp file), a
//! tracing capture keyed by a context variable, and a future that is dropped after N polls.

#![allow(dead_code)]

use std::{
    future::Future,
    hash::BuildHasher,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, Once,
    },
    task::{Context, Poll},
    time::Duration,
};

use contextflow::AsyncLocal;
use contextflow_sqlx::TxPool;
use sqlx::Database;

/// The block (or request) a log line belongs to, read by the capture layer when a line is
/// written: proves contextflow-sqlx logs in the caller's context.
pub(crate) static BLOCK: AsyncLocal<u64> = AsyncLocal::named("cf_sqlx_test.block");

/// Log lines of contextflow-sqlx, with the `BLOCK` current when each was written.
static CAPTURED: Mutex<Vec<(Option<u64>, String)>> = Mutex::new(Vec::new());

/// A fresh id for a block (unique in the process).
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A name no other test, run or process uses.
pub(crate) fn unique(prefix: &str) -> String {
    let n = next_id();
    let random = std::collections::hash_map::RandomState::new().hash_one((n, std::process::id()));
    format!("{prefix}_{random:016x}")
}

/// Installs the capture layer (once per process).
pub(crate) fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        use tracing_subscriber::prelude::*;
        let _ = tracing_subscriber::registry().with(Capture).try_init();
    });
}

/// The log lines written while `BLOCK` was `block`.
pub(crate) fn captured(block: u64) -> Vec<String> {
    CAPTURED
        .lock()
        .unwrap()
        .iter()
        .filter(|(b, _)| *b == Some(block))
        .map(|(_, line)| line.clone())
        .collect()
}

struct Capture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "contextflow_sqlx" {
            return;
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, "{}={:?} ", field.name(), value);
            }
        }
        let mut message = Message(format!("{} ", event.metadata().level()));
        event.record(&mut message);
        CAPTURED.lock().unwrap().push((BLOCK.get(), message.0));
    }
}

/// Polls `fut` at most `polls` times, then drops it: `Some(output)` if it finished first.
/// Each poll after the first happens because the future was woken, so dropping after `polls`
/// polls drops it at its `polls`-th suspension point.
pub(crate) struct DropAfter<F> {
    fut: Option<Pin<Box<F>>>,
    left: usize,
}

impl<F: Future> DropAfter<F> {
    pub(crate) fn new(fut: F, polls: usize) -> Self {
        DropAfter {
            fut: Some(Box::pin(fut)),
            left: polls,
        }
    }
}

impl<F: Future> Future for DropAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.left == 0 {
            self.fut = None;
            return Poll::Ready(None);
        }
        self.left -= 1;
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Ready(None);
        };
        match fut.as_mut().poll(cx) {
            Poll::Ready(output) => {
                self.fut = None;
                Poll::Ready(Some(output))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A deterministic pseudo-random sequence (xorshift), seeded per run and printed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Rng {
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A pool over a fresh table `table (id BIGINT, tag BIGINT)`.
pub(crate) struct Ctx<DB: Database> {
    pub(crate) db: TxPool<DB>,
    pub(crate) table: String,
    /// Set for PostgreSQL: the pool's `application_name`, to find its sessions.
    pub(crate) app_name: Option<String>,
    pub(crate) _dir: Option<tempfile::TempDir>,
}

pub(crate) const TABLE_SQL: &str = "(id BIGINT NOT NULL, tag BIGINT NOT NULL)";

/// How long a pool waits for a connection: generous, for a loaded machine (never reached in a
/// passing run; a hang becomes a failure).
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(120);

#[cfg(feature = "postgres")]
pub(crate) async fn postgres(max_connections: u32) -> Ctx<sqlx::Postgres> {
    use sqlx::postgres::PgConnectOptions;
    init_tracing();
    let url = contextflow_testenv::url(contextflow_testenv::Service::Postgres);
    let app_name = unique("cf_sqlx");
    let options = url
        .parse::<PgConnectOptions>()
        .unwrap()
        .application_name(&app_name);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to CONTEXTFLOW_PG_URL: {err}"));
    let table = unique("cf_sqlx");
    sqlx::query(&format!("CREATE TABLE {table} {TABLE_SQL}"))
        .execute(&pool)
        .await
        .unwrap();
    Ctx {
        db: TxPool::new(pool),
        table,
        app_name: Some(app_name),
        _dir: None,
    }
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql(max_connections: u32) -> Ctx<sqlx::MySql> {
    init_tracing();
    let url = contextflow_testenv::url(contextflow_testenv::Service::MySql);
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(&url)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to CONTEXTFLOW_MYSQL_URL: {err}"));
    let table = unique("cf_sqlx");
    // An index on `id`, so that row locks are taken on the rows a statement names.
    let columns = "(id BIGINT NOT NULL, tag BIGINT NOT NULL, KEY (id))";
    sqlx::query(&format!("CREATE TABLE {table} {columns} ENGINE = InnoDB"))
        .execute(&pool)
        .await
        .unwrap();
    Ctx {
        db: TxPool::new(pool),
        table,
        app_name: None,
        _dir: None,
    }
}

/// SQLite in a fresh temporary file, in WAL mode so that readers do not wait for the writer.
#[cfg(feature = "sqlite")]
pub(crate) async fn sqlite(max_connections: u32) -> Ctx<sqlx::Sqlite> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("test.sqlite"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // Writers queue for SQLite's single write lock; a loaded machine may take a while.
        .busy_timeout(ACQUIRE_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .unwrap();
    let table = unique("cf_sqlx");
    sqlx::query(&format!("CREATE TABLE {table} {TABLE_SQL}"))
        .execute(&pool)
        .await
        .unwrap();
    Ctx {
        db: TxPool::new(pool),
        table,
        app_name: None,
        _dir: Some(dir),
    }
}

impl<DB: Database> Ctx<DB> {
    /// Drops the table (a failed test leaves it behind; its name is unique, so that is
    /// harmless) and closes the pool.
    pub(crate) async fn finish(self)
    where
        for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    {
        let sql = format!("DROP TABLE {}", self.table);
        sqlx::Executor::execute(self.db.pool(), sql.as_str())
            .await
            .unwrap();
        self.db.pool().close().await;
    }
}
