//! Kafka record headers (`rdkafka` types), at the header level only: no Kafka broker runs
//! here, so records with their headers travel between tasks through a channel, and the
//! consumer runs in a task with an empty context.

use contextflow_messaging::{
    rdkafka::{self as kafka, HeaderExtractor},
    Consumer, Publisher,
};
use contextflow_otel::{new_span_id, new_trace_id, RequestId};
use opentelemetry::{
    propagation::Extractor as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context,
};
use proptest::prelude::*;
use rdkafka::{
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    Message as _, Timestamp,
};
use tokio::task::JoinSet;

fn record(payload: Vec<u8>, headers: OwnedHeaders) -> OwnedMessage {
    OwnedMessage::new(
        Some(payload),
        None,
        "orders".to_owned(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(headers),
    )
}

/// `n` records made at once, each from a request context of its own, handled concurrently by
/// a task that has no context; returns (matched, mismatched) handlers.
async fn round_trip(n: usize) -> (usize, usize) {
    let (records, mut received) = tokio::sync::mpsc::unbounded_channel::<OwnedMessage>();
    let consumer = kafka::consumer("orders").without_spans();
    // A plain tokio task, started outside any scope: it has an empty context.
    let consuming = tokio::spawn(async move {
        assert!(contextflow_otel::current_request_id().is_none());
        let mut handlers = JoinSet::new();
        for _ in 0..n {
            let record = received.recv().await.unwrap();
            let context = kafka::context(&consumer, &record);
            handlers.spawn(context.scope(async move {
                tokio::task::yield_now().await;
                let body = std::str::from_utf8(record.payload().unwrap()).unwrap();
                let (want_id, want_trace) = body.split_once(' ').unwrap();
                let seen_id = contextflow_otel::current_request_id().map(|id| id.to_string());
                let seen_trace = contextflow_otel::current_trace_id().map(|id| id.to_string());
                seen_id.as_deref() == Some(want_id) && seen_trace.as_deref() == Some(want_trace)
            }));
        }
        let (mut matched, mut mismatched) = (0, 0);
        while let Some(ok) = handlers.join_next().await {
            if ok.unwrap() {
                matched += 1;
            } else {
                mismatched += 1;
            }
        }
        (matched, mismatched)
    });
    let mut producers = JoinSet::new();
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
        let records = records.clone();
        producers.spawn(contextflow_otel::scope(cx, async move {
            tokio::task::yield_now().await;
            let headers = kafka::inject(&Publisher::new(), OwnedHeaders::new());
            let body = format!("{request_id} {trace_id}").into_bytes();
            records.send(record(body, headers)).unwrap();
        }));
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    consuming.await.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn thousand_concurrent_records_keep_their_context_current_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_records_keep_their_context_multi_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[test]
fn header_extractor_is_bounded_and_reads_only_utf8() {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "X-Request-Id",
        value: Some("r-1"),
    });
    headers = headers.insert(Header {
        key: "traceparent",
        value: Some(b"\xff\xfe".as_slice()),
    });
    for i in 0..1000 {
        headers = headers.insert(Header {
            key: "baggage",
            value: Some(format!("k{i}=v").as_str()),
        });
    }
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(extractor.get("x-request-id"), Some("r-1"));
    assert_eq!(
        extractor.get("traceparent"),
        Some(""),
        "not UTF-8: a copy, read as empty"
    );
    let null = OwnedHeaders::new()
        .insert(Header::<&str> {
            key: "x-request-id",
            value: None,
        })
        .insert(Header {
            key: "x-request-id",
            value: Some("forged"),
        });
    assert_eq!(
        HeaderExtractor::new(Some(&null)).get_all("x-request-id"),
        Some(vec!["", "forged"]),
        "a copy without a value still makes the header repeated"
    );
    assert_eq!(
        extractor.get_all("baggage").unwrap().len(),
        contextflow_otel::carrier::MAX_PAIRS - 2,
        "only the first MAX_PAIRS headers are read"
    );
}

const VALID_ID: &str = "kafka-42";

/// Headers with any bytes as names (no NUL: librdkafka's names are C strings), added through
/// librdkafka itself: rdkafka's `OwnedHeaders::insert` takes names as `&str` only, while any
/// producer (librdkafka's C API, Java's, Go's) may write a name that is not UTF-8.
/// Header `i` of `headers` as bytes, through librdkafka (rdkafka's reader panics on a name
/// that is not UTF-8).
fn raw_header(headers: &OwnedHeaders, i: usize) -> (&[u8], Option<&[u8]>) {
    use rdkafka::bindings as rd;
    let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
    // SAFETY: `headers` is a live list (a `&BorrowedHeaders` is the list's pointer, as rdkafka
    // 0.33 makes it), only read; librdkafka hands out the name (NUL-terminated) and the value
    // (`size` bytes) that the list owns, borrowed here for as long as `headers` is.
    unsafe {
        let err = rd::rd_kafka_header_get_all(
            std::ptr::from_ref(headers.as_borrowed()).cast_mut().cast(),
            i,
            &mut name,
            &mut value,
            &mut size,
        );
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        let name = std::ffi::CStr::from_ptr(name).to_bytes();
        let value = (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast(), size));
        (name, value)
    }
}

fn raw_headers(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> OwnedHeaders {
    use rdkafka::bindings as rd;
    let all = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        assert!(!name.contains(&0));
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `all` is a live list (a `&BorrowedHeaders` is the list's pointer, as rdkafka
        // 0.33 makes it) that nothing else reads during the call; librdkafka copies the name
        // (`name.len()` bytes) and the value.
        let err = unsafe {
            rd::rd_kafka_header_add(
                std::ptr::from_ref(all.as_borrowed()).cast_mut().cast(),
                name.as_ptr().cast(),
                name.len() as isize,
                value_ptr,
                value_len,
            )
        };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    all
}

/// A header name that is not UTF-8 (a producer may write one): rdkafka's own `Headers` methods
/// panic on it, which would stop a consumer on that record (and on the same offset after each
/// restart); the extractor skips it and reads the others.
#[test]
fn a_header_name_that_is_not_utf8_is_skipped_not_a_panic() {
    let headers = raw_headers(&[
        (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
        (b"x-request-id".to_vec(), Some(b"job-1".to_vec())),
        (b"x-request-id\xff".to_vec(), Some(b"forged".to_vec())),
    ]);
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(extractor.keys(), ["x-request-id"]);
    assert_eq!(extractor.get_all("x-request-id"), Some(vec!["job-1"]));
    let record = record(Vec::new(), headers.clone());
    let cx = kafka::context(&Consumer::new().without_spans(), &record);
    assert_eq!(cx.request_id().as_str(), "job-1");
    cx.finish();
    // From the message, as consumers read it.
    assert_eq!(
        HeaderExtractor::from_message(&record).get("x-request-id"),
        Some("job-1")
    );
    // Why the extractor does not use rdkafka's `Headers`: its `try_get` unwraps the name.
    use rdkafka::message::Headers as _;
    let upstream = std::panic::catch_unwind(|| headers.try_get(0).map(|h| h.key.len()));
    assert!(
        upstream.is_err(),
        "rdkafka's try_get no longer panics on a non-UTF-8 name: `raw` may not be needed"
    );
}

fn headers() -> impl Strategy<Value = Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    proptest::collection::vec(
        (
            prop_oneof![
                Just(b"traceparent".to_vec()),
                Just(b"baggage".to_vec()),
                Just(b"x-request-id".to_vec()),
                Just(b"X-Request-ID".to_vec()),
                "[a-z-]{0,12}".prop_map(String::into_bytes),
                proptest::collection::vec(1u8..=255, 0..14),
            ],
            prop_oneof![
                4 => Just(Some(VALID_ID.as_bytes().to_vec())),
                2 => proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
                1 => "[ -~]{0,300}".prop_map(|s| Some(s.into_bytes())),
            ],
        ),
        0..8,
    )
}

fn owned(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> OwnedMessage {
    record(Vec::new(), raw_headers(headers))
}

proptest! {
    /// Any record headers (untrusted): never a panic, always a valid request id, and the
    /// carried one whenever the only `x-request-id` among the first headers is the valid one.
    #[test]
    fn arbitrary_headers_never_panic(headers in headers()) {
        let record = owned(&headers);
        // The oracle, from the raw headers (not through the extractor under test): a request
        // id is used only when the first MAX_PAIRS headers hold exactly one `x-request-id`, in
        // any spelling, with or without a value (a name that is not UTF-8 is no copy).
        let copies: Vec<&Option<Vec<u8>>> = headers
            .iter()
            .take(contextflow_otel::carrier::MAX_PAIRS)
            .filter(|(key, _)| key.eq_ignore_ascii_case(b"x-request-id"))
            .map(|(_, value)| value)
            .collect();
        let carried = match copies.as_slice() {
            [Some(value)] => std::str::from_utf8(value).ok().map(str::to_owned),
            _ => None,
        };
        let cx = kafka::context(&Consumer::new().without_spans(), &record);
        let id = cx.request_id().as_str().to_owned();
        cx.finish();
        prop_assert!(!id.is_empty() && id.len() <= 128);
        prop_assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        if carried.as_deref() == Some(VALID_ID) {
            prop_assert_eq!(id, VALID_ID);
        } else if copies.len() > 1 {
            prop_assert_ne!(id, VALID_ID, "a repeated x-request-id is never used");
        }
    }
}

/// The share of generated headers that reach the accept path (a carried request id used).
#[test]
fn headers_generator_reaches_the_accept_path() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut accepted, total) = (0, 512);
    for _ in 0..total {
        let record = owned(&headers().new_tree(&mut runner).unwrap().current());
        let cx = kafka::context(&Consumer::new().without_spans(), &record);
        if cx.request_id().as_str() == VALID_ID {
            accepted += 1;
        }
        cx.finish();
    }
    println!("headers: {accepted}/{total} reached the accept path");
    assert!(accepted * 10 >= total, "{accepted}/{total}");
}

/// Review findings: `inject`, replacing the propagation headers of a record re-published with
/// its headers, read them through rdkafka's `Headers`, which panics on a name that is not
/// UTF-8; then, with such a name among the headers, it appended its headers after the old
/// ones, which a consumer dropped as repeated. Now: replaced (any case), the other headers
/// kept in their order, names that are not UTF-8 included, never a panic.
#[test]
fn inject_replaces_propagation_headers_and_survives_names_that_are_not_utf8() {
    use contextflow_otel::REQUEST_ID;
    let publish = |headers: OwnedHeaders| {
        REQUEST_ID.sync_scope("r-new".parse::<RequestId>().unwrap(), || {
            kafka::inject(&Publisher::new(), headers)
        })
    };
    let ids = |headers: &OwnedHeaders| {
        let extractor = HeaderExtractor::new(Some(headers));
        extractor.get_all("x-request-id").unwrap_or_default().len()
    };
    let text = publish(raw_headers(&[
        (b"X-Request-Id".to_vec(), Some(b"r-old".to_vec())),
        (b"order".to_vec(), Some(b"7".to_vec())),
    ]));
    assert_eq!(ids(&text), 1);
    assert_eq!(
        HeaderExtractor::new(Some(&text)).get("x-request-id"),
        Some("r-new")
    );
    assert_eq!(HeaderExtractor::new(Some(&text)).get("order"), Some("7"));
    let mixed = publish(raw_headers(&[
        (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
        (b"x-request-id".to_vec(), Some(b"r-old".to_vec())),
        (b"empty".to_vec(), None),
    ]));
    assert_eq!(ids(&mixed), 1);
    let list: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..mixed.count())
        .map(|i| {
            let (name, value) = raw_header(&mixed, i);
            (name.to_vec(), value.map(<[u8]>::to_vec))
        })
        .collect();
    assert_eq!(
        list,
        [
            (b"x-request-id".to_vec(), Some(b"r-new".to_vec())),
            (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
            (b"empty".to_vec(), None),
        ]
    );
}

/// A record with a few headers of its own, none of ours among them: ours are appended, the
/// list is not made again, and the consumer reads them.
#[test]
fn inject_appends_to_a_few_other_headers() {
    let headers =
        contextflow_otel::REQUEST_ID.sync_scope("r-few".parse::<RequestId>().unwrap(), || {
            kafka::inject(
                &Publisher::new(),
                raw_headers(&[
                    (b"order".to_vec(), Some(b"7".to_vec())),
                    (b"\xff".to_vec(), None),
                ]),
            )
        });
    let list: Vec<Vec<u8>> = (0..headers.count())
        .map(|i| raw_header(&headers, i).0.to_vec())
        .collect();
    assert_eq!(
        list,
        [
            b"order".to_vec(),
            b"\xff".to_vec(),
            b"x-request-id".to_vec()
        ]
    );
    let cx = kafka::context(
        &Consumer::new().without_spans(),
        &record(Vec::new(), headers.clone()),
    );
    assert_eq!(cx.request_id().as_str(), "r-few");
    cx.finish();
}

/// Review finding: a record with many headers of its own got the propagation headers after
/// them, past the first MAX_PAIRS that a consumer reads: it lost its context.
#[test]
fn inject_puts_the_propagation_headers_first() {
    use contextflow_otel::carrier::MAX_PAIRS;
    let own: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..MAX_PAIRS + 10)
        .map(|i| (format!("app-{i}").into_bytes(), Some(b"v".to_vec())))
        .collect();
    let headers = contextflow_otel::REQUEST_ID
        .sync_scope("r-many".parse::<RequestId>().unwrap(), || {
            kafka::inject(&Publisher::new(), raw_headers(&own))
        });
    assert_eq!(headers.count(), MAX_PAIRS + 11);
    let cx = kafka::context(
        &Consumer::new().without_spans(),
        &record(Vec::new(), headers.clone()),
    );
    assert_eq!(cx.request_id().as_str(), "r-many");
    cx.finish();
    assert_eq!(raw_header(&headers, 1).0, b"app-0");
}

/// Review finding: a republished record kept the first send's `baggage` under a publisher
/// whose propagator writes none.
#[test]
fn republish_with_a_narrower_propagator_drops_the_old_baggage() {
    let publisher =
        Publisher::new().with_propagator(contextflow_otel::TraceContextPropagator::new());
    let headers =
        contextflow_otel::REQUEST_ID.sync_scope("r-2".parse::<RequestId>().unwrap(), || {
            kafka::inject(
                &publisher,
                raw_headers(&[
                    (b"Baggage".to_vec(), Some(b"user=alice".to_vec())),
                    (b"attempt".to_vec(), Some(b"2".to_vec())),
                ]),
            )
        });
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(extractor.get("baggage"), None);
    assert_eq!(extractor.get("attempt"), Some("2"));
    assert_eq!(extractor.get("x-request-id"), Some("r-2"));
}
