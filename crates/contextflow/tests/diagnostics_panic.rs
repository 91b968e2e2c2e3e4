//! `contextflow::diagnostics` in `Mode::Panic`, the test-suite mode: every report is also a
//! panic where it is detected. Its own binary: the mode is process-wide.

use std::panic::AssertUnwindSafe;

use contextflow::{
    diagnostics::{self, Mode},
    tree::Root,
    AsyncLocal,
};
use futures_util::FutureExt as _;

/// One variable per runtime: a read site reports once per variable.
static TENANTS: [AsyncLocal<&str>; 2] = [AsyncLocal::named("tenant"), AsyncLocal::named("tenant")];

fn panic_mode() {
    diagnostics::set_mode(Mode::Panic);
    // Quiet: the panic message carries the report.
    diagnostics::set_sink(|_| {});
}

fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast::<&str>()
            .map_or_else(|_| "?".into(), |s| s.to_string()),
    }
}

fn runtimes() -> [tokio::runtime::Runtime; 2] {
    [
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap(),
    ]
}

#[test]
fn a_lost_read_panics_in_the_reading_task() {
    panic_mode();
    for (i, rt) in runtimes().into_iter().enumerate() {
        let tenant = &TENANTS[i];
        let err = rt
            .block_on(async {
                let job = tenant.sync_scope("acme", || {
                    contextflow::spawn_without_context(async move { tenant.get() })
                });
                job.await
            })
            .unwrap_err();
        assert!(err.is_panic());
        let text = message(err.into_panic());
        assert!(
            text.starts_with("contextflow: tenant read at ")
                && text.contains(
                    " is unset: this task was started by contextflow::spawn_without_context at "
                ),
            "{text}"
        );
    }
}

#[test]
fn a_root_that_ends_with_running_tasks_panics_where_it_ends() {
    panic_mode();
    for (i, rt) in runtimes().into_iter().enumerate() {
        let label = format!("strict {i}");
        let root = Root::new(label.clone());
        let ended = rt.block_on(
            AssertUnwindSafe(root.scope(async {
                let _running = contextflow::spawn(std::future::pending::<()>());
            }))
            .catch_unwind(),
        );
        let text = message(ended.unwrap_err());
        assert!(
            text.starts_with(&format!(
                "contextflow: tree::Root {label:?} ended while 1 task still holds its context:\n  \
                 task "
            )),
            "{text}"
        );
    }
}

#[test]
fn a_report_while_panicking_does_not_panic_again() {
    panic_mode();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let root = Root::new("panicking");
    let ended = rt.block_on(
        AssertUnwindSafe(root.scope(async {
            let _running = contextflow::spawn(std::future::pending::<()>());
            panic!("the request's own panic");
        }))
        .catch_unwind(),
    );
    // The request's panic, not a second one (which would abort).
    assert_eq!(message(ended.unwrap_err()), "the request's own panic");
}
