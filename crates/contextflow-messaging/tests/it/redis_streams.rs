//! Redis Streams (`redis`): a job queue on a consumer group through the real server, where
//! the workers run in a task with an empty context, every job fails once and is claimed again
//! (`XAUTOCLAIM`) by another worker, and keeps the context it was queued in; the jobs of a
//! worker that died (a panic, a cancelled task) are taken over with `XCLAIM` and keep theirs
//! too.

use std::{collections::HashMap, time::Duration};

use contextflow_messaging::{
    redis::{self as streams, FieldExtractor},
    Consumer,
};
use contextflow_otel::{new_span_id, new_trace_id, RequestId};
use contextflow_testenv::Service;
use opentelemetry::{
    propagation::Extractor as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context,
};
use proptest::prelude::*;
use redis::{
    aio::MultiplexedConnection,
    streams::{
        StreamAutoClaimOptions, StreamAutoClaimReply, StreamClaimReply, StreamId,
        StreamPendingCountReply, StreamPendingReply, StreamRangeReply, StreamReadOptions,
        StreamReadReply,
    },
    AsyncCommands as _, Value,
};
use tokio::task::JoinSet;

/// A connection whose replies may take long: a thousand commands are in flight at once while
/// CI runs many tests in parallel on two cores, and the client's default response timeout
/// (500 ms) then fails a command the server is merely slow to answer.
async fn connect() -> MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    redis::Client::open(contextflow_testenv::url(Service::Redis))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The `body` field of a job, as text.
fn body(entry: &StreamId) -> String {
    match &entry.map["body"] {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).unwrap(),
        other => panic!("unexpected body {other:?}"),
    }
}

/// Whether the current context is the one `body` was queued from.
fn context_matches(body: &str) -> bool {
    let (want_id, want_trace) = body.split_once(' ').unwrap();
    let seen_id = contextflow_otel::current_request_id().map(|id| id.to_string());
    let seen_trace = contextflow_otel::current_trace_id().map(|id| id.to_string());
    seen_id.as_deref() == Some(want_id) && seen_trace.as_deref() == Some(want_trace)
}

async fn count(mut handlers: JoinSet<bool>) -> (usize, usize) {
    let (mut matched, mut mismatched) = (0, 0);
    while let Some(ok) = handlers.join_next().await {
        if ok.unwrap() {
            matched += 1;
        } else {
            mismatched += 1;
        }
    }
    (matched, mismatched)
}

/// `n` jobs queued at once, each from a request context of its own; a worker reads them all
/// (`XREADGROUP`) and fails each one (no `XACK`); a second worker claims them (`XAUTOCLAIM`),
/// handles and acknowledges them. Both workers run in a task with no context. Returns
/// (matched, mismatched) handlers over both attempts, the number of jobs retried and the number
/// still pending at the end.
async fn job_queue_round_trip(n: usize) -> ((usize, usize), usize, usize) {
    let mut con = connect().await;
    let key = format!("contextflow-jobs-{}", RequestId::new());
    let group = "workers";
    let (): () = con.xgroup_create_mkstream(&key, group, "$").await.unwrap();

    let mut publishers = JoinSet::new();
    for _ in 0..n {
        let request_id = RequestId::new();
        let trace_id = new_trace_id();
        let parent = SpanContext::new(
            trace_id,
            new_span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new()
            .with_remote_span_context(parent)
            .with_value(request_id.clone());
        let mut con = con.clone();
        let key = key.clone();
        publishers.spawn(contextflow_otel::scope(cx, async move {
            tokio::task::yield_now().await;
            assert_eq!(
                contextflow_otel::current_request_id(),
                Some(request_id.clone())
            );
            let body = format!("{request_id} {trace_id}");
            streams::add(&mut con, &key, &[("body", body)])
                .await
                .unwrap();
        }));
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }

    let consumer = streams::consumer(&key).without_spans();
    let worker_con = con.clone();
    let worker_key = key.clone();
    // A plain tokio task, started outside any scope: it has an empty context.
    let working = tokio::spawn(async move {
        let (key, mut con) = (worker_key, worker_con);
        assert!(contextflow_otel::current_request_id().is_none());
        // First attempt: every job fails (it is not acknowledged).
        let mut handlers = JoinSet::new();
        let mut read = 0;
        let options = StreamReadOptions::default()
            .group(group, "worker-a")
            .count(n);
        while read < n {
            let reply: Option<StreamReadReply> =
                con.xread_options(&[&key], &[">"], &options).await.unwrap();
            let reply = reply.unwrap();
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                read += 1;
                let body = body(&entry);
                handlers.spawn(streams::scope(&consumer, &entry, async move {
                    tokio::task::yield_now().await;
                    context_matches(&body)
                }));
            }
        }
        let (mut matched, mut mismatched) = count(handlers).await;

        // Retry: another worker claims every pending job and handles it this time.
        let mut handlers = JoinSet::new();
        let mut retried = 0;
        let mut start = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = con
                .xautoclaim_options(
                    &key,
                    group,
                    "worker-b",
                    0,
                    &start,
                    StreamAutoClaimOptions::default().count(n),
                )
                .await
                .unwrap();
            for entry in reply.claimed {
                retried += 1;
                let body = body(&entry);
                let mut con = con.clone();
                let key = key.clone();
                let id = entry.id.clone();
                handlers.spawn(streams::scope(&consumer, &entry, async move {
                    tokio::task::yield_now().await;
                    let ok = context_matches(&body);
                    let _: usize = con.xack(&key, group, &[&id]).await.unwrap();
                    ok
                }));
            }
            start = reply.next_stream_id;
            if start == "0-0" {
                break;
            }
        }
        let (m, mm) = count(handlers).await;
        (matched, mismatched) = (matched + m, mismatched + mm);
        assert!(contextflow_otel::current_request_id().is_none());
        ((matched, mismatched), retried)
    });
    let (counts, retried) = working.await.unwrap();
    let pending: StreamPendingReply = con.xpending(&key, group).await.unwrap();
    let pending = pending.count();
    let _: usize = con.del(&key).await.unwrap();
    (counts, retried, pending)
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn thousand_jobs_keep_their_context_across_retries_current_thread() {
    assert_eq!(job_queue_round_trip(1000).await, ((2000, 0), 1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn thousand_jobs_keep_their_context_across_retries_multi_thread() {
    assert_eq!(job_queue_round_trip(1000).await, ((2000, 0), 1000, 0));
}

/// How the first worker dies while it handles a job.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Its handler panics.
    Panic,
    /// Its task is cancelled (a crash: the task and its connection are dropped).
    Abort,
}

/// `n` jobs queued at once, each from a request of its own; a first worker (a task with an
/// empty context, on a connection of its own) reads them all and dies in the first job's
/// handler, leaving every job pending on it. A second worker (another task with an empty
/// context) finds the dead worker's jobs (`XPENDING ... worker-a`) and takes them over with
/// `XCLAIM`, their idle time past the limit; each job's handler runs in the context the job
/// was queued in. Returns (matched, mismatched) handlers of the second worker, and the times
/// each job was delivered before it was acknowledged.
async fn dead_worker_jobs_claimed(n: usize, death: Death) -> ((usize, usize), Vec<usize>) {
    let mut con = connect().await;
    let key = format!("contextflow-dead-{}", RequestId::new());
    let group = "workers";
    let (): () = con.xgroup_create_mkstream(&key, group, "$").await.unwrap();
    for _ in 0..n {
        let request_id = RequestId::new();
        let trace_id = new_trace_id();
        let parent = SpanContext::new(
            trace_id,
            new_span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new()
            .with_remote_span_context(parent)
            .with_value(request_id.clone());
        let body = format!("{request_id} {trace_id}");
        let mut con = con.clone();
        contextflow_otel::scope(cx, async {
            streams::add(&mut con, &key, &[("body", body)])
                .await
                .unwrap();
        })
        .await;
    }

    // The first worker, on its own connection: reads every job, dies in the first handler.
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let dying = tokio::spawn({
        let key = key.clone();
        async move {
            let mut con = connect().await;
            let consumer = streams::consumer(&key).without_spans();
            let options = StreamReadOptions::default()
                .group(group, "worker-a")
                .count(n);
            let reply: StreamReadReply =
                con.xread_options(&[&key], &[">"], &options).await.unwrap();
            let entries: Vec<StreamId> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
            assert_eq!(entries.len(), n);
            let _ = read_tx.send(());
            streams::scope(&consumer, &entries[0], async {
                assert!(context_matches(&body(&entries[0])));
                match death {
                    Death::Panic => panic!("worker-a dies handling its first job"),
                    Death::Abort => std::future::pending::<()>().await,
                }
            })
            .await;
        }
    });
    read_rx.await.unwrap();
    match death {
        Death::Panic => {
            // The intended panic, not a failed assertion before it (which is a panic too).
            let payload = dying.await.unwrap_err().into_panic();
            assert_eq!(
                payload.downcast_ref::<&str>(),
                Some(&"worker-a dies handling its first job"),
                "{:?}",
                payload.downcast_ref::<String>()
            );
        }
        Death::Abort => {
            dying.abort();
            assert!(dying.await.unwrap_err().is_cancelled());
        }
    }

    // The second worker: claims the dead worker's jobs once they are idle long enough.
    let min_idle = 50;
    tokio::time::sleep(Duration::from_millis(2 * min_idle)).await;
    let claiming = tokio::spawn({
        let key = key.clone();
        let mut con = con.clone();
        async move {
            assert!(contextflow_otel::current_request_id().is_none());
            let consumer = streams::consumer(&key).without_spans();
            let dead: StreamPendingCountReply = con
                .xpending_consumer_count(&key, group, "-", "+", n, "worker-a")
                .await
                .unwrap();
            let ids: Vec<String> = dead.ids.into_iter().map(|p| p.id).collect();
            assert_eq!(ids.len(), n, "every job is pending on the dead worker");
            let claimed: StreamClaimReply = con
                .xclaim(&key, group, "worker-b", min_idle, &ids)
                .await
                .unwrap();
            assert_eq!(claimed.ids.len(), n);
            // Delivered twice now: once to the dead worker, once here.
            let pending: StreamPendingCountReply = con
                .xpending_consumer_count(&key, group, "-", "+", n, "worker-b")
                .await
                .unwrap();
            let delivered: Vec<usize> = pending.ids.iter().map(|p| p.times_delivered).collect();
            let mut handlers = JoinSet::new();
            for entry in claimed.ids {
                let body = body(&entry);
                let mut con = con.clone();
                let key = key.clone();
                let id = entry.id.clone();
                handlers.spawn(streams::scope(&consumer, &entry, async move {
                    tokio::task::yield_now().await;
                    let ok = context_matches(&body);
                    let _: usize = con.xack(&key, group, &[&id]).await.unwrap();
                    ok
                }));
            }
            let counts = count(handlers).await;
            assert!(contextflow_otel::current_request_id().is_none());
            (counts, delivered)
        }
    });
    let (counts, delivered) = claiming.await.unwrap();
    let pending: StreamPendingReply = con.xpending(&key, group).await.unwrap();
    assert_eq!(pending.count(), 0, "every claimed job was acknowledged");
    let _: usize = con.del(&key).await.unwrap();
    (counts, delivered)
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn jobs_of_a_worker_that_panicked_are_claimed_in_their_context_current_thread() {
    let (counts, delivered) = dead_worker_jobs_claimed(200, Death::Panic).await;
    assert_eq!(counts, (200, 0));
    assert_eq!(delivered, vec![2; 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn jobs_of_a_worker_that_was_cancelled_are_claimed_in_their_context_multi_thread() {
    let (counts, delivered) = dead_worker_jobs_claimed(200, Death::Abort).await;
    assert_eq!(counts, (200, 0));
    assert_eq!(delivered, vec![2; 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn malformed_fields_from_the_server_give_a_fresh_context() {
    let mut con = connect().await;
    let key = format!("contextflow-malformed-{}", RequestId::new());
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("traceparent")
        .arg("00-garbage")
        .arg("x-request-id")
        .arg(b"id-\xff\x1b[31m".as_slice())
        .arg("baggage")
        .arg("k=".repeat(10_000))
        .query_async(&mut con)
        .await
        .unwrap();
    let range: StreamRangeReply = con.xrange_all(&key).await.unwrap();
    let entries = range.ids;
    let (id, trace) = streams::scope(&streams::consumer(&key), &entries[0], async {
        (
            contextflow_otel::current_request_id().unwrap(),
            contextflow_otel::current_trace_id(),
        )
    })
    .await;
    assert_eq!(id.as_str().len(), 36, "a fresh id, got {id:?}");
    assert_eq!(trace, None);
    let _: usize = con.del(&key).await.unwrap();
}

/// One entry with a field name that is not UTF-8 (any client may write one) among others:
/// redis-rs's reply types fail the whole read on it, so the other entries, delivered to the
/// group and pending, would never be handled; contextflow's lenient replies give every entry,
/// each with its own context, on every read command a worker uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn an_entry_with_a_binary_field_name_does_not_fail_the_others() {
    let mut con = connect().await;
    let key = format!("contextflow-binary-name-{}", RequestId::new());
    let _: () = con
        .xgroup_create_mkstream(&key, "workers", "$")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for (name, value) in [
        (b"x-request-id".as_slice(), b"job-a".as_slice()),
        (b"\xff\xfename".as_slice(), b"x".as_slice()),
        (b"x-request-id".as_slice(), b"job-c".as_slice()),
    ] {
        let id: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg(name)
            .arg(value)
            .query_async(&mut con)
            .await
            .unwrap();
        ids.push(id);
    }
    let options = StreamReadOptions::default()
        .group("workers", "w1")
        .count(10);
    let consumer = streams::consumer(&key);
    let request_ids = |entries: &[StreamId]| {
        let consumer = consumer.clone();
        let entries = entries.to_vec();
        async move {
            let mut seen = Vec::new();
            for entry in &entries {
                let id = streams::scope(&consumer, entry, async {
                    contextflow_otel::current_request_id().unwrap()
                })
                .await;
                seen.push((entry.id.clone(), id.as_str().to_owned()));
            }
            seen
        }
    };
    let check = |seen: Vec<(String, String)>| {
        assert_eq!(
            seen.iter().map(|s| &s.0).collect::<Vec<_>>(),
            ids.iter().collect::<Vec<_>>()
        );
        assert_eq!(seen[0].1, "job-a");
        assert_eq!(
            seen[1].1.len(),
            36,
            "a fresh id for the entry without one: {:?}",
            seen[1]
        );
        assert_eq!(seen[2].1, "job-c");
    };

    // The first read delivers all three to `w1`; redis-rs's own type would fail on it.
    let read: streams::ReadReply = con.xread_options(&[&key], &[">"], &options).await.unwrap();
    let entries: Vec<StreamId> = read.into_entries().collect();
    assert!(
        entries[1].map.contains_key("\u{FFFD}\u{FFFD}name"),
        "{:?}",
        entries[1].map
    );
    check(request_ids(&entries).await);
    // Read again from the pending list (a worker after a reconnection): the same three.
    let raw: Value = con.xread_options(&[&key], &["0"], &options).await.unwrap();
    assert!(
        redis::from_redis_value::<StreamReadReply>(raw.clone()).is_err(),
        "redis-rs's StreamReadReply fails on the binary name (if it no longer does, this \
         module's docs can say so)"
    );
    let pending: streams::ReadReply = redis::from_redis_value(raw).unwrap();
    check(request_ids(&pending.into_entries().collect::<Vec<_>>()).await);
    // Claimed by another worker, with `XAUTOCLAIM` and with `XCLAIM`, and read with `XRANGE`.
    let claimed: streams::AutoClaimReply = con
        .xautoclaim_options(
            &key,
            "workers",
            "w2",
            0,
            "0-0",
            StreamAutoClaimOptions::default(),
        )
        .await
        .unwrap();
    check(request_ids(&claimed.claimed).await);
    let streams::Entries(claimed) = con.xclaim(&key, "workers", "w3", 0, &ids).await.unwrap();
    check(request_ids(&claimed).await);
    let streams::Entries(range) = con.xrange_all(&key).await.unwrap();
    check(request_ids(&range).await);
    let _: usize = con.del(&key).await.unwrap();
}

/// Adds `items` through `publisher` in a request with the id `id`, and returns the entry's
/// fields as written, sorted by name.
async fn added_fields(
    publisher: &contextflow_messaging::Publisher,
    id: &str,
    items: &[(&str, &str)],
) -> Vec<(String, Value)> {
    let mut con = connect().await;
    let key = format!("contextflow-add-items-{}", RequestId::new());
    let id: RequestId = id.parse().unwrap();
    contextflow_otel::REQUEST_ID
        .scope(id, streams::add_with(publisher, &mut con, &key, items))
        .await
        .unwrap();
    let streams::Entries(entries) = con.xrange_all(&key).await.unwrap();
    let _: usize = con.del(&key).await.unwrap();
    let mut fields: Vec<(String, Value)> = entries[0].map.clone().into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
}

/// `add` writes the current context's propagation fields, not an application item spelled
/// like one (a job re-queued with its old fields would otherwise carry two `x-request-id`s, or
/// an old `baggage` where the current context has none).
#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn add_leaves_out_items_named_like_propagation_fields() {
    let fields = added_fields(
        &contextflow_messaging::Publisher::new(),
        "job-9",
        &[
            ("Baggage", "user=al"),
            ("X-Request-ID", "old"),
            ("to", "a@example.com"),
        ],
    )
    .await;
    assert_eq!(
        fields,
        [
            (
                "to".to_owned(),
                Value::BulkString(b"a@example.com".to_vec())
            ),
            (
                "x-request-id".to_owned(),
                Value::BulkString(b"job-9".to_vec())
            ),
        ]
    );
}

/// A job re-queued through a publisher whose propagator does not write `baggage` loses its
/// old `baggage` item: the consumer would take it for the current request's.
#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
async fn requeue_with_a_narrower_propagator_drops_the_old_baggage() {
    let publisher = contextflow_messaging::Publisher::new()
        .with_propagator(contextflow_otel::TraceContextPropagator::new());
    let fields = added_fields(
        &publisher,
        "job-10",
        &[("BAGGAGE", "user=alice"), ("attempt", "2")],
    )
    .await;
    let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["attempt", "x-request-id"]);
}

#[test]
fn field_extractor_reads_only_strings() {
    let fields = HashMap::from([
        ("Traceparent".to_owned(), Value::BulkString(b"tp".to_vec())),
        ("simple".to_owned(), Value::SimpleString("s".to_owned())),
        ("bytes".to_owned(), Value::BulkString(b"\xff".to_vec())),
        ("int".to_owned(), Value::Int(1)),
        ("nil".to_owned(), Value::Nil),
    ]);
    let extractor = FieldExtractor::new(&fields);
    assert_eq!(extractor.get("traceparent"), Some("tp"), "any ASCII case");
    assert_eq!(extractor.get("simple"), Some("s"));
    assert_eq!(extractor.get("bytes"), None, "not UTF-8");
    assert_eq!(extractor.get("int"), None);
    assert_eq!(extractor.get("nil"), None);
    assert_eq!(extractor.keys().len(), 5);
}

const VALID_ID: &str = "job-42";

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => Just(Value::BulkString(VALID_ID.as_bytes().to_vec())),
        2 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Value::BulkString),
        1 => "[ -~]{0,300}".prop_map(Value::SimpleString),
        1 => any::<i64>().prop_map(Value::Int),
        1 => Just(Value::Nil),
        1 => proptest::collection::vec(any::<u8>(), 0..8)
            .prop_map(|b| Value::Array(vec![Value::BulkString(b)])),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    // The other spelling is rarer: with both in one entry the request id is repeated (names
    // compare without regard to case), which is invalid.
    prop_oneof![
        2 => Just("traceparent".to_owned()),
        2 => Just("baggage".to_owned()),
        4 => Just("x-request-id".to_owned()),
        1 => Just("X-Request-ID".to_owned()),
        2 => ".{0,12}",
    ]
}

proptest! {
    /// Any field map (the parser of an untrusted stream entry): never a panic, always a valid
    /// request id, and the entry's own id whenever it has one `x-request-id` field (names
    /// compared without regard to case: two are a repeat, which is invalid) and it is valid.
    #[test]
    fn arbitrary_field_maps_never_panic(
        pairs in proptest::collection::vec((field_name(), field_value()), 0..12)
    ) {
        let entry = StreamId {
            map: pairs.into_iter().collect(),
            ..StreamId::default()
        };
        // The oracle, from the raw map (not through the extractor under test): the fields
        // named `x-request-id` in any case, whatever their value's type, are the copies; a
        // request id is used only when there is exactly one and its value is text.
        let copies: Vec<&Value> = entry
            .map
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
            .map(|(_, value)| value)
            .collect();
        let carried = match copies.as_slice() {
            [Value::BulkString(bytes)] => std::str::from_utf8(bytes).ok(),
            [Value::SimpleString(text)] => Some(text.as_str()),
            _ => None,
        };
        let id = streams::context(&Consumer::new().without_spans(), &entry);
        let id = id.request_id().as_str().to_owned();
        prop_assert!(!id.is_empty() && id.len() <= 128);
        prop_assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        if carried == Some(VALID_ID) {
            prop_assert_eq!(id, VALID_ID);
        } else if copies.len() > 1 {
            prop_assert_ne!(id, VALID_ID, "a repeated x-request-id is never used");
        }
    }
}

/// The share of generated field maps that reach the accept path (a carried request id used):
/// the generator is useful only if that share is high enough.
#[test]
fn field_map_generator_reaches_the_accept_path() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec((field_name(), field_value()), 0..12);
    let (mut accepted, total) = (0, 512);
    for _ in 0..total {
        let pairs = strategy.new_tree(&mut runner).unwrap().current();
        let entry = StreamId {
            map: pairs.into_iter().collect(),
            ..StreamId::default()
        };
        let message = streams::context(&Consumer::new().without_spans(), &entry);
        if message.request_id().as_str() == VALID_ID {
            accepted += 1;
        }
        message.finish();
    }
    println!("field maps: {accepted}/{total} reached the accept path");
    assert!(accepted * 5 >= total, "{accepted}/{total}");
}
