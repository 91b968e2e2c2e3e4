//! Rows for issue 11: the cost of a runtime with contextflow's task hooks
//! (`contextflow::runtime`), per poll and per spawn, next to contextflow's own spawn path on an
//! ordinary runtime and next to tokio's task hooks doing nothing. Measured only when built with
//! `RUSTFLAGS="--cfg tokio_unstable"` (tokio has no task hooks otherwise):
//!
//! ```text
//! RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable \
//!     cargo run --release -p contextflow-bench -- --only hooks
//! ```

use crate::Settings;

/// Prints the hooked-runtime rows, or says how to get them.
pub(crate) fn bench_hooked_runtime(settings: &Settings, smoke: bool) {
    #[cfg(tokio_unstable)]
    imp::run(settings, smoke);
    #[cfg(not(tokio_unstable))]
    {
        let _ = (settings, smoke);
        println!(
            "\n## hooked runtime (contextflow::runtime): not measured in this build; run with \
             RUSTFLAGS=\"--cfg tokio_unstable\" CARGO_TARGET_DIR=target/unstable \
             cargo run --release -p contextflow-bench -- --only hooks"
        );
    }
}

#[cfg(tokio_unstable)]
mod imp {
    use std::time::Instant;

    use contextflow::{AsyncLocal, Inherit};
    use tokio::runtime::Runtime;

    use crate::{contender, measure, report, Padded, Settings, YieldN};

    /// Flows through plain spawns on the hooked runtime.
    static ID: AsyncLocal<u64> = AsyncLocal::named("request_id").inherit(Inherit::Everywhere);

    const POLLS: u32 = 1000;

    fn ordinary() -> Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    }

    fn noop_hooks() -> Runtime {
        tokio::runtime::Builder::new_current_thread()
            .on_task_spawn(|_| {})
            .on_before_task_poll(|_| {})
            .on_after_task_poll(|_| {})
            .on_task_terminate(|_| {})
            .build()
            .expect("a current-thread runtime")
    }

    fn hooked() -> Runtime {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        contextflow::runtime::Hooks::new()
            .install(&mut builder)
            .expect("built with --cfg tokio_unstable");
        builder.build().expect("a current-thread runtime")
    }

    #[derive(Clone, Copy)]
    enum Spawn {
        Plain,
        Contextflow,
    }

    /// Runs about `n` task polls as tasks of `POLLS + 1` polls each, spawned one after the
    /// other from inside a request (so each captures a frame) and awaited; returns the elapsed
    /// time scaled to exactly `n` polls.
    fn polls(rt: &Runtime, n: u64, how: Spawn) -> f64 {
        let tasks = n.div_ceil(u64::from(POLLS) + 1).max(1);
        rt.block_on(ID.scope(1, async move {
            let start = Instant::now();
            for _ in 0..tasks {
                let task = match how {
                    Spawn::Plain => tokio::spawn(Padded {
                        _pad: 0,
                        inner: YieldN(POLLS),
                    }),
                    Spawn::Contextflow => contextflow::spawn(YieldN(POLLS)),
                };
                task.await.expect("the task completes");
            }
            let polls = tasks * (u64::from(POLLS) + 1);
            start.elapsed().as_nanos() as f64 * n as f64 / polls as f64
        }))
    }

    /// Spawns and awaits `n` ready tasks from inside a request; returns the elapsed time.
    fn spawns(rt: &Runtime, n: u64, how: Spawn) -> f64 {
        rt.block_on(ID.scope(1, async move {
            let start = Instant::now();
            let mut handles = Vec::with_capacity(n as usize);
            for _ in 0..n {
                handles.push(match how {
                    Spawn::Plain => tokio::spawn(Padded {
                        _pad: 0,
                        inner: std::future::ready(()),
                    }),
                    Spawn::Contextflow => contextflow::spawn(std::future::ready(())),
                });
            }
            for h in handles {
                h.await.expect("the task completes");
            }
            start.elapsed().as_nanos() as f64
        }))
    }

    pub(super) fn run(settings: &Settings, smoke: bool) {
        let (plain_rt, noop_rt, hooked_rt) = (ordinary(), noop_hooks(), hooked());
        let results = measure(
            settings,
            &mut [
                contender("bare: plain tokio::spawn, ordinary runtime", |n| {
                    polls(&plain_rt, n, Spawn::Plain)
                }),
                contender("contextflow::spawn, ordinary runtime", |n| {
                    polls(&plain_rt, n, Spawn::Contextflow)
                }),
                contender("plain tokio::spawn, tokio no-op task hooks", |n| {
                    polls(&noop_rt, n, Spawn::Plain)
                }),
                contender("plain tokio::spawn, hooked runtime", |n| {
                    polls(&hooked_rt, n, Spawn::Plain)
                }),
                contender("contextflow::spawn, hooked runtime", |n| {
                    polls(&hooked_rt, n, Spawn::Contextflow)
                }),
            ],
        );
        report(
            "per poll on a hooked runtime (contextflow::runtime), current_thread, a task that \
             yields",
            &results,
            "plain tokio::spawn, hooked runtime",
        );

        let tasks: u64 = if smoke { 1_000 } else { 10_000 };
        let spawn_settings = Settings {
            rounds: settings.rounds.min(11),
            batch_ns: 0.0,
            fixed_batch: Some(tasks),
        };
        let results = measure(
            &spawn_settings,
            &mut [
                contender("bare: tokio::spawn (size-matched), ordinary", |n| {
                    spawns(&plain_rt, n, Spawn::Plain)
                }),
                contender("contextflow::spawn, ordinary runtime", |n| {
                    spawns(&plain_rt, n, Spawn::Contextflow)
                }),
                contender("plain tokio::spawn, tokio no-op task hooks", |n| {
                    spawns(&noop_rt, n, Spawn::Plain)
                }),
                contender("plain tokio::spawn, hooked runtime", |n| {
                    spawns(&hooked_rt, n, Spawn::Plain)
                }),
                contender("contextflow::spawn, hooked runtime", |n| {
                    spawns(&hooked_rt, n, Spawn::Contextflow)
                }),
            ],
        );
        report(
            "spawn + await per task on a hooked runtime, current_thread (1 variable set)",
            &results,
            "plain tokio::spawn, hooked runtime",
        );
    }
}
