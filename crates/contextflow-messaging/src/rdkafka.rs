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
//! // Consume, in a thread or task of its own: each record's handler runs in its context. The
//! // consumer is made with `enable.auto.offset.store=false`, and a record's offset is stored
//! // once it is handled: a crash in a handler redelivers the record instead of losing it.
//! records.subscribe(&["orders"])?;
//! let consumer = kafka::consumer("orders");
//! loop {
//!     let record = match records.poll(Duration::from_secs(1)) {
//!         // Nothing within the second: poll again (`None` is not the end of the stream).
//!         None => continue,
//!         // An error about one poll (a broker down for a moment, a partition's end): the
//!         // consumer goes on.
//!         Some(Err(err)) => {
//!             tracing::warn!(%err, "kafka poll failed");
//!             continue;
//!         }
//!         Some(Ok(record)) => record,
//!     };
//!     let message = kafka::context(&consumer, &record);
//!     message.run(|| tracing::info!("order received")); // with the producer's request id
//!     message.finish();
//!     if let Err(err) = records.store_offset_from_message(&record) {
//!         // A partition revoked meanwhile: the record comes again to whoever has it now.
//!         tracing::warn!(%err, "could not store the record's offset");
//!     }
//! }
//! # }
//! ```
//!
//! `rdkafka` is used without its default features, with `dynamic-linking` against the
//! system's librdkafka (Debian's `librdkafka-dev`, 2.0.2; `rdkafka-sys` is pinned to a release
//! that accepts it).

use opentelemetry::propagation::Extractor;
use rdkafka::message::{BorrowedMessage, Header, Message as _, OwnedHeaders, OwnedMessage};

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
#[derive(Clone, Copy, Debug)]
pub struct HeaderExtractor<'a> {
    headers: Option<raw::List<'a>>,
}

// ===== impl HeaderExtractor =====

impl<'a> HeaderExtractor<'a> {
    /// Reads `headers` (a record without headers has `None`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let extractor = contextflow_messaging::rdkafka::HeaderExtractor::new(None);
    /// assert!(extractor.keys().is_empty());
    /// ```
    pub fn new(headers: Option<&'a OwnedHeaders>) -> Self {
        HeaderExtractor {
            headers: headers.map(raw::List::owned),
        }
    }

    /// Reads the headers of `record`: a consumer's `BorrowedMessage` or an `OwnedMessage`.
    ///
    /// ```
    /// use contextflow_messaging::rdkafka::HeaderExtractor;
    /// use opentelemetry::propagation::Extractor as _;
    /// use rdkafka::{message::{Header, OwnedHeaders, OwnedMessage}, Timestamp};
    ///
    /// let headers = OwnedHeaders::new().insert(Header { key: "x-request-id", value: Some("r-2") });
    /// let record = OwnedMessage::new(None, None, "orders".into(), Timestamp::NotAvailable, 0, 0, Some(headers));
    /// assert_eq!(HeaderExtractor::from_message(&record).get("x-request-id"), Some("r-2"));
    /// ```
    pub fn from_message<M: KafkaMessage + ?Sized>(record: &'a M) -> Self {
        HeaderExtractor {
            headers: record.header_list(),
        }
    }

    /// The first [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) headers whose names are
    /// UTF-8 (others cannot be propagation fields), as (name, value).
    fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let headers = self.headers;
        let count = headers.map_or(0, |list| list.count());
        (0..count.min(contextflow_otel::carrier::MAX_PAIRS)).filter_map(move |i| {
            let (name, value) = headers?.get(i)?;
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

impl Extractor for HeaderExtractor<'_> {
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

/// A Kafka record whose headers [`HeaderExtractor`], [`context`] and [`scope`] read:
/// rdkafka's `BorrowedMessage` (a consumer's records) and `OwnedMessage`.
///
/// The headers are read through librdkafka itself rather than rdkafka's `Headers` trait: that
/// trait's `try_get` (and every method built on it) panics on a header name that is not UTF-8
/// (rdkafka 0.33), which any producer may write, so one record would stop the consumer, and
/// again on the same offset after each restart. Here such a header is skipped. (The list is
/// taken from the message, never from a `&BorrowedHeaders`, which safe code can make out of
/// nothing.)
///
/// ```
/// use contextflow_messaging::rdkafka::KafkaMessage;
/// fn readable<M: KafkaMessage>(_: &M) {}
/// readable(&rdkafka::message::OwnedMessage::new(None, None, "t".into(), rdkafka::Timestamp::NotAvailable, 0, 0, None));
/// ```
pub trait KafkaMessage: sealed::Sealed {
    /// The record's header list, if it has one.
    #[doc(hidden)]
    fn header_list(&self) -> Option<raw::List<'_>>;
}

impl KafkaMessage for BorrowedMessage<'_> {
    fn header_list(&self) -> Option<raw::List<'_>> {
        raw::List::of_message(self)
    }
}

impl KafkaMessage for OwnedMessage {
    fn header_list(&self) -> Option<raw::List<'_>> {
        self.headers().map(raw::List::owned)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for rdkafka::message::BorrowedMessage<'_> {}
    impl Sealed for rdkafka::message::OwnedMessage {}
}

/// librdkafka's header list, read without rdkafka's `Headers::try_get` (which unwraps the name
/// as UTF-8).
#[allow(unsafe_code)]
#[doc(hidden)]
pub mod raw {
    use std::{
        ffi::{c_char, c_void, CStr},
        marker::PhantomData,
        ptr::{self, NonNull},
    };

    use rdkafka::{
        bindings as rd,
        message::{BorrowedMessage, OwnedHeaders},
    };

    /// A live header list, borrowed for `'a` from what owns it (an `OwnedHeaders`, a
    /// consumer's message). Only this module makes one, from those owners: never from a
    /// `&BorrowedHeaders`, which safe code can conjure from nothing (it is a public unit
    /// struct), so a pointer taken from one could dangle.
    #[derive(Clone, Copy, Debug)]
    pub struct List<'a> {
        ptr: NonNull<rd::rd_kafka_headers_t>,
        _owner: PhantomData<&'a ()>,
    }

    // SAFETY: the list is only read (`rd_kafka_header_cnt`, `rd_kafka_header_get_all` do not
    // modify it), and its owner, borrowed for `'a`, is `Sync` (`OwnedHeaders`,
    // `BorrowedMessage`), so reading it from another thread is as safe as from this one.
    unsafe impl Send for List<'_> {}
    // SAFETY: as above.
    unsafe impl Sync for List<'_> {}

    impl<'a> List<'a> {
        /// The list `headers` owns. rdkafka 0.33 hands out a `&BorrowedHeaders` made by casting
        /// the list's pointer (`BorrowedHeaders` is a zero-sized type used only by reference)
        /// and casts it back for every call into librdkafka; `as_borrowed` of a real
        /// `OwnedHeaders` is such a reference (the crate is pinned to `=0.33.2` for this).
        pub(super) fn owned(headers: &'a OwnedHeaders) -> Self {
            List {
                ptr: NonNull::from(headers.as_borrowed()).cast(),
                _owner: PhantomData,
            }
        }

        /// The list of a consumer's message, if it has headers.
        pub(super) fn of_message(message: &'a BorrowedMessage<'_>) -> Option<Self> {
            let mut headers: *mut rd::rd_kafka_headers_t = ptr::null_mut();
            // SAFETY: `message.ptr()` is the live message `message` borrows for `'a`; the list
            // librdkafka hands out is owned by the message and lives as long as it does. On the
            // first call librdkafka parses the headers and stores the list in the message (as
            // it does for rdkafka's own `Message::headers`): two threads asking for one
            // message's headers at the same moment would race inside librdkafka, as they would
            // through rdkafka's method; a consumer reads a message from one thread.
            let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut headers) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return None;
            }
            Some(List {
                ptr: NonNull::new(headers)?,
                _owner: PhantomData,
            })
        }

        /// The list's pointer, for a call that changes it.
        fn as_mut_ptr(self) -> *mut rd::rd_kafka_headers_t {
            self.ptr.as_ptr()
        }

        /// How many headers the list holds.
        pub(super) fn count(self) -> usize {
            // SAFETY: a live list for `'a` (see the constructors).
            unsafe { rd::rd_kafka_header_cnt(self.ptr.as_ptr()) }
        }

        /// Header `i`: its name's bytes (up to its NUL) and its value (`None` for a null value).
        pub(super) fn get(self, i: usize) -> Option<(&'a [u8], Option<&'a [u8]>)> {
            let mut name: *const c_char = ptr::null();
            let mut value: *const c_void = ptr::null();
            let mut size = 0usize;
            // SAFETY: a live list (see the constructors) and valid out-pointers.
            let err = unsafe {
                rd::rd_kafka_header_get_all(self.ptr.as_ptr(), i, &mut name, &mut value, &mut size)
            };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            // SAFETY: librdkafka hands out the header's own NUL-terminated name and its value
            // (`size` bytes), owned by the list; the list cannot change or be freed while its
            // owner is borrowed for `'a` (adding a header takes an `OwnedHeaders` by value;
            // rdkafka offers no way to change a consumer's message's headers), so both live as
            // long as `'a`.
            let name = unsafe { CStr::from_ptr(name) }.to_bytes();
            let value = (!value.is_null())
                // SAFETY: as above.
                .then(|| unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) });
            Some((name, value))
        }
    }

    /// `headers` with the header `name` (its bytes, UTF-8 or not; no NUL) = `value` (`None`:
    /// a null value) added at the end. rdkafka's `OwnedHeaders::insert` takes a `&str` name
    /// only.
    pub(super) fn add(headers: OwnedHeaders, name: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
        debug_assert!(
            !name.contains(&0),
            "a header name read from a list has no NUL"
        );
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
            None => (ptr::null(), 0),
        };
        // SAFETY: `headers` is a live list that this function owns (taken by value: nothing
        // else reads or changes it during the call), made writable by `OwnedHeaders::new*`
        // (rdkafka's own `insert` makes the same call on it); librdkafka copies `name.len()`
        // bytes of the name and `value_len` bytes of the value, both live for the call.
        let err = unsafe {
            rd::rd_kafka_header_add(
                List::owned(&headers).as_mut_ptr(),
                name.as_ptr().cast::<c_char>(),
                name.len() as isize,
                value_ptr,
                value_len,
            )
        };
        debug_assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        headers
    }
}

// ===== publish =====

/// `headers` with the current context written into them by `publisher`: the headers named by
/// its fields or the default ones (`traceparent`, `tracestate`, `baggage`, `x-request-id`;
/// any case) are replaced, the others kept in their order. The propagation headers go after
/// the others, or, when headers are replaced or there are so many that they would fall past
/// the first [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) (all a consumer reads),
/// before them, in a new list.
/// Kafka headers are a list, and a record re-published with its headers (to a retry topic)
/// would otherwise carry two of each, which a consumer drops as repeated. Header names that
/// are not UTF-8 are kept as they are.
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
///
/// // Re-published with its headers (to a retry topic, say): replaced, not doubled.
/// let again = REQUEST_ID.sync_scope("r-3".parse::<RequestId>()?, || {
///     let kept = headers.insert(rdkafka::message::Header { key: "order", value: Some("7") });
///     inject(&Publisher::new(), kept)
/// });
/// let ids: Vec<_> = again.iter().filter(|h| h.key == "x-request-id").map(|h| h.value).collect();
/// assert_eq!(ids, [Some(b"r-3".as_slice())]);
/// assert!(again.iter().any(|h| h.key == "order"));
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn inject(publisher: &Publisher, headers: OwnedHeaders) -> OwnedHeaders {
    let mut pairs = Vec::new();
    publisher.inject(&mut contextflow_otel::carrier::InjectFn(
        |k: &str, v: String| pairs.push((k.to_owned(), v)),
    ));
    let write_ours = |list: OwnedHeaders| {
        pairs.iter().fold(list, |list, (key, value)| {
            list.insert(Header {
                key,
                value: Some(value.as_str()),
            })
        })
    };
    // Read through the raw list: rdkafka's own reader panics on a name that is not UTF-8.
    let old = raw::List::owned(&headers);
    let count = old.count();
    if count == 0 {
        return write_ours(headers);
    }
    let fields = publisher.replaced_fields();
    let ours = |name: &[u8]| {
        fields
            .iter()
            .any(|f| f.as_bytes().eq_ignore_ascii_case(name))
    };
    let clash = (0..count)
        .filter_map(|i| old.get(i))
        .any(|(name, _)| ours(name));
    if !clash && count + pairs.len() <= contextflow_otel::carrier::MAX_PAIRS {
        // Nothing to replace, and ours stay within the headers a consumer reads: appended.
        return write_ours(headers);
    }
    // A new list, ours first: a consumer reads the first MAX_PAIRS headers, and a record with
    // many headers of its own would push ours out of them. The others follow in their order,
    // names that are not UTF-8 included (copied as bytes).
    let fresh = write_ours(OwnedHeaders::new_with_capacity(pairs.len() + count));
    (0..count)
        .filter_map(|i| old.get(i))
        .filter(|(name, _)| !ours(name))
        .fold(fresh, |list, (name, value)| raw::add(list, name, value))
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
pub fn context<M: KafkaMessage>(consumer: &Consumer, record: &M) -> MessageContext {
    consumer.context(&HeaderExtractor::from_message(record))
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
pub fn scope<M: KafkaMessage, F: std::future::Future>(
    consumer: &Consumer,
    record: &M,
    handler: F,
) -> Consumed<F> {
    consumer.scope(&HeaderExtractor::from_message(record), handler)
}
