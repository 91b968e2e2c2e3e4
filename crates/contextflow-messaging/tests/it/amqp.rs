//! RabbitMQ (`lapin`): round trips through the real broker, where the consumer runs in a task
//! with an empty context.

use contextflow_messaging::lapin::{self as amqp, HeaderExtractor};
use contextflow_otel::{new_span_id, new_trace_id, RequestId};
use contextflow_testenv::Service;
use futures_util::StreamExt as _;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection, ConnectionProperties,
};
use opentelemetry::{
    propagation::Extractor as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context,
};
use tokio::task::JoinSet;

async fn connect() -> Connection {
    let url = contextflow_testenv::url(Service::Amqp);
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Connection::connect(&url, properties).await.unwrap()
}

/// A queue of its own for one test, named `contextflow-messaging-<name>-<unique>`, on a new
/// connection and channel. Removed by the broker if the test dies before its own delete.
async fn fresh_queue(name: &str) -> (Connection, lapin::Channel, String) {
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("contextflow-messaging-{name}-{}", RequestId::new());
    let declare = QueueDeclareOptions {
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(&queue, declare, FieldTable::default())
        .await
        .unwrap();
    (connection, channel, queue)
}

/// Publishes `n` messages at once, each from a request context of its own, and consumes them
/// concurrently in a task that has no context; returns (matched, mismatched) handlers.
async fn round_trip(n: usize) -> (usize, usize) {
    let (connection, channel, queue) = fresh_queue("round-trip").await;

    let consume_channel = connection.create_channel().await.unwrap();
    consume_channel
        .basic_qos(256, BasicQosOptions::default())
        .await
        .unwrap();
    let mut deliveries = consume_channel
        .basic_consume(
            &queue,
            "contextflow-messaging-test",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = amqp::consumer(&queue).without_spans();
    // A plain tokio task, started outside any scope: it has an empty context.
    let consuming = tokio::spawn(async move {
        assert!(contextflow_otel::current_request_id().is_none());
        assert!(contextflow_otel::current_trace_id().is_none());
        let mut handlers = JoinSet::new();
        for _ in 0..n {
            let delivery = deliveries.next().await.unwrap().unwrap();
            let message = amqp::context(&consumer, &delivery);
            handlers.spawn(message.scope(async move {
                // Interleave with the other handlers before looking.
                tokio::task::yield_now().await;
                let body = std::str::from_utf8(&delivery.data).unwrap();
                let (want_id, want_trace) = body.split_once(' ').unwrap();
                let seen_id = contextflow_otel::current_request_id().map(|id| id.to_string());
                let seen_trace = contextflow_otel::current_trace_id().map(|id| id.to_string());
                delivery.ack(BasicAckOptions::default()).await.unwrap();
                seen_id.as_deref() == Some(want_id) && seen_trace.as_deref() == Some(want_trace)
            }));
        }
        let (mut matched, mut mismatched) = (0, 0);
        while let Some(ok) = handlers.join_next().await {
            if ok.unwrap() {
                matched += 1;
            } else {
                mismatched += 1;
            }
        }
        assert!(
            contextflow_otel::current_request_id().is_none(),
            "the consumer task's own context stays empty"
        );
        (matched, mismatched)
    });

    let mut publishers = JoinSet::new();
    for _ in 0..n {
        let channel = channel.clone();
        let queue = queue.clone();
        let request_id = RequestId::new();
        let trace_id = new_trace_id();
        let parent = SpanContext::new(
            trace_id,
            new_span_id(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new()
            .with_remote_span_context(parent)
            .with_value(request_id.clone());
        publishers.spawn(contextflow_otel::scope(cx, async move {
            tokio::task::yield_now().await;
            assert_eq!(
                contextflow_otel::current_request_id(),
                Some(request_id.clone())
            );
            let body = format!("{request_id} {trace_id}");
            amqp::publish(
                &channel,
                "",
                &queue,
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }));
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    let counts = consuming.await.unwrap();
    channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await
        .unwrap();
    connection.close(200, "OK").await.unwrap();
    counts
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_amqp),
    ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
)]
async fn thousand_concurrent_messages_keep_their_context_current_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(cf_service_amqp),
    ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
)]
async fn thousand_concurrent_messages_keep_their_context_multi_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(cf_service_amqp),
    ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
)]
async fn malformed_headers_from_the_broker_give_a_fresh_context() {
    let (connection, channel, queue) = fresh_queue("malformed").await;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-garbage".into()),
    );
    headers.insert(
        "x-request-id".into(),
        AMQPValue::LongString(b"id-\xff\x1b[31m".to_vec().into()),
    );
    headers.insert("baggage".into(), AMQPValue::LongInt(7));
    channel
        .basic_publish(
            "",
            &queue,
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut deliveries = channel
        .basic_consume(
            &queue,
            "contextflow-messaging-malformed",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = deliveries.next().await.unwrap().unwrap();
    let (id, trace) = amqp::scope(&amqp::consumer(&queue), &delivery, async {
        (
            contextflow_otel::current_request_id().unwrap(),
            contextflow_otel::current_trace_id(),
        )
    })
    .await;
    assert_eq!(id.as_str().len(), 36, "a fresh id, got {id:?}");
    assert_eq!(trace, None);
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await
        .unwrap();
    connection.close(200, "OK").await.unwrap();
}

#[test]
fn header_extractor_reads_only_utf8_strings() {
    let mut headers = FieldTable::default();
    headers.insert("Traceparent".into(), AMQPValue::LongString("tp".into()));
    headers.insert(
        "bytes".into(),
        AMQPValue::LongString(b"\xff".to_vec().into()),
    );
    headers.insert("short".into(), AMQPValue::ShortString("s".into()));
    headers.insert("int".into(), AMQPValue::LongInt(1));
    let extractor = HeaderExtractor::new(Some(&headers));
    assert_eq!(extractor.get("traceparent"), Some("tp"), "any ASCII case");
    assert_eq!(extractor.get("bytes"), None, "not UTF-8");
    assert_eq!(extractor.get("short"), Some("s"));
    assert_eq!(extractor.get("int"), None);
    assert_eq!(extractor.keys().len(), 4);
}

/// Review finding: a republished message kept the first send's `baggage` under a publisher
/// whose propagator writes none.
#[test]
fn republish_with_a_narrower_propagator_drops_the_old_baggage() {
    let publisher = contextflow_messaging::Publisher::new()
        .with_propagator(contextflow_otel::TraceContextPropagator::new());
    let mut old = FieldTable::default();
    old.insert("Baggage".into(), AMQPValue::LongString("user=alice".into()));
    old.insert("attempt".into(), AMQPValue::LongInt(2));
    let properties = contextflow_otel::REQUEST_ID
        .sync_scope("r-2".parse::<RequestId>().unwrap(), || {
            amqp::inject(&publisher, BasicProperties::default().with_headers(old))
        });
    let headers = properties.headers().clone().unwrap_or_default();
    let keys: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
    assert!(
        !keys.iter().any(|k| k.eq_ignore_ascii_case("baggage")),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"attempt") && keys.contains(&"x-request-id"),
        "{keys:?}"
    );
}

/// The consumer span follows the RabbitMQ conventions: the exchange as
/// `messaging.destination.name` (empty for the default one), the routing key, the delivery
/// tag, and the queue as the subscription. It used to name the queue as the destination.
#[tokio::test(flavor = "current_thread")]
#[cfg_attr(
    not(cf_service_amqp),
    ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
)]
async fn consumer_spans_name_the_exchange_routing_key_and_queue() {
    use lapin::options::QueueBindOptions;
    use opentelemetry::{trace::TracerProvider as _, Value};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let (connection, channel, queue) = fresh_queue("semconv").await;
    channel
        .queue_bind(
            &queue,
            "amq.direct",
            &queue,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for exchange in ["", "amq.direct"] {
        channel
            .basic_publish(
                exchange,
                &queue,
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut deliveries = channel
        .basic_consume(
            &queue,
            "contextflow-messaging-semconv",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = amqp::consumer(&queue).with_tracer(provider.tracer("amqp-semconv"));
    let mut tags = Vec::new();
    for _ in 0..2 {
        let delivery = deliveries.next().await.unwrap().unwrap();
        tags.push(delivery.delivery_tag);
        amqp::scope(&consumer, &delivery, async {}).await;
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let spans = exporter.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 2, "{spans:?}");
    for (span, (exchange, tag)) in spans.iter().zip([("", tags[0]), ("amq.direct", tags[1])]) {
        let attr = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(
            attr("messaging.destination.name"),
            Some(Value::from(exchange.to_owned()))
        );
        assert_eq!(
            attr("messaging.destination.subscription.name"),
            Some(Value::from(queue.clone()))
        );
        assert_eq!(
            attr("messaging.rabbitmq.destination.routing_key"),
            Some(Value::from(queue.clone()))
        );
        assert_eq!(
            attr("messaging.rabbitmq.message.delivery_tag"),
            Some(Value::I64(tag as i64))
        );
        assert_eq!(attr("messaging.system"), Some(Value::from("rabbitmq")));
        let name = if exchange.is_empty() {
            &queue
        } else {
            exchange
        };
        assert_eq!(span.name, format!("process {name}"));
    }
    channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await
        .unwrap();
    connection.close(200, "OK").await.unwrap();
}
