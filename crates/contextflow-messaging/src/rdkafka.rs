//! Kafka record headers through [`rdkafka`]'s types: headers as carriers, a helper that
//! writes the current context into a record's headers, and consume helpers that run a record's
//! handler in the context its headers carry.
//!
//! Propagation fields travel as record headers (`traceparent`, `tracestate`, `baggage`,
//! `x-request-id`). Record headers are untrusted: at most
//! [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) of them are read, a header without a
//! value or with a value that is not UTF-8 is ignored, and everything is then validated and
//! bounded as for any carrier.
//!
//! **Tested at the header level only**: no Kafka broker runs in this project's test
//! environment, so the tests round-trip records' headers (`OwnedHeaders`, `OwnedMessage`)
//! between tasks rather than through a broker. The producer and consumer code is the same as
//! with a broker.
//!
//! ```no_run
//! use contextflow_messaging::rdkafka as kafka;
//! use rdkafka::{
//!     consumer::{BaseConsumer, Consumer as _},
//!     message::OwnedHeaders,
//!     producer::{BaseProducer, BaseRecord},
//! };
//! use std::time::Duration;
//!
//! # #[allow(dead_code)]
//! # fn run(producer: BaseProducer, records: BaseConsumer) -> Result<(), rdkafka::error::KafkaError> {
//! // Produce, inside a request: the request's context goes into the record's headers.
//! let headers = kafka::inject(&contextflow_messaging::Publisher::new(), OwnedHeaders::new());
//! let record = BaseRecord::to("orders").key("17").payload("{}").headers(headers);
//! producer.send(record).map_err(|(e, _)| e)?;
//!
//! // Consume, in a thread or task of its own: each record's handler runs in its context.
//! records.subscribe(&["orders"])?;
//! let consumer = kafka::consumer("orders");
//! while let Some(record) = records.poll(Duration::from_secs(1)) {
//!     let record = record?;
//!     let message = kafka::context(&consumer, &record);
//!     message.run(|| tracing::info!("order received")); // with the producer's request id
//!     message.finish();
//! }
//! # Ok(()) }
//! ```
//!
//! `rdkafka` is used without its default features, with `dynamic-linking` against the
//! system's librdkafka (Debian's `librdkafka-dev`, 2.0.2; `rdkafka-sys` is pinned to a release
//! that accepts it).

use opentelemetry::propagation::Extractor;
use rdkafka::message::{BorrowedHeaders, Header, Message, OwnedHeaders};

use crate::{Consumed, Consumer, MessageContext, Publisher};

/// The `messaging.system` of Kafka consumer spans.
pub const SYSTEM: &str = "kafka";

/// Reads propagation fields from Kafka record headers (the first
/// [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) headers; names compared without regard
/// to ASCII case; the first header of a name wins for a single value). A header without a
/// value, or whose value is not UTF-8, reads as an empty value: it still counts as a copy, so a
/// second `x-request-id` beside it makes the field repeated (and refused).
///
/// ```
/// use contextflow_messaging::rdkafka::HeaderExtractor;
/// use opentelemetry::propagation::Extractor as _;
/// use rdkafka::message::{Header, OwnedHeaders};
///
/// let headers = OwnedHeaders::new()
///     .insert(Header { key: "X-Request-Id", value: Some("r-1") })
///     .insert(Header { key: "baggage", value: Some(b"\xff".as_slice()) })
///     .insert(Header { key: "tracestate", value: None::<&str> });
/// let extractor = HeaderExtractor::new(Some(&headers));
/// assert_eq!(extractor.get("x-request-id"), Some("r-1"));
/// assert_eq!(extractor.get("baggage"), Some(""), "not UTF-8");
/// assert_eq!(extractor.get("tracestate"), Some(""), "no value");
/// assert_eq!(extractor.get("traceparent"), None, "absent");
/// ```
#[derive(Debug)]
pub struct HeaderExtractor<'a, H: ?Sized> {
    headers: Option<&'a H>,
}

// ===== impl HeaderExtractor =====

impl<'a, H: RecordHeaders + ?Sized> HeaderExtractor<'a, H> {
    /// Reads `headers` (a record without headers has `None`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let extractor = contextflow_messaging::rdkafka::HeaderExtractor::<rdkafka::message::OwnedHeaders>::new(None);
    /// assert!(extractor.keys().is_empty());
    /// ```
    pub fn new(headers: Option<&'a H>) -> Self {
        HeaderExtractor { headers }
    }

    /// The first [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) headers whose names are
    /// UTF-8 (others cannot be propagation fields), as (name, value).
    fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let headers = self.headers.map(RecordHeaders::borrowed);
        let count = headers.map_or(0, raw::count);
        (0..count.min(contextflow_otel::carrier::MAX_PAIRS)).filter_map(move |i| {
            let (name, value) = raw::get(headers?, i)?;
            Some((std::str::from_utf8(name).ok()?, value))
        })
    }

    fn values<'k>(&self, key: &'k str) -> impl Iterator<Item = &'a str> + 'k
    where
        'a: 'k,
    {
        // A copy without a value, or not UTF-8, still counts as a copy (read as empty, which no
        // propagator accepts), as the AMQP and Redis readers do: a forged second
        // `x-request-id` next to a null one is a repeated header, not a single valid value.
        self.headers()
            .filter(move |(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| {
                value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .unwrap_or("")
            })
    }
}

impl<H: RecordHeaders + ?Sized> Extractor for HeaderExtractor<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.values(key).next()
    }

    fn keys(&self) -> Vec<&str> {
        self.headers().map(|(name, _)| name).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self.values(key).collect();
        (!all.is_empty()).then_some(all)
    }
}

/// Record headers [`HeaderExtractor`] reads: rdkafka's `BorrowedHeaders` (a consumer's
/// records) and `OwnedHeaders` (`OwnedMessage`, `detach`).
///
/// The extractor reads them through librdkafka itself rather than rdkafka's `Headers` trait:
/// that trait's `try_get` (and every method built on it) panics on a header name that is not
/// UTF-8 (rdkafka 0.33), which any producer may write, so one record would stop the consumer,
/// and again on the same offset after each restart. Here such a header is skipped.
///
/// ```
/// use contextflow_messaging::rdkafka::RecordHeaders;
/// fn readable<H: RecordHeaders + ?Sized>(_: &H) {}
/// readable(&rdkafka::message::OwnedHeaders::new());
/// ```
pub trait RecordHeaders: sealed::Sealed {
    /// The headers as librdkafka's header list.
    #[doc(hidden)]
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl RecordHeaders for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl RecordHeaders for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for rdkafka::message::BorrowedHeaders {}
    impl Sealed for rdkafka::message::OwnedHeaders {}
}

/// librdkafka's header list, read without rdkafka's `Headers::try_get` (which unwraps the name
/// as UTF-8).
#[allow(unsafe_code)]
mod raw {
    use std::{
        ffi::{c_char, c_void, CStr},
        ptr,
    };

    use rdkafka::{bindings as rd, message::BorrowedHeaders};

    /// The native list. rdkafka 0.33 makes a `&BorrowedHeaders` by casting the list's pointer
    /// (`BorrowedHeaders` is a zero-sized type used only by reference), and casts it back the
    /// same way for every call into librdkafka; we do as it does (the crate is pinned to
    /// `=0.33.2` for this).
    fn native(headers: &BorrowedHeaders) -> *const rd::rd_kafka_headers_t {
        ptr::from_ref(headers).cast()
    }

    /// How many headers the list holds.
    pub(super) fn count(headers: &BorrowedHeaders) -> usize {
        // SAFETY: a valid list for as long as `headers` is borrowed (see `native`).
        unsafe { rd::rd_kafka_header_cnt(native(headers)) }
    }

    /// Header `i`: its name's bytes (up to its NUL) and its value (`None` for a null value).
    pub(super) fn get(headers: &BorrowedHeaders, i: usize) -> Option<(&[u8], Option<&[u8]>)> {
        let mut name: *const c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size = 0usize;
        // SAFETY: a valid list (see `native`) and valid out-pointers.
        let err = unsafe {
            rd::rd_kafka_header_get_all(native(headers), i, &mut name, &mut value, &mut size)
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: librdkafka hands out the header's own NUL-terminated name and its value
        // (`size` bytes), owned by the list; the list cannot change or be freed while `headers`
        // is borrowed (adding a header takes an `OwnedHeaders` by value; a borrowed message's
        // headers are read-only), so both live as long as the borrow.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = (!value.is_null())
            // SAFETY: as above.
            .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
        Some((name, value))
    }
}

impl<H: ?Sized> Clone for HeaderExtractor<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H: ?Sized> Copy for HeaderExtractor<'_, H> {}

// ===== publish =====

/// `headers` with the current context written into them by `publisher` (other headers kept:
/// Kafka headers are a list, so pass headers without propagation fields).
///
/// ```
/// use contextflow_messaging::{rdkafka::inject, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
/// use rdkafka::message::{Headers as _, OwnedHeaders};
///
/// let headers = REQUEST_ID.sync_scope("r-2".parse::<RequestId>()?, || {
///     inject(&Publisher::new(), OwnedHeaders::new())
/// });
/// let header = headers.get(0);
/// assert_eq!((header.key, header.value), ("x-request-id", Some(b"r-2".as_slice())));
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn inject(publisher: &Publisher, headers: OwnedHeaders) -> OwnedHeaders {
    let mut pairs = Vec::new();
    publisher.inject(&mut contextflow_otel::carrier::InjectFn(
        |k: &str, v: String| pairs.push((k.to_owned(), v)),
    ));
    pairs.iter().fold(headers, |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value.as_str()),
        })
    })
}

// ===== consume =====

/// A [`Consumer`] for the Kafka topic `topic` (`messaging.system = "kafka"`).
///
/// ```
/// let consumer = contextflow_messaging::rdkafka::consumer("orders");
/// # drop(consumer);
/// ```
pub fn consumer(topic: &str) -> Consumer {
    Consumer::new().system(SYSTEM).destination(topic)
}

/// The context of `record` (a `BorrowedMessage` from a consumer, or an `OwnedMessage`), made
/// by `consumer` from its headers.
///
/// ```
/// use contextflow_messaging::{rdkafka::{consumer, context, inject}, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
/// use rdkafka::{message::{OwnedHeaders, OwnedMessage}, Timestamp};
///
/// let headers = REQUEST_ID.sync_scope("r-3".parse::<RequestId>()?, || inject(&Publisher::new(), OwnedHeaders::new()));
/// let record = OwnedMessage::new(None, None, "orders".into(), Timestamp::NotAvailable, 0, 0, Some(headers));
/// let message = context(&consumer("orders"), &record);
/// assert_eq!(message.request_id().as_str(), "r-3");
/// message.finish();
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn context<M>(consumer: &Consumer, record: &M) -> MessageContext
where
    M: Message,
    M::Headers: RecordHeaders,
{
    consumer.context(&HeaderExtractor::new(record.headers()))
}

/// Runs `handler` for `record` in the context its headers carry; see [`Consumer::scope`].
///
/// ```
/// use contextflow_messaging::rdkafka::{consumer, scope};
/// use rdkafka::{message::OwnedMessage, Timestamp};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let record = OwnedMessage::new(None, None, "orders".into(), Timestamp::NotAvailable, 0, 0, None);
/// let id = scope(&consumer("orders"), &record, async { contextflow_otel::current_request_id() }).await;
/// assert_eq!(id.unwrap().as_str().len(), 36, "no headers: a fresh request id");
/// # }
/// ```
pub fn scope<M, F: std::future::Future>(consumer: &Consumer, record: &M, handler: F) -> Consumed<F>
where
    M: Message,
    M::Headers: RecordHeaders,
{
    consumer.scope(&HeaderExtractor::new(record.headers()), handler)
}
