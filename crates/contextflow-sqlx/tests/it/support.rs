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

/// What a block's captured lines say about a COMMIT whose caller went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommitReport {
    /// A line says it committed.
    pub(crate) committed: bool,
    /// A line says it did not commit.
    pub(crate) not_committed: bool,
    /// A line says the outcome is unknown for good.
    pub(crate) unknown: bool,
}

impl CommitReport {
    /// Reads `lines` (from [`captured`]); the interim "outcome unknown until the connection is
    /// examined" is no verdict.
    pub(crate) fn of(lines: &[String]) -> CommitReport {
        let says = |needles: &[&str]| {
            lines
                .iter()
                .any(|line| needles.iter().any(|needle| line.contains(needle)))
        };
        CommitReport {
            committed: says(&[
                "dropped COMMIT resolved: committed",
                "during COMMIT, which committed",
            ]),
            not_committed: says(&[
                "dropped COMMIT resolved: rolled back",
                "during COMMIT, which did not commit",
                "not committed: the task that was to run COMMIT",
            ]),
            unknown: says(&[
                "outcome unknown; connection closed",
                "may or may not have committed",
                "whose outcome is unknown",
            ]),
        }
    }

    /// Whether any line speaks of a COMMIT whose caller went away.
    pub(crate) fn any(self) -> bool {
        self.committed || self.not_committed || self.unknown
    }

    /// Panics (with `what`) unless the report agrees with what the database holds: `present`
    /// says whether the block's work is there.
    pub(crate) fn assert_agrees(self, present: bool, what: &str) {
        assert!(
            !(self.committed && self.not_committed),
            "{what}: the lines say both committed and not committed"
        );
        if present {
            assert!(
                !self.not_committed,
                "{what}: committed, but reported as not committed"
            );
        } else {
            assert!(
                !self.committed,
                "{what}: not committed, but reported as committed"
            );
        }
    }
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
    /// The proxy the pool connects through, if any (dropped after the pool is closed).
    pub(crate) _proxy: Option<SlowProxy>,
}

/// A TCP proxy on 127.0.0.1 in front of a database server that holds each piece of every
/// answer for `delay` before passing it on, on a thread and runtime of its own. Behind it,
/// every answer arrives after its reader has looked for it once, so a future waiting on the
/// database suspends at each round trip whatever the runtime and the machine's speed: the
/// drop-at-every-await-point tests then reach every step of the protocol. (Without it, a
/// debug build on `current_thread` often found PostgreSQL's answers already there and
/// finished a ten-statement block in 2 or 3 polls.)
pub(crate) struct SlowProxy {
    pub(crate) port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowProxy {
    pub(crate) fn start(host: &str, port: u16, delay: Duration) -> SlowProxy {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let local = listener.local_addr().unwrap().port();
        let target = (host.to_owned(), port);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let client = tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => match accepted {
                            Ok((client, _)) => client,
                            Err(_) => continue,
                        },
                    };
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (_, _) = (client.set_nodelay(true), server.set_nodelay(true));
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let up = async {
                            tokio::io::copy(&mut client_read, &mut server_write).await?;
                            server_write.shutdown().await
                        };
                        let down = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = server_read.read(&mut buf).await?;
                                if n == 0 {
                                    break;
                                }
                                tokio::time::sleep(delay).await;
                                client_write.write_all(&buf[..n]).await?;
                            }
                            client_write.shutdown().await
                        };
                        let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(up, down);
                    });
                }
            });
        });
        SlowProxy {
            port: local,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long [`SlowProxy`] holds each piece of an answer in the drop tests.
pub(crate) const PROXY_DELAY: Duration = Duration::from_millis(1);

pub(crate) const TABLE_SQL: &str = "(id BIGINT NOT NULL, tag BIGINT NOT NULL)";

/// How long a pool waits for a connection: generous, for a loaded machine (never reached in a
/// passing run; a hang becomes a failure).
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(120);

#[cfg(feature = "postgres")]
pub(crate) async fn postgres(max_connections: u32) -> Ctx<sqlx::Postgres> {
    postgres_with(max_connections, false).await
}

/// PostgreSQL behind a [`SlowProxy`] (when the URL names a TCP host).
#[cfg(feature = "postgres")]
pub(crate) async fn postgres_slow(max_connections: u32) -> Ctx<sqlx::Postgres> {
    postgres_with(max_connections, true).await
}

#[cfg(feature = "postgres")]
async fn postgres_with(max_connections: u32, slow: bool) -> Ctx<sqlx::Postgres> {
    use sqlx::postgres::PgConnectOptions;
    init_tracing();
    let url = contextflow_testenv::url(contextflow_testenv::Service::Postgres);
    let app_name = unique("cf_sqlx");
    let mut options = url
        .parse::<PgConnectOptions>()
        .unwrap()
        .application_name(&app_name);
    let proxy = (slow && !options.get_host().starts_with('/'))
        .then(|| SlowProxy::start(options.get_host(), options.get_port(), PROXY_DELAY));
    if let Some(proxy) = &proxy {
        options = options.host("127.0.0.1").port(proxy.port);
    }
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
        _proxy: proxy,
    }
}

#[cfg(feature = "mysql")]
pub(crate) async fn mysql(max_connections: u32) -> Ctx<sqlx::MySql> {
    mysql_with(max_connections, false).await
}

/// MariaDB behind a [`SlowProxy`] (when the URL names a TCP host).
#[cfg(feature = "mysql")]
pub(crate) async fn mysql_slow(max_connections: u32) -> Ctx<sqlx::MySql> {
    mysql_with(max_connections, true).await
}

#[cfg(feature = "mysql")]
async fn mysql_with(max_connections: u32, slow: bool) -> Ctx<sqlx::MySql> {
    use sqlx::mysql::MySqlConnectOptions;
    init_tracing();
    let url = contextflow_testenv::url(contextflow_testenv::Service::MySql);
    let mut options = url.parse::<MySqlConnectOptions>().unwrap();
    let proxy = (slow && !options.get_host().starts_with('/'))
        .then(|| SlowProxy::start(options.get_host(), options.get_port(), PROXY_DELAY));
    if let Some(proxy) = &proxy {
        options = options.host("127.0.0.1").port(proxy.port);
    }
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
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
        _proxy: proxy,
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
        _proxy: None,
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
