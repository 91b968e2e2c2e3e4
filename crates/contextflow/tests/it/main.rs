//! Behaviour of the core crate, through its public API only.

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

mod api;
mod auto_traits;
mod basics;
mod drop_runs_in_scope;
mod enter_guard;
mod inherit_on_spawn;
mod isolation;
mod layering;
mod no_leaks;
mod panic_restores;
mod snapshot;
mod stress;
