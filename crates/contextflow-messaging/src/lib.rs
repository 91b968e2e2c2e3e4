//! Request context across message brokers and child processes: the publish side writes the
//! current context into a message's metadata, the consume side runs each message's handler in
//! a scope of its own made from that metadata, and a child process gets the context in its
//! environment.
//!
//! Inside a process, `contextflow` carries the context by itself. Across a boundary only what
//! a propagator writes travels (`contextflow-otel` owns them: W3C trace context, baggage, the
//! request id, or what the application configures as OpenTelemetry's global propagator):
//!
//! | boundary | carrier | what crosses | what never crosses | recipe |
//! |---|---|---|---|---|
//! | any broker | [`Consumer`], [`Publisher`] over an `Extractor`/`Injector` (`contextflow_otel::carrier::Pairs`, `InjectFn`) | trace context, baggage, request id | the tenant and the user (unless [`Consumer::trust`] verifies them), a database transaction, every other variable | below |
//! | RabbitMQ (feature `lapin`) | AMQP message headers | the same | the same | `lapin` module |
//! | NATS, JetStream (feature `async-nats`) | NATS message headers, kept across JetStream redeliveries | the same | the same | `async_nats` module |
//! | Redis Streams (feature `redis`) | fields of the stream entry, kept across retries (`XAUTOCLAIM`, `XCLAIM`) | the same | the same | `redis` module |
//! | MQTT 5 (feature `rumqttc`) | user properties of the PUBLISH packet | the same | the same | `rumqttc` module |
//! | Kafka (feature `rdkafka`) | record headers; tested at the header level only (no Kafka broker runs in this project's tests) | the same | the same | `rdkafka` module |
//! | child process | [`process`]: `TRACEPARENT`, `TRACESTATE`, `BAGGAGE`, `CONTEXTFLOW_REQUEST_ID` | the same | the same | [`process`] |
//! | a scheduled run (feature `cron`) | none: `cron::Scheduler` starts each run from an empty root | nothing: a fresh run id and trace | everything of whoever registered the job | `cron` module |
//!
//! Each module's first example is its recipe, one screen long: publish inside a request, then
//! consume in a task of its own where each message's handler runs in the message's context
//! (the `redis` recipe also retries a job a worker left pending). The order service
//! (`examples/order-service`, `demo --queue amqp://... | nats://... | redis://...`) is a
//! worked example of the RabbitMQ, NATS and Redis Streams carriers: its audit consumer reads the
//! broker in a task with an empty context, and every event is checked to be consumed under the
//! id and trace of the request that published it. `contextflow-bench`'s `broker-overhead`
//! binary measures each carrier's cost against the same client without it.
//! A message's context (its trace, baggage and request id) is layered over the frame of
//! whoever polls its handler, so a binding made around the consumer (as a tower layer does
//! around a service) stays visible, and the message's own values replace the loop's. Start the
//! consumer loop from an empty context ([`contextflow::spawn_without_context`], as the order
//! service does): a loop spawned from inside a request would otherwise lend that request's
//! tenant or user to every message that does not bring its own. A message never brings a
//! tenant, a user or a transaction with it: a handler that needs them loads them the way
//! authenticated code does, or its consumer opts in with [`Consumer::trust`].
//!
//! - [`Consumer`]: one per queue; [`Consumer::scope`] runs a handler in the message's
//!   context, with a consumer span that is a child of the producer's (a batch's span links to
//!   each message's context instead), and a fresh request id when the message has none.
//! - [`Publisher`]: writes the current context into an outgoing message. The synchronous
//!   writers (`inject`, `redis::fields`) read the context at the call; the `async` publish
//!   helpers (`lapin::publish`, `async_nats::publish`, `rumqttc::publish`, `redis::add`), like
//!   any `async fn`, read it when their future is first polled, so that
//!   `REQUEST_ID.scope(id, redis::add(..))` publishes under `id`. A publish future made in one
//!   context and awaited in another (pushed into a set the consumer loop polls) takes the
//!   poller's: bind it where it is made with `contextflow::FutureExt::in_current_context`.
//! - [`process`]: the OpenTelemetry environment-variable carrier for child processes.
//!
//! Any transport's metadata becomes a carrier with `contextflow_otel::carrier::Pairs` (read)
//! and `InjectFn` (write):
//!
//! ```
//! use std::collections::BTreeMap;
//! use contextflow_messaging::{Consumer, Publisher};
//! use contextflow_otel::carrier::{InjectFn, Pairs};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Producer, inside a request:
//! let request = contextflow_otel::extract(&Pairs::new([
//!     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
//!     ("x-request-id", "order-17"),
//! ]));
//! let mut headers = BTreeMap::new();
//! contextflow_otel::sync_scope(request, || {
//!     Publisher::new().inject(&mut InjectFn(|k: &str, v: String| {
//!         headers.insert(k.to_owned(), v);
//!     }))
//! });
//!
//! // Consumer, in a task with no context of its own:
//! let consumer = Consumer::new().destination("orders");
//! let metadata = Pairs::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
//! let (request_id, trace_id) = consumer
//!     .scope(&metadata, async {
//!         (contextflow_otel::current_request_id(), contextflow_otel::current_trace_id())
//!     })
//!     .await;
//! assert_eq!(request_id.unwrap().as_str(), "order-17");
//! assert_eq!(trace_id.unwrap().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! # Ok(()) }
//! ```
//!
//! The tenant and the user never come from a message unless a consumer opts in: see
//! [`consume`](crate::consume#tenant-and-user).
//!
//! # Feature flags
//!
//! - `tokio`: [`process::CommandExt`] for `tokio::process::Command`.
//! - `lapin`: RabbitMQ, `lapin` module (AMQP headers as carriers, publish and consume helpers).
//! - `async-nats`: NATS and JetStream, `async_nats` module (NATS
//!   headers as carriers, publish and consume helpers).
//! - `cron`: scheduled jobs, `cron` module (each run from an empty root context with its own
//!   run id and trace; overlap policy, panics, shutdown).
//! - `redis`: Redis Streams, `redis` module (stream entry fields as
//!   carriers, `XADD` and consume helpers for consumer groups).
//! - `rumqttc`: MQTT 5, `rumqttc` module (user properties as carriers, publish and consume
//!   helpers).
//! - `rdkafka`: Kafka record headers, `rdkafka` module (headers as carriers; librdkafka is
//!   linked dynamically: install `librdkafka-dev`).
// The one exception, `rdkafka::raw`, reads librdkafka's header list directly.
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

#[cfg(feature = "async-nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "async-nats")))]
pub mod async_nats;
pub mod consume;
#[cfg(feature = "cron")]
#[cfg_attr(docsrs, doc(cfg(feature = "cron")))]
pub mod cron;
#[cfg(feature = "lapin")]
#[cfg_attr(docsrs, doc(cfg(feature = "lapin")))]
pub mod lapin;
pub mod process;
pub mod publish;
#[cfg(feature = "rdkafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "rdkafka")))]
pub mod rdkafka;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "rumqttc")]
#[cfg_attr(docsrs, doc(cfg(feature = "rumqttc")))]
pub mod rumqttc;
mod spans;

pub use crate::{
    consume::{Bindings, Consumed, Consumer, MessageContext},
    publish::Publisher,
};
