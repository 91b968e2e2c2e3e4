//! Concurrent scopes on one thread never see each other's values.

use contextflow::AsyncLocal;

static REQ: AsyncLocal<u32> = AsyncLocal::named("req");

async fn interleaved_scopes_on_one_task() {
    // `join` polls both futures from the same task, interleaving them at every yield.
    let a = REQ.scope(1, async {
        let mut seen = Vec::new();
        for _ in 0..10 {
            tokio::task::yield_now().await;
            seen.push(REQ.get());
        }
        seen
    });
    let b = REQ.scope(2, async {
        let mut seen = Vec::new();
        for _ in 0..10 {
            tokio::task::yield_now().await;
            seen.push(REQ.get());
        }
        seen
    });
    let (a, b) = futures_util::future::join(a, b).await;
    assert!(a.iter().all(|v| *v == Some(1)), "{a:?}");
    assert!(b.iter().all(|v| *v == Some(2)), "{b:?}");
    assert_eq!(REQ.get(), None);
}

async fn the_same_scope_future_polled_under_different_frames() {
    use std::{future::Future, pin::Pin, task::Context};
    static OUTER: AsyncLocal<&str> = AsyncLocal::named("outer");
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    type Seen = Vec<(Option<&'static str>, Option<u32>)>;
    let mut fut: Pin<Box<dyn Future<Output = Seen> + Send>> = Box::pin(REQ.scope(7, async move {
        let mut seen = vec![(OUTER.get(), REQ.get())];
        rx.recv().await;
        seen.push((OUTER.get(), REQ.get()));
        seen
    }));
    assert!(OUTER
        .sync_scope("first", || fut.as_mut().poll(&mut cx))
        .is_pending());
    tx.send(()).unwrap();
    let seen = match OUTER.sync_scope("second", || fut.as_mut().poll(&mut cx)) {
        std::task::Poll::Ready(seen) => seen,
        std::task::Poll::Pending => panic!("the channel had a message"),
    };
    assert_eq!(
        seen,
        vec![(Some("first"), Some(7)), (Some("second"), Some(7))]
    );
}

on_both_runtimes! {
    interleaved_scopes_on_one_task => interleaved_scopes_on_one_task;
    the_same_scope_future_polled_under_different_frames => the_same_scope_future_polled_under_different_frames;
}
