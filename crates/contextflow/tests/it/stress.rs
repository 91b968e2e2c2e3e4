//! 10,000 concurrent requests on a 2-worker runtime, each in its own scope, hopping through
//! yields, sleeps and channel receives, spawning children; every checkpoint sees its own value.

use std::time::Duration;

use contextflow::AsyncLocal;

static REQ: AsyncLocal<u64> = AsyncLocal::named("req");
static HOP: AsyncLocal<u64> = AsyncLocal::named("hop");

async fn request(id: u64) -> u64 {
    let mut checkpoints = 0;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(1);
    let echo = contextflow::spawn(async move {
        // The child inherits the request and answers on the channel from its own task.
        for _ in 0..4 {
            tokio::task::yield_now().await;
            tx.send(REQ.get().unwrap_or(u64::MAX)).await.unwrap();
        }
    });
    for hop in 0..20u64 {
        match hop % 4 {
            0 => tokio::task::yield_now().await,
            1 => tokio::time::sleep(Duration::from_micros(50)).await,
            2 if hop < 16 => assert_eq!(rx.recv().await, Some(id), "child of {id}"),
            _ => {
                let nested = HOP
                    .scope(hop, async {
                        tokio::task::yield_now().await;
                        (REQ.get(), HOP.get())
                    })
                    .await;
                assert_eq!(nested, (Some(id), Some(hop)));
            }
        }
        assert_eq!(REQ.get(), Some(id), "request {id} at hop {hop}");
        assert_eq!(HOP.get(), None);
        checkpoints += 1;
    }
    let blocking = contextflow::spawn_blocking(|| REQ.get()).await.unwrap();
    assert_eq!(blocking, Some(id));
    echo.await.unwrap();
    checkpoints
}

#[test]
fn ten_thousand_concurrent_requests() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let total: u64 = rt.block_on(async {
        let handles: Vec<_> = (0..10_000u64)
            .map(|id| tokio::spawn(REQ.scope(id, request(id))))
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.await.unwrap();
        }
        total
    });
    assert_eq!(total, 10_000 * 20);
}
