//! `contextflow::rayon` on pools with more threads than this machine has cores: every
//! closure sees the caller's context on whichever worker, a transaction never crosses, and no
//! worker keeps a frame afterwards (also after a panic).

use std::{
    collections::HashSet,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Barrier, Mutex},
    thread::ThreadId,
};

use contextflow::{rayon::ParallelIteratorExt as _, AsyncLocal, Inherit};
use rayon::prelude::*;

static ID: AsyncLocal<u32> = AsyncLocal::named("id");
static TX: AsyncLocal<u32> = AsyncLocal::named("tx").inherit(Inherit::Never);

const THREADS: usize = 8;

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap()
}

/// What every worker of `pool` sees when it runs a plain job: `None` unless a frame leaked.
fn worker_frames(pool: &rayon::ThreadPool) -> Vec<Option<u32>> {
    pool.broadcast(|_| ID.get())
}

#[test]
fn every_item_sees_the_context_on_distinct_workers() {
    let pool = pool();
    // Four items that wait for each other can only finish on four distinct threads at once.
    let barrier = Barrier::new(4);
    let seen: Vec<(Option<u32>, ThreadId)> = ID.sync_scope(1, || {
        contextflow::rayon::install(&pool, || {
            (0..4)
                .into_par_iter()
                .with_max_len(1)
                .in_current_context()
                .map(|_| {
                    barrier.wait();
                    (ID.get(), std::thread::current().id())
                })
                .collect()
        })
    });
    assert!(seen.iter().all(|(id, _)| *id == Some(1)), "{seen:?}");
    let threads: HashSet<_> = seen.iter().map(|(_, t)| *t).collect();
    assert_eq!(threads.len(), 4);
    assert_eq!(worker_frames(&pool), [None; THREADS]);
}

#[test]
fn unindexed_and_indexed_adaptors_downstream_see_it() {
    let pool = pool();
    ID.sync_scope(2, || {
        contextflow::rayon::install(&pool, || {
            let n = 2_000u32;
            // Unindexed consumers: filter, for_each, fold + reduce (identity and reducer).
            let filtered = (0..n)
                .into_par_iter()
                .in_current_context()
                .filter(|_| ID.get() == Some(2))
                .count();
            assert_eq!(filtered, n as usize);
            let seen = Mutex::new(0usize);
            (0..n).into_par_iter().in_current_context().for_each(|_| {
                assert_eq!(ID.get(), Some(2));
                *seen.lock().unwrap() += 1;
            });
            assert_eq!(seen.into_inner().unwrap(), n as usize);
            // Every call of the fold's identity and step and of the reducer sees the value (a
            // sum would hide a wrong one that is larger).
            let seen_ids = Mutex::new(std::collections::BTreeSet::new());
            let note = || {
                seen_ids.lock().unwrap().insert(ID.get());
            };
            let folded = (0..n)
                .into_par_iter()
                .in_current_context()
                .fold(
                    || {
                        note();
                        0u32
                    },
                    |acc, _| {
                        note();
                        acc + 1
                    },
                )
                .reduce(
                    || {
                        note();
                        0
                    },
                    |a, b| {
                        note();
                        a + b
                    },
                );
            assert_eq!(folded, n);
            assert_eq!(
                seen_ids.into_inner().unwrap(),
                std::collections::BTreeSet::from([Some(2)])
            );
            // Indexed adaptors downstream use the producer path.
            let v: Vec<(usize, Option<u32>)> = (0..n)
                .into_par_iter()
                .in_current_context()
                .enumerate()
                .map(|(i, _)| (i, ID.get()))
                .collect();
            assert!(v.iter().enumerate().all(|(i, p)| *p == (i, Some(2))));
            let zipped = (0..n)
                .into_par_iter()
                .in_current_context()
                .zip((0..n).into_par_iter())
                .all(|_| ID.get() == Some(2));
            assert!(zipped);
            let mut out = Vec::new();
            (0..n)
                .into_par_iter()
                .in_current_context()
                .map(|_| ID.get())
                .collect_into_vec(&mut out);
            assert!(out.iter().all(|id| *id == Some(2)));
        })
    });
    assert_eq!(worker_frames(&pool), [None; THREADS]);
}

#[test]
fn a_transaction_never_crosses() {
    let pool = pool();
    let seen: Vec<(Option<u32>, Option<u32>)> = ID.sync_scope(3, || {
        TX.sync_scope(99, || {
            let from_iter: Vec<_> = contextflow::rayon::install(&pool, || {
                (0..100)
                    .into_par_iter()
                    .in_current_context()
                    .map(|_| (ID.get(), TX.get()))
                    .collect()
            });
            let (a, b) = contextflow::rayon::join(|| (ID.get(), TX.get()), || (ID.get(), TX.get()));
            let mut scoped = None;
            contextflow::rayon::scope(|s| s.spawn(|_| scoped = Some((ID.get(), TX.get()))));
            let installed = contextflow::rayon::install(&pool, || (ID.get(), TX.get()));
            // Still here, on the caller's own thread, afterwards.
            assert_eq!(TX.get(), Some(99));
            from_iter
                .into_iter()
                .chain([a, b, scoped.unwrap(), installed])
                .collect()
        })
    });
    assert!(seen.iter().all(|s| *s == (Some(3), None)), "{seen:?}");
}

#[test]
fn join_scope_and_spawn_on_distinct_workers() {
    let pool = pool();
    let barrier = Barrier::new(THREADS);
    let seen = Mutex::new(Vec::new());
    ID.sync_scope(4, || {
        contextflow::rayon::install(&pool, || {
            contextflow::rayon::scope(|s| {
                for i in 0..THREADS as u32 {
                    // Each task under its own binding, all waiting for each other.
                    ID.sync_scope(100 + i, || {
                        s.spawn(|_| {
                            barrier.wait();
                            let (a, b) = contextflow::rayon::join(|| ID.get(), || ID.get());
                            seen.lock()
                                .unwrap()
                                .push((a, b, std::thread::current().id()));
                        })
                    });
                }
            })
        })
    });
    let seen = seen.into_inner().unwrap();
    let ids: HashSet<_> = seen
        .iter()
        .map(|(a, b, _)| (a.unwrap(), b.unwrap()))
        .collect();
    assert_eq!(ids, (100..100 + THREADS as u32).map(|i| (i, i)).collect());
    let threads: HashSet<_> = seen.iter().map(|(_, _, t)| *t).collect();
    assert_eq!(threads.len(), THREADS);

    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..32 {
        let tx = tx.clone();
        ID.sync_scope(i, || {
            contextflow::rayon::install(&pool, || {
                contextflow::rayon::spawn(move || tx.send((i, ID.get())).unwrap())
            })
        });
    }
    drop(tx);
    let spawned: Vec<_> = rx.iter().collect();
    assert_eq!(spawned.len(), 32);
    assert!(spawned.iter().all(|(i, id)| Some(*i) == *id), "{spawned:?}");
    assert_eq!(worker_frames(&pool), [None; THREADS]);
}

#[test]
fn concurrent_callers_share_a_pool_and_keep_their_own() {
    let pool = pool();
    std::thread::scope(|s| {
        for caller in 0..4u32 {
            let pool = &pool;
            s.spawn(move || {
                ID.sync_scope(caller, || {
                    for _ in 0..5 {
                        let ok = contextflow::rayon::install(pool, || {
                            (0..500)
                                .into_par_iter()
                                .in_current_context()
                                .map(|_| {
                                    // Nested parallelism: a worker may steal another
                                    // caller's job while it waits here.
                                    let inner: u32 = (0..4)
                                        .into_par_iter()
                                        .in_current_context()
                                        .map(|_| u32::from(ID.get() == Some(caller)))
                                        .sum();
                                    inner == 4 && ID.get() == Some(caller)
                                })
                                .all(|ok| ok)
                        });
                        assert!(ok, "caller {caller}");
                    }
                })
            });
        }
    });
    assert_eq!(worker_frames(&pool), [None; THREADS]);
}

#[test]
fn panics_propagate_and_restore_every_frame() {
    let pool = pool();
    ID.sync_scope(5, || {
        let result = catch_unwind(AssertUnwindSafe(|| {
            contextflow::rayon::install(&pool, || {
                (0..1_000)
                    .into_par_iter()
                    .in_current_context()
                    .for_each(|i| assert!(i != 500, "item {i} fails"))
            })
        }));
        assert!(result.is_err());
        assert_eq!(ID.get(), Some(5), "the caller's frame is back");

        let joined = catch_unwind(AssertUnwindSafe(|| {
            contextflow::rayon::join(|| panic!("left fails"), || ID.get())
        }));
        assert!(joined.is_err());
        assert_eq!(ID.get(), Some(5));

        let scoped = catch_unwind(AssertUnwindSafe(|| {
            contextflow::rayon::install(&pool, || {
                contextflow::rayon::scope(|s| {
                    for i in 0..THREADS {
                        s.spawn(move |_| assert!(i % 2 == 0, "task {i} fails"));
                    }
                })
            })
        }));
        assert!(scoped.is_err());
        assert_eq!(ID.get(), Some(5));
    });
    assert_eq!(ID.get(), None);
    assert_eq!(worker_frames(&pool), [None; THREADS]);
}

#[test]
fn plain_rayon_does_not_carry_it() {
    // The behaviour the helpers exist for: a plain parallel iterator's workers see nothing.
    let pool = pool();
    let barrier = Barrier::new(2);
    let seen: Vec<Option<u32>> = ID.sync_scope(6, || {
        contextflow::rayon::install(&pool, || {
            // In the caller's context here, but the plain iterator's other workers see nothing.
            (0..2)
                .into_par_iter()
                .with_max_len(1)
                .map(|_| {
                    barrier.wait();
                    ID.get()
                })
                .collect()
        })
    });
    assert!(seen.contains(&None), "{seen:?}");
}
