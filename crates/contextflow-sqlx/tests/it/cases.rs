// Included by each backend module of `main.rs`, which defines `Db`, `BACKEND`, `setup`, `sql`,
// `oracle_in_transaction`, `idle_in_transaction` and the `tests!` macro.

use std::{
    future::pending,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
};

use contextflow::{FutureExt as _, Snapshot};
use contextflow_sqlx::{
    ConnectionBusy, Propagation, PropagationError, TransactionClosed, TxPool,
};
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use tokio::sync::oneshot;

use crate::support::{captured, next_id, CommitReport, DropAfter, Rng, BLOCK};

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
    let sql = sql(&format!("INSERT INTO {} (id, tag) VALUES ($1, $2)", ctx.table));
    ctx.db.execute(sqlx::query(&sql).bind(id).bind(tag)).await?;
    Ok(())
}

/// Committed ids, read on a connection of their own (not one of the pool's, which a block
/// might have left inside a transaction that shows its own uncommitted rows).
async fn ids(ctx: &Ctx) -> Vec<i64> {
    use sqlx::{ConnectOptions as _, Connection as _};
    let sql = format!("SELECT id FROM {} ORDER BY id", ctx.table);
    let mut conn = ctx.db.pool().connect_options().connect().await.unwrap();
    let ids = sqlx::query_scalar(&sql).fetch_all(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    ids
}

/// Rows matching `condition` (with `$1` = `tag`) as seen through the `TxPool`.
async fn count_where(db: &TxPool<Db>, table: &str, condition: &str, tag: i64) -> i64 {
    let sql = sql(&format!("SELECT count(*) FROM {table} WHERE {condition}"));
    sqlx::query_scalar(&sql).bind(tag).fetch_one(db).await.unwrap()
}

/// Committed rows with `tag`, read on the sqlx pool.
async fn committed_with_tag(ctx: &Ctx, tag: i64) -> i64 {
    let sql = sql(&format!("SELECT count(*) FROM {} WHERE tag = $1", ctx.table));
    sqlx::query_scalar(&sql).bind(tag).fetch_one(ctx.db.pool()).await.unwrap()
}

/// After a rollback the pooled connection must be clean: a new transaction on it commits
/// only its own row.
async fn assert_connection_clean(ctx: &Ctx, id: i64) {
    ctx.db.transaction(|| insert(ctx, id, 0)).await.unwrap();
    assert_eq!(ids(ctx).await, vec![id]);
}

/// Takes every connection of the pool at once, straight from sqlx (past contextflow-sqlx's
/// own check), and asks the server whether any is inside a transaction.
async fn assert_pool_clean(ctx: &Ctx, size: u32) {
    let mut conns = Vec::new();
    for _ in 0..size {
        conns.push(ctx.db.pool().acquire().await.unwrap());
    }
    for conn in &mut conns {
        assert!(
            !oracle_in_transaction(conn).await,
            "{BACKEND}: a pooled connection is inside a transaction"
        );
    }
}

async fn commit() {
    let ctx = setup(2).await;
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
    let ctx = setup(1).await;
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
    let ctx = setup(1).await;
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
    let ctx = setup(1).await;
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
    assert_pool_clean(&ctx, 1).await;
    assert_connection_clean(&ctx, 3).await;
    ctx.finish().await;
}

/// The block is dropped while a task that kept its context (a full snapshot) has a query in
/// flight: the transaction is rolled back once that query is done, not left open, holding its
/// locks, for as long as the snapshot lives.
async fn rollback_on_drop_with_a_query_in_flight() {
    let ctx = setup(2).await;
    let (snapshot_tx, snapshot_rx) = oneshot::channel();
    let mut request = Box::pin(ctx.db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        snapshot_tx.send(Snapshot::capture()).unwrap();
        pending::<()>().await;
        Ok::<_, TestError>(())
    }));
    let snapshot = tokio::select! {
        _ = &mut request => unreachable!("the block never finishes"),
        snapshot = snapshot_rx => snapshot.unwrap(),
    };
    // A long query in the block's context (a recursive count keeps the connection busy for
    // a while), then the block is dropped while it runs.
    let slow = sql(
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3000000) \
         SELECT count(*) FROM c",
    );
    let db = ctx.db.clone();
    let (started_tx, started_rx) = oneshot::channel();
    let late = tokio::spawn(
        async move {
            started_tx.send(()).unwrap();
            sqlx::query_scalar::<_, i64>(&slow).fetch_one(&db).await
        }
        .with_snapshot(snapshot.clone()),
    );
    started_rx.await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    drop(request);
    let _ = late.await.unwrap();
    // The snapshot is still alive; the transaction must be gone all the same (a bound on the
    // wait, so that the failure is a message rather than a hang).
    let clean = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        assert_pool_clean(&ctx, 2),
    )
    .await;
    assert!(
        clean.is_ok(),
        "{BACKEND}: the dropped block's connection stayed out of the pool, in its transaction"
    );
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    drop(snapshot);
    ctx.finish().await;
}

/// The request's task is aborted after its first insert.
async fn rollback_on_abort() {
    let ctx = setup(1).await;
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
    assert_pool_clean(&ctx, 1).await;
    assert_connection_clean(&ctx, 2).await;
    ctx.finish().await;
}

/// A failing nested block rolls back its own work only.
async fn savepoint_error() {
    let ctx = setup(1).await;
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
    let ctx = setup(1).await;
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
    let ctx = setup(1).await;
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
    let ctx = setup(1).await;
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

/// A savepoint that cannot be rolled back (user code released it behind contextflow-sqlx's
/// back) poisons the transaction: it may only be rolled back, and says so.
async fn poisoned_savepoint() {
    let ctx = setup(1).await;
    let db = &ctx.db;
    let result = db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let inner = db
                .transaction(|| async {
                    insert(&ctx, 2, 0).await?;
                    let mut conn = db.acquire().await?;
                    sqlx::raw_sql("RELEASE SAVEPOINT contextflow_sp_1")
                        .execute(&mut *conn)
                        .await?;
                    Err::<(), _>(TestError::Refused)
                })
                .await;
            assert!(matches!(inner, Err(TestError::Refused)), "{inner:?}");
            let err = insert(&ctx, 3, 0).await.unwrap_err();
            let closed = TransactionClosed::find(&err).expect("a TransactionClosed");
            assert!(closed.is_poisoned(), "{err}");
            Ok::<_, TestError>(())
        })
        .await;
    let Err(TestError::Sql(err)) = result else { panic!("{result:?}") };
    assert!(TransactionClosed::find(&err).unwrap().is_poisoned());
    assert_eq!(ids(&ctx).await, Vec::<i64>::new());
    assert_pool_clean(&ctx, 1).await;
    ctx.finish().await;
}

/// Outside a block, queries autocommit on the pool.
async fn pool_outside_a_block() {
    let ctx = setup(2).await;
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
    let ctx = setup(2).await;
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
    let ctx = setup(2).await;
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
    let ctx = setup(2).await;
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

/// `after_commit` through a snapshot of a block that has ended (committed, rolled back, or a
/// savepoint released or rolled back) has nobody to run its hook: the hook is not run, and a
/// warning says so, in the caller's context (it was dropped without a word).
async fn after_commit_after_the_block_ended_is_reported() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let ran = Arc::new(Mutex::new(Vec::new()));
    let committed = db
        .transaction(|| async { Ok::<_, TestError>(Snapshot::capture()) })
        .await
        .unwrap();
    let mut rolled_back = None;
    let _ = db
        .transaction(|| async {
            rolled_back = Some(Snapshot::capture());
            Err::<(), _>(TestError::Refused)
        })
        .await;
    let mut nested = None;
    db.transaction(|| async {
        nested = Some(db.transaction(|| async { Ok::<_, TestError>(Snapshot::capture()) }).await?);
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    for (i, snapshot) in [committed, rolled_back.unwrap(), nested.unwrap()].into_iter().enumerate() {
        let block = next_id();
        let ran = ran.clone();
        BLOCK
            .scope(block, db.after_commit(async move { ran.lock().unwrap().push(i) }))
            .with_snapshot(snapshot)
            .await;
        let lines = captured(block);
        assert!(
            lines.iter().any(|line| line.contains("transaction that has ended")),
            "{BACKEND} snapshot {i}: {lines:?}"
        );
    }
    assert!(ran.lock().unwrap().is_empty(), "{BACKEND}: a hook of an ended block ran");
    ctx.finish().await;
}

/// The same one level down: a snapshot captured inside a nested block, used after the block
/// ended (its savepoint released, or rolled back), is refused with `TransactionClosed`: its
/// statements never run in the enclosing transaction, whose own work still commits.
async fn snapshot_after_nested_block_is_closed() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        let released = db
            .transaction(|| async {
                insert(&ctx, 2, 0).await?;
                Ok::<_, TestError>(Snapshot::capture())
            })
            .await?;
        let mut rolled_back = None;
        let failed = db
            .transaction(|| async {
                insert(&ctx, 3, 0).await?;
                rolled_back = Some(Snapshot::capture());
                Err::<(), _>(TestError::Refused)
            })
            .await;
        assert!(matches!(failed, Err(TestError::Refused)));
        for (id, snapshot) in [(4, released), (5, rolled_back.unwrap())] {
            let late = insert(&ctx, id, 0).with_snapshot(snapshot.clone()).await;
            let err = late.unwrap_err();
            assert!(TransactionClosed::find(&err).is_some(), "{BACKEND}: {err}");
            let nested = async { db.transaction(|| insert(&ctx, id, 0)).await }
                .with_snapshot(snapshot)
                .await;
            assert!(nested.is_err(), "{BACKEND}: a savepoint under an ended one");
        }
        insert(&ctx, 6, 0).await?;
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 2, 6]);
    ctx.finish().await;
}

/// Concurrent queries inside one transaction are serialized on its connection.
async fn concurrent_queries_in_one_transaction() {
    let ctx = setup(1).await;
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
    let ctx = setup(8).await;
    let mut handles = Vec::new();
    for tag in 0..REQUESTS {
        let db = ctx.db.clone();
        let table = ctx.table.clone();
        handles.push(tokio::spawn(async move {
            let result = db
                .transaction(|| async {
                    for row in 0..ROWS {
                        let q = sql(&format!("INSERT INTO {table} (id, tag) VALUES ($1, $2)"));
                        db.execute(sqlx::query(&q).bind(tag * ROWS + row).bind(tag))
                            .await?;
                        tokio::task::yield_now().await;
                    }
                    assert_eq!(count_where(&db, &table, "tag = $1", tag).await, ROWS);
                    // Odd requests roll back, so no request may ever see their rows.
                    let doomed =
                        count_where(&db, &table, "tag % 2 = 1 AND tag <> $1", tag).await;
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
        assert_eq!(committed_with_tag(&ctx, tag).await, expected);
    }
    assert_eq!(ids(&ctx).await.len() as i64, REQUESTS / 2 * ROWS);
    ctx.finish().await;
}

/// Whether the after-commit hook of block `tag` has run, waiting a while for it: hooks run in
/// a task of their own, which goes on when the block's caller is dropped after the commit.
async fn hook_ran(hooks: &Mutex<Vec<i64>>, tag: i64) -> bool {
    for _ in 0..500 {
        if hooks.lock().unwrap().contains(&tag) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// The block every drop test runs: rows `tag*10 + 1..=4` (3 is rolled back by its savepoint),
/// an after-commit hook (unless `hooks` is `None`), and `fail` decides between commit and
/// rollback.
async fn protocol_block(ctx: &Ctx, tag: i64, fail: bool, hooks: Option<Arc<Mutex<Vec<i64>>>>) -> Result<(), TestError> {
    let db = &ctx.db;
    db.transaction(|| async {
        insert(ctx, tag * 10 + 1, tag).await?;
        db.transaction(|| insert(ctx, tag * 10 + 2, tag)).await?;
        let _ = db
            .transaction(|| async {
                insert(ctx, tag * 10 + 3, tag).await?;
                Err::<(), _>(TestError::Refused)
            })
            .await;
        if let Some(hooks) = hooks {
            db.after_commit(async move { hooks.lock().unwrap().push(tag) })
                .await;
        }
        insert(ctx, tag * 10 + 4, tag).await?;
        if fail {
            Err(TestError::Refused)
        } else {
            Ok(())
        }
    })
    .await
}

/// Issue 9: the transaction future is dropped at every one of its suspension points in turn
/// (BEGIN, each statement, SAVEPOINT, RELEASE, ROLLBACK TO, COMMIT or ROLLBACK, the pool's
/// check): afterwards no pooled connection is inside a transaction, the dropped block's work
/// is absent (or, when dropped during COMMIT, complete and reported), and after-commit hooks
/// ran exactly for committed blocks. A block without hooks commits in the caller's task, a
/// block with hooks in a task of its own: both are dropped at every point.
async fn issue_9_drop_at_every_await_point() {
    for (fail, with_hooks) in [(false, true), (true, true), (false, false)] {
        let ctx = setup_slow(1).await;
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let mut polls = 0;
        loop {
            let block = next_id();
            let tag = block as i64;
            let block_hooks = with_hooks.then(|| hooks.clone());
            let fut = BLOCK.scope(block, protocol_block(&ctx, tag, fail, block_hooks));
            let outcome = DropAfter::new(fut, polls).await;
            assert_pool_clean(&ctx, 1).await;
            let rows = committed_with_tag(&ctx, tag).await;
            let lines = captured(block);
            let report = CommitReport::of(&lines);
            report.assert_agrees(rows == 3, &format!("{BACKEND} poll {polls}: {lines:?}"));
            let unknown = report.any();
            let hooked = hooks.lock().unwrap().contains(&tag);
            match &outcome {
                Some(Ok(())) => assert!(rows == 3 && hooked == with_hooks && !fail, "{BACKEND} poll {polls}: {rows} rows"),
                // Without hooks, a drop during COMMIT is resolved by the connection's clean-up,
                // which reports it.
                None if rows == 3 && !with_hooks => {
                    assert!(!fail, "{BACKEND} poll {polls}: a failing block committed");
                    assert!(report.committed || report.unknown, "{BACKEND} poll {polls}: a dropped block committed unreported: {lines:?}");
                }
                Some(Err(_)) => assert!(rows == 0 && !hooked && fail, "{BACKEND} poll {polls}: {rows} rows"),
                // Dropped with its COMMIT in flight or after it, while its hooks ran (the
                // commit and the hooks go on in a task of their own): complete, and the hooks
                // run to their end.
                None if rows == 3 => {
                    assert!(!fail, "{BACKEND} poll {polls}: a failing block committed");
                    assert!(hook_ran(&hooks, tag).await, "{BACKEND} poll {polls}: committed, hooks never ran: {lines:?}");
                }
                None if unknown => {
                    assert_eq!(rows, 0, "{BACKEND} poll {polls}: partial commit");
                    assert!(!hooked);
                }
                None => assert!(rows == 0 && !hooked, "{BACKEND} poll {polls}: {rows} rows of a dropped block: {lines:?}"),
            }
            if outcome.is_some() {
                break;
            }
            polls += 1;
        }
        eprintln!(
            "{BACKEND}: {} block{} dropped at each of its {polls} await points",
            if fail { "failing" } else { "committing" },
            if with_hooks { " with a hook" } else { "" }
        );
        // Without the slow proxy, how many polls a block takes depends on the runtime and on
        // timing (a response already there needs no suspension: PostgreSQL took 2 or 3 on
        // `current_thread` in a debug build), so most drop points went untested.
        assert!(
            polls >= MIN_DROP_POINTS,
            "{BACKEND}: only {polls} suspension points"
        );
        ctx.finish().await;
    }
}

/// A nested block dropped with its statement in flight leaves a rollback to its savepoint
/// pending, settled by the connection's next use. That use, dropped in turn at each of its
/// suspension points (a timeout around every call), must not lose the rollback: the nested
/// block's row is never committed; the transaction commits without it, or is refused and
/// rolled back as a whole.
async fn dropped_savepoint_rollback_survives_a_dropped_settle() {
    let ctx = setup_slow(1).await;
    let db = &ctx.db;
    let mut settle_points = 0;
    for nested_polls in 1..=4 {
        let mut polls = 0;
        loop {
            let tag = next_id() as i64;
            let result = db
                .transaction(|| async {
                    insert(&ctx, tag * 10 + 1, tag).await?;
                    let nested = db.transaction(|| insert(&ctx, tag * 10 + 2, tag));
                    let nested_done = DropAfter::new(nested, nested_polls).await.is_some();
                    let settled = DropAfter::new(insert(&ctx, tag * 10 + 3, tag), polls).await;
                    insert(&ctx, tag * 10 + 4, tag).await?;
                    Ok::<_, TestError>((nested_done, settled.is_some()))
                })
                .await;
            assert_pool_clean(&ctx, 1).await;
            let nested_done = matches!(result, Ok((true, _)));
            let committed = committed_with_tag(&ctx, tag).await;
            let rows: Vec<i64> = ids(&ctx).await.into_iter().filter(|id| id / 10 == tag).collect();
            assert!(
                nested_done || !rows.contains(&(tag * 10 + 2)),
                "{BACKEND} nested dropped after {nested_polls} polls, next use after {polls}: \
                 the dropped block's row was committed: {rows:?} ({result:?})"
            );
            assert_eq!(committed, rows.len() as i64);
            if matches!(result, Ok((_, true))) || polls > 50 {
                break;
            }
            polls += 1;
        }
        settle_points = settle_points.max(polls);
    }
    assert!(settle_points >= 1, "{BACKEND}: the settling statement never suspended");
    ctx.finish().await;
}

/// A statement outside any block, dropped at each suspension point: the connection still
/// comes back clean.
async fn drop_pool_statement_at_every_await_point() {
    let ctx = setup_slow(1).await;
    let mut polls = 0;
    loop {
        let outcome = DropAfter::new(insert(&ctx, polls as i64, 0), polls).await;
        assert_pool_clean(&ctx, 1).await;
        if outcome.is_some() {
            break;
        }
        polls += 1;
    }
    assert!(polls >= 1, "{BACKEND}: the statement never suspended");
    // The statement that ran to the end is there; a dropped one may or may not be (it was
    // sent, or not): nothing else, nothing twice.
    let ids = ids(&ctx).await;
    assert!(ids.contains(&(polls as i64)), "{BACKEND}: {ids:?}");
    assert!(
        ids.iter().all(|id| (0..=polls as i64).contains(id)),
        "{BACKEND}: {ids:?}"
    );
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{BACKEND}: a statement ran twice: {ids:?}");
    ctx.finish().await;
}

/// 500 concurrent transactions on a 3-connection pool, a random share of them dropped at a
/// random point or aborted: no session is left idle in a transaction, every committed block's
/// rows are complete and every dropped block's rows absent (or complete when its COMMIT was
/// in flight, which is then reported).
async fn load_with_random_drops() {
    const BLOCKS: u64 = 500;
    const POOL: u32 = 3;
    let ctx = Arc::new(setup(POOL).await);
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let mut rng = Rng::new();
    let mut handles = Vec::new();
    for _ in 0..BLOCKS {
        let block = next_id();
        let ctx = ctx.clone();
        let hooks = hooks.clone();
        let drop_after = match rng.below(3) {
            0 => Some(rng.below(12) as usize),
            _ => None,
        };
        let abort = rng.below(10) == 0;
        let handle = tokio::spawn(async move {
            let fut = BLOCK.scope(block, protocol_block(&ctx, block as i64, false, Some(hooks)));
            match drop_after {
                Some(polls) => DropAfter::new(fut, polls).await,
                None => Some(fut.await),
            }
        });
        if abort {
            handle.abort();
        }
        handles.push((block, handle));
    }
    let mut committed = 0;
    let mut dropped_blocks = Vec::new();
    for (block, handle) in handles {
        match handle.await.ok().flatten() {
            Some(result) => {
                result.unwrap();
                assert_eq!(committed_with_tag(&ctx, block as i64).await, 3);
                assert!(hooks.lock().unwrap().contains(&(block as i64)));
                committed += 1;
            }
            None => dropped_blocks.push(block),
        }
    }
    // Every connection back in the pool: a dropped block's COMMIT (in a task of its own when
    // the block has hooks) has ended one way or the other.
    assert_pool_clean(&ctx, POOL).await;
    match idle_in_transaction(&ctx).await {
        Some(idle) => assert_eq!(idle, 0, "{BACKEND}: sessions idle in a transaction"),
        None => eprintln!(
            "{BACKEND}: sessions leaked out of the pool not checked (no server view by pool)"
        ),
    }
    let dropped = dropped_blocks.len();
    for block in dropped_blocks {
        let rows = committed_with_tag(&ctx, block as i64).await;
        if rows == 3 {
            // Dropped with its COMMIT in flight or after it: the commit and then the hooks
            // went on in a task of their own.
            assert!(hook_ran(&hooks, block as i64).await, "block {block}: committed, hooks never ran");
        } else {
            assert_eq!(rows, 0, "block {block}: partial commit: {:?}", captured(block));
            assert!(
                !hooks.lock().unwrap().contains(&(block as i64)),
                "block {block}: hooks ran without a commit"
            );
        }
    }
    eprintln!("{BACKEND}: {committed} committed, {dropped} dropped or aborted, pool clean");
    assert!(committed > 0 && dropped > 0);
    let ctx = Arc::into_inner(ctx).unwrap();
    ctx.finish().await;
}

/// sqlx's typed API runs on `&TxPool` inside and outside a transaction: `query_as`,
/// `query_scalar`, `Map` (what `query!`/`query_as!` produce), `fetch` streams,
/// `fetch_optional` and `fetch_all`.
async fn typed_queries_and_streams() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    insert(&ctx, 1, 10).await.unwrap();
    db.transaction(|| async {
        insert(&ctx, 2, 20).await?;
        let all = sql(&format!("SELECT id, tag FROM {} ORDER BY id", ctx.table));
        let rows: Vec<(i64, i64)> = sqlx::query_as(&all).fetch_all(db).await?;
        assert_eq!(rows, vec![(1, 10), (2, 20)]);
        let one = sql(&format!("SELECT tag FROM {} WHERE id = $1", ctx.table));
        let tag: i64 = sqlx::query_scalar(&one).bind(2_i64).fetch_one(db).await?;
        assert_eq!(tag, 20);
        let none: Option<i64> = sqlx::query_scalar(&one).bind(9_i64).fetch_optional(db).await?;
        assert_eq!(none, None);
        // What the `query!` family expands to: a `Map` over the row.
        let mapped: Vec<i64> = sqlx::query(&all)
            .try_map(|row: <Db as sqlx::Database>::Row| sqlx::Row::try_get::<i64, _>(&row, 1))
            .fetch_all(db)
            .await?;
        assert_eq!(mapped, vec![10, 20]);
        // A stream, consumed row by row, on the transaction (it sees row 2).
        let mut stream = sqlx::query_as::<_, (i64, i64)>(&all).fetch(db);
        let mut seen = Vec::new();
        while let Some(row) = stream.try_next().await? {
            seen.push(row.0);
        }
        drop(stream);
        assert_eq!(seen, vec![1, 2]);
        // The shortcuts, inside the transaction.
        assert_eq!(db.fetch_all(sqlx::query(&all)).await?.len(), 2);
        assert!(db.fetch_optional(sqlx::query(&one).bind(9_i64)).await?.is_none());
        assert!(db.fetch_optional(sqlx::query(&one).bind(2_i64)).await?.is_some());
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    // Outside: the pool, committed rows only.
    let all = sql(&format!("SELECT id FROM {} ORDER BY id", ctx.table));
    let streamed: Vec<i64> = sqlx::query_scalar::<_, i64>(&all).fetch(db).try_collect().await.unwrap();
    assert_eq!(streamed, vec![1, 2]);
    ctx.finish().await;
}

/// Holding the transaction's connection (a `Conn`, a stream between rows) across another call
/// of the same task fails at once, naming both places, instead of waiting forever.
async fn held_connection_fails_fast() {
    let ctx = setup(1).await;
    let db = &ctx.db;
    db.transaction(|| async {
        let conn = db.acquire().await?;
        let err = insert(&ctx, 1, 0).await.unwrap_err();
        let busy = ConnectionBusy::find(&err).expect("a ConnectionBusy");
        assert!(busy.held_at().unwrap().file().ends_with("cases.rs"), "{err}");
        let nested = db.transaction(|| async { Ok::<_, sqlx::Error>(()) }).await;
        assert!(ConnectionBusy::find(&nested.unwrap_err()).is_some());
        drop(conn);
        insert(&ctx, 1, 0).await?;

        let all = format!("SELECT id FROM {}", ctx.table);
        let mut stream = sqlx::query_scalar::<_, i64>(&all).fetch(db);
        assert_eq!(stream.next().await.transpose()?, Some(1));
        let err = insert(&ctx, 2, 0).await.unwrap_err();
        assert!(ConnectionBusy::find(&err).is_some(), "{err}");
        drop(stream);
        insert(&ctx, 2, 0).await?;
        Ok::<_, TestError>(())
    })
    .await
    .unwrap();
    assert_eq!(ids(&ctx).await, vec![1, 2]);

    // Outside a transaction: the task holds the pool's only connection.
    let conn = db.acquire().await.unwrap();
    let err = insert(&ctx, 3, 0).await.unwrap_err();
    assert!(ConnectionBusy::find(&err).is_some(), "{err}");
    drop(conn);
    insert(&ctx, 3, 0).await.unwrap();
    ctx.finish().await;
}

/// A `Conn` kept past the end of its block (stored elsewhere): the block's end reports
/// `ConnectionBusy` and commits nothing, and the transaction is over for everyone else at once:
/// a statement through a snapshot of the block's context is refused (before, it ran in the
/// still-open transaction and reported success for work that was never committed).
async fn a_conn_kept_past_its_block_ends_the_transaction() {
    let ctx = setup(1).await;
    let db = &ctx.db;
    let stash = Mutex::new(None);
    let result = db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let snapshot = Snapshot::capture();
            let conn = db.acquire().await?;
            *stash.lock().unwrap() = Some((conn, snapshot));
            Ok::<_, TestError>(())
        })
        .await;
    let Err(TestError::Sql(err)) = result else {
        panic!("{result:?}")
    };
    assert!(ConnectionBusy::find(&err).is_some(), "{err}");
    let (conn, snapshot) = stash.lock().unwrap().take().unwrap();
    drop(conn);
    let late = insert(&ctx, 2, 0).with_snapshot(snapshot.clone()).await;
    let err = late.unwrap_err();
    assert!(TransactionClosed::find(&err).is_some(), "{err}");
    drop(snapshot);
    let clean = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        assert_pool_clean(&ctx, 1),
    )
    .await;
    assert!(clean.is_ok(), "the transaction was never ended");
    // Nothing of the block committed: only the new row.
    assert_connection_clean(&ctx, 3).await;
    ctx.finish().await;
}

/// REQUIRED and MANDATORY join; REQUIRES_NEW commits on its own; NEVER and MANDATORY refuse
/// where they do not apply.
async fn propagation_modes() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    // MANDATORY outside, NEVER inside: refused, the block does not run.
    let ran = AtomicBoolCell::default();
    let err = db
        .transaction_with(Propagation::Mandatory, || async {
            ran.set();
            Ok::<_, sqlx::Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(PropagationError::find(&err).unwrap().propagation(), Propagation::Mandatory);
    db.transaction_with(Propagation::Never, || async {
        assert!(!db.in_transaction());
        insert(&ctx, 1, 0).await // autocommits
    })
    .await
    .unwrap();
    let result = db
        .transaction(|| async {
            let err = db
                .transaction_with(Propagation::Never, || async {
                    ran.set();
                    Ok::<_, sqlx::Error>(())
                })
                .await
                .unwrap_err();
            assert!(PropagationError::find(&err).is_some());
            // REQUIRES_NEW: its own transaction, committed whatever happens here. (Before
            // this transaction's first write: on SQLite the new one would wait for its lock.)
            db.transaction_with(Propagation::RequiresNew, || async {
                assert_eq!(db.transaction_depth(), 1);
                insert(&ctx, 3, 0).await
            })
            .await?;
            // REQUIRED joins: same depth, same transaction.
            db.transaction_with(Propagation::Required, || async {
                assert_eq!(db.transaction_depth(), 1);
                insert(&ctx, 2, 0).await
            })
            .await?;
            Err::<(), _>(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)));
    assert!(!ran.get());
    assert_eq!(ids(&ctx).await, vec![1, 3]);

    // A failed REQUIRED block marks the transaction rollback-only, even if swallowed.
    let result = db
        .transaction(|| async {
            insert(&ctx, 4, 0).await?;
            let joined = db
                .transaction_with(Propagation::Mandatory, || async {
                    insert(&ctx, 5, 0).await?;
                    Err::<(), _>(TestError::Refused)
                })
                .await;
            assert!(joined.is_err());
            Ok::<_, TestError>(())
        })
        .await;
    let Err(TestError::Sql(err)) = result else { panic!("{result:?}") };
    assert!(TransactionClosed::find(&err).unwrap().is_poisoned());
    assert_eq!(ids(&ctx).await, vec![1, 3]);
    ctx.finish().await;
}

/// After-commit hooks run after a successful top-level commit only, in the caller's context;
/// a rolled-back savepoint takes its hooks with it.
async fn after_commit_hooks() {
    let ctx = setup(1).await;
    let db = &ctx.db;
    let log = Arc::new(Mutex::new(Vec::new()));
    let push = |what: &'static str| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push((what, REQUEST_ID.get()));
        }
    };
    REQUEST_ID
        .scope(7, async {
            db.transaction(|| async {
                db.after_commit(push("outer")).await;
                db.transaction(|| async {
                    db.after_commit(push("released")).await;
                    Ok::<_, TestError>(())
                })
                .await?;
                let rolled_back = db
                    .transaction(|| async {
                        db.after_commit(push("rolled back")).await;
                        Err::<(), _>(TestError::Refused)
                    })
                    .await;
                assert!(matches!(rolled_back, Err(TestError::Refused)), "{rolled_back:?}");
                assert!(log.lock().unwrap().is_empty());
                Ok::<_, TestError>(())
            })
            .await
            .unwrap();
            let failed = db
                .transaction(|| async {
                    db.after_commit(push("failed")).await;
                    Err::<(), _>(TestError::Refused)
                })
                .await;
            assert!(matches!(failed, Err(TestError::Refused)), "{failed:?}");
            db.after_commit(push("no transaction")).await;
        })
        .await;
    assert_eq!(
        *log.lock().unwrap(),
        [("outer", Some(7)), ("released", Some(7)), ("no transaction", Some(7))]
    );
    ctx.finish().await;
}

#[derive(Default)]
struct AtomicBoolCell(std::sync::atomic::AtomicBool);

impl AtomicBoolCell {
    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn check(db: &TxPool<Db>) {
        assert_send(&db.transaction(|| async { Ok::<_, sqlx::Error>(()) }));
        assert_send(&db.acquire());
        assert_send(&db.execute(sqlx::query("SELECT 1")));
        assert_send(&sqlx::query("SELECT 1").fetch_all(db));
    }
    let _ = check;
}

/// A savepoint opened in another task that carries the block's context (a snapshot) and is
/// still open when the block returns: the commit waits for it to end, and its work is
/// committed only if it was released (before, the commit took the connection between the
/// task's statements and committed the work of a savepoint that then failed).
async fn commit_waits_for_a_savepoint_open_in_another_task() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let (started_tx, started_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let task = db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let db2 = db.clone();
            let insert2 = sql(&format!("INSERT INTO {} (id, tag) VALUES (2, 0)", ctx.table));
            let task = tokio::spawn(
                async move {
                    db2.transaction(|| async {
                        db2.execute(sqlx::query(&insert2)).await?;
                        started_tx.send(()).unwrap();
                        go_rx.await.unwrap();
                        Err::<(), _>(TestError::Refused)
                    })
                    .await
                }
                .with_snapshot(Snapshot::capture()),
            );
            started_rx.await.unwrap();
            // The savepoint fails a moment after the block has returned.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let _ = go_tx.send(());
            });
            Ok::<_, TestError>(task)
        })
        .await
        .unwrap();
    assert!(matches!(task.await.unwrap(), Err(TestError::Refused)));
    assert_eq!(ids(&ctx).await, vec![1], "the failed savepoint's row is not committed");
    ctx.finish().await;
}

/// The same one level down: a nested block whose own nested block runs in another task and
/// is still open when the middle one returns. Releasing the middle savepoint waits for it, so
/// the grandchild's failed work never reaches the commit.
async fn release_waits_for_a_savepoint_open_in_another_task() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let (started_tx, started_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let task = db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let task = db
                .transaction(|| async {
                    let db2 = db.clone();
                    let insert2 = sql(&format!("INSERT INTO {} (id, tag) VALUES (2, 0)", ctx.table));
                    let task = tokio::spawn(
                        async move {
                            db2.transaction(|| async {
                                db2.execute(sqlx::query(&insert2)).await?;
                                started_tx.send(()).unwrap();
                                go_rx.await.unwrap();
                                Err::<(), _>(TestError::Refused)
                            })
                            .await
                        }
                        .with_snapshot(Snapshot::capture()),
                    );
                    started_rx.await.unwrap();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let _ = go_tx.send(());
                    });
                    Ok::<_, TestError>(task)
                })
                .await?;
            Ok::<_, TestError>(task)
        })
        .await
        .unwrap();
    assert!(matches!(task.await.unwrap(), Err(TestError::Refused)));
    assert_eq!(ids(&ctx).await, vec![1], "the failed grandchild's row is not committed");
    ctx.finish().await;
}

/// A savepoint opened in another task (with the block's context) registers a hook and is
/// released while the block's end waits for it: the hook reaches the transaction before the
/// transaction's end can take its hooks, and runs after the commit.
async fn hooks_of_a_savepoint_released_in_another_task_run_after_the_commit() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, started_rx) = oneshot::channel();
    let task = db
        .transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let db2 = db.clone();
            let flag = ran.clone();
            let insert2 = sql(&format!("INSERT INTO {} (id, tag) VALUES (2, 0)", ctx.table));
            let task = tokio::spawn(
                async move {
                    db2.transaction(|| async {
                        db2.execute(sqlx::query(&insert2)).await?;
                        started_tx.send(()).unwrap();
                        // The block's end is waiting for this savepoint by now.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        db2.after_commit(async move {
                            flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        })
                        .await;
                        Ok::<_, TestError>(())
                    })
                    .await
                }
                .with_snapshot(Snapshot::capture()),
            );
            started_rx.await.unwrap();
            Ok::<_, TestError>(task)
        })
        .await
        .unwrap();
    task.await.unwrap().unwrap();
    assert!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        "the released savepoint's hook ran"
    );
    assert_eq!(ids(&ctx).await, vec![1, 2]);
    ctx.finish().await;
}

/// The hooks of a `RequiresNew` block run after its own commit, outside every transaction:
/// their queries go to the pool, not into the suspended outer transaction (whose rollback
/// would undo them although the inner block committed).
async fn requires_new_hooks_run_outside_the_suspended_transaction() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let result = db
        .transaction(|| async {
            db.transaction_with(Propagation::RequiresNew, || async {
                insert(&ctx, 1, 0).await?;
                let db2 = db.clone();
                let insert2 = sql(&format!("INSERT INTO {} (id, tag) VALUES (2, 0)", ctx.table));
                db.after_commit(async move {
                    assert_eq!(db2.transaction_depth(), 0, "no transaction around a hook");
                    db2.execute(sqlx::query(&insert2)).await.unwrap();
                })
                .await;
                Ok::<_, TestError>(())
            })
            .await?;
            Err::<(), _>(TestError::Refused)
        })
        .await;
    assert!(matches!(result, Err(TestError::Refused)));
    assert_eq!(ids(&ctx).await, vec![1, 2]);
    ctx.finish().await;
}

/// A nested block's future kept past its block by the same task (returned out of it, still
/// open): the block's end reports `ConnectionBusy` and commits nothing, instead of waiting for a
/// savepoint that only this task could end (forever), or committing its unfinished work.
async fn a_savepoint_of_the_same_task_kept_past_its_block_is_refused() {
    let ctx = setup(1).await;
    let db = &ctx.db;
    let (inserted_tx, inserted_rx) = oneshot::channel();
    let err = {
        let result = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        db.transaction(|| async {
            insert(&ctx, 1, 0).await?;
            let mut nested = Box::pin(db.transaction(|| async {
                insert(&ctx, 2, 0).await?;
                let _ = inserted_tx.send(());
                pending::<Result<(), TestError>>().await
            }));
            // Poll the nested block until its savepoint is open and its row written.
            tokio::select! {
                _ = nested.as_mut() => unreachable!("the nested block never ends"),
                _ = inserted_rx => {}
            }
            Ok::<_, TestError>(nested)
        }),
    )
    .await
    .expect("the block's end does not wait for its own task's savepoint");
        match result {
            Err(TestError::Sql(err)) => err,
            Ok(_) => panic!("committed with a savepoint of its own still open"),
            Err(other) => panic!("{other:?}"),
        }
    };
    assert!(ConnectionBusy::find(&err).is_some(), "{err}");
    assert_eq!(ids(&ctx).await, Vec::<i64>::new(), "nothing committed");
    ctx.finish().await;
}

/// A caller that goes away once the commit is done (a client disconnect, a timeout, an
/// aborted task) while an after-commit hook runs: the hooks still run to the end (before, they
/// ran in the caller's future and were dropped with it, though the commit had happened).
async fn hooks_outlive_a_caller_dropped_after_the_commit() {
    let ctx = setup(1).await;
    let (started_tx, started_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel();
    let db = ctx.db.clone();
    let insert1 = sql(&format!("INSERT INTO {} (id, tag) VALUES (1, 0)", ctx.table));
    let request = tokio::spawn(async move {
        db.transaction(|| async {
            db.execute(sqlx::query(&insert1)).await?;
            db.after_commit(async move {
                started_tx.send(()).unwrap();
                go_rx.await.unwrap();
                done_tx.send(()).unwrap();
            })
            .await;
            Ok::<_, sqlx::Error>(())
        })
        .await
    });
    started_rx.await.unwrap();
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    go_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), done_rx)
        .await
        .expect("the hook ran to its end")
        .unwrap();
    assert_eq!(ids(&ctx).await, vec![1]);
    ctx.finish().await;
}

/// Review finding: a statement whose future the block dropped (a timeout around it) may have
/// run; the block went on and committed, keeping a write the caller believed absent (or, with
/// a retry, making it twice). Now the transaction is poisoned: the block ends in an error and
/// nothing of it is committed. A stream dropped after its first row is not such a case: the
/// caller saw the statement run.
async fn a_dropped_statement_poisons_the_transaction() {
    let ctx = setup_slow(1).await;
    for (tag, through_executor) in [(1_i64, false), (2, true)] {
        let result = ctx
            .db
            .transaction(|| async {
                insert(&ctx, tag * 10, tag).await?;
                // A slow insert (it counts half a million rows first), so that it is still
                // running on any backend when the caller gives up on it.
                let sql = sql(&format!(
                    "INSERT INTO {} (id, tag) SELECT count(*), $1 FROM \
                     (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 500000) \
                     SELECT n FROM c) AS counted",
                    ctx.table
                ));
                let query = sqlx::query(&sql).bind(tag);
                // Polled once (the statement sent), then given up on.
                let gave_up = if through_executor {
                    DropAfter::new(query.execute(&ctx.db), 1).await.is_none()
                } else {
                    DropAfter::new(ctx.db.execute(query), 1).await.is_none()
                };
                assert!(gave_up, "{BACKEND}: the statement suspended");
                Ok::<_, TestError>(())
            })
            .await;
        let err = match result {
            Err(TestError::Sql(err)) => err,
            other => panic!("{BACKEND} {tag}: the block committed: {other:?}"),
        };
        assert!(
            contextflow_sqlx::TransactionClosed::find(&err).is_some_and(|c| c.is_poisoned()),
            "{BACKEND} {tag}: {err}"
        );
        assert_eq!(committed_with_tag(&ctx, tag).await, 0, "{BACKEND} {tag}");
        assert_pool_clean(&ctx, 1).await;
    }
    // A row stream dropped after its first row: the block commits.
    let read = sql(&format!("SELECT id FROM {} WHERE tag = $1", ctx.table));
    ctx.db
        .transaction(|| async {
            insert(&ctx, 31, 3).await?;
            insert(&ctx, 32, 3).await?;
            let mut rows = sqlx::query(&read).bind(3_i64).fetch(&ctx.db);
            assert!(futures_util::StreamExt::next(&mut rows).await.is_some());
            drop(rows);
            Ok::<_, TestError>(())
        })
        .await
        .unwrap();
    assert_eq!(committed_with_tag(&ctx, 3).await, 2, "{BACKEND}");
    ctx.finish().await;
}

/// Review finding: a nested block that started a savepoint in another task (a snapshot of its
/// context) and then failed rolled that savepoint back on the server with its own, but the
/// other task's block went on: its next statement ran, unseen, in the enclosing transaction
/// (committed with it), and its end poisoned the enclosing transaction. Now the savepoints
/// beneath a rolled-back one end with it.
async fn a_rolled_back_savepoint_ends_the_savepoints_beneath_it() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let insert_sql = |id: i64| sql(&format!("INSERT INTO {} (id, tag) VALUES ({id}, 0)", ctx.table));
    let (inserted_tx, inserted_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let grandchild = std::sync::Mutex::new(None);
    let (first, second) = (insert_sql(2), insert_sql(3));
    db.transaction(|| async {
        insert(&ctx, 1, 0).await?;
        let failed = db
            .transaction(|| async {
                let db2 = db.clone();
                let task = tokio::spawn(
                    async move {
                        db2.transaction(|| async {
                            db2.execute(sqlx::query(&first)).await?;
                            inserted_tx.send(()).unwrap();
                            go_rx.await.unwrap();
                            // Its enclosing block was rolled back meanwhile.
                            db2.execute(sqlx::query(&second)).await?;
                            Ok::<_, TestError>(())
                        })
                        .await
                    }
                    .with_snapshot(Snapshot::capture()),
                );
                *grandchild.lock().unwrap() = Some(task);
                inserted_rx.await.unwrap();
                Err::<(), _>(TestError::Refused)
            })
            .await;
        assert!(matches!(failed, Err(TestError::Refused)));
        insert(&ctx, 4, 0).await?;
        go_tx.send(()).unwrap();
        let task = grandchild.lock().unwrap().take().unwrap();
        let outcome = task.await.unwrap();
        assert!(
            matches!(&outcome, Err(TestError::Sql(err)) if contextflow_sqlx::TransactionClosed::find(err).is_some()),
            "{BACKEND}: the grandchild's block ends with its enclosing one: {outcome:?}"
        );
        Ok::<_, TestError>(())
    })
    .await
    .expect("the enclosing transaction is not poisoned");
    assert_eq!(ids(&ctx).await, vec![1, 4], "{BACKEND}");
    ctx.finish().await;
}

/// Review finding: a block joined (`Required`) from another task was not waited for: the
/// enclosing block's commit took whatever it had written so far, and its later failure marked
/// a transaction that had committed already. Now the level's end waits for it: all of its
/// work or none is committed, and its failure rolls the transaction back.
async fn a_joined_block_of_another_task_is_never_half_committed() {
    for fail in [true, false] {
        let ctx = setup(2).await;
        let db = &ctx.db;
        let insert_sql = |id: i64| sql(&format!("INSERT INTO {} (id, tag) VALUES ({id}, 0)", ctx.table));
        let (first, second) = (insert_sql(2), insert_sql(3));
        let (started_tx, started_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let outcome = db
            .transaction(|| async {
                insert(&ctx, 1, 0).await?;
                let db2 = db.clone();
                let task = tokio::spawn(
                    async move {
                        db2.transaction_with(Propagation::Required, || async {
                            db2.execute(sqlx::query(&first)).await?;
                            started_tx.send(()).unwrap();
                            go_rx.await.unwrap();
                            db2.execute(sqlx::query(&second)).await?;
                            if fail {
                                return Err(TestError::Refused);
                            }
                            Ok(())
                        })
                        .await
                    }
                    .with_snapshot(Snapshot::capture()),
                );
                started_rx.await.unwrap();
                // The enclosing block ends while the joined one is half done.
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    let _ = go_tx.send(());
                });
                Ok::<_, TestError>(task)
            })
            .await;
        if fail {
            let err = match outcome {
                Err(TestError::Sql(err)) => err,
                other => panic!("{BACKEND}: committed around a failed joined block: {other:?}"),
            };
            assert!(contextflow_sqlx::TransactionClosed::find(&err).is_some(), "{BACKEND}: {err}");
            assert_eq!(ids(&ctx).await, Vec::<i64>::new(), "{BACKEND}");
        } else {
            let task = outcome.expect("committed");
            assert!(task.await.unwrap().is_ok());
            assert_eq!(ids(&ctx).await, vec![1, 2, 3], "{BACKEND}");
        }
        ctx.finish().await;
    }
}

/// Review finding: with a `Conn` of the block's task kept past the block, the commit waited
/// for a block joined from another task, which waited for that `Conn`: neither ever ended.
/// The kept `Conn` is found first, as without a joined block.
async fn a_kept_conn_and_a_joined_block_do_not_hang_the_commit() {
    let ctx = setup(2).await;
    let db = &ctx.db;
    let stash = Mutex::new(None);
    let joined = Mutex::new(None);
    let (started_tx, started_rx) = oneshot::channel();
    let select = sql("SELECT 1");
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        db.transaction(|| async {
            let db2 = db.clone();
            let task = tokio::spawn(
                async move {
                    db2.transaction_with(Propagation::Required, || async {
                        started_tx.send(()).unwrap();
                        // The enclosing block ends meanwhile, keeping its `Conn`.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        db2.execute(sqlx::query(&select)).await?;
                        Ok::<_, TestError>(())
                    })
                    .await
                }
                .with_snapshot(Snapshot::capture()),
            );
            *joined.lock().unwrap() = Some(task);
            started_rx.await.unwrap();
            let conn = db.acquire().await?;
            *stash.lock().unwrap() = Some(conn);
            Ok::<_, TestError>(())
        }),
    )
    .await
    .expect("the commit does not hang");
    let Err(TestError::Sql(err)) = result else {
        panic!("{BACKEND}: {result:?}")
    };
    assert!(ConnectionBusy::find(&err).is_some(), "{BACKEND}: {err}");
    drop(stash.lock().unwrap().take());
    let task = joined.lock().unwrap().take().unwrap();
    let joined_outcome = tokio::time::timeout(std::time::Duration::from_secs(20), task)
        .await
        .expect("the joined block ends")
        .unwrap();
    assert!(joined_outcome.is_err(), "{BACKEND}: its transaction has ended");
    ctx.finish().await;
}

tests!(
    commit,
    rollback_on_error,
    rollback_on_panic,
    rollback_on_drop,
    rollback_on_drop_with_a_query_in_flight,
    rollback_on_abort,
    savepoint_error,
    savepoint_rolled_back_with_outer,
    savepoint_panic,
    savepoint_drop,
    poisoned_savepoint,
    pool_outside_a_block,
    separate_tx_pools_are_independent,
    spawned_task_gets_the_pool,
    snapshot_after_block_is_closed,
    snapshot_after_nested_block_is_closed,
    after_commit_after_the_block_ended_is_reported,
    concurrent_queries_in_one_transaction,
    concurrent_transactions_no_cross_talk,
    issue_9_drop_at_every_await_point,
    drop_pool_statement_at_every_await_point,
    dropped_savepoint_rollback_survives_a_dropped_settle,
    load_with_random_drops,
    typed_queries_and_streams,
    held_connection_fails_fast,
    propagation_modes,
    after_commit_hooks,
    commit_waits_for_a_savepoint_open_in_another_task,
    release_waits_for_a_savepoint_open_in_another_task,
    hooks_of_a_savepoint_released_in_another_task_run_after_the_commit,
    requires_new_hooks_run_outside_the_suspended_transaction,
    hooks_outlive_a_caller_dropped_after_the_commit,
    a_conn_kept_past_its_block_ends_the_transaction,
    a_savepoint_of_the_same_task_kept_past_its_block_is_refused,
    a_dropped_statement_poisons_the_transaction,
    a_rolled_back_savepoint_ends_the_savepoints_beneath_it,
    a_joined_block_of_another_task_is_never_half_committed,
    a_kept_conn_and_a_joined_block_do_not_hang_the_commit,
);
