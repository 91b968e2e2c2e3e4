//! Behaviour of `contextflow-sqlx` against real databases: PostgreSQL (URL from
//! `CONTEXTFLOW_PG_URL`) and SQLite in a temporary file. The same cases, in `cases.rs`, run on
//! both backends.

mod support;

/// Runs `super::$case` once on a `current_thread` and once on a `multi_thread` runtime.
macro_rules! flavors {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "current_thread")]
            async fn current_thread() {
                super::$case().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() {
                super::$case().await
            }
        }
    )*};
}

mod postgres {
    type Db = sqlx::Postgres;

    async fn setup(max_connections: u32) -> Option<crate::support::Ctx<Db>> {
        crate::support::postgres(max_connections).await
    }

    include!("cases.rs");

    /// PostgreSQL aborts the whole transaction when a statement fails; a savepoint that
    /// swallows such an error and returns `Ok` cannot be released. The release error is
    /// reported, the savepoint rolled back, and the enclosing transaction goes on.
    async fn savepoint_release_fails_after_swallowed_error() {
        let Some(ctx) = setup(2).await else { return };
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
        let Some(ctx) = setup(8).await else { return };
        let mut handles = Vec::new();
        for _ in 0..50 {
            let db = ctx.db.clone();
            handles.push(tokio::spawn(async move {
                db.transaction(|| async {
                    let txid = || async {
                        let row = db
                            .fetch_one(sqlx::query("SELECT txid_current()::BIGINT"))
                            .await?;
                        Ok::<i64, sqlx::Error>(sqlx::Row::get(&row, 0))
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
    /// silent ROLLBACK; the block must report an error instead of `Ok`.
    async fn commit_after_swallowed_error_is_an_error() {
        let Some(ctx) = setup(1).await else { return };
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
        assert_eq!(ids(&ctx).await, Vec::<i64>::new());
        assert_connection_clean(&ctx, 2).await;
        ctx.finish().await;
    }

    /// `transaction_with` opens the top-level transaction with its statement, and is a plain
    /// savepoint when nested.
    async fn transaction_with_isolation_level() {
        let Some(ctx) = setup(1).await else { return };
        let db = &ctx.db;
        let isolation = || async {
            let row = db
                .fetch_one(sqlx::query("SHOW transaction_isolation"))
                .await?;
            Ok::<String, sqlx::Error>(sqlx::Row::get(&row, 0))
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

    flavors!(
        transaction_with_isolation_level,
        commit_after_swallowed_error_is_an_error,
        savepoint_release_fails_after_swallowed_error,
        transactions_have_distinct_server_ids
    );
}

mod sqlite {
    type Db = sqlx::Sqlite;

    async fn setup(max_connections: u32) -> Option<crate::support::Ctx<Db>> {
        Some(crate::support::sqlite(max_connections).await)
    }

    include!("cases.rs");

    /// With `BEGIN IMMEDIATE`, concurrent read-modify-write blocks queue for the write lock
    /// instead of failing to upgrade a read lock: no increment is lost or refused.
    async fn begin_immediate_serializes_writers() {
        const WRITERS: i64 = 50;
        let ctx = setup(4).await.unwrap();
        insert(&ctx, 0, 0).await.unwrap();
        let mut handles = Vec::new();
        for _ in 0..WRITERS {
            let db = ctx.db.clone();
            let table = ctx.table.clone();
            handles.push(tokio::spawn(async move {
                db.transaction_with("BEGIN IMMEDIATE", || async {
                    let mut conn = db.acquire().await?;
                    let sql = format!("SELECT tag FROM {table} WHERE id = 0");
                    let tag: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
                    drop(conn);
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

    flavors!(begin_immediate_serializes_writers);
}
