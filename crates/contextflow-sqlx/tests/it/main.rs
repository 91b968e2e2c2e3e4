//! Behaviour of `contextflow-sqlx` against real databases: PostgreSQL (`CONTEXTFLOW_PG_URL`),
//! MariaDB/MySQL (`CONTEXTFLOW_MYSQL_URL`) and SQLite in a temporary file. The same cases, in
//! `cases.rs`, run on every backend whose feature is on; a backend whose service is missing
//! shows its tests as ignored, with the reason.

mod support;

/// Runs `super::$case` once on a `current_thread` and once on a `multi_thread` runtime, with
/// the given attributes (the backend's "ignored without its service").
#[allow(unused_macros)] // with no database feature on, no backend module uses it
macro_rules! flavors {
    ($attrs:tt ; $($case:ident),* $(,)?) => {$(
        flavors!(@one $attrs $case);
    )*};
    (@one [$($attr:tt)*] $case:ident) => {
        mod $case {
            #[tokio::test(flavor = "current_thread")]
            $($attr)*
            async fn current_thread() {
                super::$case().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $($attr)*
            async fn multi_thread() {
                super::$case().await
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod tenant;

#[cfg(feature = "postgres")]
mod postgres {
    type Db = sqlx::Postgres;
    const BACKEND: &str = "PostgreSQL";

    macro_rules! tests {
        ($($case:ident),* $(,)?) => {
            flavors!(
                [#[cfg_attr(not(cf_service_postgres), ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL")]];
                $($case),*
            );
        };
    }

    async fn setup(max_connections: u32) -> crate::support::Ctx<Db> {
        crate::support::postgres(max_connections).await
    }

    /// The fewest suspension points the drop test's protocol block may have (behind the slow proxy: 14 seen, each round trip of the block suspends).
    const MIN_DROP_POINTS: usize = 10;

    /// Behind a proxy that delays every answer: each round trip suspends (the drop tests).
    async fn setup_slow(max_connections: u32) -> crate::support::Ctx<Db> {
        crate::support::postgres_slow(max_connections).await
    }

    fn sql(s: &str) -> String {
        s.to_owned()
    }

    /// Independent of the library: PostgreSQL's own view of the session.
    async fn oracle_in_transaction(conn: &mut sqlx::PgConnection) -> bool {
        let row = sqlx::raw_sql(
            "SELECT (CASE WHEN xact_start <> query_start THEN 1 ELSE 0 END)::int8 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(conn)
        .await
        .unwrap();
        sqlx::Row::get::<i64, _>(&row, 0) == 1
    }

    /// Sessions of this pool that sit idle inside a transaction (from another connection),
    /// pooled or leaked out of the pool.
    async fn idle_in_transaction(ctx: &crate::support::Ctx<Db>) -> Option<i64> {
        let url = contextflow_testenv::url(contextflow_testenv::Service::Postgres);
        let mut monitor = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let idle = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND state LIKE 'idle in transaction%'",
        )
        .bind(ctx.app_name.as_deref().unwrap())
        .fetch_one(&mut monitor)
        .await
        .unwrap();
        Some(idle)
    }

    include!("cases.rs");

    /// PostgreSQL aborts the whole transaction when a statement fails; a savepoint that
    /// swallows such an error and returns `Ok` cannot be released. The release error is
    /// reported, the savepoint rolled back, and the enclosing transaction goes on.
    async fn savepoint_release_fails_after_swallowed_error() {
        let ctx = setup(2).await;
        let db = &ctx.db;
        db.transaction(|| async {
            insert(&ctx, 1, 1).await?;
            let inner = db
                .transaction(|| async {
                    insert(&ctx, 2, 1).await?;
                    let failed = db.execute(sqlx::query("SELECT * FROM no_such_table")).await;
                    assert!(failed.is_err());
                    Ok::<_, TestError>(())
                })
                .await;
            assert!(matches!(inner, Err(TestError::Sql(_))), "{inner:?}");
            insert(&ctx, 3, 1).await?;
            Ok::<_, TestError>(())
        })
        .await
        .unwrap();
        assert_eq!(ids(&ctx).await, vec![1, 3]);
        ctx.finish().await;
    }

    /// Each transaction is its own server-side transaction, stable across its queries.
    async fn transactions_have_distinct_server_ids() {
        let ctx = setup(8).await;
        let mut handles = Vec::new();
        for _ in 0..50 {
            let db = ctx.db.clone();
            handles.push(tokio::spawn(async move {
                db.transaction(|| async {
                    let txid = || async {
                        sqlx::query_scalar::<_, i64>("SELECT txid_current()::BIGINT")
                            .fetch_one(&db)
                            .await
                    };
                    let first = txid().await?;
                    tokio::task::yield_now().await;
                    assert_eq!(txid().await?, first);
                    Ok::<_, sqlx::Error>(first)
                })
                .await
                .unwrap()
            }));
        }
        let mut seen = std::collections::HashSet::new();
        for handle in handles {
            assert!(seen.insert(handle.await.unwrap()));
        }
        ctx.finish().await;
    }

    /// PostgreSQL would turn the COMMIT of a transaction aborted by a failed statement into a
    /// silent ROLLBACK; the block must report an error instead of `Ok`, also when the failed
    /// statement ran on a raw `Conn` that contextflow-sqlx cannot see.
    async fn commit_after_swallowed_error_is_an_error() {
        let ctx = setup(1).await;
        let db = &ctx.db;
        let result = db
            .transaction(|| async {
                insert(&ctx, 1, 1).await?;
                let failed = db.execute(sqlx::query("SELECT * FROM no_such_table")).await;
                assert!(failed.is_err());
                Ok::<_, TestError>(())
            })
            .await;
        assert!(matches!(result, Err(TestError::Sql(_))), "{result:?}");
        let result = db
            .transaction(|| async {
                insert(&ctx, 2, 1).await?;
                let mut conn = db.acquire().await?;
                let failed = sqlx::query("SELECT * FROM no_such_table")
                    .execute(&mut *conn)
                    .await;
                assert!(failed.is_err());
                Ok::<_, TestError>(())
            })
            .await;
        assert!(matches!(result, Err(TestError::Sql(_))), "{result:?}");
        // Through sqlx's own `Executor` methods on the pool (`query.execute(&db)`,
        // `fetch_all`), which stop at the first error and drop the row stream: the failure is
        // recorded all the same.
        let result = db
            .transaction(|| async {
                insert(&ctx, 3, 1).await?;
                let failed = sqlx::query("SELECT * FROM no_such_table").execute(db).await;
                assert!(failed.is_err());
                Ok::<_, TestError>(())
            })
            .await;
        assert!(matches!(result, Err(TestError::Sql(_))), "{result:?}");
        let result = db
            .transaction(|| async {
                insert(&ctx, 4, 1).await?;
                let failed = sqlx::query_scalar::<_, i64>("SELECT id FROM no_such_table")
                    .fetch_all(db)
                    .await;
                assert!(failed.is_err());
                Ok::<_, TestError>(())
            })
            .await;
        assert!(matches!(result, Err(TestError::Sql(_))), "{result:?}");
        assert_eq!(ids(&ctx).await, Vec::<i64>::new());
        assert_connection_clean(&ctx, 5).await;
        ctx.finish().await;
    }

    /// A raw `COMMIT` run by user code on the transaction's connection ends it behind
    /// contextflow-sqlx's back: the block's end reports it instead of claiming a commit.
    async fn transaction_ended_outside_is_reported() {
        let ctx = setup(1).await;
        let db = &ctx.db;
        let result = db
            .transaction(|| async {
                let mut conn = db.acquire().await?;
                sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
                Ok::<_, TestError>(())
            })
            .await;
        let Err(TestError::Sql(err)) = result else {
            panic!("{result:?}")
        };
        assert!(
            TransactionClosed::find(&err).unwrap().is_poisoned(),
            "{err}"
        );
        assert_connection_clean(&ctx, 1).await;
        ctx.finish().await;
    }

    /// `transaction_with` opens the top-level transaction with its statement, and is a plain
    /// savepoint when nested.
    async fn transaction_with_isolation_level() {
        let ctx = setup(1).await;
        let db = &ctx.db;
        let isolation = || async {
            sqlx::query_scalar::<_, String>("SHOW transaction_isolation")
                .fetch_one(db)
                .await
        };
        let (outer, nested) = db
            .transaction_with("BEGIN ISOLATION LEVEL SERIALIZABLE", || async {
                insert(&ctx, 1, 0).await?;
                let nested = db
                    .transaction_with("BEGIN ISOLATION LEVEL READ COMMITTED", || async {
                        assert_eq!(db.transaction_depth(), 2);
                        insert(&ctx, 2, 0).await?;
                        isolation().await
                    })
                    .await?;
                Ok::<_, TestError>((isolation().await?, nested))
            })
            .await
            .unwrap();
        assert_eq!(
            (outer.as_str(), nested.as_str()),
            ("serializable", "serializable")
        );
        assert_eq!(ids(&ctx).await, vec![1, 2]);
        ctx.finish().await;
    }

    /// Regression test for issue 9: sqlx 0.8 leaves a PostgreSQL connection inside a
    /// transaction when the future is dropped while `BEGIN` is in flight; the next user of the
    /// pool then runs in that stale transaction ("there is already a transaction in
    /// progress"). Here a connection left dirty by plain sqlx is refused on acquire.
    async fn issue_9_dirty_connection_refused_on_acquire() {
        let ctx = setup(1).await;
        {
            let mut conn = ctx.db.pool().acquire().await.unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
            // Dropped inside the transaction: back to the pool, dirty.
        }
        insert(&ctx, 1, 0).await.unwrap(); // on a fresh connection: autocommitted
        let mut conn = ctx.db.pool().acquire().await.unwrap();
        assert!(!oracle_in_transaction(&mut conn).await);
        drop(conn);
        assert_eq!(ids(&ctx).await, vec![1]);
        ctx.finish().await;
    }

    async fn pg_pid(conn: &mut sqlx::PgConnection) -> i64 {
        let query = sqlx::raw_sql("SELECT pg_backend_pid()::int8");
        sqlx::Row::get::<i64, _>(&query.fetch_one(conn).await.unwrap(), 0)
    }

    /// A block whose transaction an error aborted, dropped while waiting: the background
    /// clean-up rolls the aborted transaction back and gives the same session back to the
    /// pool (it used to close it: its check failed with `25P02`).
    async fn aborted_block_dropped_is_rolled_back_not_closed() {
        let ctx = setup(1).await;
        let db = &ctx.db;
        let (opened, is_open) = tokio::sync::oneshot::channel();
        let fut = db.transaction(|| async {
            let mut conn = db.acquire().await?;
            let pid = pg_pid(&mut conn).await;
            drop(conn);
            let failed = db.execute(sqlx::query("SELECT 1/0")).await;
            assert!(failed.is_err(), "the transaction is aborted now");
            let _ = opened.send(pid);
            std::future::pending::<()>().await;
            Ok::<_, sqlx::Error>(())
        });
        let pid = tokio::select! {
            biased;
            result = fut => panic!("the block never ends, yet it returned {result:?}"),
            pid = is_open => pid.expect("the block was dropped before it failed its statement"),
        };
        // The pool's one connection comes back once the clean-up is done.
        let mut conn = db.pool().acquire().await.unwrap();
        assert!(!oracle_in_transaction(&mut conn).await);
        assert_eq!(
            pg_pid(&mut conn).await,
            pid,
            "the same session, rolled back"
        );
        drop(conn);
        ctx.finish().await;
    }

    /// A block may set its own isolation level with `SET TRANSACTION` as its first statement:
    /// the acquire check (a query, which would take the snapshot first) is not sent in the
    /// `BEGIN`'s message for a plain `TxPool`.
    async fn set_transaction_first_in_a_block() {
        let ctx = setup(1).await;
        let db = &ctx.db;
        let level = db
            .transaction(|| async {
                db.execute(sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
                    .await?;
                sqlx::query_scalar::<_, String>("SHOW transaction_isolation")
                    .fetch_one(db)
                    .await
            })
            .await
            .unwrap();
        assert_eq!(level, "serializable");
        ctx.finish().await;
    }

    /// A transaction block's `BEGIN` travels with the acquire check in one message: a
    /// connection left inside a transaction (open, or aborted by an error) is still refused
    /// before any `BEGIN` reaches it, and the block runs on another session.
    async fn dirty_connection_refused_when_a_block_begins() {
        let ctx = setup(1).await;
        for (n, leftover) in ["open", "aborted"].into_iter().enumerate() {
            let dirty = {
                let mut conn = ctx.db.pool().acquire().await.unwrap();
                sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
                let pid = pg_pid(&mut conn).await;
                if leftover == "aborted" {
                    let failed = sqlx::raw_sql("SELECT 1/0").execute(&mut *conn).await;
                    assert!(failed.is_err());
                }
                pid
            };
            let id = n as i64 + 1;
            let in_block = ctx
                .db
                .transaction(|| async {
                    insert(&ctx, id, 0).await?;
                    let mut conn = ctx.db.acquire().await?;
                    Ok::<_, sqlx::Error>(pg_pid(&mut conn).await)
                })
                .await
                .unwrap();
            assert_ne!(
                in_block, dirty,
                "{leftover}: the block ran on the dirty session"
            );
        }
        assert_eq!(ids(&ctx).await, vec![1, 2]);
        let mut conn = ctx.db.pool().acquire().await.unwrap();
        assert!(!oracle_in_transaction(&mut conn).await);
        drop(conn);
        ctx.finish().await;
    }

    async fn pid(conn: &mut sqlx::AnyConnection) -> i64 {
        let query = sqlx::raw_sql("SELECT pg_backend_pid()::int8");
        sqlx::Row::get::<i64, _>(&query.fetch_one(conn).await.unwrap(), 0)
    }

    /// sqlx's `Any` driver (what the order service uses): contextflow-sqlx finds the database
    /// behind it, so a dirty connection is refused and a dropped transaction cleaned up.
    async fn any_driver_is_checked_too() {
        sqlx::any::install_default_drivers();
        let url = contextflow_testenv::url(contextflow_testenv::Service::Postgres);
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let db = contextflow_sqlx::TxPool::new(pool);
        let dirty = {
            let mut conn = db.pool().acquire().await.unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut *conn).await.unwrap();
            pid(&mut conn).await
        };
        // The check closed the dirty connection: the pool's connection is another session.
        db.execute(sqlx::query("SELECT 1")).await.unwrap();
        let now = pid(&mut db.pool().acquire().await.unwrap()).await;
        assert_ne!(dirty, now);
        // Drop the transaction once its block is open and has run a statement. The block says
        // so itself: with a fixed poll budget, a block that reached `pending()` in fewer polls
        // would never be woken again, and the test would hang (it did, about 1 run in 10).
        let (opened, is_open) = tokio::sync::oneshot::channel();
        let fut = db.transaction(|| async {
            sqlx::query("SELECT 1").execute(&db).await?;
            let _ = opened.send(());
            std::future::pending::<()>().await;
            Ok::<_, sqlx::Error>(())
        });
        tokio::select! {
            biased;
            result = fut => panic!("the block never ends, yet it returned {result:?}"),
            signal = is_open => signal.expect("the block was dropped before it ran its statement"),
        }
        let mut conn = db.pool().acquire().await.unwrap();
        let row = sqlx::raw_sql(
            "SELECT (CASE WHEN xact_start <> query_start THEN 1 ELSE 0 END)::int8 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(sqlx::Row::get::<i64, _>(&row, 0), 0);
        drop(conn);
        db.pool().close().await;
    }

    tests!(
        any_driver_is_checked_too,
        transaction_with_isolation_level,
        commit_after_swallowed_error_is_an_error,
        transaction_ended_outside_is_reported,
        savepoint_release_fails_after_swallowed_error,
        transactions_have_distinct_server_ids,
        issue_9_dirty_connection_refused_on_acquire,
        dirty_connection_refused_when_a_block_begins,
        set_transaction_first_in_a_block,
        aborted_block_dropped_is_rolled_back_not_closed,
    );
}

#[cfg(feature = "mysql")]
mod mysql {
    type Db = sqlx::MySql;
    const BACKEND: &str = "MariaDB";

    macro_rules! tests {
        ($($case:ident),* $(,)?) => {
            flavors!(
                [#[cfg_attr(not(cf_service_mysql), ignore = "needs MySQL/MariaDB: set CONTEXTFLOW_MYSQL_URL")]];
                $($case),*
            );
        };
    }

    async fn setup(max_connections: u32) -> crate::support::Ctx<Db> {
        crate::support::mysql(max_connections).await
    }

    /// The fewest suspension points the drop test's protocol block may have (behind the slow proxy: 15 seen).
    const MIN_DROP_POINTS: usize = 10;

    /// Behind a proxy that delays every answer: each round trip suspends (the drop tests).
    async fn setup_slow(max_connections: u32) -> crate::support::Ctx<Db> {
        crate::support::mysql_slow(max_connections).await
    }

    /// MySQL's placeholders are `?`; the cases write `$1`, `$2` in order.
    fn sql(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
                out.push('?');
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Independent of the library: MariaDB's own flag.
    async fn oracle_in_transaction(conn: &mut sqlx::MySqlConnection) -> bool {
        let row = sqlx::raw_sql("SELECT CAST(@@in_transaction AS SIGNED)")
            .fetch_one(conn)
            .await
            .unwrap();
        sqlx::Row::get::<i64, _>(&row, 0) == 1
    }

    /// No view of another session's transaction by pool here: the pooled connections are
    /// checked one by one by `assert_pool_clean`; a session leaked out of the pool is not seen.
    async fn idle_in_transaction(_: &crate::support::Ctx<Db>) -> Option<i64> {
        None
    }

    include!("cases.rs");

    /// A deadlock makes MySQL roll the whole transaction back and run what follows in
    /// autocommit mode; the transaction is poisoned at once, so nothing after it runs.
    async fn deadlock_poisons_the_transaction() {
        let ctx = setup(3).await;
        insert(&ctx, 1, 0).await.unwrap();
        insert(&ctx, 2, 0).await.unwrap();
        let (a_locked, wait_a) = tokio::sync::oneshot::channel();
        let (b_locked, wait_b) = tokio::sync::oneshot::channel();
        let update = |id: i64| {
            sql(&format!(
                "UPDATE {} SET tag = tag + 1 WHERE id = {id}",
                ctx.table
            ))
        };
        // After the deadlock error, the victim's next statement is refused: the server has
        // rolled its transaction back and would have run the statement in autocommit mode.
        let after_deadlock = |result: Result<_, sqlx::Error>, id: i64| {
            let ctx = &ctx;
            async move {
                if result.is_err() {
                    let err = insert(ctx, id, 0).await.unwrap_err();
                    assert!(
                        TransactionClosed::find(&err).unwrap().is_poisoned(),
                        "{err}"
                    );
                }
                Ok::<_, TestError>(())
            }
        };
        let first = async {
            ctx.db
                .transaction(|| async {
                    ctx.db.execute(sqlx::query(&update(1))).await?;
                    a_locked.send(()).unwrap();
                    wait_b.await.unwrap();
                    let second = ctx.db.execute(sqlx::query(&update(2))).await;
                    after_deadlock(second, 3).await
                })
                .await
        };
        let second = async {
            ctx.db
                .transaction(|| async {
                    ctx.db.execute(sqlx::query(&update(2))).await?;
                    wait_a.await.unwrap();
                    b_locked.send(()).unwrap();
                    let first = ctx.db.execute(sqlx::query(&update(1))).await;
                    after_deadlock(first, 4).await
                })
                .await
        };
        let (a, b) = tokio::join!(first, second);
        // Exactly one is the victim: its block ends in a poisoned-transaction error.
        let victim = match (&a, &b) {
            (Ok(()), Err(TestError::Sql(err))) | (Err(TestError::Sql(err)), Ok(())) => err,
            _ => panic!("expected one deadlock victim: {a:?} {b:?}"),
        };
        assert!(
            TransactionClosed::find(victim).unwrap().is_poisoned(),
            "{victim}"
        );
        // No row of the victim's was autocommitted after the deadlock.
        assert_eq!(ids(&ctx).await, vec![1, 2]);
        ctx.finish().await;
    }

    /// A lock wait timeout (error 1205) poisons the transaction (with `innodb_rollback_on_timeout`
    /// the server rolled it back whole, and what follows would run in autocommit mode) also
    /// when the server answers in another language: it was told by its English message text.
    async fn lock_wait_timeout_poisons_in_any_language() {
        let ctx = setup(2).await;
        insert(&ctx, 1, 0).await.unwrap();
        // The contended row, in a table of its own with a key (a lock on the test table, which
        // has no index, would hold back every insert into it too).
        let locks = format!("{}_locks", ctx.table);
        let url = contextflow_testenv::url(contextflow_testenv::Service::MySql);
        let mut blocker = <sqlx::MySqlConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql(&format!(
            "CREATE TABLE {locks} (id BIGINT PRIMARY KEY, n BIGINT NOT NULL);
             INSERT INTO {locks} VALUES (1, 0);
             BEGIN; SELECT id FROM {locks} WHERE id = 1 FOR UPDATE"
        ))
        .execute(&mut blocker)
        .await
        .unwrap();
        let db = &ctx.db;
        let result = db
            .transaction(|| async {
                db.execute(sqlx::query("SET SESSION lc_messages = 'de_DE'"))
                    .await?;
                db.execute(sqlx::query("SET SESSION innodb_lock_wait_timeout = 1"))
                    .await?;
                insert(&ctx, 2, 0).await?;
                let update = format!("UPDATE {locks} SET n = 1 WHERE id = 1");
                let timed_out = db.execute(sqlx::query(&update)).await.unwrap_err();
                let message = timed_out.as_database_error().unwrap().message().to_owned();
                assert!(
                    !message.starts_with("Lock wait"),
                    "not in German: {message}"
                );
                // Swallowed, as a careless block would: what follows must not commit.
                let _ = insert(&ctx, 3, 0).await;
                Ok::<_, TestError>(())
            })
            .await;
        sqlx::raw_sql(&format!("ROLLBACK; DROP TABLE {locks}"))
            .execute(&mut blocker)
            .await
            .unwrap();
        match &result {
            Err(TestError::Sql(err)) => assert!(
                TransactionClosed::find(err).is_some_and(|closed| closed.is_poisoned()),
                "{err}"
            ),
            other => panic!("the block committed after a lock wait timeout: {other:?}"),
        }
        assert_eq!(ids(&ctx).await, vec![1]);
        ctx.finish().await;
    }

    /// Review finding: MariaDB's snapshot isolation conflict (error 1020, the default from
    /// 11.6.2) rolls the whole transaction back, as a deadlock does, but was not taken for
    /// that: a block that swallowed it went on in autocommit mode, and its next write was
    /// committed on its own although the block then failed.
    async fn snapshot_isolation_conflict_poisons_the_transaction() {
        let ctx = setup(2).await;
        insert(&ctx, 1, 0).await.unwrap();
        let url = contextflow_testenv::url(contextflow_testenv::Service::MySql);
        let mut other = <sqlx::MySqlConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let db = &ctx.db;
        let table = &ctx.table;
        let result = db
            .transaction(|| async {
                db.execute(sqlx::query("SET SESSION innodb_snapshot_isolation = ON"))
                    .await?;
                insert(&ctx, 2, 0).await?;
                // The snapshot: a consistent read of the row.
                let seen: Vec<i64> =
                    sqlx::query_scalar(&format!("SELECT tag FROM {table} WHERE id = 1"))
                        .fetch_all(db)
                        .await?;
                assert_eq!(seen, [0]);
                // Another session changes the row and commits after that snapshot.
                sqlx::query(&format!("UPDATE {table} SET tag = 5 WHERE id = 1"))
                    .execute(&mut other)
                    .await
                    .unwrap();
                let update = format!("UPDATE {table} SET tag = 6 WHERE id = 1");
                let conflict = db.execute(sqlx::query(&update)).await.unwrap_err();
                let number = conflict
                    .as_database_error()
                    .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
                    .map(sqlx::mysql::MySqlDatabaseError::number);
                assert_eq!(number, Some(1020), "{conflict}");
                // Swallowed, as a careless block would: what follows must not commit.
                let _ = insert(&ctx, 3, 0).await;
                Ok::<_, TestError>(())
            })
            .await;
        match &result {
            Err(TestError::Sql(err)) => assert!(
                TransactionClosed::find(err).is_some_and(|closed| closed.is_poisoned()),
                "{err}"
            ),
            other => panic!("the block committed after a snapshot conflict: {other:?}"),
        }
        assert_eq!(ids(&ctx).await, vec![1]);
        ctx.finish().await;
    }

    tests!(
        deadlock_poisons_the_transaction,
        lock_wait_timeout_poisons_in_any_language,
        snapshot_isolation_conflict_poisons_the_transaction
    );
}

#[cfg(feature = "sqlite")]
mod sqlite {
    type Db = sqlx::Sqlite;
    const BACKEND: &str = "SQLite";

    macro_rules! tests {
        ($($case:ident),* $(,)?) => {
            flavors!([]; $($case),*);
        };
    }

    async fn setup(max_connections: u32) -> crate::support::Ctx<Db> {
        crate::support::sqlite(max_connections).await
    }

    /// The fewest suspension points the drop test's protocol block may have. No proxy: a
    /// statement suspends only when SQLite's worker thread has not answered by the next poll,
    /// so the count is not fixed (1 to 15 seen; 1 or 2 for a failing block on a quiet
    /// machine). The proxied backends cover every drop point.
    const MIN_DROP_POINTS: usize = 1;

    /// SQLite has no socket to slow down: its worker thread answers as it answers.
    async fn setup_slow(max_connections: u32) -> crate::support::Ctx<Db> {
        setup(max_connections).await
    }

    fn sql(s: &str) -> String {
        s.to_owned()
    }

    /// Independent of the library: `BEGIN` fails inside a transaction.
    async fn oracle_in_transaction(conn: &mut sqlx::SqliteConnection) -> bool {
        match sqlx::raw_sql("BEGIN").execute(&mut *conn).await {
            Ok(_) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
                false
            }
            Err(_) => true,
        }
    }

    /// A SQLite connection lives in this process: the pooled ones are checked one by one by
    /// `assert_pool_clean`; there is no server-side view of a leaked one.
    async fn idle_in_transaction(_: &crate::support::Ctx<Db>) -> Option<i64> {
        None
    }

    include!("cases.rs");

    /// With `BEGIN IMMEDIATE`, concurrent read-modify-write blocks queue for the write lock
    /// instead of failing to upgrade a read lock: no increment is lost or refused.
    async fn begin_immediate_serializes_writers() {
        const WRITERS: i64 = 50;
        let ctx = setup(4).await;
        insert(&ctx, 0, 0).await.unwrap();
        let mut handles = Vec::new();
        for _ in 0..WRITERS {
            let db = ctx.db.clone();
            let table = ctx.table.clone();
            handles.push(tokio::spawn(async move {
                db.transaction_with("BEGIN IMMEDIATE", || async {
                    let sql = format!("SELECT tag FROM {table} WHERE id = 0");
                    let tag: i64 = sqlx::query_scalar(&sql).fetch_one(&db).await?;
                    tokio::task::yield_now().await;
                    let sql = format!("UPDATE {table} SET tag = $1 WHERE id = 0");
                    db.execute(sqlx::query(&sql).bind(tag + 1)).await?;
                    Ok::<_, sqlx::Error>(())
                })
                .await
            }));
        }
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
        assert_eq!(
            count_where(&ctx.db, &ctx.table, "tag = $1", WRITERS).await,
            1
        );
        ctx.finish().await;
    }

    /// WAL: reads outside the writer's transaction proceed while it is open (and see the last
    /// committed state), on other connections of the pool.
    async fn readers_proceed_beside_the_writer() {
        let ctx = setup(4).await;
        insert(&ctx, 1, 0).await.unwrap();
        let (written, wait_written) = tokio::sync::oneshot::channel();
        let (read, wait_read) = tokio::sync::oneshot::channel::<Vec<i64>>();
        let writer = ctx.db.transaction(|| async {
            insert(&ctx, 2, 0).await?;
            written.send(()).unwrap();
            // Still open, holding the write lock, until the readers are done.
            let seen = wait_read.await.unwrap();
            Ok::<_, TestError>(seen)
        });
        let readers = async {
            wait_written.await.unwrap();
            let db = ctx.db.clone();
            let table = ctx.table.clone();
            // Another task: outside the writer's transaction.
            let seen = tokio::spawn(async move {
                let sql = format!("SELECT id FROM {table} ORDER BY id");
                let a: Vec<i64> = sqlx::query_scalar(&sql).fetch_all(&db).await.unwrap();
                let b: Vec<i64> = sqlx::query_scalar(&sql).fetch_all(db.pool()).await.unwrap();
                assert_eq!(a, b);
                a
            })
            .await
            .unwrap();
            read.send(seen).unwrap();
        };
        let (seen, ()) = tokio::join!(writer, readers);
        assert_eq!(seen.unwrap(), vec![1]);
        assert_eq!(ids(&ctx).await, vec![1, 2]);
        ctx.finish().await;
    }

    /// Review finding: on SQLite an error may end the whole transaction with a code that does
    /// not say so (`UNIQUE ON CONFLICT ROLLBACK`, `INSERT OR ROLLBACK`, a trigger's
    /// `RAISE(ROLLBACK, ...)`); the block went on, and every later statement committed on its
    /// own, outside it. Now the next statement asks the connection first and finds the
    /// transaction closed.
    async fn a_conflict_that_rolls_back_the_transaction_closes_the_block() {
        let ctx = setup(2).await;
        let unique = format!("{}_u", ctx.table);
        sqlx::raw_sql(&format!(
            "CREATE TABLE {unique} (k INTEGER UNIQUE ON CONFLICT ROLLBACK); \
             INSERT INTO {unique} VALUES (1)"
        ))
        .execute(ctx.db.pool())
        .await
        .unwrap();
        let conflict = format!("INSERT INTO {unique} VALUES (1)");
        let result = ctx
            .db
            .transaction(|| async {
                insert(&ctx, 1, 0).await?;
                // Swallowed, as an "insert or ignore" written by hand would.
                assert!(ctx.db.execute(sqlx::query(&conflict)).await.is_err());
                let after = insert(&ctx, 2, 0).await;
                let err = after.expect_err("the transaction is gone: refused");
                assert!(
                    TransactionClosed::find(&err).is_some_and(|closed| closed.is_poisoned()),
                    "{err}"
                );
                Ok::<_, sqlx::Error>(())
            })
            .await;
        assert!(result.is_err(), "nothing to commit: {result:?}");
        assert_eq!(
            ids(&ctx).await,
            Vec::<i64>::new(),
            "no row stored outside it"
        );
        // The nested form: a savepoint opened after the failure is refused too.
        let result = ctx
            .db
            .transaction(|| async {
                insert(&ctx, 3, 0).await?;
                let _ = ctx.db.execute(sqlx::query(&conflict)).await;
                ctx.db
                    .transaction_with(Propagation::Nested, || async { insert(&ctx, 4, 0).await })
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
            .await;
        assert!(result.is_err(), "{result:?}");
        assert_eq!(ids(&ctx).await, Vec::<i64>::new());
        ctx.finish().await;
    }

    tests!(
        begin_immediate_serializes_writers,
        readers_proceed_beside_the_writer,
        a_conflict_that_rolls_back_the_transaction_closes_the_block
    );
}
