//! RabbitMQ through [`lapin`]: AMQP message headers as carriers, a publish helper that writes
//! the current context into a message's headers, and a consume helper that runs a delivery's
//! handler in the context its headers carry.
//!
//! Propagation fields travel as long-string entries of the message's `headers` table
//! (`traceparent`, `tracestate`, `baggage`, `x-request-id`); on consume, an entry that is not
//! a UTF-8 string is ignored, and everything else is validated as for any carrier.
//!
//! A header *name* that is not UTF-8 never reaches this module: lapin's frame parser
//! (amq-protocol-types 8, `parse_short_string`) requires field-table keys to be UTF-8, and a
//! frame it cannot parse is a connection error, so such a message (another client may publish
//! one) closes the connection, and comes back after a reconnection. Give such queues a
//! delivery limit (`x-delivery-limit` on a quorum queue, with a dead-letter exchange) so that
//! one message cannot hold a consumer in that loop.
//!
//! ```no_run
//! use contextflow_messaging::lapin as amqp;
//! use futures_util::{FutureExt as _, StreamExt as _};
//! use lapin::{options::*, types::FieldTable, BasicProperties, Connection};
//! use std::panic::AssertUnwindSafe;
//!
//! # #[allow(dead_code)]
//! # async fn run(connection: Connection) -> lapin::Result<()> {
//! let channel = connection.create_channel().await?;
//! // Publish, inside a request: the request's context goes into the headers.
//! amqp::publish(&channel, "", "orders", BasicPublishOptions::default(), b"{}", BasicProperties::default())
//!     .await?
//!     .await?;
//!
//! // Consume, in a task of its own started from an empty context (for example with
//! // `contextflow::spawn_without_context`): each delivery's handler runs in the delivery's
//! // context, and nothing of whoever started the loop.
//! let consumer = amqp::consumer("orders");
//! // At most 32 unacknowledged deliveries at once: the broker holds the rest back, so the
//! // handlers in flight are bounded.
//! channel.basic_qos(32, BasicQosOptions::default()).await?;
//! let mut deliveries = channel
//!     .basic_consume("orders", "worker", BasicConsumeOptions::default(), FieldTable::default())
//!     .await?;
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     let message = amqp::context(&consumer, &delivery);
//!     contextflow::spawn(message.scope(async move {
//!         let handled = AssertUnwindSafe(async {
//!             tracing::info!("order received"); // with the producer's request id and trace id
//!             Ok::<(), std::io::Error>(())
//!         })
//!         .catch_unwind()
//!         .await;
//!         match handled {
//!             Ok(Ok(())) => delivery.ack(BasicAckOptions::default()).await,
//!             // A failed or panicking handler hands the delivery back (requeued here; with
//!             // `requeue: false` and a dead-letter exchange, set aside). Left unacknowledged,
//!             // it would hold one of the channel's prefetch slots until the channel closes.
//!             _ => delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
//!         }
//!     }));
//! }
//! # Ok(()) }
//! ```
//!
//! `lapin` is used without its default features: enable the runtime (`default-runtime`, or
//! an executor and reactor such as `tokio-executor-trait` and `tokio-reactor-trait` passed to
//! `ConnectionProperties`) and TLS features in the application.

use lapin::{
    message::Delivery,
    options::BasicPublishOptions,
    publisher_confirm::PublisherConfirm,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel,
};
use opentelemetry::{
    propagation::{Extractor, Injector},
    KeyValue,
};

use crate::{spans::SpanInfo, Consumed, Consumer, MessageContext, Publisher};

/// The `messaging.system` of RabbitMQ consumer spans.
pub const SYSTEM: &str = "rabbitmq";

/// Reads propagation fields from an AMQP headers table (keys compared without regard to
/// ASCII case; long-string and short-string values that are UTF-8).
///
/// ```
/// use contextflow_messaging::lapin::HeaderExtractor;
/// use lapin::types::{AMQPValue, FieldTable};
/// use opentelemetry::propagation::Extractor as _;
///
/// let mut headers = FieldTable::default();
/// headers.insert("x-request-id".into(), AMQPValue::LongString("r-1".into()));
/// headers.insert("x-count".into(), AMQPValue::LongInt(3));
/// let extractor = HeaderExtractor::new(Some(&headers));
/// assert_eq!(extractor.get("X-Request-Id"), Some("r-1"));
/// assert_eq!(extractor.get("x-count"), None, "not a string");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct HeaderExtractor<'a> {
    headers: Option<&'a FieldTable>,
}

/// Writes propagation fields into an AMQP headers table, as long strings.
///
/// ```
/// use contextflow_messaging::lapin::HeaderInjector;
/// use lapin::types::{AMQPValue, FieldTable};
/// use opentelemetry::propagation::Injector as _;
///
/// let mut headers = FieldTable::default();
/// HeaderInjector::new(&mut headers).set("x-request-id", "r-2".to_owned());
/// assert_eq!(headers.inner().get("x-request-id"), Some(&AMQPValue::LongString("r-2".into())));
/// ```
#[derive(Debug)]
pub struct HeaderInjector<'a> {
    headers: &'a mut FieldTable,
}

// ===== impl HeaderExtractor =====

impl<'a> HeaderExtractor<'a> {
    /// Reads `headers` (a message without headers has `None`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let extractor = contextflow_messaging::lapin::HeaderExtractor::new(None);
    /// assert!(extractor.keys().is_empty());
    /// ```
    pub fn new(headers: Option<&'a FieldTable>) -> Self {
        HeaderExtractor { headers }
    }

    /// Reads the headers of `properties`.
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let properties = lapin::BasicProperties::default();
    /// let extractor = contextflow_messaging::lapin::HeaderExtractor::from_properties(&properties);
    /// assert_eq!(extractor.get("traceparent"), None);
    /// ```
    pub fn from_properties(properties: &'a BasicProperties) -> Self {
        HeaderExtractor::new(properties.headers().as_ref())
    }
}

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let headers = self.headers?;
        // Exact match first (the common case, a B-tree lookup), then without regard to case.
        let value = match headers.inner().get(key) {
            Some(value) => value,
            None => {
                headers
                    .inner()
                    .iter()
                    .find(|(k, _)| k.as_str().eq_ignore_ascii_case(key))?
                    .1
            }
        };
        as_str(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.headers.map_or_else(Vec::new, |headers| {
            headers.inner().keys().map(ShortString::as_str).collect()
        })
    }

    /// Every header named `key` without regard to case (`traceparent` and `TraceParent` are
    /// two values, so a repeated single-valued field is seen as repeated); a value that is not
    /// text counts, as an empty one.
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self
            .headers?
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str().eq_ignore_ascii_case(key))
            .map(|(_, v)| as_str(v).unwrap_or(""))
            .collect();
        (!all.is_empty()).then_some(all)
    }
}

fn as_str(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

// ===== impl HeaderInjector =====

impl<'a> HeaderInjector<'a> {
    /// Writes into `headers`.
    ///
    /// ```
    /// let mut headers = lapin::types::FieldTable::default();
    /// let injector = contextflow_messaging::lapin::HeaderInjector::new(&mut headers);
    /// # drop(injector);
    /// ```
    pub fn new(headers: &'a mut FieldTable) -> Self {
        HeaderInjector { headers }
    }
}

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
}

// ===== publish =====

/// `properties` with the current context written into its headers by `publisher` (other
/// headers kept). Propagation headers already there (a message republished to a retry or
/// dead-letter queue), in any spelling, are dropped first: they describe the context the
/// message was first sent in, and next to the current one the consumer would find each field
/// twice (and use neither), or an old `baggage` where the current context has none.
///
/// ```
/// use contextflow_messaging::{lapin::inject, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let properties = REQUEST_ID.sync_scope("r-3".parse::<RequestId>()?, || {
///     inject(&Publisher::new(), lapin::BasicProperties::default())
/// });
/// let headers = properties.headers().as_ref().unwrap();
/// assert_eq!(headers.inner()["x-request-id"], lapin::types::AMQPValue::LongString("r-3".into()));
///
/// // Republished: the first send's propagation headers go, whatever their spelling.
/// let mut old = lapin::types::FieldTable::default();
/// old.insert("X-Request-ID".into(), lapin::types::AMQPValue::LongString("r-1".into()));
/// old.insert("Baggage".into(), lapin::types::AMQPValue::LongString("user=al".into()));
/// old.insert("attempt".into(), lapin::types::AMQPValue::LongUInt(2));
/// let properties = REQUEST_ID.sync_scope("r-4".parse::<RequestId>()?, || {
///     inject(&Publisher::new(), lapin::BasicProperties::default().with_headers(old))
/// });
/// let keys: Vec<&str> = properties.headers().as_ref().unwrap().inner().keys().map(|k| k.as_str()).collect();
/// assert_eq!(keys, ["attempt", "x-request-id"]);
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn inject(publisher: &Publisher, properties: BasicProperties) -> BasicProperties {
    let fields = publisher.replaced_fields();
    let mut headers = match properties.headers() {
        Some(headers) => FieldTable::from(
            headers
                .inner()
                .iter()
                .filter(|(key, _)| !fields.iter().any(|f| f.eq_ignore_ascii_case(key.as_str())))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
        None => FieldTable::default(),
    };
    publisher.inject(&mut HeaderInjector::new(&mut headers));
    properties.with_headers(headers)
}

/// Publishes `payload` with the current context in its headers (OpenTelemetry's global
/// propagator plus the request id); otherwise `Channel::basic_publish`.
///
/// # Errors
///
/// Those of `Channel::basic_publish`.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(channel: lapin::Channel) -> lapin::Result<()> {
/// use lapin::{options::BasicPublishOptions, BasicProperties};
/// contextflow_messaging::lapin::publish(&channel, "", "orders", BasicPublishOptions::default(), b"{}", BasicProperties::default())
///     .await?
///     .await?;
/// # Ok(()) }
/// ```
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    options: BasicPublishOptions,
    payload: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    let properties = inject(&Publisher::new(), properties);
    channel
        .basic_publish(exchange, routing_key, options, payload, properties)
        .await
}

// ===== consume =====

/// A [`Consumer`] for the RabbitMQ queue `queue` (`messaging.system = "rabbitmq"`).
///
/// Through [`context`] and [`scope`], each message's `process` span follows the RabbitMQ
/// conventions: `messaging.destination.name` is the exchange the message was published to
/// (empty for the default exchange), `messaging.rabbitmq.destination.routing_key` its
/// routing key (when not empty), `messaging.rabbitmq.message.delivery_tag` its delivery tag,
/// and `messaging.destination.subscription.name` the queue. The span is named after the
/// exchange, or after the queue for the default exchange.
///
/// ```
/// let consumer = contextflow_messaging::lapin::consumer("orders");
/// # drop(consumer);
/// ```
pub fn consumer(queue: &str) -> Consumer {
    Consumer::new().system(SYSTEM).destination(queue)
}

/// The context of `delivery`, made by `consumer` from its headers.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # fn run(delivery: lapin::message::Delivery) {
/// let message = contextflow_messaging::lapin::context(&contextflow_messaging::lapin::consumer("orders"), &delivery);
/// message.run(|| tracing::info!("in the producer's context"));
/// message.finish();
/// # }
/// ```
pub fn context(consumer: &Consumer, delivery: &Delivery) -> MessageContext {
    consumer.context_described(
        &HeaderExtractor::from_properties(&delivery.properties),
        described(consumer, delivery),
    )
}

/// The span attributes of `delivery`, as the RabbitMQ conventions name them.
fn described<'a>(consumer: &'a Consumer, delivery: &'a Delivery) -> SpanInfo<'a> {
    let mut extra = Vec::with_capacity(2);
    if !delivery.routing_key.as_str().is_empty() {
        extra.push(KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            delivery.routing_key.as_str().to_owned(),
        ));
    }
    extra.push(KeyValue::new(
        "messaging.rabbitmq.message.delivery_tag",
        i64::try_from(delivery.delivery_tag).unwrap_or(i64::MAX),
    ));
    let info = consumer.info();
    SpanInfo {
        system: info.system,
        destination: Some(delivery.exchange.as_str()),
        subscription: info.destination,
        extra,
    }
}

/// Runs `handler` for `delivery` in the context its headers carry; see [`Consumer::scope`].
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(delivery: lapin::message::Delivery) -> lapin::Result<()> {
/// use contextflow_messaging::lapin as amqp;
/// let consumer = amqp::consumer("orders");
/// amqp::scope(&consumer, &delivery, async {
///     // ... handle the message; logs carry the producer's request id
///     delivery.ack(lapin::options::BasicAckOptions::default()).await
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub fn scope<F: std::future::Future>(
    consumer: &Consumer,
    delivery: &Delivery,
    handler: F,
) -> Consumed<F> {
    context(consumer, delivery).scope(handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differing_in_case_are_all_returned() {
        let mut headers = FieldTable::default();
        for (name, value) in [("traceparent", "a"), ("TraceParent", "b"), ("other", "c")] {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        headers.insert(ShortString::from("TRACEPARENT"), AMQPValue::Boolean(true));
        let extractor = HeaderExtractor::new(Some(&headers));
        let mut all = extractor.get_all("traceparent").unwrap();
        all.sort_unstable();
        assert_eq!(all, ["", "a", "b"], "three values, one of them not text");
        assert_eq!(extractor.get_all("missing"), None);
    }
}
