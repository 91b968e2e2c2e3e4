//! The queue on NATS (`--queue nats://...`): a message is the same JSON envelope as on
//! RabbitMQ, its propagation fields NATS headers written with `contextflow_messaging::async_nats`'s
//! carrier; the audit consumer is a subscriber of the service's subject in a task of its own.

use contextflow_messaging::async_nats::{HeaderExtractor, HeaderInjector};
use futures_util::StreamExt as _;

use super::amqp::Envelope;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection to NATS and the service's subject.
#[derive(Clone, Debug)]
pub(super) struct Nats {
    client: async_nats::Client,
    subject: String,
}

impl Nats {
    /// Connects to `url`; messages go to `subject`.
    pub(super) async fn connect(url: &str, subject: &str) -> Result<Nats, BoxError> {
        // async-nats logs its "event: connected" line from a task of its own, after `connect`
        // has returned, and then calls the event callback: waiting for the callback makes that
        // line a start-up line, not one outside every request in the middle of the load.
        let connected = std::sync::Arc::new(tokio::sync::Notify::new());
        let signal = connected.clone();
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let signal = signal.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        signal.notify_one();
                    }
                }
            })
            .connect(url)
            .await?;
        tokio::time::timeout(std::time::Duration::from_secs(10), connected.notified())
            .await
            .map_err(|_| "NATS: no `connected` event within 10 s of connecting")?;
        Ok(Nats {
            client,
            subject: subject.to_owned(),
        })
    }

    /// Publishes message `id` with the current context in its headers; returns once the server
    /// has it.
    pub(super) async fn publish(
        &self,
        id: i64,
        topic: &str,
        payload: serde_json::Value,
    ) -> Result<(), BoxError> {
        let mut headers = async_nats::HeaderMap::new();
        contextflow_otel::inject(&mut HeaderInjector::new(&mut headers));
        let body = serde_json::to_vec(&Envelope {
            id,
            topic: topic.to_owned(),
            payload,
        })?;
        self.client
            .publish_with_headers(self.subject.clone(), headers, body.into())
            .await?;
        // The publish only queues the message in the client: the outbox marks the row
        // delivered once the server has it (core NATS keeps nothing beyond that).
        self.client.flush().await?;
        Ok(())
    }

    /// The messages of the service's subject: each envelope (if it parses) with the context
    /// its headers carry.
    pub(super) async fn messages(
        &self,
    ) -> Result<
        impl futures_util::Stream<Item = (Option<Envelope>, opentelemetry::Context)> + Send + Unpin,
        BoxError,
    > {
        let subscriber = self.client.subscribe(self.subject.clone()).await?;
        // The subscription is registered with the server before any publish.
        self.client.flush().await?;
        Ok(subscriber.map(|message| {
            let incoming = contextflow_otel::extract(&HeaderExtractor::from_message(&message));
            (serde_json::from_slice(&message.payload).ok(), incoming)
        }))
    }
}
