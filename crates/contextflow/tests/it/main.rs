//! Behaviour of the core crate, through its public API only. Modules that need the spawn
//! helpers are compiled with the `tokio` feature (on by default); the rest also runs with
//! `cargo test -p contextflow --no-default-features`.

/// Runs an `async fn` test body on a `current_thread` and on a 2-worker `multi_thread` runtime.
macro_rules! on_both_runtimes {
    ($($name:ident => $body:ident;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "current_thread")]
            async fn current_thread() {
                super::$body().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() {
                super::$body().await
            }
        }
    )*};
}

#[cfg(feature = "tokio")]
mod api;
mod auto_traits;
mod basics;
mod binding;
#[cfg(feature = "tokio")]
mod drop_runs_in_scope;
mod enter_guard;
#[cfg(feature = "tokio")]
mod inherit_on_spawn;
mod isolation;
mod layering;
#[cfg(feature = "tokio")]
mod no_leaks;
mod panic_restores;
#[cfg(feature = "rayon")]
mod rayon_helpers;
#[cfg(feature = "runtime-hooks")]
mod runtime_hooks;
mod snapshot;
#[cfg(all(feature = "tokio", feature = "futures"))]
mod streams;
#[cfg(feature = "tokio")]
mod stress;
#[cfg(feature = "tokio")]
mod suppress_flow;
#[cfg(feature = "tokio")]
mod task_tree;
mod worker_threads;
