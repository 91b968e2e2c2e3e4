use std::sync::{Arc, Mutex};

use contextflow::{AsyncLocal, FutureExt};

static ID: AsyncLocal<u32> = AsyncLocal::named("id");

/// Records what `ID` is when it is dropped.
struct Probe(Arc<Mutex<Vec<Option<u32>>>>);
impl Drop for Probe {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(ID.get());
    }
}

async fn dropped_scope_future_sees_its_value() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe(log.clone());
    let fut = ID.scope(1, async move {
        let _probe = probe;
        std::future::pending::<()>().await;
    });
    // Poll once so the probe lives inside the state machine, then drop it (a client went away).
    let mut fut = Box::pin(fut);
    assert!(futures_util::poll!(fut.as_mut()).is_pending());
    drop(fut);
    assert_eq!(*log.lock().unwrap(), vec![Some(1)]);
    assert_eq!(ID.get(), None);
}

async fn aborted_task_drop_sees_its_context() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe(log.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let handle = ID.sync_scope(2, || {
        contextflow::spawn(async move {
            let _probe = probe;
            let _ = started_tx.send(());
            std::future::pending::<()>().await;
        })
    });
    started_rx.await.unwrap();
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    assert_eq!(*log.lock().unwrap(), vec![Some(2)]);
}

async fn never_polled_with_context_drops_inside_snapshot() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe(log.clone());
    let fut = ID.sync_scope(3, || {
        async move {
            let _probe = probe;
        }
        .in_current_context()
    });
    drop(fut);
    assert_eq!(*log.lock().unwrap(), vec![Some(3)]);
}

on_both_runtimes! {
    dropped_scope_future_sees_its_value => dropped_scope_future_sees_its_value;
    aborted_task_drop_sees_its_context => aborted_task_drop_sees_its_context;
    never_polled_with_context_drops_inside_snapshot => never_polled_with_context_drops_inside_snapshot;
}
