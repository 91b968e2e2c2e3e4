//! The queue on RabbitMQ (`--queue amqp://...`): a message is a JSON envelope, its
//! propagation fields AMQP headers written with `contextflow_messaging::lapin`'s carrier.
//!
//! One connection, two channels: publishes go out on one; the audit consumer reads the
//! service's queue on the other, in a task of its own, and acknowledges each delivery once it
//! is handled.

use futures_util::StreamExt as _;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    },
    publisher_confirm::Confirmation,
    types::FieldTable,
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

/// A connection to RabbitMQ and the service's queue.
#[derive(Clone, Debug)]
pub(super) struct Amqp {
    publish: Channel,
    consume: Channel,
    queue: String,
    _connection: std::sync::Arc<Connection>,
}

/// One received message: its envelope, the context its headers carry, and how to ack it.
pub(super) struct Received {
    pub(super) envelope: Option<Envelope>,
    pub(super) incoming: opentelemetry::Context,
    delivery: lapin::message::Delivery,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Amqp {
    /// Connects to `url` and declares `queue` (not durable, deleted with its last consumer).
    pub(super) async fn connect(url: &str, queue: &str) -> Result<Amqp, BoxError> {
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let connection = Connection::connect(url, properties).await?;
        let publish = connection.create_channel().await?;
        // Publisher confirms: a publish returns once the broker has taken the message, so the
        // outbox marks a row delivered only then (without them it returns as soon as the
        // frames are written).
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consume = connection.create_channel().await?;
        consume
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        consume.basic_qos(256, BasicQosOptions::default()).await?;
        Ok(Amqp {
            publish,
            consume,
            queue: queue.to_owned(),
            _connection: std::sync::Arc::new(connection),
        })
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
            .publish
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

    /// The deliveries of the service's queue, one at a time (`None` when the stream ends).
    pub(super) async fn deliveries(
        &self,
        tag: &str,
    ) -> Result<impl futures_util::Stream<Item = Received> + Send + Unpin, BoxError> {
        let consumer = self
            .consume
            .basic_consume(
                &self.queue,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer.filter_map(|delivery| {
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

    /// A message no queue takes (the service's queue deleted, as RabbitMQ does with an
    /// auto-delete queue when its consumer's channel closes) is an error, so the outbox keeps
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
        amqp.consume
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
