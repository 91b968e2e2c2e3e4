//! MQTT 5 (`rumqttc`, Mosquitto): round trips through the real broker, where the consumer
//! runs in a task with an empty context, and arbitrary user properties never panic.

use contextflow_messaging::{
    rumqttc::{self as mqtt, UserProperties},
    Consumer,
};
use contextflow_otel::{new_span_id, new_trace_id, RequestId};
use contextflow_testenv::Service;
use opentelemetry::{
    propagation::Extractor as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context,
};
use proptest::prelude::*;
use rumqttc::v5::{
    mqttbytes::{
        v5::{Packet, Publish, PublishProperties},
        QoS,
    },
    AsyncClient, Event, EventLoop, MqttOptions,
};
use tokio::task::JoinSet;

/// A client with a unique id, on the broker of `CONTEXTFLOW_MQTT_URL` (`mqtt://host:port`).
fn client(role: &str) -> (AsyncClient, EventLoop) {
    let url = contextflow_testenv::url(Service::Mqtt);
    let address = url.strip_prefix("mqtt://").unwrap_or(&url);
    let address = address.trim_end_matches('/');
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "1883"));
    let id = format!("contextflow-{role}-{}", RequestId::new());
    let mut options = MqttOptions::new(id, host, port.parse().unwrap());
    options.set_keep_alive(std::time::Duration::from_secs(30));
    AsyncClient::new(options, 64)
}

/// Whether the current context is the one `body` was published from.
fn context_matches(body: &[u8]) -> bool {
    let body = std::str::from_utf8(body).unwrap();
    let (want_id, want_trace) = body.split_once(' ').unwrap();
    let seen_id = contextflow_otel::current_request_id().map(|id| id.to_string());
    let seen_trace = contextflow_otel::current_trace_id().map(|id| id.to_string());
    seen_id.as_deref() == Some(want_id) && seen_trace.as_deref() == Some(want_trace)
}

/// `n` messages published at once (QoS 1), each from a request context of its own, consumed
/// concurrently in a task that has no context; returns (matched, mismatched) handlers.
async fn round_trip(n: usize) -> (usize, usize) {
    let topic = format!("contextflow/round-trip/{}", RequestId::new());
    let (subscriber, mut events) = client("sub");
    subscriber
        .subscribe(topic.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Wait for the broker to confirm the subscription before anything is published.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let consumer = mqtt::consumer(&topic).without_spans();
    // A plain tokio task, started outside any scope: it has an empty context.
    let consuming = tokio::spawn(async move {
        assert!(contextflow_otel::current_request_id().is_none());
        let mut handlers = JoinSet::new();
        let mut received = 0;
        while received < n {
            if let Event::Incoming(Packet::Publish(message)) = events.poll().await.unwrap() {
                received += 1;
                let context = mqtt::context(&consumer, &message);
                handlers.spawn(context.scope(async move {
                    tokio::task::yield_now().await;
                    context_matches(&message.payload)
                }));
            }
        }
        let (mut matched, mut mismatched) = (0, 0);
        while let Some(ok) = handlers.join_next().await {
            if ok.unwrap() {
                matched += 1;
            } else {
                mismatched += 1;
            }
        }
        assert!(contextflow_otel::current_request_id().is_none());
        (matched, mismatched)
    });

    let (publisher, mut publisher_events) = client("pub");
    let driving = tokio::spawn(async move { while publisher_events.poll().await.is_ok() {} });
    let mut publishers = JoinSet::new();
    for _ in 0..n {
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
        let publisher = publisher.clone();
        let topic = topic.clone();
        publishers.spawn(contextflow_otel::scope(cx, async move {
            tokio::task::yield_now().await;
            let body = format!("{request_id} {trace_id}");
            mqtt::publish(&publisher, topic, QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }));
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    let counts = consuming.await.unwrap();
    publisher.disconnect().await.unwrap();
    driving.abort();
    counts
}

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(cf_service_mqtt), ignore = "needs MQTT: set CONTEXTFLOW_MQTT_URL")]
async fn thousand_concurrent_messages_keep_their_context_current_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(cf_service_mqtt), ignore = "needs MQTT: set CONTEXTFLOW_MQTT_URL")]
async fn thousand_concurrent_messages_keep_their_context_multi_thread() {
    assert_eq!(round_trip(1000).await, (1000, 0));
}

#[test]
fn user_properties_are_bounded_and_case_blind() {
    let mut pairs = vec![("X-Request-Id".to_owned(), "r-1".to_owned())];
    pairs.extend((0..1000).map(|i| ("baggage".to_owned(), format!("k{i}=v"))));
    let extractor = UserProperties::new(&pairs);
    assert_eq!(extractor.get("x-request-id"), Some("r-1"));
    assert_eq!(
        extractor.get_all("baggage").unwrap().len(),
        contextflow_otel::carrier::MAX_PAIRS - 1,
        "only the first MAX_PAIRS pairs are read"
    );
    assert_eq!(extractor.get("traceparent"), None);
}

const VALID_ID: &str = "mqtt-42";

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(
        (
            prop_oneof![
                Just("traceparent".to_owned()),
                Just("baggage".to_owned()),
                Just("x-request-id".to_owned()),
                Just("X-REQUEST-ID".to_owned()),
                ".{0,12}",
            ],
            prop_oneof![
                4 => Just(VALID_ID.to_owned()),
                2 => ".{0,80}",
                1 => "[ -~]{0,300}",
            ],
        ),
        0..8,
    )
}

fn message(pairs: Vec<(String, String)>) -> Publish {
    let properties = PublishProperties {
        user_properties: pairs,
        ..PublishProperties::default()
    };
    Publish::new("t", QoS::AtLeastOnce, "", Some(properties))
}

proptest! {
    /// Any user properties (untrusted): never a panic, always a valid request id, and the
    /// carried one whenever the only `x-request-id` among the first pairs is the valid one.
    #[test]
    fn arbitrary_user_properties_never_panic(pairs in pairs()) {
        // The carried request id is used only when there is exactly one copy, and a repeated
        // one never is.
        let copies = crate::request_id_copies(&pairs);
        let carried = match copies.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        let message = message(pairs.clone());
        let cx = mqtt::context(&Consumer::new().without_spans(), &message);
        let id = cx.request_id().as_str().to_owned();
        cx.finish();
        prop_assert!(!id.is_empty() && id.len() <= 128);
        prop_assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        if carried == Some(VALID_ID) {
            prop_assert_eq!(id, VALID_ID);
        } else if copies.len() > 1 {
            prop_assert_ne!(id, VALID_ID, "a repeated x-request-id is never used");
        }
    }
}

/// The share of generated user properties that reach the accept path (a carried request id
/// used): the generator is useful only if that share is high enough.
#[test]
fn user_properties_generator_reaches_the_accept_path() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut accepted, total) = (0, 512);
    for _ in 0..total {
        let message = message(pairs().new_tree(&mut runner).unwrap().current());
        let cx = mqtt::context(&Consumer::new().without_spans(), &message);
        if cx.request_id().as_str() == VALID_ID {
            accepted += 1;
        }
        cx.finish();
    }
    println!("user properties: {accepted}/{total} reached the accept path");
    assert!(accepted * 10 >= total, "{accepted}/{total}");
}

/// Review finding: a republished message kept the first send's `baggage` under a publisher
/// whose propagator writes none.
#[test]
fn republish_with_a_narrower_propagator_drops_the_old_baggage() {
    let publisher = contextflow_messaging::Publisher::new()
        .with_propagator(contextflow_otel::TraceContextPropagator::new());
    let old = PublishProperties {
        user_properties: vec![
            ("Baggage".into(), "user=alice".into()),
            ("attempt".into(), "2".into()),
        ],
        ..PublishProperties::default()
    };
    let properties = contextflow_otel::REQUEST_ID
        .sync_scope("r-2".parse::<RequestId>().unwrap(), || {
            mqtt::inject(&publisher, old)
        });
    let names: Vec<&str> = properties
        .user_properties
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        !names.iter().any(|n| n.eq_ignore_ascii_case("baggage")),
        "{names:?}"
    );
    assert!(
        names.contains(&"attempt") && names.contains(&"x-request-id"),
        "{names:?}"
    );
}
