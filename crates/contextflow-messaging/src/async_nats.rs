//! NATS and JetStream through [`async_nats`]: message headers as carriers, publish helpers
//! that write the current context into a message's headers (core NATS and JetStream), and
//! consume helpers that run a message's handler in the context its headers carry.
//!
//! Propagation fields travel as NATS headers (`traceparent`, `tracestate`, `baggage`,
//! `x-request-id`). A JetStream message keeps its headers in the stream, so a redelivery (after
//! a nack, or an ack timeout) runs in the same context as the first delivery. On consume,
//! everything is validated as for any carrier; header names are compared without regard to
//! ASCII case.
//!
//! ```no_run
//! use contextflow_messaging::async_nats as nats;
//! use futures_util::StreamExt as _;
//!
//! # #[allow(dead_code)]
//! # async fn run(client: async_nats::Client) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Publish, inside a request: the request's context goes into the headers.
//! nats::publish(&client, "orders.created", "{}".into()).await?;
//!
//! // Consume, in a task of its own started from an empty context: each message's handler runs
//! // in the message's context, and nothing of whoever started the loop (its tenant, its user).
//! // Core NATS pushes messages as fast as they come: at most 64 handlers run at once.
//! let consumer = nats::consumer("orders.created");
//! let mut messages = client.subscribe("orders.created").await?;
//! let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
//! let consuming = contextflow::spawn_without_context(async move {
//!     while let Some(message) = messages.next().await {
//!         let Ok(slot) = slots.clone().acquire_owned().await else { break };
//!         let context = nats::context(&consumer, &message);
//!         contextflow::spawn(context.scope(async move {
//!             tracing::info!(bytes = message.payload.len(), "order received"); // with the producer's request id
//!             drop(slot);
//!         }));
//!     }
//! });
//! consuming.await?;
//! # Ok(()) }
//! ```
//!
//! JetStream works the same way: [`jetstream_publish`] on the publish side, and [`context`] or
//! [`scope`] with a `jetstream::Message` (it dereferences to an [`async_nats::Message`]):
//!
//! ```no_run
//! use async_nats::jetstream::{self, consumer::pull};
//! use contextflow_messaging::async_nats as nats;
//! use futures_util::StreamExt as _;
//!
//! # #[allow(dead_code)]
//! # async fn run(client: async_nats::Client) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let js = jetstream::new(client);
//! nats::jetstream_publish(&js, "jobs.email", "{}".into()).await?.await?;
//!
//! let stream = js.get_stream("JOBS").await?;
//! let worker = stream.get_consumer::<pull::Config>("email").await?;
//! let consumer = nats::consumer("jobs.email");
//! let mut messages = worker.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = match message {
//!         Ok(message) => message,
//!         // A missed heartbeat (a slow link, a server restart) does not end the stream.
//!         Err(err) if err.kind() == pull::MessagesErrorKind::MissingHeartbeat => {
//!             tracing::warn!(%err, "JetStream heartbeat missed");
//!             continue;
//!         }
//!         Err(err) => return Err(err.into()),
//!     };
//!     // A redelivery of this message runs in the same context as its first delivery.
//!     let acked = nats::scope(&consumer, &message, async {
//!         tracing::info!("sending the email");
//!         message.ack().await
//!     })
//!     .await;
//!     // Not acknowledged: the server sends the message again after the consumer's `ack_wait`.
//!     if let Err(err) = acked {
//!         tracing::warn!(%err, "could not acknowledge the message");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `async-nats` is used without its default features, with `jetstream` and `ring`: enable
//! the others (`service`, `kv`, `aws-lc-rs`...) in the application.

use async_nats::{
    jetstream::{self, context::PublishAckFuture},
    Client, HeaderMap, HeaderName, HeaderValue, Message,
};
use bytes::Bytes;
use opentelemetry::propagation::{Extractor, Injector};

use crate::{Consumed, Consumer, MessageContext, Publisher};

/// The `messaging.system` of NATS consumer spans.
pub const SYSTEM: &str = "nats";

/// Reads propagation fields from NATS headers (names compared without regard to ASCII case).
///
/// ```
/// use async_nats::HeaderMap;
/// use contextflow_messaging::async_nats::HeaderExtractor;
/// use opentelemetry::propagation::Extractor as _;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("X-Request-Id", "r-1");
/// let extractor = HeaderExtractor::new(Some(&headers));
/// assert_eq!(extractor.get("x-request-id"), Some("r-1"));
/// assert_eq!(extractor.get("traceparent"), None);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct HeaderExtractor<'a> {
    headers: Option<&'a HeaderMap>,
}

/// Writes propagation fields into NATS headers, replacing earlier values of the same field.
///
/// ```
/// use async_nats::HeaderMap;
/// use contextflow_messaging::async_nats::HeaderInjector;
/// use opentelemetry::propagation::Injector as _;
///
/// let mut headers = HeaderMap::new();
/// HeaderInjector::new(&mut headers).set("x-request-id", "r-2".to_owned());
/// assert_eq!(headers.get("x-request-id").map(|v| v.as_str()), Some("r-2"));
/// ```
#[derive(Debug)]
pub struct HeaderInjector<'a> {
    headers: &'a mut HeaderMap,
}

// ===== impl HeaderExtractor =====

impl<'a> HeaderExtractor<'a> {
    /// Reads `headers` (a message without headers has `None`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let extractor = contextflow_messaging::async_nats::HeaderExtractor::new(None);
    /// assert!(extractor.keys().is_empty());
    /// ```
    pub fn new(headers: Option<&'a HeaderMap>) -> Self {
        HeaderExtractor { headers }
    }

    /// Reads the headers of `message` (a core NATS message, or a JetStream message through
    /// `Deref`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// # #[allow(dead_code)]
    /// # fn run(message: &async_nats::Message) {
    /// let extractor = contextflow_messaging::async_nats::HeaderExtractor::from_message(message);
    /// let _traceparent = extractor.get("traceparent");
    /// # }
    /// ```
    pub fn from_message(message: &'a Message) -> Self {
        HeaderExtractor::new(message.headers.as_ref())
    }

    /// The values of the header named `key` in every ASCII spelling: `Traceparent` and
    /// `TRACEPARENT` are two copies of one field, as they would be on the wire (a repeated
    /// `traceparent` or `x-request-id` is then refused, not one of them picked). Spellings come
    /// in byte order of their names, so the order never depends on the map's hashing.
    fn values(&self, key: &str) -> Vec<&'a HeaderValue> {
        let Some(headers) = self.headers else {
            return Vec::new();
        };
        let mut named: Vec<(&'a str, &'a [HeaderValue])> = headers
            .iter()
            .filter(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            .map(|(name, values)| (name.as_ref(), values.as_slice()))
            .collect();
        named.sort_unstable_by_key(|(name, _)| *name);
        named.into_iter().flat_map(|(_, values)| values).collect()
    }
}

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.values(key).first().map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.headers.map_or_else(Vec::new, |headers| {
            headers.iter().map(|(name, _)| name.as_ref()).collect()
        })
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let values = self.values(key);
        (!values.is_empty()).then(|| values.into_iter().map(HeaderValue::as_str).collect())
    }
}

// ===== impl HeaderInjector =====

impl<'a> HeaderInjector<'a> {
    /// Writes into `headers`.
    ///
    /// ```
    /// let mut headers = async_nats::HeaderMap::new();
    /// let injector = contextflow_messaging::async_nats::HeaderInjector::new(&mut headers);
    /// # drop(injector);
    /// ```
    pub fn new(headers: &'a mut HeaderMap) -> Self {
        HeaderInjector { headers }
    }
}

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagators write valid names and values; anything NATS cannot carry (a control
        // character, a newline) is left out rather than panicking in `HeaderMap::insert`.
        match (HeaderName::try_from(key), value.parse::<HeaderValue>()) {
            (Ok(name), Ok(value)) => self.headers.insert(name, value),
            _ => tracing::debug!("propagation field not written: not a valid NATS header"),
        }
    }
}

// ===== publish =====

/// `headers` with the current context written into them by `publisher` (other headers kept).
/// Propagation headers already there (a message republished), in any spelling, are dropped
/// first: NATS header names are case-sensitive, so an old `Traceparent` next to the new
/// `traceparent` would make the field repeated (and refused), and an old `baggage` would stay
/// where the current context has none.
///
/// ```
/// use contextflow_messaging::{async_nats::inject, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let headers = REQUEST_ID.sync_scope("r-3".parse::<RequestId>()?, || {
///     inject(&Publisher::new(), async_nats::HeaderMap::new())
/// });
/// assert_eq!(headers.get("x-request-id").map(|v| v.as_str()), Some("r-3"));
///
/// // Republished: the first send's propagation headers go, whatever their spelling.
/// let mut old = async_nats::HeaderMap::new();
/// old.insert("X-Request-ID", "r-1");
/// old.insert("Baggage", "user=al");
/// old.insert("attempt", "2");
/// let headers = REQUEST_ID.sync_scope("r-4".parse::<RequestId>()?, || inject(&Publisher::new(), old));
/// let mut names: Vec<&str> = headers.iter().map(|(name, _)| name.as_ref()).collect();
/// names.sort();
/// assert_eq!(names, ["attempt", "x-request-id"]);
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn inject(publisher: &Publisher, headers: HeaderMap) -> HeaderMap {
    let fields = publisher.replaced_fields();
    let mut kept = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if fields.iter().any(|f| f.eq_ignore_ascii_case(name)) {
            continue;
        }
        for value in values {
            kept.append(name, value.clone());
        }
    }
    publisher.inject(&mut HeaderInjector::new(&mut kept));
    kept
}

/// Publishes `payload` to `subject` on core NATS with the current context in its headers
/// (OpenTelemetry's global propagator plus the request id); otherwise
/// `Client::publish_with_headers`.
///
/// # Errors
///
/// Those of `Client::publish_with_headers`.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(client: async_nats::Client) -> Result<(), async_nats::PublishError> {
/// contextflow_messaging::async_nats::publish(&client, "orders.created", "{}".into()).await?;
/// # Ok(()) }
/// ```
pub async fn publish(
    client: &Client,
    subject: impl Into<String>,
    payload: Bytes,
) -> Result<(), async_nats::PublishError> {
    let headers = inject(&Publisher::new(), HeaderMap::new());
    client
        .publish_with_headers(subject.into(), headers, payload)
        .await
}

/// Publishes `payload` to `subject` through JetStream with the current context in its headers;
/// otherwise `jetstream::Context::publish_with_headers` (await the returned future for the
/// stream's acknowledgement).
///
/// # Errors
///
/// Those of `jetstream::Context::publish_with_headers`.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(js: async_nats::jetstream::Context) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let ack = contextflow_messaging::async_nats::jetstream_publish(&js, "jobs.email", "{}".into())
///     .await?
///     .await?;
/// assert!(ack.sequence > 0);
/// # Ok(()) }
/// ```
pub async fn jetstream_publish(
    context: &jetstream::Context,
    subject: impl Into<String>,
    payload: Bytes,
) -> Result<PublishAckFuture, jetstream::context::PublishError> {
    let headers = inject(&Publisher::new(), HeaderMap::new());
    context
        .publish_with_headers(subject.into(), headers, payload)
        .await
}

// ===== consume =====

/// A [`Consumer`] for the NATS subject (or JetStream consumer) `destination`
/// (`messaging.system = "nats"`).
///
/// ```
/// let consumer = contextflow_messaging::async_nats::consumer("orders.created");
/// # drop(consumer);
/// ```
pub fn consumer(destination: &str) -> Consumer {
    Consumer::new().system(SYSTEM).destination(destination)
}

/// The context of `message`, made by `consumer` from its headers.
///
/// ```
/// use contextflow_messaging::async_nats::{consumer, context, inject};
/// use contextflow_messaging::Publisher;
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let headers = REQUEST_ID.sync_scope("r-4".parse::<RequestId>()?, || inject(&Publisher::new(), Default::default()));
/// let message = async_nats::Message {
///     subject: "orders".into(),
///     reply: None,
///     payload: "{}".into(),
///     headers: Some(headers),
///     status: None,
///     description: None,
///     length: 2,
/// };
/// let cx = context(&consumer("orders"), &message);
/// assert_eq!(cx.request_id().as_str(), "r-4");
/// cx.finish();
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn context(consumer: &Consumer, message: &Message) -> MessageContext {
    consumer.context(&HeaderExtractor::from_message(message))
}

/// Runs `handler` for `message` in the context its headers carry; see [`Consumer::scope`].
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(message: async_nats::jetstream::Message) -> Result<(), async_nats::Error> {
/// use contextflow_messaging::async_nats as nats;
/// let consumer = nats::consumer("jobs.email");
/// nats::scope(&consumer, &message, async {
///     // ... handle the job; logs carry the producer's request id
///     message.ack().await
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub fn scope<F: std::future::Future>(
    consumer: &Consumer,
    message: &Message,
    handler: F,
) -> Consumed<F> {
    consumer.scope(&HeaderExtractor::from_message(message), handler)
}
