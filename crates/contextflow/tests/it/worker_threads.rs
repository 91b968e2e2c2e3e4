//! `contextflow::thread::scope` and `contextflow::channel` with more threads than this machine
//! has cores: each thread or job sees its spawner's or sender's context, a transaction never
//! crosses, and a panicking job leaves its worker's frame as it was.

use std::{
    collections::HashSet,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Barrier, Mutex},
};

use contextflow::{AsyncLocal, Inherit};

static ID: AsyncLocal<u32> = AsyncLocal::named("id");
static TX: AsyncLocal<u32> = AsyncLocal::named("tx").inherit(Inherit::Never);

const THREADS: usize = 8;

#[test]
fn scoped_threads_inherit_where_spawned() {
    let barrier = Barrier::new(THREADS);
    let mut slots = [(None, None); THREADS];
    ID.sync_scope(1, || {
        TX.sync_scope(9, || {
            contextflow::thread::scope(|s| {
                for (i, slot) in slots.iter_mut().enumerate() {
                    let barrier = &barrier;
                    ID.sync_scope(10 + i as u32, || {
                        s.spawn(move || {
                            barrier.wait();
                            *slot = (ID.get(), TX.get());
                        })
                    });
                }
                // The scope's own closure runs on the caller's thread, in its frame.
                assert_eq!((ID.get(), TX.get()), (Some(1), Some(9)));
            })
        })
    });
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(*slot, (Some(10 + i as u32), None), "thread {i}");
    }
}

#[test]
fn scoped_thread_panic_restores_and_propagates() {
    ID.sync_scope(2, || {
        let result = catch_unwind(AssertUnwindSafe(|| {
            contextflow::thread::scope(|s| {
                s.spawn(|| panic!("scoped thread fails"));
                s.spawn(|| ID.get());
            })
        }));
        assert!(result.is_err());
        assert_eq!(ID.get(), Some(2));
        // A handle joined by hand gives the panic back.
        let joined = contextflow::thread::scope(|s| s.spawn(|| panic!("joined")).join());
        assert!(joined.is_err());
    });
}

#[test]
fn a_worker_pool_runs_each_job_in_its_senders_context() {
    let (jobs, queue) = contextflow::channel::sync_channel::<u32>(16);
    let queue = Arc::new(Mutex::new(queue));
    let results = Mutex::new(Vec::new());
    let workers_seen = Mutex::new(HashSet::new());
    // Each worker waits here with its first job until every worker has one: all of them run
    // jobs, whatever the scheduler does.
    let first_job = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (queue, results, workers_seen) = (queue.clone(), &results, &workers_seen);
            let first_job = &first_job;
            let mut waited = false;
            s.spawn(move || loop {
                let job = queue.lock().unwrap().recv();
                let Ok(job) = job else { break };
                if !waited {
                    first_job.wait();
                    waited = true;
                }
                workers_seen
                    .lock()
                    .unwrap()
                    .insert(std::thread::current().id());
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    job.run(|n| {
                        assert!(n % 10 != 7, "job {n} fails");
                        (n, ID.get(), TX.get())
                    })
                }));
                // Between jobs, the worker has no frame: the panic restored it too.
                assert_eq!(ID.get(), None);
                if let Ok(outcome) = outcome {
                    results.lock().unwrap().push(outcome);
                }
            });
        }
        // Many senders on many threads, each job under its own binding.
        contextflow::thread::scope(|senders| {
            for sender in 0..4u32 {
                let jobs = jobs.clone();
                senders.spawn(move || {
                    for n in (sender * 250)..(sender + 1) * 250 {
                        TX.sync_scope(0, || ID.sync_scope(n, || jobs.send(n).unwrap()));
                    }
                });
            }
        });
        drop(jobs);
    });
    let results = results.into_inner().unwrap();
    assert_eq!(
        workers_seen.into_inner().unwrap().len(),
        THREADS,
        "every worker ran jobs"
    );
    assert_eq!(results.len(), 1_000 - 100, "every job but the failing ones");
    assert!(
        results
            .iter()
            .all(|(n, id, tx)| (*id, *tx) == (Some(*n), None)),
        "{results:?}"
    );
}

#[test]
fn unbounded_channel_and_iteration() {
    let (tx, rx) = contextflow::channel::channel();
    let senders: Vec<_> = (0..THREADS as u32)
        .map(|i| {
            let tx = tx.clone();
            ID.sync_scope(i, || {
                contextflow::thread::spawn(move || tx.send(i).unwrap())
            })
        })
        .collect();
    drop(tx);
    senders.into_iter().for_each(|h| h.join().unwrap());
    let mut seen: Vec<_> = rx.into_iter().map(|m| m.run(|i| (i, ID.get()))).collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..THREADS as u32)
            .map(|i| (i, Some(i)))
            .collect::<Vec<_>>()
    );
    assert_eq!(ID.get(), None);
}
