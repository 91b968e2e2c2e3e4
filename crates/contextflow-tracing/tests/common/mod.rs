//! Shared test helpers: an in-memory log sink.
#![allow(dead_code)]

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
};

use tracing_subscriber::fmt::MakeWriter;

/// A `MakeWriter` that appends everything to one shared buffer. The fmt layer writes each
/// event with a single `write_all`, and `write` takes the whole slice under the lock, so lines
/// from concurrent threads never interleave.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub(crate) fn contents(&self) -> String {
        let buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8(buf.clone()).expect("log output is UTF-8")
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.contents().lines().map(str::to_owned).collect()
    }

    pub(crate) fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Parses a text line's context prefix `[first k=v ...] rest` into (first, [(k, v)], rest).
/// Only handles the bare values the proof tests use.
pub(crate) fn parse_prefix(line: &str) -> Option<(Vec<(String, String)>, String)> {
    let rest = line.strip_prefix('[')?;
    let (inside, rest) = rest.split_once("] ")?;
    let fields = inside
        .split(' ')
        .map(|part| match part.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (String::new(), part.to_owned()),
        })
        .collect();
    Some((fields, rest.to_owned()))
}

// ===== the proof workload =====

use contextflow::AsyncLocal;
use contextflow_tracing::ContextFields;

pub(crate) static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
pub(crate) static TENANT: AsyncLocal<String> = AsyncLocal::named("tenant");
pub(crate) static USER_ID: AsyncLocal<u64> = AsyncLocal::named("user_id");

/// Requests in the proof tests.
pub(crate) const REQUESTS: u64 = 1_000;
/// Events each request logs: 3 in the handler, 3 in a spawned task, 1 in `spawn_blocking`,
/// 1 in a task spawned by the spawned task.
pub(crate) const EVENTS_PER_REQUEST: usize = 8;

pub(crate) fn proof_fields() -> ContextFields {
    ContextFields::new()
        .field("request_id", &REQUEST_ID)
        .field("tenant", &TENANT)
        .field("user_id", &USER_ID)
}

/// The expected fields of request `i`.
pub(crate) fn expected(i: u64) -> (String, String, u64) {
    (
        format!("req-{i}"),
        format!("tenant-{}", i % 7),
        1_000_000 + i,
    )
}

/// One request: logs, yields, spawns children that log too. Every event has a field `i`.
async fn handle(i: u64) {
    tracing::info!(i, "request started");
    tokio::task::yield_now().await;
    let child = contextflow::spawn(async move {
        tracing::info!(i, "child started");
        tokio::task::yield_now().await;
        let grandchild = contextflow::spawn(async move { tracing::debug!(i, "grandchild") });
        tracing::info!(i, "child waiting");
        grandchild.await.unwrap();
        tracing::warn!(i, "child done");
    });
    let blocking = contextflow::spawn_blocking(move || tracing::info!(i, "blocking work"));
    tracing::info!(i, "handler waiting");
    tokio::task::yield_now().await;
    child.await.unwrap();
    blocking.await.unwrap();
    tracing::info!(i, "request finished");
}

/// Runs [`REQUESTS`] concurrent requests on a multi-thread runtime, each in its own scopes.
pub(crate) fn run_requests() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .max_blocking_threads(8)
        .build()
        .unwrap();
    rt.block_on(async {
        tracing::info!(i = u64::MAX, "server started");
        let handles: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let (id, tenant, user) = expected(i);
                let request =
                    REQUEST_ID.scope(id, TENANT.scope(tenant, USER_ID.scope(user, handle(i))));
                // A plain tokio::spawn is enough here: the scopes live in the future itself.
                tokio::spawn(request)
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        tracing::info!(i = u64::MAX, "server stopped");
    });
}
