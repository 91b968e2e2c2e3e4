//! MQTT 5 through [`rumqttc`]'s `v5` client: a PUBLISH packet's user properties as carriers, a
//! publish helper that writes the current context into them, and consume helpers that run a
//! message's handler in the context they carry.
//!
//! Propagation fields travel as MQTT 5 user properties (`traceparent`, `tracestate`,
//! `baggage`, `x-request-id`). User properties are a list of pairs that anyone who can publish
//! to the topic writes: [`UserProperties`] reads at most
//! [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) of them, names compared without regard
//! to ASCII case, and everything is then validated and bounded as for any carrier. MQTT 3.1.1
//! has no user properties: its messages are consumed with a fresh context.
//!
//! ```no_run
//! use contextflow_messaging::rumqttc as mqtt;
//! use futures_util::FutureExt as _;
//! use rumqttc::v5::{mqttbytes::{v5::Packet, QoS}, AsyncClient, Event, MqttOptions};
//! use std::{panic::AssertUnwindSafe, sync::{atomic::{AtomicU64, Ordering}, Arc}};
//!
//! # #[allow(dead_code)]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut options = MqttOptions::new("worker", "127.0.0.1", 1883);
//! // A QoS 1 message is acknowledged once its handler is done, not as it arrives (rumqttc's
//! // default), in a session the broker keeps across reconnections (not a clean start, and an
//! // expiry: MQTT 5's default of 0 ends the session with the connection): a message whose
//! // handler had not finished when the connection dropped is sent again.
//! options.set_manual_acks(true);
//! options.set_clean_start(false);
//! options.set_session_expiry_interval(Some(3600));
//! let (client, mut events) = AsyncClient::new(options, 64);
//! // Publish, inside a request: the request's context goes into the user properties.
//! mqtt::publish(&client, "orders/created", QoS::AtLeastOnce, false, "{}").await?;
//!
//! // Consume, in a task of its own started from an empty context: each message's handler runs
//! // in the context its user properties carry, and nothing of whoever started the loop.
//! let consumer = mqtt::consumer("orders/created");
//! // Which connection a message came on: a packet id is only valid on its connection, and the
//! // broker may give the id of a message still being handled to another message after a
//! // reconnection (it sends the first one again, with its id): an acknowledgement from the
//! // old connection's handler would then acknowledge the new message before it is handled.
//! let connection = Arc::new(AtomicU64::new(0));
//! let consuming = contextflow::spawn_without_context(async move {
//!     loop {
//!         match events.poll().await {
//!             Ok(Event::Incoming(Packet::ConnAck(ack))) => {
//!                 connection.fetch_add(1, Ordering::SeqCst);
//!                 // Connected without a session (the first time, or the broker lost it):
//!                 // subscribe (again); rumqttc does not. Without waiting: only this loop
//!                 // empties the client's request queue, which the handlers'
//!                 // acknowledgements may have filled.
//!                 if !ack.session_present {
//!                     if let Err(err) = client.try_subscribe("orders/created", QoS::AtLeastOnce) {
//!                         tracing::warn!(%err, "could not subscribe");
//!                     }
//!                 }
//!             }
//!             Ok(Event::Incoming(Packet::Publish(message))) => {
//!                 let context = mqtt::context(&consumer, &message);
//!                 let client = client.clone();
//!                 let (connection, received_on) =
//!                     (connection.clone(), connection.load(Ordering::SeqCst));
//!                 contextflow::spawn(context.scope(async move {
//!                     let handled = AssertUnwindSafe(async {
//!                         tracing::info!("order received"); // with the producer's request id
//!                     })
//!                     .catch_unwind()
//!                     .await;
//!                     // MQTT has no negative acknowledgement: a handler that panicked is
//!                     // acknowledged too (its message set aside with an error line), or its
//!                     // message would hold one of the broker's in-flight slots until the
//!                     // connection ends.
//!                     if handled.is_err() {
//!                         tracing::error!(pkid = message.pkid, "handler panicked; message dropped");
//!                     }
//!                     if connection.load(Ordering::SeqCst) != received_on {
//!                         // Received on an earlier connection: the broker sends it again on
//!                         // this one (handled twice: at least once), and that copy is acked.
//!                         tracing::debug!(pkid = message.pkid, "reconnected since: not acknowledged");
//!                     } else if let Err(err) = client.ack(&message).await {
//!                         tracing::warn!(%err, "could not acknowledge the message");
//!                     }
//!                 }));
//!             }
//!             Ok(_) => {}
//!             // rumqttc reconnects on the next poll: keep polling, after a pause. The
//!             // connection is gone: a handler that ends from now on does not acknowledge (its
//!             // acknowledgement would go out on the next connection).
//!             Err(err) => {
//!                 connection.fetch_add(1, Ordering::SeqCst);
//!                 tracing::warn!(%err, "MQTT connection lost");
//!                 tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//!             }
//!         }
//!     }
//! });
//! consuming.await?;
//! # Ok(())
//! # }
//! ```
//!
//! `rumqttc` is used without its default features: enable TLS or websockets in the application.

use opentelemetry::propagation::{Extractor, Injector};
use rumqttc::v5::{
    mqttbytes::{
        v5::{Publish, PublishProperties},
        QoS,
    },
    AsyncClient, ClientError,
};

use crate::{Consumed, Consumer, MessageContext, Publisher};

/// The `messaging.system` of MQTT consumer spans.
pub const SYSTEM: &str = "mqtt";

/// Reads propagation fields from MQTT 5 user properties (the first
/// [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) pairs; names compared without regard to
/// ASCII case; the first pair of a name wins for a single value).
///
/// ```
/// use contextflow_messaging::rumqttc::UserProperties;
/// use opentelemetry::propagation::Extractor as _;
///
/// let properties = vec![
///     ("X-Request-Id".to_owned(), "r-1".to_owned()),
///     ("baggage".to_owned(), "a=1".to_owned()),
///     ("baggage".to_owned(), "b=2".to_owned()),
/// ];
/// let extractor = UserProperties::new(&properties);
/// assert_eq!(extractor.get("x-request-id"), Some("r-1"));
/// assert_eq!(extractor.get_all("baggage"), Some(vec!["a=1", "b=2"]));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct UserProperties<'a> {
    pairs: &'a [(String, String)],
}

/// Writes propagation fields into MQTT 5 user properties, replacing earlier pairs of the same
/// name.
///
/// ```
/// use contextflow_messaging::rumqttc::UserPropertiesInjector;
/// use opentelemetry::propagation::Injector as _;
///
/// let mut properties = vec![("x-request-id".to_owned(), "old".to_owned())];
/// UserPropertiesInjector::new(&mut properties).set("x-request-id", "r-2".to_owned());
/// assert_eq!(properties, [("x-request-id".to_owned(), "r-2".to_owned())]);
/// ```
#[derive(Debug)]
pub struct UserPropertiesInjector<'a> {
    pairs: &'a mut Vec<(String, String)>,
}

// ===== impl UserProperties =====

impl<'a> UserProperties<'a> {
    /// Reads `pairs` (`PublishProperties::user_properties`), at most
    /// [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) of them.
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let many = vec![("k".to_owned(), "v".to_owned()); 1000];
    /// let extractor = contextflow_messaging::rumqttc::UserProperties::new(&many);
    /// assert_eq!(extractor.keys().len(), contextflow_otel::carrier::MAX_PAIRS);
    /// ```
    pub fn new(pairs: &'a [(String, String)]) -> Self {
        let bounded = pairs.len().min(contextflow_otel::carrier::MAX_PAIRS);
        if bounded < pairs.len() {
            tracing::debug!(
                pairs = pairs.len(),
                "MQTT user properties beyond the first {bounded} ignored"
            );
        }
        UserProperties {
            pairs: &pairs[..bounded],
        }
    }

    /// Reads the user properties of `message` (none when it has no properties).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// use rumqttc::v5::mqttbytes::{v5::Publish, QoS};
    /// let message = Publish::new("orders", QoS::AtLeastOnce, "{}", None);
    /// let extractor = contextflow_messaging::rumqttc::UserProperties::from_message(&message);
    /// assert_eq!(extractor.get("traceparent"), None);
    /// ```
    pub fn from_message(message: &'a Publish) -> Self {
        match &message.properties {
            Some(properties) => UserProperties::new(&properties.user_properties),
            None => UserProperties::new(&[]),
        }
    }

    fn values<'k>(&self, key: &'k str) -> impl Iterator<Item = &'a str> + 'k
    where
        'a: 'k,
    {
        self.pairs
            .iter()
            .filter(move |(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }
}

impl Extractor for UserProperties<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.values(key).next()
    }

    fn keys(&self) -> Vec<&str> {
        self.pairs.iter().map(|(name, _)| name.as_str()).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self.values(key).collect();
        (!all.is_empty()).then_some(all)
    }
}

// ===== impl UserPropertiesInjector =====

impl<'a> UserPropertiesInjector<'a> {
    /// Writes into `pairs`.
    ///
    /// ```
    /// let mut pairs = Vec::new();
    /// let injector = contextflow_messaging::rumqttc::UserPropertiesInjector::new(&mut pairs);
    /// # drop(injector);
    /// ```
    pub fn new(pairs: &'a mut Vec<(String, String)>) -> Self {
        UserPropertiesInjector { pairs }
    }
}

impl Injector for UserPropertiesInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.pairs
            .retain(|(name, _)| !name.eq_ignore_ascii_case(key));
        self.pairs.push((key.to_owned(), value));
    }
}

// ===== publish =====

/// `properties` with the current context written into their user properties by `publisher`
/// (other properties kept, after them). Propagation properties already there (a message
/// republished), in any spelling, are dropped first: an old `baggage` would otherwise stay
/// where the current context has none. The propagation properties go first, so that a reader
/// that reads only the first [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) finds them
/// however many the application adds.
///
/// ```
/// use contextflow_messaging::{rumqttc::inject, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let properties = REQUEST_ID.sync_scope("r-3".parse::<RequestId>()?, || {
///     inject(&Publisher::new(), Default::default())
/// });
/// assert_eq!(properties.user_properties, [("x-request-id".to_owned(), "r-3".to_owned())]);
///
/// // Republished: the first send's propagation properties go, whatever their spelling.
/// let mut old = rumqttc::v5::mqttbytes::v5::PublishProperties::default();
/// old.user_properties = vec![
///     ("attempt".to_owned(), "2".to_owned()),
///     ("Baggage".to_owned(), "user=al".to_owned()),
///     ("X-Request-ID".to_owned(), "r-1".to_owned()),
/// ];
/// let properties = REQUEST_ID.sync_scope("r-4".parse::<RequestId>()?, || inject(&Publisher::new(), old));
/// assert_eq!(
///     properties.user_properties,
///     [("x-request-id".to_owned(), "r-4".to_owned()), ("attempt".to_owned(), "2".to_owned())]
/// );
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn inject(publisher: &Publisher, mut properties: PublishProperties) -> PublishProperties {
    let fields = publisher.replaced_fields();
    let mut pairs = Vec::with_capacity(properties.user_properties.len() + fields.len());
    publisher.inject(&mut UserPropertiesInjector::new(&mut pairs));
    pairs.extend(
        std::mem::take(&mut properties.user_properties)
            .into_iter()
            .filter(|(name, _)| !fields.iter().any(|f| f.eq_ignore_ascii_case(name))),
    );
    properties.user_properties = pairs;
    properties
}

/// Publishes `payload` to `topic` with the current context in its user properties
/// (OpenTelemetry's global propagator plus the request id); otherwise
/// `AsyncClient::publish_with_properties`.
///
/// # Errors
///
/// Those of `AsyncClient::publish_with_properties`.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(client: rumqttc::v5::AsyncClient) -> Result<(), rumqttc::v5::ClientError> {
/// use rumqttc::v5::mqttbytes::QoS;
/// contextflow_messaging::rumqttc::publish(&client, "orders/created", QoS::AtLeastOnce, false, "{}").await?;
/// # Ok(()) }
/// ```
pub async fn publish(
    client: &AsyncClient,
    topic: impl Into<String>,
    qos: QoS,
    retain: bool,
    payload: impl Into<bytes::Bytes>,
) -> Result<(), ClientError> {
    let properties = inject(&Publisher::new(), PublishProperties::default());
    client
        .publish_with_properties(topic.into(), qos, retain, payload, properties)
        .await
}

// ===== consume =====

/// A [`Consumer`] for the MQTT topic (or topic filter) `topic` (`messaging.system = "mqtt"`).
///
/// ```
/// let consumer = contextflow_messaging::rumqttc::consumer("orders/created");
/// # drop(consumer);
/// ```
pub fn consumer(topic: &str) -> Consumer {
    Consumer::new().system(SYSTEM).destination(topic)
}

/// The context of `message`, made by `consumer` from its user properties.
///
/// ```
/// use contextflow_messaging::rumqttc::{consumer, context};
/// use rumqttc::v5::mqttbytes::{v5::{Publish, PublishProperties}, QoS};
///
/// let properties = PublishProperties {
///     user_properties: vec![("x-request-id".to_owned(), "r-4".to_owned())],
///     ..Default::default()
/// };
/// let message = Publish::new("orders", QoS::AtLeastOnce, "{}", Some(properties));
/// let cx = context(&consumer("orders"), &message);
/// assert_eq!(cx.request_id().as_str(), "r-4");
/// cx.finish();
/// ```
pub fn context(consumer: &Consumer, message: &Publish) -> MessageContext {
    consumer.context(&UserProperties::from_message(message))
}

/// Runs `handler` for `message` in the context its user properties carry; see
/// [`Consumer::scope`].
///
/// ```
/// use contextflow_messaging::rumqttc::{consumer, scope};
/// use rumqttc::v5::mqttbytes::{v5::Publish, QoS};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let message = Publish::new("orders", QoS::AtLeastOnce, "{}", None);
/// let id = scope(&consumer("orders"), &message, async { contextflow_otel::current_request_id() }).await;
/// assert_eq!(id.unwrap().as_str().len(), 36, "no properties: a fresh request id");
/// # }
/// ```
pub fn scope<F: std::future::Future>(
    consumer: &Consumer,
    message: &Publish,
    handler: F,
) -> Consumed<F> {
    consumer.scope(&UserProperties::from_message(message), handler)
}
