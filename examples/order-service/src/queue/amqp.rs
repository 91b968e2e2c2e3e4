//! The queue on RabbitMQ (`--queue amqp://...`): a message is a JSON envelope, its
//! propagation fields AMQP headers written with `contextflow_messaging::lapin`'s carrier.
//!
//! Two connections: publishes go out on one (made again when it closes: a broker restart, a
//! broken link); the audit consumer reads the service's queue on the other, in a task of its
//! own, acknowledges each delivery once it is handled, and connects again when its stream
//! ends. The queue outlives its consumer for [`QUEUE_EXPIRES_MS`] (not auto-delete), so the
//! messages the broker confirmed wait there while the consumer reconnects.

use futures_util::StreamExt as _;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    publisher_confirm::Confirmation,
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use serde::{Deserialize, Serialize};

use contextflow_messaging::lapin::{HeaderExtractor, HeaderInjector};

/// The body of a message on the broker.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Envelope {
    pub(super) id: i64,
    pub(super) topic: String,
    pub(super) payload: serde_json::Value,
}

/// How long the service's queue lives unused (no consumer, no declaration) before RabbitMQ
/// deletes it: long enough for the consumer to reconnect, short enough that a stopped
/// service leaves nothing behind for long.
pub(super) const QUEUE_EXPIRES_MS: i64 = 120_000;

/// RabbitMQ and the service's queue.
#[derive(Debug)]
pub(super) struct Amqp {
    url: String,
    queue: String,
    /// The publishing connection and its confirming channel; made again once closed.
    publisher: tokio::sync::Mutex<Link>,
}

/// A connection and one channel on it.
#[derive(Debug)]
struct Link {
    connection: Connection,
    channel: Channel,
}

/// One received message: its envelope, the context its headers carry, and how to ack it.
pub(super) struct Received {
    pub(super) envelope: Option<Envelope>,
    pub(super) incoming: opentelemetry::Context,
    delivery: lapin::message::Delivery,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Link {
    /// A connection to `url`, a channel on it, and `queue` declared.
    async fn open(url: &str, queue: &str) -> Result<Link, BoxError> {
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let connection = Connection::connect(url, properties).await?;
        let channel = connection.create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
        channel
            .queue_declare(queue, QueueDeclareOptions::default(), arguments)
            .await?;
        Ok(Link {
            connection,
            channel,
        })
    }

    /// A publishing link: publisher confirms on, so a publish returns once the broker has
    /// taken the message and the outbox marks a row delivered only then (without them it
    /// returns as soon as the frames are written).
    async fn publisher(url: &str, queue: &str) -> Result<Link, BoxError> {
        let link = Link::open(url, queue).await?;
        link.channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(link)
    }

    fn is_open(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl Amqp {
    /// Connects to `url` and declares `queue` (not durable; deleted after
    /// [`QUEUE_EXPIRES_MS`] unused).
    pub(super) async fn connect(url: &str, queue: &str) -> Result<Amqp, BoxError> {
        let publisher = Link::publisher(url, queue).await?;
        Ok(Amqp {
            url: url.to_owned(),
            queue: queue.to_owned(),
            publisher: tokio::sync::Mutex::new(publisher),
        })
    }

    /// The publishing channel, connected again if it closed.
    async fn publishing(&self) -> Result<Channel, BoxError> {
        let mut link = self.publisher.lock().await;
        if !link.is_open() {
            tracing::info!("RabbitMQ publishing connection closed: connecting again");
            *link = Link::publisher(&self.url, &self.queue).await?;
        }
        Ok(link.channel.clone())
    }

    /// Publishes message `id` with the current context in its headers; returns once the broker
    /// confirmed it (an error when it refused it, or could not route it to the queue).
    pub(super) async fn publish(
        &self,
        id: i64,
        topic: &str,
        payload: serde_json::Value,
    ) -> Result<(), BoxError> {
        let mut headers = FieldTable::default();
        // The same propagation as an HTTP call: traceparent, tracestate, baggage, x-request-id.
        contextflow_otel::inject(&mut HeaderInjector::new(&mut headers));
        let body = serde_json::to_vec(&Envelope {
            id,
            topic: topic.to_owned(),
            payload,
        })?;
        // Mandatory: a message no queue takes (the queue gone with its consumer's channel) comes
        // back to us instead of being confirmed and dropped, so the outbox keeps its row.
        let confirmation = self
            .publishing()
            .await?
            .basic_publish(
                "",
                &self.queue,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                BasicProperties::default().with_headers(headers),
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(format!(
                "RabbitMQ could not route message {id} to queue {}",
                self.queue
            )
            .into()),
            Confirmation::Nack(_) => Err(format!("RabbitMQ refused message {id}").into()),
            Confirmation::NotRequested => {
                Err(format!("RabbitMQ did not confirm message {id} (confirms are off)").into())
            }
        }
    }

    /// The deliveries of the service's queue, one at a time, on a connection of their own
    /// (`None` when the stream ends: its connection or channel closed; call again to go on).
    pub(super) async fn deliveries(
        &self,
        tag: &str,
    ) -> Result<impl futures_util::Stream<Item = Received> + Send + Unpin, BoxError> {
        let link = Link::open(&self.url, &self.queue).await?;
        link.channel
            .basic_qos(256, BasicQosOptions::default())
            .await?;
        let consumer = link
            .channel
            .basic_consume(
                &self.queue,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer.filter_map(move |delivery| {
            // The connection lives as long as its stream.
            let _link = &link;
            futures_util::future::ready(match delivery {
                Ok(delivery) => {
                    // Metadata is input: validated and bounded by contextflow-otel.
                    let incoming = contextflow_otel::extract(&HeaderExtractor::from_properties(
                        &delivery.properties,
                    ));
                    let envelope = serde_json::from_slice(&delivery.data).ok();
                    Some(Received {
                        envelope,
                        incoming,
                        delivery,
                    })
                }
                Err(err) => {
                    tracing::warn!(error = %err, "AMQP delivery failed");
                    None
                }
            })
        }))
    }
}

impl Received {
    /// Acknowledges the delivery (a failure is logged: the broker redelivers, and the
    /// consumer's de-duplication handles it once).
    pub(super) async fn ack(self) {
        if let Err(err) = self.delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %err, "AMQP ack failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::options::QueueDeleteOptions;

    use super::*;

    /// Review finding: nothing connected again after RabbitMQ dropped the connection (a
    /// restart, a broken link): the consumer had ended, the auto-delete queue went with the
    /// messages the broker had confirmed, and every later publish failed until the service
    /// restarted. Now both sides connect again, the queue waits for its consumer, and every
    /// event published is consumed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(cf_service_amqp),
        ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
    )]
    async fn both_sides_connect_again_after_the_broker_drops_them() {
        use crate::queue::{test_proxy::Proxy, OrderConfirmed, Queue, QueueUrl, ORDER_CONFIRMED};

        let url = contextflow_testenv::url(contextflow_testenv::Service::Amqp);
        let (scheme_and_auth, rest) = url
            .split_once('@')
            .expect("amqp://user:pass@host:port/vhost");
        let (server, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let proxy = Proxy::start(server.to_owned()).await;
        let through = format!("{scheme_and_auth}@{}/{vhost}", proxy.addr);
        let name = format!("order-service-test-{}", uuid::Uuid::new_v4().simple());
        let (queue, consumer) = Queue::open(&QueueUrl::parse(&through).unwrap(), &name, 16)
            .await
            .unwrap();
        let event = |i: i64| OrderConfirmed {
            order_id: i,
            reference: format!("r-{i}"),
            tenant: "acme".into(),
        };
        assert!(queue.publish(ORDER_CONFIRMED, 1, &event(1)).await);
        tokio::time::timeout(std::time::Duration::from_secs(20), queue.wait_idle())
            .await
            .expect("the first event is consumed");
        // The broker drops both connections and stays away for a moment: the queue outlives
        // its consumer (an auto-delete queue was deleted with it, and the events it held).
        proxy.refuse_new(true);
        proxy.drop_all();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let direct = Link::open(&url, &format!("{name}-probe")).await.unwrap();
        direct
            .channel
            .queue_declare(
                &name,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue outlives its consumer");
        direct
            .channel
            .queue_delete(&format!("{name}-probe"), QueueDeleteOptions::default())
            .await
            .unwrap();
        proxy.refuse_new(false);
        // A publish may fail while the broker is away (its outbox row waits); one goes through
        // on a new connection.
        let mut published = false;
        for _ in 0..50 {
            if queue.publish(ORDER_CONFIRMED, 2, &event(2)).await {
                published = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(published, "publishing never connected again");
        tokio::time::timeout(std::time::Duration::from_secs(30), queue.wait_idle())
            .await
            .expect("the consumer connected again and consumed the event");
        consumer.abort();
    }

    /// A message no queue takes (the service's queue deleted, as RabbitMQ does once it
    /// expires) is an error, so the outbox keeps
    /// its row; RabbitMQ confirms such a message and drops it unless it is mandatory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(cf_service_amqp),
        ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
    )]
    async fn an_unroutable_message_is_not_delivered() {
        let url = contextflow_testenv::url(contextflow_testenv::Service::Amqp);
        let queue = format!("order-service-test-{}", uuid::Uuid::new_v4().simple());
        let amqp = Amqp::connect(&url, &queue).await.expect("connect");
        amqp.publish(1, "order.confirmed", serde_json::json!({}))
            .await
            .expect("the queue takes it");
        amqp.publishing()
            .await
            .unwrap()
            .queue_delete(&queue, QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
        let err = amqp
            .publish(2, "order.confirmed", serde_json::json!({}))
            .await
            .expect_err("no queue takes it");
        assert!(err.to_string().contains("could not route"), "{err}");
    }
}
