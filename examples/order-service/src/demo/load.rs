//! The load: many concurrent `POST /orders`, each with its own request id, trace, tenant and
//! order reference, remembered so the checks can tell which request a log event belongs to.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry_sdk::trace::SdkTracer;
use tokio::task::JoinSet;

use super::progress::Progress;
use crate::{
    http::auth::DEMO_TOKENS,
    service::{NewOrder, NewOrderItem},
};

/// What one request sent, so its log events can be checked against it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The order's reference.
    pub reference: String,
    /// The trace id of its `traceparent`, 32 hex digits.
    pub trace_id: String,
    /// The tenant its token belongs to.
    pub tenant: String,
    /// The id of the order it created, from its `201` answer (`None` until answered, or when
    /// it was not created).
    pub order_id: Option<i64>,
}

/// How one request ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Its request id.
    pub request_id: String,
    /// From sending to the end of the response.
    pub latency: Duration,
    /// The status, or `None` when the request failed in transport.
    pub status: Option<u16>,
    /// The body's start (non-201 answers) or the transport error.
    pub detail: String,
    /// The created order's id (the `id` of a `201` answer).
    pub order_id: Option<i64>,
}

/// Everything the load sent and got back.
#[derive(Debug, Default)]
pub struct Load {
    /// Request id to what it sent.
    pub expected: HashMap<String, Expected>,
    /// One per request, in completion order.
    pub outcomes: Vec<Outcome>,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
}

/// Sends `orders` orders to the service at `addr`, `concurrency` at a time. Request ids are
/// `demo-<run_id>-<n>`, references `ord-<run_id>-<n>`. Each request is a client span of
/// `tracer`, the root of its trace, whose `traceparent` the request carries.
pub(crate) async fn run(
    addr: SocketAddr,
    tracer: &SdkTracer,
    run_id: &str,
    orders: usize,
    concurrency: usize,
    progress: bool,
) -> Result<Load, reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("http://{addr}/orders");
    let mut load = Load {
        expected: HashMap::with_capacity(orders),
        outcomes: Vec::with_capacity(orders),
        elapsed: Duration::ZERO,
    };
    let mut set = JoinSet::new();
    let mut progress = Progress::new(orders, progress);
    let started = Instant::now();
    let mut next = 0;
    while next < orders || !set.is_empty() {
        while next < orders && set.len() < concurrency.max(1) {
            let (token, tenant) = DEMO_TOKENS[next % DEMO_TOKENS.len()];
            let request_id = request_id(run_id, next);
            // A new root: the client is where each request's trace starts.
            let mut span = tracer
                .span_builder("POST /orders")
                .with_kind(SpanKind::Client)
                .start_with_context(tracer, &opentelemetry::Context::new());
            let trace_id = span.span_context().trace_id();
            let traceparent = format!(
                "00-{trace_id}-{}-{:02x}",
                span.span_context().span_id(),
                span.span_context().trace_flags().to_u8()
            );
            let order = order(run_id, next);
            load.expected.insert(
                request_id.clone(),
                Expected {
                    reference: order.reference.clone(),
                    trace_id: trace_id.to_string(),
                    tenant: tenant.to_string(),
                    order_id: None,
                },
            );
            let request = client
                .post(&url)
                .header("authorization", format!("Bearer {token}"))
                .header("x-request-id", &request_id)
                .header("traceparent", traceparent)
                .json(&order);
            set.spawn(async move {
                let sent = Instant::now();
                let (status, detail, order_id) = match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body = response.text().await.unwrap_or_default();
                        if status == 201 {
                            // The order's id, so the checks can tell its events apart from
                            // another order's (the outbox's `order_id`).
                            let id = serde_json::from_str::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v["id"].as_i64());
                            (Some(status), String::new(), id)
                        } else {
                            (Some(status), body.chars().take(200).collect(), None)
                        }
                    }
                    Err(err) => (None, err.to_string(), None),
                };
                if let Some(status) = status {
                    span.set_attribute(opentelemetry::KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                }
                span.end();
                Outcome {
                    request_id,
                    latency: sent.elapsed(),
                    status,
                    detail,
                    order_id,
                }
            });
            next += 1;
        }
        if let Some(done) = set.join_next().await {
            load.outcomes.push(done.unwrap_or_else(|err| Outcome {
                request_id: String::new(),
                latency: Duration::ZERO,
                status: None,
                detail: format!("client task failed: {err}"),
                order_id: None,
            }));
            progress.tick();
        }
    }
    load.elapsed = started.elapsed();
    for outcome in &load.outcomes {
        if let Some(expected) = load.expected.get_mut(&outcome.request_id) {
            expected.order_id = outcome.order_id;
        }
    }
    progress.finish();
    Ok(load)
}

/// The request id of request `i`.
pub(crate) fn request_id(run_id: &str, i: usize) -> String {
    format!("demo-{run_id}-{i:05}")
}

/// Order `i` of run `run_id`: one to three apples, and a pear every other order.
pub(crate) fn order(run_id: &str, i: usize) -> NewOrder {
    let mut items = vec![NewOrderItem {
        sku: "sku-apple".into(),
        quantity: 1 + (i % 3) as i64,
    }];
    if i.is_multiple_of(2) {
        items.push(NewOrderItem {
            sku: "sku-pear".into(),
            quantity: 1,
        });
    }
    NewOrder {
        reference: format!("ord-{run_id}-{i:05}"),
        items,
    }
}

impl Load {
    /// Requests answered `201 Created`.
    pub fn created(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == Some(201))
            .count()
    }

    /// The request ids answered `201 Created`.
    pub fn created_ids(&self) -> impl Iterator<Item = &str> {
        self.outcomes
            .iter()
            .filter(|o| o.status == Some(201))
            .map(|o| o.request_id.as_str())
    }

    /// The latency at quantile `q` (0.5 for the median).
    pub fn latency(&self, q: f64) -> Duration {
        let mut sorted: Vec<Duration> = self.outcomes.iter().map(|o| o.latency).collect();
        sorted.sort();
        percentile(&sorted, q)
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = |n: u64| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.5), ms(50));
        assert_eq!(percentile(&sorted, 0.99), ms(99));
        assert_eq!(percentile(&sorted, 1.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 0.99), ms(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
