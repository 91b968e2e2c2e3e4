// Included by each backend module of `main.rs`, which defines `Db` and `setup`.

use std::{future::pending, panic::AssertUnwindSafe};

use contextflow::{FutureExt as _, Snapshot};
use contextflow_sqlx::{TransactionClosed, TxPool};
use futures_util::FutureExt as _;
use tokio::sync::oneshot;

#[derive(Debug)]
enum TestError {
    Sql(#[allow(dead_code)] sqlx::Error),
    Refused,
}

impl From<sqlx::Error> for TestError {
    fn from(err: sqlx::Error) -> Self {
        TestError::Sql(err)
    }
}

type Ctx = crate::support::Ctx<Db>;

static REQUEST_ID: contextflow::AsyncLocal<u64> = contextflow::AsyncLocal::named("request_id");

/// Inserts a row through the `TxPool`: the current transaction's connection, or the pool.
async fn insert(ctx: &Ctx, id: i64, tag: i64) -> Result<(), sqlx::Error> {
    let sql = format!("INSERT INTO {} (id, tag) VALUES ($1, $2)", ctx.table);
    ctx.db.execute(sqlx::query(&sql).bind(id).bind(tag)).await?;
    Ok(())
}

/// Committed ids, read on the pool (outside any transaction).
async fn ids(ctx: &Ctx) -> Vec<i64> {
    let sql = format!("SELECT id FROM {} ORDER BY id", ctx.table);
    sqlx::query_scalar(&sql).fetch_all(ctx.db.pool()).await.unwrap()
}

/// Rows matching `condition` (with `$1` = `tag`) as seen through the `TxPool`.
async fn count_where(db: &TxPool<Db>, table: &str, condition: &str, tag: i64) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE {condition}");
    let mut conn = db.acquire().await.unwrap();
    sqlx::query_scalar(&sql).bind(tag).fetch_one(&mut *conn).await.unwrap()
}

/// After a rollback the single pooled connection must be clean: a new transaction on it
/// commits only its own row.
async fn assert_connection_clean(ctx: &Ctx, id: i64) {
    ctx.db
        .transaction(|| insert(ctx, id, 0))
        .await
        .unwrap();
    assert_eq!(ids(ctx).await, vec![id]);
}

async fn commit() {
    let Some(ctx) = setup(2).await else { return };
    let db = &ctx.db;
    let value = db
        .transaction(|| async {
            assert!(db.in_transaction());
            assert_eq!(db.transaction_depth(), 1);
            insert(&ctx, 1, 7).await?;
            insert(&ctx, 2, 7).await?;
            // The transaction sees its rows; the pool (another connection) does not yet.
            assert_eq!(count_where(db, &ctx.table, "tag = $1", 7).await, 2);
            assert_eq!(ids(&ctx).await, Vec::<i64>::new());
            Ok::<_, TestError>("done")
        })
        .await
        .unwrap();
    assert_eq!(value, "done");
    assert!(!db.in_transaction());
    assert_eq!(ids(&ctx).await, vec![1, 2]);
    ctx.finish().await;
}

async fn rollback_on_error() {
    let Some(ctx) = setup(1).await else { return };
    let result = ctx
        .db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            insert(&ctx, 2, 0).await?;
            Err::<(), _>(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)), "{result:?}");
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_connection_clean(&ctx, 3).await;
    ctx.finish().await;
}

async fn rollback_on_panic() {
    let Some(ctx) = setup(1).await else { return };
    let caught = AssertUnwindSafe(ctx.db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        if ctx.db.in_transaction() {
            panic!("the handler crashed");
        }
        Ok::<_, TestError>(())
    }))
    .catch_unwind()
    .await;
    let panic = caught.unwrap_err();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"the handler crashed"));
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_connection_clean(&ctx, 2).await;
    ctx.finish().await;
}

/// The request's future is dropped after its first insert (a client disconnect).
async fn rollback_on_drop() {
    let Some(ctx) = setup(1).await else { return };
    let (inserted, wait) = oneshot::channel();
    let request = ctx.db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        inserted.send(()).unwrap();
        pending::<()>().await;
        insert(&ctx, 2, 0).await?;
        Ok::<_, TestError>(())
    });
    tokio::select! {
        _ = request => unreachable!("the block never finishes"),
        _ = wait => {}
    }
    // The only connection comes back from the pool rolled back.
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_connection_clean(&ctx, 3).await;
    ctx.finish().await;
}

/// The request's task is aborted after its first insert.
async fn rollback_on_abort() {
    let Some(ctx) = setup(1).await else { return };
    let db = ctx.db.clone();
    let table = ctx.table.clone();
    let (inserted, wait) = oneshot::channel();
    let task = tokio::spawn(async move {
        db.transaction(|| async {
            let sql = format!("INSERT INTO {table} (id, tag) VALUES (1, 0)");
            db.execute(sqlx::query(&sql)).await?;
            inserted.send(()).unwrap();
            pending::<()>().await;
            Ok::<_, TestError>(())
        })
        .await
    });
    wait.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_connection_clean(&ctx, 2).await;
    ctx.finish().await;
}

/// A failing nested block rolls back its own work only.
async fn savepoint_error() {
    let Some(ctx) = setup(1).await else { return };
    let db = &ctx.db;
    db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        let inner = db
            .transaction(|| async {
                assert_eq!(db.transaction_depth(), 2);
                insert(&ctx, 2, 0).await?;
                Err::<(), _>(TestError::Refused)
            })
            .await;
        assert!(matches!(inner, Err(TestError::Refused)));
        assert_eq!(db.transaction_depth(), 1);
        // A successful savepoint's work stays.
        db.transaction(|| insert(&ctx, 3, 0)).await?;
        insert(&ctx, 4, 0).await?;
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 3, 4]);
    ctx.finish().await;
}

/// A released savepoint still rolls back with its enclosing transaction.
async fn savepoint_rolled_back_with_outer() {
    let Some(ctx) = setup(1).await else { return };
    let db = &ctx.db;
    let result = db
        .transaction(|| async {
            db.transaction(|| async {
                insert(&ctx, 1, 0).await?;
                db.transaction(|| insert(&ctx, 2, 0)).await
            })
            .await?;
            Err::<(), _>(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)));
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_connection_clean(&ctx, 3).await;
    ctx.finish().await;
}

async fn savepoint_panic() {
    let Some(ctx) = setup(1).await else { return };
    let db = &ctx.db;
    db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        let caught = AssertUnwindSafe(db.transaction(|| async {
            insert(&ctx, 2, 0).await?;
            if db.in_transaction() {
                panic!("nested crash");
            }
            Ok::<_, TestError>(())
        }))
        .catch_unwind()
        .await;
        assert!(caught.is_err());
        insert(&ctx, 3, 0).await?;
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 3]);
    ctx.finish().await;
}

/// A nested block dropped half-way (a timeout inside the request) is rolled back before the
/// enclosing block's next query.
async fn savepoint_drop() {
    let Some(ctx) = setup(1).await else { return };
    let db = &ctx.db;
    db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        let (inserted, wait) = oneshot::channel();
        let inner = db.transaction(|| async {
            insert(&ctx, 2, 0).await?;
            db.transaction(|| async {
                insert(&ctx, 3, 0).await?;
                inserted.send(()).unwrap();
                pending::<()>().await;
                Ok::<_, TestError>(())
            })
            .await
        });
        tokio::select! {
            _ = inner => unreachable!("the nested block never finishes"),
            _ = wait => {}
        }
        assert_eq!(db.transaction_depth(), 1);
        assert_eq!(count_where(db, &ctx.table, "tag = $1", 0).await, 1);
        insert(&ctx, 4, 0).await?;
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 4]);
    ctx.finish().await;
}

/// Outside a block, queries autocommit on the pool.
async fn pool_outside_a_block() {
    let Some(ctx) = setup(2).await else { return };
    assert!(!ctx.db.in_transaction());
    assert_eq!(ctx.db.transaction_depth(), 0);
    assert!(!ctx.db.acquire().await.unwrap().in_transaction());
    insert(&ctx, 1, 0).await.unwrap();
    assert_eq!(ids(&ctx).await, vec![1]);
    ctx.finish().await;
}

/// A task spawned inside a block (even with `contextflow::spawn`) gets the pool: its write
/// commits on its own, and survives the block's rollback.
async fn spawned_task_gets_the_pool() {
    let Some(ctx) = setup(2).await else { return };
    let db = &ctx.db;
    let result = db
        .transaction(|| async {
            let child_db = db.clone();
            let table = ctx.table.clone();
            // On SQLite the spawned write must come before the block's first write, which takes
            // the database's only write lock until the block ends.
            let spawn = REQUEST_ID.scope(42, async move {
                contextflow::spawn(async move {
                    // The rest of the context travels; the transaction does not.
                    assert_eq!(REQUEST_ID.get(), Some(42));
                    assert!(!child_db.in_transaction());
                let mut conn = child_db.acquire().await?;
                assert!(!conn.in_transaction());
                let sql = format!("INSERT INTO {table} (id, tag) VALUES (1, 0)");
                    sqlx::query(&sql).execute(&mut *conn).await?;
                    Ok::<_, sqlx::Error>(())
                })
                .await
            });
            spawn.await.unwrap()?;
            // Committed already: visible from the pool while the block is still open.
            assert_eq!(ids(&ctx).await, vec![1]);
            insert(&ctx, 2, 0).await?;
            Err::<(), _>(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)));
    assert_eq!(ids(&ctx).await, vec![1]);
    ctx.finish().await;
}

/// Two `TxPool`s built separately are independent, even over the same sqlx pool.
async fn separate_tx_pools_are_independent() {
    let Some(ctx) = setup(2).await else { return };
    let other = TxPool::new(ctx.db.pool().clone());
    ctx.db
        .transaction(|| async {
            assert!(ctx.db.clone().in_transaction());
            assert!(!other.in_transaction());
            assert!(!other.acquire().await?.in_transaction());
            Ok::<_, TestError>(())
        })
        .await
        .unwrap();
    ctx.finish().await;
}

/// A full snapshot (not what `contextflow::spawn` carries) keeps the transaction, but using it
/// after the block ended is an error, never a silent fall-back to the pool.
async fn snapshot_after_block_is_closed() {
    let Some(ctx) = setup(2).await else { return };
    let db = &ctx.db;
    let snapshot = db
        .transaction(|| async { Ok::<_, TestError>(Snapshot::capture()) })
        .await
        .unwrap();
    let late = async { db.acquire().await.map(drop) }
        .with_snapshot(snapshot)
        .await;
    let err = late.unwrap_err();
    let closed = TransactionClosed::find(&err).expect("a TransactionClosed error");
    assert!(!closed.is_poisoned());
    ctx.finish().await;
}

/// Concurrent queries inside one transaction are serialized on its connection.
async fn concurrent_queries_in_one_transaction() {
    let Some(ctx) = setup(1).await else { return };
    ctx.db
        .transaction(|| async {
            let (a, b, c) = tokio::join!(insert(&ctx, 1, 0), insert(&ctx, 2, 0), async {
                ctx.db.transaction(|| insert(&ctx, 3, 0)).await
            });
            a?;
            b?;
            c?;
            Ok::<_, TestError>(())
        })
        .await
        .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 2, 3]);
    ctx.finish().await;
}

/// 500 concurrent requests: each writes its own rows, sees all of them and no other request's
/// uncommitted rows; even requests commit, odd ones roll back.
async fn concurrent_transactions_no_cross_talk() {
    const REQUESTS: i64 = 500;
    const ROWS: i64 = 3;
    let Some(ctx) = setup(8).await else { return };
    let mut handles = Vec::new();
    for tag in 0..REQUESTS {
        let db = ctx.db.clone();
        let table = ctx.table.clone();
        handles.push(tokio::spawn(async move {
            let result = db
                .transaction(|| async {
                    for row in 0..ROWS {
                        let sql = format!("INSERT INTO {table} (id, tag) VALUES ($1, $2)");
                        db.execute(sqlx::query(&sql).bind(tag * ROWS + row).bind(tag))
                            .await?;
                        tokio::task::yield_now().await;
                    }
                    assert_eq!(count_where(&db, &table, "tag = $1", tag).await, ROWS);
                    // Odd requests roll back, so no request may ever see their rows.
                    let doomed = count_where(&db, &table, "tag % 2 = 1 AND tag <> $1", tag).await;
                    assert_eq!(doomed, 0);
                    if tag % 2 == 0 {
                        Ok(())
                    } else {
                        Err(TestError::Refused)
                    }
                })
                .await;
            assert_eq!(result.is_ok(), tag % 2 == 0, "{result:?}");
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    assert!(!ctx.db.in_transaction());
    for tag in 0..REQUESTS {
        let expected = if tag % 2 == 0 { ROWS } else { 0 };
        assert_eq!(count_where(&ctx.db, &ctx.table, "tag = $1", tag).await, expected);
    }
    assert_eq!(ids(&ctx).await.len() as i64, REQUESTS / 2 * ROWS);
    ctx.finish().await;
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn check(db: &TxPool<Db>) {
        assert_send(&db.transaction(|| async { Ok::<_, sqlx::Error>(()) }));
        assert_send(&db.acquire());
        assert_send(&db.execute(sqlx::query("SELECT 1")));
    }
    let _ = check;
}

flavors!(
    commit,
    rollback_on_error,
    rollback_on_panic,
    rollback_on_drop,
    rollback_on_abort,
    savepoint_error,
    savepoint_rolled_back_with_outer,
    savepoint_panic,
    savepoint_drop,
    pool_outside_a_block,
    separate_tx_pools_are_independent,
    spawned_task_gets_the_pool,
    snapshot_after_block_is_closed,
    concurrent_queries_in_one_transaction,
    concurrent_transactions_no_cross_talk,
);
