//! An in-process message queue: what crosses a queue is what a propagator writes, nothing else.
//!
//! [`Queue::publish`] writes the current context into the message's headers with
//! `contextflow_http::inject_headers` (`traceparent` with a fresh span id, `x-request-id`,
//! `baggage`), exactly as for an HTTP call. The consumer task, started at start-up with an
//! empty context (it belongs to no request), runs each message's handler inside
//! `contextflow_http::extract_headers(..)`: its log lines carry the publishing
//! request's id and trace id. The tenant does *not* cross: message metadata is input, and
//! input never sets the tenant; the handler reads the order's tenant from the payload as data.
//!
//! With an OpenTelemetry SDK installed (the global provider), publishing is a `producer` span
//! whose context the headers carry, and handling a message is a `process` consumer span: a
//! child of the producer's span that also links to it, as the OpenTelemetry messaging
//! conventions describe for a consumer that handles one message at a time.
//!
//! The in-process channel is the zero-setup default. [`Queue::open`] with an `amqp://` URL
//! puts the queue on RabbitMQ instead (`amqp` module), with a `nats://` URL on NATS (`nats`
//! module), with a `redis://` URL on a Redis stream read by a consumer group (`redis`
//! module): the same propagation fields travel as AMQP or NATS message headers or as fields of
//! the stream entry (`contextflow_messaging`'s `lapin`, `async_nats` and `redis` carriers), and
//! the audit consumer reads the broker in a task of its own; the two calls and the handler stay
//! the same.

mod amqp;
mod nats;
mod redis;

use std::{collections::HashMap, sync::Arc};

use axum::http::HeaderMap;
use futures_util::StreamExt as _;
use opentelemetry::{
    trace::{Link, SpanKind, TraceContextExt as _, Tracer as _},
    Context, KeyValue,
};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn, Instrument as _};

/// The topic the confirmation job publishes to.
pub const ORDER_CONFIRMED: &str = "order.confirmed";
/// How long one publish may take before it counts as failed (the row is delivered later).
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A message: an id, a topic, propagation headers and a JSON payload.
#[derive(Debug)]
pub struct Message {
    /// Unique per event (the outbox row's id): a message delivered twice is handled once.
    pub id: i64,
    /// Where it goes.
    pub topic: &'static str,
    /// What the propagator wrote: trace context, request id, baggage.
    pub headers: HeaderMap,
    /// The event itself.
    pub payload: serde_json::Value,
}

/// The payload of [`ORDER_CONFIRMED`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: i64,
    /// Its client reference.
    pub reference: String,
    /// Its tenant (data here, not context).
    pub tenant: String,
}

/// The publishing side of the queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct Queue {
    transport: Transport,
    pending: Arc<Pending>,
}

/// Where messages go.
#[derive(Clone, Debug)]
enum Transport {
    InProcess(mpsc::Sender<Message>),
    Amqp(Arc<amqp::Amqp>),
    Nats(Arc<nats::Nats>),
    Redis(Arc<redis::Redis>),
}

/// Which queue the service uses: the in-process channel or a broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum QueueUrl {
    /// An in-process channel (the default: nothing to set up).
    #[default]
    InProcess,
    /// RabbitMQ, `amqp://...` or `amqps://...`.
    Amqp(String),
    /// NATS, `nats://...`.
    Nats(String),
    /// Redis Streams, `redis://...` (a stream read by a consumer group).
    Redis(String),
}

impl QueueUrl {
    /// `memory` (or nothing) for the in-process channel, else a broker URL.
    ///
    /// # Errors
    /// A URL scheme this service does not speak.
    pub fn parse(url: &str) -> Result<QueueUrl, String> {
        let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
        match scheme.to_ascii_lowercase().as_str() {
            "" | "memory" => Ok(QueueUrl::InProcess),
            "amqp" | "amqps" => Ok(QueueUrl::Amqp(url.to_owned())),
            "nats" => Ok(QueueUrl::Nats(url.to_owned())),
            "redis" => Ok(QueueUrl::Redis(url.to_owned())),
            _ => Err(format!(
                "--queue: unknown scheme {scheme:?} (amqp://, nats://, redis:// or memory)"
            )),
        }
    }

    /// The broker's `messaging.system` name (`in-process`, `rabbitmq`, `nats`, `redis`).
    pub fn system(&self) -> &'static str {
        match self {
            QueueUrl::InProcess => "in-process",
            QueueUrl::Amqp(_) => "rabbitmq",
            QueueUrl::Nats(_) => "nats",
            QueueUrl::Redis(_) => "redis",
        }
    }

    /// What the queue runs on, for people (`in-process`, `RabbitMQ`, `NATS`, `Redis Streams`).
    pub fn name(&self) -> &'static str {
        match self {
            QueueUrl::InProcess => "in-process",
            QueueUrl::Amqp(_) => "RabbitMQ",
            QueueUrl::Nats(_) => "NATS",
            QueueUrl::Redis(_) => "Redis Streams",
        }
    }
}

/// Published messages not yet handled, by id (with how many copies are in flight), in a
/// `watch` channel so no wake-up can be missed. Keyed by id, not counted: a message this
/// process did not publish (another publisher's, or a broker's redelivery of one already
/// handled) can never make it look idle while one of ours is still in flight.
#[derive(Debug)]
struct Pending(watch::Sender<HashMap<i64, usize>>);

impl Default for Pending {
    fn default() -> Self {
        Pending(watch::channel(HashMap::new()).0)
    }
}

impl Pending {
    fn published(&self, id: i64) {
        self.0.send_modify(|ids| *ids.entry(id).or_insert(0) += 1);
    }

    /// One copy of `id` never left (its publish failed).
    fn not_sent(&self, id: i64) {
        self.0.send_modify(|ids| {
            if let Some(copies) = ids.get_mut(&id) {
                *copies -= 1;
                if *copies == 0 {
                    ids.remove(&id);
                }
            }
        });
    }

    /// A copy of `id` was handled (the first one had its effect; the consumer drops the
    /// others). One copy off: another copy still in flight keeps the queue busy, so it is
    /// consumed here rather than redelivered to the next process. An id not in flight (a
    /// foreign message, a broker's redelivery) changes nothing.
    fn handled(&self, id: i64) {
        self.0.send_if_modified(|ids| match ids.get_mut(&id) {
            Some(copies) => {
                *copies -= 1;
                if *copies == 0 {
                    ids.remove(&id);
                }
                true
            }
            None => false,
        });
    }
}

impl Queue {
    /// A queue of `capacity` messages and its consumer task, which logs every
    /// [`ORDER_CONFIRMED`] event (an audit trail) in the publisher's propagated context.
    pub fn start(capacity: usize) -> (Queue, JoinHandle<()>) {
        let (sender, mut receiver) = mpsc::channel::<Message>(capacity);
        let pending = Arc::new(Pending::default());
        let mut audit = Audit::new(pending.clone());
        // The consumer serves every request and none: it starts from an empty context and
        // takes each message's context from its headers.
        let consumer = contextflow::spawn_without_context(async move {
            while let Some(message) = receiver.recv().await {
                let incoming = contextflow_http::extract_headers(&message.headers);
                audit.handle(message, incoming).await;
            }
        });
        let transport = Transport::InProcess(sender);
        (Queue { transport, pending }, consumer)
    }

    /// The queue `url` names: [`Queue::start`] for the in-process channel, or a connection to
    /// the broker, its queue `name` declared, and the audit consumer of that queue started in
    /// a task of its own (with an empty context, like the in-process one).
    ///
    /// # Errors
    /// When the broker cannot be reached or the queue declared.
    pub async fn open(
        url: &QueueUrl,
        name: &str,
        capacity: usize,
    ) -> Result<(Queue, JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
        let amqp = match url {
            QueueUrl::InProcess => return Ok(Queue::start(capacity)),
            QueueUrl::Amqp(url) => amqp::Amqp::connect(url, name).await?,
            QueueUrl::Nats(url) => return Queue::open_nats(url, name).await,
            QueueUrl::Redis(url) => return Queue::open_redis(url, name).await,
        };
        let pending = Arc::new(Pending::default());
        let mut audit = Audit::new(pending.clone());
        let amqp = Arc::new(amqp);
        let first = amqp.deliveries("order-service-audit").await?;
        let consuming = amqp.clone();
        let consumer = contextflow::spawn_without_context(async move {
            let mut stream = first;
            loop {
                consume_amqp(&mut stream, &mut audit).await;
                // The stream ended: the connection or channel closed (a broker restart, a
                // broken link). The queue outlives it for a while, with the messages the
                // broker confirmed: connect again and go on.
                warn!("RabbitMQ consumer stopped: its connection closed; connecting again");
                let mut failures = 0u32;
                stream = loop {
                    // After a pause that grows while the broker stays away.
                    tokio::time::sleep(std::time::Duration::from_millis(100 << failures.min(6)))
                        .await;
                    match consuming.deliveries("order-service-audit").await {
                        Ok(stream) => break stream,
                        Err(err) => {
                            failures += 1;
                            warn!(error = %err, failures, "RabbitMQ consumer could not connect");
                        }
                    }
                };
                info!("RabbitMQ consumer connected again");
            }
        });
        let transport = Transport::Amqp(amqp);
        Ok((Queue { transport, pending }, consumer))
    }

    async fn open_nats(
        url: &str,
        subject: &str,
    ) -> Result<(Queue, JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
        let nats = nats::Nats::connect(url, subject).await?;
        let pending = Arc::new(Pending::default());
        let mut audit = Audit::new(pending.clone());
        let mut messages = nats.messages().await?;
        let consumer = contextflow::spawn_without_context(async move {
            while let Some((envelope, incoming)) = messages.next().await {
                match envelope {
                    Some(envelope) => {
                        let message = Message {
                            id: envelope.id,
                            topic: known_topic(&envelope.topic),
                            headers: HeaderMap::new(),
                            payload: envelope.payload,
                        };
                        audit.handle(message, incoming).await;
                    }
                    None => contextflow_otel::sync_scope(incoming, || {
                        warn!("malformed message on the queue; dropped")
                    }),
                }
            }
        });
        let transport = Transport::Nats(Arc::new(nats));
        Ok((Queue { transport, pending }, consumer))
    }

    async fn open_redis(
        url: &str,
        stream: &str,
    ) -> Result<(Queue, JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
        let redis = redis::Redis::connect(url, stream).await?;
        let pending = Arc::new(Pending::default());
        let mut audit = Audit::new(pending.clone());
        let mut jobs = redis.jobs("audit-1").await?;
        let consumer = contextflow::spawn_without_context(async move {
            loop {
                let job = jobs.next().await;
                match job.envelope {
                    Some(envelope) => {
                        let message = Message {
                            id: envelope.id,
                            topic: known_topic(&envelope.topic),
                            headers: HeaderMap::new(),
                            payload: envelope.payload,
                        };
                        audit.handle(message, job.incoming).await;
                    }
                    None => contextflow_otel::sync_scope(job.incoming, || {
                        warn!("malformed message on the queue; dropped")
                    }),
                }
                jobs.done(&job.id).await;
            }
        });
        let transport = Transport::Redis(Arc::new(redis));
        Ok((Queue { transport, pending }, consumer))
    }

    /// Publishes `payload` on `topic` as message `id`, with the current context in the
    /// headers. Waits while the queue is full; returns whether the message was queued.
    pub async fn publish<T: Serialize>(&self, topic: &'static str, id: i64, payload: &T) -> bool {
        let span = tracing::info_span!("queue.publish", topic);
        let cx = producer_span(topic);
        let published = async {
            let mut headers = HeaderMap::new();
            contextflow_http::inject_headers(&mut headers);
            let payload = match serde_json::to_value(payload) {
                Ok(payload) => payload,
                Err(err) => {
                    warn!(error = %err, "message not serializable; dropped");
                    return false;
                }
            };
            self.pending.published(id);
            // Bounded: a broker that blocks publishers (a memory alarm, a reconnection) must
            // not hold the outbox worker, its transaction and the claimed rows' locks.
            let send = async {
                match &self.transport {
                    Transport::InProcess(sender) => {
                        let message = Message {
                            id,
                            topic,
                            headers,
                            payload,
                        };
                        sender.send(message).await.is_ok()
                    }
                    Transport::Amqp(amqp) => match amqp.publish(id, topic, payload).await {
                        Ok(()) => true,
                        Err(err) => {
                            warn!(error = %err, "AMQP publish failed");
                            false
                        }
                    },
                    Transport::Nats(nats) => match nats.publish(id, topic, payload).await {
                        Ok(()) => true,
                        Err(err) => {
                            warn!(error = %err, "NATS publish failed");
                            false
                        }
                    },
                    Transport::Redis(redis) => match redis.publish(id, topic, payload).await {
                        Ok(()) => true,
                        Err(err) => {
                            warn!(error = %err, "Redis XADD failed");
                            false
                        }
                    },
                }
            };
            let sent = match tokio::time::timeout(PUBLISH_TIMEOUT, send).await {
                Ok(sent) => sent,
                Err(_) => {
                    warn!(
                        timeout_ms = PUBLISH_TIMEOUT.as_millis() as u64,
                        "publish timed out"
                    );
                    false
                }
            };
            if sent {
                debug!("message published");
            } else {
                self.pending.not_sent(id);
                warn!("queue closed; message dropped");
            }
            sent
        }
        .instrument(span);
        let published = contextflow_otel::scope(cx.clone(), published).await;
        cx.span().end();
        published
    }

    /// How many published messages are not yet handled.
    pub fn pending(&self) -> usize {
        self.pending.0.borrow().len()
    }

    /// Waits until every published message has been handled.
    pub async fn wait_idle(&self) {
        let mut ids = self.pending.0.subscribe();
        // The sender lives in `self.pending`: `wait_for` cannot fail while we hold it.
        let _ = ids.wait_for(HashMap::is_empty).await;
    }
}

/// How many handled ids the audit consumer remembers to drop duplicates (oldest forgotten
/// first): a bound, so that a publisher of made-up ids cannot grow it without end.
const SEEN_CAPACITY: usize = 100_000;

/// The audit consumer's state: what it has handled, and the pending ids it clears.
struct Audit {
    // Delivery is at least once (the outbox republishes what it could not mark delivered; a
    // broker redelivers what was not acknowledged); the consumer makes the effect exactly once
    // for the last `SEEN_CAPACITY` ids. The queue is internal (trusted publishers): a message's
    // id is not authenticated.
    seen: std::collections::HashSet<i64>,
    order: std::collections::VecDeque<i64>,
    pending: Arc<Pending>,
}

impl Audit {
    fn new(pending: Arc<Pending>) -> Audit {
        Audit {
            seen: std::collections::HashSet::new(),
            order: std::collections::VecDeque::new(),
            pending,
        }
    }

    /// Handles `message` in `incoming`, the context its headers carried.
    async fn handle(&mut self, message: Message, incoming: Context) {
        let id = message.id;
        if self.seen.insert(id) {
            self.order.push_back(id);
            if self.order.len() > SEEN_CAPACITY {
                if let Some(oldest) = self.order.pop_front() {
                    self.seen.remove(&oldest);
                }
            }
            let cx = consumer_span(message.topic, incoming);
            let span = tracing::info_span!("queue.consume", topic = message.topic);
            contextflow_otel::scope(cx.clone(), consume(message).instrument(span)).await;
            cx.span().end();
        }
        self.pending.handled(id);
    }
}

/// The static name of a topic read from a broker (`unknown` for one this service never
/// publishes).
fn known_topic(topic: &str) -> &'static str {
    match topic {
        ORDER_CONFIRMED => ORDER_CONFIRMED,
        _ => "unknown",
    }
}

/// The instrumentation scope of the queue's spans.
const SCOPE: &str = "order-service.queue";

/// The current context with a `producer` span for `topic` (the global provider's; with no SDK
/// installed, the current span passes through unchanged).
fn producer_span(topic: &'static str) -> Context {
    let parent = contextflow_otel::current_context();
    let tracer = opentelemetry::global::tracer(SCOPE);
    let span = tracer
        .span_builder(format!("send {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes(topic, "send"))
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Handles the deliveries of `stream` until it ends, acknowledging each once handled.
async fn consume_amqp(
    stream: &mut (impl futures_util::Stream<Item = amqp::Received> + Unpin),
    audit: &mut Audit,
) {
    while let Some(received) = stream.next().await {
        match &received.envelope {
            Some(envelope) => {
                let message = Message {
                    id: envelope.id,
                    topic: known_topic(&envelope.topic),
                    headers: HeaderMap::new(),
                    payload: envelope.payload.clone(),
                };
                audit.handle(message, received.incoming.clone()).await;
            }
            None => {
                // Not ours to count: a body that is not an envelope never was published here.
                contextflow_otel::sync_scope(received.incoming.clone(), || {
                    warn!("malformed message on the queue; dropped")
                });
            }
        }
        received.ack().await;
    }
}

/// `incoming` (the message's extracted context) with a `process` consumer span for `topic`:
/// a child of the producer's span, with a link to it.
fn consumer_span(topic: &'static str, incoming: Context) -> Context {
    let producer = incoming.span().span_context().clone();
    let tracer = opentelemetry::global::tracer(SCOPE);
    let mut builder = tracer
        .span_builder(format!("process {topic}"))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes(topic, "process"));
    if producer.is_valid() {
        builder = builder.with_links(vec![Link::with_context(producer)]);
    }
    let span = builder.start_with_context(&tracer, &incoming);
    incoming.with_span(span)
}

fn attributes(topic: &'static str, operation: &'static str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", "order-service.queue"),
        KeyValue::new("messaging.operation.type", operation),
        KeyValue::new("messaging.destination.name", topic),
    ]
}

async fn consume(message: Message) {
    match message.topic {
        ORDER_CONFIRMED => match serde_json::from_value::<OrderConfirmed>(message.payload) {
            Ok(event) => info!(
                order_id = event.order_id,
                reference = %event.reference,
                order_tenant = %event.tenant,
                "audit: order confirmed"
            ),
            Err(err) => warn!(error = %err, "malformed order.confirmed event"),
        },
        other => warn!(topic = other, "message on an unknown topic"),
    }
}

/// A TCP proxy in front of a broker whose connections the tests break.
#[cfg(test)]
mod test_proxy {
    use std::{
        net::SocketAddr,
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        sync::watch,
    };

    /// Forwards each connection to the server; see its methods for the breaks.
    pub(super) struct Proxy {
        pub(super) addr: SocketAddr,
        swallow: Arc<AtomicBool>,
        refuse: Arc<AtomicBool>,
        drop_all: watch::Sender<u64>,
    }

    impl Proxy {
        /// A proxy on 127.0.0.1 in front of `server` (`host:port`).
        pub(super) async fn start(server: String) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let swallow = Arc::new(AtomicBool::new(false));
            let refuse = Arc::new(AtomicBool::new(false));
            let (drop_all, _) = watch::channel(0);
            let (swallowing, refusing, dropping) =
                (swallow.clone(), refuse.clone(), drop_all.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let Ok(upstream) = TcpStream::connect(&server).await else {
                        continue;
                    };
                    let swallow = swallowing.clone();
                    let mut dropped = dropping.subscribe();
                    tokio::spawn(async move {
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = upstream.into_split();
                        let down = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        });
                        let mut buf = vec![0; 64 * 1024];
                        loop {
                            let n = tokio::select! {
                                read = client_read.read(&mut buf) => match read {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                },
                                _ = dropped.changed() => break,
                            };
                            if swallow.swap(false, Ordering::SeqCst) {
                                break;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        down.abort();
                    });
                }
            });
            Proxy {
                addr,
                swallow,
                refuse,
                drop_all,
            }
        }

        /// Closes new connections at once while `refuse` is set (the broker away).
        pub(super) fn refuse_new(&self, refuse: bool) {
            self.refuse.store(refuse, Ordering::SeqCst);
        }

        /// The next bytes a client sends are swallowed, and that connection closed (as a
        /// broken link between the client's write and the server's read would).
        pub(super) fn swallow_next_write(&self) {
            self.swallow.store(true, Ordering::SeqCst);
        }

        /// Closes every open connection (as a broker restart would); new ones go through.
        pub(super) fn drop_all(&self) {
            self.drop_all.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::logging::{context_fields, EventCapture};

    /// Runs `f` on a current-thread runtime with a capture as the thread's subscriber (the
    /// consumer task runs on the same thread, so it logs into the capture too).
    fn captured<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) -> EventCapture {
        let capture = EventCapture::new(context_fields());
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let _default = tracing::subscriber::set_default(subscriber);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
        capture
    }

    fn messages(capture: &EventCapture) -> Vec<String> {
        capture.events().iter().map(|e| e.summary()).collect()
    }

    /// A message this process did not publish, or a redelivery of one already handled,
    /// never makes the queue look idle while one of ours is in flight, and a failed publish
    /// never counts below zero.
    #[test]
    fn pending_is_kept_by_id() {
        let pending = Pending::default();
        let idle = |p: &Pending| p.0.borrow().is_empty();
        pending.published(1);
        pending.handled(99); // foreign
        pending.handled(99);
        assert!(!idle(&pending), "ours still in flight");
        pending.not_sent(2); // a failed publish of an id never counted
        pending.published(1); // republished before being handled
        pending.not_sent(1); // that copy failed
        assert!(!idle(&pending), "the first copy is still in flight");
        pending.handled(1);
        assert!(idle(&pending));
        pending.handled(1); // a redelivery
        assert!(idle(&pending));
        // Two copies in flight (a batch republished after its transaction failed): the
        // queue is idle only once both were consumed.
        pending.published(5);
        pending.published(5);
        pending.handled(5);
        assert!(!idle(&pending), "the second copy is still in flight");
        pending.handled(5);
        assert!(idle(&pending));
    }

    #[test]
    fn queue_urls_name_their_broker() {
        for (url, system, name) in [
            ("memory", "in-process", "in-process"),
            ("", "in-process", "in-process"),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "rabbitmq",
                "RabbitMQ",
            ),
            ("AMQPS://broker", "rabbitmq", "RabbitMQ"),
            ("nats://127.0.0.1:4222", "nats", "NATS"),
            ("redis://127.0.0.1:6379", "redis", "Redis Streams"),
            ("Redis://127.0.0.1:6379/2", "redis", "Redis Streams"),
        ] {
            let parsed = QueueUrl::parse(url).unwrap();
            assert_eq!((parsed.system(), parsed.name()), (system, name), "{url}");
        }
        assert_eq!(
            QueueUrl::parse("redis://h:1").unwrap(),
            QueueUrl::Redis("redis://h:1".to_owned())
        );
        for bad in ["kafka://127.0.0.1:9092", "rediss://h", "http://x"] {
            let err = QueueUrl::parse(bad).unwrap_err();
            assert!(err.contains("unknown scheme"), "{bad}: {err}");
            assert!(err.contains("redis://"), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_and_unknown_messages_are_logged_and_skipped() {
        let capture = captured(|| async {
            let (queue, consumer) = Queue::start(4);
            queue
                .publish(
                    ORDER_CONFIRMED,
                    1,
                    &serde_json::json!({"order_id": "not a number"}),
                )
                .await;
            queue
                .publish("order.unknown", 2, &serde_json::json!({}))
                .await;
            let event = OrderConfirmed {
                order_id: 7,
                reference: "r-7".into(),
                tenant: "acme".into(),
            };
            assert!(queue.publish(ORDER_CONFIRMED, 3, &event).await);
            // The same message again: handled once.
            assert!(queue.publish(ORDER_CONFIRMED, 3, &event).await);
            queue.wait_idle().await;
            assert_eq!(queue.pending(), 0);
            consumer.abort();
        });
        let lines = messages(&capture);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("malformed order.confirmed event")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("message on an unknown topic topic=order.unknown")),
            "{lines:#?}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("audit: order confirmed order_id=7"))
                .count(),
            1,
            "message 3, published twice, is handled once: {lines:#?}"
        );
    }

    /// On Redis Streams: 50 events, each published from a request of its own, all consumed by
    /// the audit consumer (a task with an empty context) under their request's id and trace; an
    /// entry someone else wrote that is not an envelope is logged, acknowledged and skipped.
    #[test]
    #[cfg_attr(
        not(cf_service_redis),
        ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
    )]
    fn on_redis_streams_each_event_is_consumed_under_its_request() {
        let url = contextflow_testenv::url(contextflow_testenv::Service::Redis);
        let stream = format!("order-service.test.{}", uuid::Uuid::new_v4().simple());
        let key = stream.clone();
        let traces: Vec<String> = (0..50)
            .map(|i| format!("4bf92f3577b34da6a3ce929d0e0e{i:04x}"))
            .collect();
        let sent = traces.clone();
        let capture = captured(|| async move {
            let (queue, consumer) = Queue::open(&QueueUrl::parse(&url).unwrap(), &key, 16)
                .await
                .unwrap();
            let client = ::redis::Client::open(url.as_str()).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let _: String = ::redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("envelope")
                .arg("not an envelope")
                .query_async(&mut con)
                .await
                .unwrap();
            let mut publishers = tokio::task::JoinSet::new();
            for (i, trace) in sent.into_iter().enumerate() {
                let queue = queue.clone();
                let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
                let request = contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new([
                    ("traceparent", traceparent.as_str()),
                    ("x-request-id", &format!("req-{i}")),
                ]));
                publishers.spawn(contextflow_otel::scope(request, async move {
                    let event = OrderConfirmed {
                        order_id: i as i64,
                        reference: format!("r-{i}"),
                        tenant: "acme".into(),
                    };
                    assert!(queue.publish(ORDER_CONFIRMED, i as i64, &event).await);
                }));
            }
            while let Some(done) = publishers.join_next().await {
                done.unwrap();
            }
            queue.wait_idle().await;
            consumer.abort();
            // Every handled entry was acknowledged and deleted.
            let pending: ::redis::streams::StreamPendingReply =
                ::redis::AsyncCommands::xpending(&mut con, &key, "order-service-audit")
                    .await
                    .unwrap();
            assert_eq!(pending.count(), 0);
            let left: usize = ::redis::AsyncCommands::xlen(&mut con, &key).await.unwrap();
            assert_eq!(left, 0);
            let _: usize = ::redis::AsyncCommands::del(&mut con, &key).await.unwrap();
        });
        let events = capture.events();
        let audits: Vec<_> = events
            .iter()
            .filter(|e| e.message == "audit: order confirmed")
            .collect();
        assert_eq!(audits.len(), 50);
        for event in audits {
            let order = event
                .fields
                .iter()
                .find(|(name, _)| name == "order_id")
                .map(|(_, v)| v.parse::<usize>().unwrap())
                .unwrap();
            assert_eq!(
                event.context.request_id.as_deref(),
                Some(format!("req-{order}").as_str())
            );
            assert_eq!(
                event.context.trace_id.as_deref(),
                Some(traces[order].as_str())
            );
        }
        assert!(
            events
                .iter()
                .any(|e| e.message == "malformed message on the queue; dropped"),
            "{:#?}",
            messages(&capture)
        );
    }

    #[test]
    fn unserializable_payload_and_closed_queue_drop_the_message() {
        struct Unserializable;
        impl Serialize for Unserializable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let capture = captured(|| async {
            let (queue, consumer) = Queue::start(4);
            assert!(!queue.publish(ORDER_CONFIRMED, 1, &Unserializable).await);
            assert_eq!(queue.pending(), 0, "nothing was queued");
            consumer.abort();
            // The consumer is gone: the receiver is dropped with it.
            let _ = consumer.await;
            assert!(
                !queue
                    .publish(ORDER_CONFIRMED, 2, &serde_json::json!({}))
                    .await
            );
            assert_eq!(queue.pending(), 0, "a dropped message is not pending");
            queue.wait_idle().await;
        });
        let lines = messages(&capture);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("message not serializable; dropped")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("queue closed; message dropped")),
            "{lines:#?}"
        );
    }
}
