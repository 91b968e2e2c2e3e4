//! The span carrier's bookkeeping, seen by a subscriber: a request span closes once its last
//! child has ended, and a child that panics leaves the span entered nowhere (every enter of
//! the carrier is matched by an exit, on both runtimes). Installs a global subscriber, hence
//! its own test binary.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use tracing::{info_span, span, Subscriber};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

/// Per span name: how many times it was entered, exited and closed.
#[derive(Clone, Default)]
struct Books(Arc<Mutex<HashMap<String, [usize; 3]>>>);

impl Books {
    fn of(&self, name: &str) -> [usize; 3] {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or_default()
    }

    fn count<S>(&self, id: &span::Id, ctx: &Context<'_, S>, which: usize)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if let Some(span) = ctx.span(id) {
            self.0
                .lock()
                .unwrap()
                .entry(span.name().to_owned())
                .or_default()[which] += 1;
        }
    }
}

impl<S> Layer<S> for Books
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.count(id, &ctx, 0);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.count(id, &ctx, 1);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.count(&id, &ctx, 2);
    }
}

fn books() -> &'static Books {
    static BOOKS: OnceLock<Books> = OnceLock::new();
    BOOKS.get_or_init(|| {
        let books = Books::default();
        tracing_subscriber::registry().with(books.clone()).init();
        contextflow_tracing::carry_spans();
        books
    })
}

fn runtimes() -> [(&'static str, tokio::runtime::Runtime); 2] {
    [
        (
            "current_thread",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        ),
        (
            "multi_thread",
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        ),
    ]
}

#[test]
fn a_request_span_closes_when_its_last_child_ends() {
    let books = books();
    for (closed_before, (flavor, rt)) in runtimes().into_iter().enumerate() {
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let child = {
            let _runtime = rt.enter();
            let span = info_span!("request");
            let child = span.in_scope(|| {
                contextflow::spawn(async move {
                    let _ = wait.await;
                    tracing::Span::current().is_none()
                })
            });
            drop(span);
            child
        };
        assert_eq!(
            books.of("request")[2],
            closed_before,
            "{flavor}: not closed while the child lives"
        );
        release.send(()).unwrap();
        let outside = rt.block_on(child).unwrap();
        assert!(!outside, "{flavor}: the child ran inside the span");
        let [entered, exited, closed] = books.of("request");
        assert_eq!(
            closed,
            closed_before + 1,
            "{flavor}: closed once the child ended"
        );
        assert_eq!(entered, exited, "{flavor}: every enter exited");
    }
}

#[test]
fn a_panicking_child_leaves_its_span_entered_nowhere() {
    let books = books();
    for (flavor, rt) in runtimes() {
        rt.block_on(async {
            let span = info_span!("panicking");
            let child = span.in_scope(|| {
                contextflow::spawn(async {
                    tokio::task::yield_now().await;
                    panic!("the child fails");
                })
            });
            assert!(child.await.unwrap_err().is_panic(), "{flavor}");
            drop(span);
            // The next tasks on the same workers see no span.
            for _ in 0..4 {
                let current = tokio::spawn(async { tracing::Span::current().is_none() })
                    .await
                    .unwrap();
                assert!(current, "{flavor}: a later task saw the span");
            }
        });
        let [entered, exited, closed] = books.of("panicking");
        assert_eq!(entered, exited, "{flavor}: every enter exited");
        assert!(closed >= 1, "{flavor}: the span closed");
    }
}
