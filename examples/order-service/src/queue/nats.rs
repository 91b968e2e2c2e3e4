//! The queue on NATS (`--queue nats://...`): a message is the same JSON envelope as on
//! RabbitMQ, its propagation fields NATS headers written with `contextflow_messaging::async_nats`'s
//! carrier; the audit consumer is a subscriber of the service's subject in a task of its own.

use contextflow_messaging::async_nats::{HeaderExtractor, HeaderInjector};
use futures_util::StreamExt as _;

use super::amqp::Envelope;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a publish waits for the server's answer to its round trip.
const ECHO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a publish waiting for that answer checks for a new connection.
const ECHO_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

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
        // Connections made so far (the client counts each one as it is made, before it is
        // used): a publish is delivered only if none was made between its write and the
        // server's answer to the round trip after it.
        let connects = || {
            self.client
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        let connects_before = connects();
        self.client
            .publish_with_headers(self.subject.clone(), headers, body.into())
            .await?;
        // The publish only queues the message in the client, and a flush only writes it to the
        // socket: the outbox marks the row delivered once the server has it (core NATS keeps
        // nothing beyond that). The round trip: a marker published to an inbox of this
        // client's own, subscribed to just before, comes back once the server has read
        // everything the connection sent before it (other subscribers, a debugging `>` one,
        // cannot answer for it). A connection lost in between (the client reconnects and drops
        // what it had buffered, while a flush waiting then is released by the new
        // connection's first flush) makes the message undelivered: the outbox publishes it
        // again (the queue bounds the wait), and the consumer handles its id once. (The
        // service's NATS user needs permission to publish to and subscribe on `_INBOX.>`.)
        let marker = self.client.new_inbox();
        let mut echo = self.client.subscribe(marker.clone()).await?;
        self.client.publish(marker, Default::default()).await?;
        self.client.flush().await?;
        let lost = || "NATS connection lost while publishing: the server may not have the message";
        let deadline = tokio::time::Instant::now() + ECHO_TIMEOUT;
        loop {
            tokio::select! {
                answer = echo.next() => match answer {
                    Some(_) => break,
                    None => return Err("NATS subscription closed before the server answered".into()),
                },
                // A marker lost with its connection never comes back: stop as soon as the
                // client has connected again.
                () = tokio::time::sleep(ECHO_CHECK) => {
                    if connects() != connects_before {
                        return Err(lost().into());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err("NATS server did not answer the round trip in time".into());
                    }
                }
            }
        }
        if connects() != connects_before {
            return Err(
                "NATS connection lost while publishing: the server may not have the message".into(),
            );
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Review finding: a message lost with its connection counted as delivered: async-nats
    /// drops what it had buffered when it reconnects, and a flush waiting then is released by
    /// the new connection's first flush. The publish now fails, and the outbox sends it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
    async fn a_message_lost_with_its_connection_is_not_delivered() {
        let url = contextflow_testenv::url(contextflow_testenv::Service::Nats);
        let server = url.trim_start_matches("nats://").to_owned();
        let proxy = super::super::test_proxy::Proxy::start(server).await;
        let through = format!("nats://{}", proxy.addr);
        let subject = format!("order-service-test.{}", uuid::Uuid::new_v4().simple());
        let nats = Nats::connect(&through, &subject).await.unwrap();
        let payload = || serde_json::json!({"order_id": 9});
        // Another client watching every subject (an operator's `nats sub '>'`) does not hold
        // up the round trip.
        let watcher = async_nats::connect(&url).await.unwrap();
        let _everything = watcher.subscribe(">").await.unwrap();
        watcher.flush().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            nats.publish(1, "order.confirmed", payload()),
        )
        .await
        .expect("answered at once")
        .expect("delivered while the connection holds");
        proxy.swallow_next_write();
        let lost = tokio::time::timeout(
            Duration::from_secs(20),
            nats.publish(2, "order.confirmed", payload()),
        )
        .await
        .expect("the publish ends");
        assert!(
            lost.is_err(),
            "a message swallowed with its connection was delivered"
        );
        // Reconnected: the next publish goes through.
        let again = tokio::time::timeout(
            Duration::from_secs(20),
            nats.publish(3, "order.confirmed", payload()),
        )
        .await
        .expect("the publish ends");
        assert!(again.is_ok(), "{again:?}");
    }
}
