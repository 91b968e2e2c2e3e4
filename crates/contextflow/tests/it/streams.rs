//! `StreamExt` (feature `futures`) beyond its doctests: a stream polled item by item inside its
//! context across yields and other tasks, and a stream dropped half-way whose destructor sees
//! its context (issue 14).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use contextflow::{AsyncLocal, Snapshot, StreamExt as _};
use futures_util::{stream, Stream, StreamExt};

static ID: AsyncLocal<u32> = AsyncLocal::named("id");

async fn a_stream_is_polled_inside_its_context() {
    let items = ID.sync_scope(4, || {
        stream::iter(0..5)
            .then(|i| async move {
                tokio::task::yield_now().await;
                (i, ID.get())
            })
            .in_current_context()
    });
    // Consumed from another task, under another binding: every item still sees 4.
    let seen = ID
        .scope(99, async {
            contextflow::spawn(items.collect::<Vec<_>>()).await.unwrap()
        })
        .await;
    assert_eq!(seen, (0..5).map(|i| (i, Some(4))).collect::<Vec<_>>());
    let empty = stream::once(async { ID.get() }).with_snapshot(Snapshot::empty());
    assert_eq!(ID.scope(1, empty.collect::<Vec<_>>()).await, vec![None]);
}

/// A stream that records the context its destructor runs in.
struct Recorder(Arc<Mutex<Vec<Option<u32>>>>);
impl Stream for Recorder {
    type Item = u32;
    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<u32>> {
        Poll::Ready(ID.get())
    }
}
impl Drop for Recorder {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(ID.get());
    }
}

async fn a_dropped_stream_sees_its_context() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut s = ID.sync_scope(6, || Recorder(log.clone()).in_current_context());
    assert_eq!(s.next().await, Some(6));
    drop(s); // half-way: a consumer that stopped early
    assert_eq!(*log.lock().unwrap(), vec![Some(6)]);
    assert_eq!(s_size_hint_is_forwarded(), (3, Some(3)));
}

fn s_size_hint_is_forwarded() -> (usize, Option<usize>) {
    stream::iter([1, 2, 3]).in_current_context().size_hint()
}

on_both_runtimes! {
    a_stream_is_polled_inside_its_context => a_stream_is_polled_inside_its_context;
    a_dropped_stream_sees_its_context => a_dropped_stream_sees_its_context;
}
