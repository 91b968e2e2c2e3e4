//! Redis Streams through [`redis`]: a stream entry's fields as the carrier, for job queues on
//! consumer groups (the BullMQ pattern: `XADD`, `XREADGROUP`, `XACK`, and retries of failed
//! jobs with `XAUTOCLAIM` or `XCLAIM`).
//!
//! [`add`] appends an entry with the application's fields plus the propagation fields of the
//! current context (`traceparent`, `tracestate`, `baggage`, `x-request-id`), so the fields are
//! part of the job itself: a job claimed again after a failure, by any worker, runs in the
//! context of the request that queued it, however many retries it takes. Application fields
//! should not use those names.
//!
//! On consume, [`context`] and [`scope`] read an entry ([`StreamId`]) through
//! [`FieldExtractor`]: a field is read only when its value is a string (a bulk string that is
//! UTF-8, a simple or verbatim string), and everything is then validated and bounded as for any
//! carrier; a malformed value is dropped with a `debug` log and a fresh request id made.
//!
//! ```no_run
//! use contextflow_messaging::redis as streams;
//! use redis::{streams::*, AsyncCommands as _};
//!
//! # #[allow(dead_code)]
//! # async fn run(mut con: redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
//! // Producer, inside a request: the job carries the request's context.
//! streams::add(&mut con, "jobs:email", &[("to", "a@example.com")]).await?;
//!
//! // Worker, in a task of its own: each job's handler runs in the job's context.
//! let consumer = streams::consumer("jobs:email");
//! let options = StreamReadOptions::default().group("mailers", "worker-1").count(10);
//! let reply: Option<StreamReadReply> = con.xread_options(&["jobs:email"], &[">"], &options).await?;
//! for job in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
//!     streams::scope(&consumer, &job, async {
//!         tracing::info!(job = %job.id, "sending"); // with the producer's request id
//!     })
//!     .await;
//!     let _: i64 = con.xack("jobs:email", "mailers", &[&job.id]).await?;
//! }
//!
//! // Retry, in any worker: a job left pending for 30 s (its worker failed or died) is claimed
//! // and runs again in the context it was queued in, not the claiming worker's.
//! let options = StreamAutoClaimOptions::default().count(10);
//! let reply: StreamAutoClaimReply =
//!     con.xautoclaim_options("jobs:email", "mailers", "worker-1", 30_000, "0-0", options).await?;
//! for job in reply.claimed {
//!     streams::scope(&consumer, &job, async { tracing::info!("sending, again") }).await;
//!     let _: i64 = con.xack("jobs:email", "mailers", &[&job.id]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! `redis` is used without its default features, with `streams` and `tokio-comp`: enable TLS
//! and the others in the application.

use std::collections::HashMap;

use opentelemetry::propagation::Extractor;
use redis::{streams::StreamId, RedisResult, ToRedisArgs, Value};

use crate::{Consumed, Consumer, MessageContext, Publisher};

/// The `messaging.system` of Redis Streams consumer spans.
pub const SYSTEM: &str = "redis";

/// Reads propagation fields from a stream entry's field map (names compared without regard to
/// ASCII case; values that are strings, as UTF-8).
///
/// ```
/// use std::collections::HashMap;
/// use contextflow_messaging::redis::FieldExtractor;
/// use opentelemetry::propagation::Extractor as _;
/// use redis::Value;
///
/// let fields = HashMap::from([
///     ("x-request-id".to_owned(), Value::BulkString(b"r-1".to_vec())),
///     ("attempts".to_owned(), Value::Int(3)),
///     ("baggage".to_owned(), Value::BulkString(b"\xff".to_vec())),
/// ]);
/// let extractor = FieldExtractor::new(&fields);
/// assert_eq!(extractor.get("X-Request-Id"), Some("r-1"));
/// assert_eq!(extractor.get("attempts"), None, "not a string");
/// assert_eq!(extractor.get("baggage"), None, "not UTF-8");
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FieldExtractor<'a> {
    fields: &'a HashMap<String, Value>,
}

// ===== impl FieldExtractor =====

impl<'a> FieldExtractor<'a> {
    /// Reads `fields` (`StreamId::map`).
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let fields = std::collections::HashMap::new();
    /// assert!(contextflow_messaging::redis::FieldExtractor::new(&fields).keys().is_empty());
    /// ```
    pub fn new(fields: &'a HashMap<String, Value>) -> Self {
        FieldExtractor { fields }
    }

    /// Reads the fields of the stream entry `entry`.
    ///
    /// ```
    /// use opentelemetry::propagation::Extractor as _;
    /// let entry = redis::streams::StreamId::default();
    /// let extractor = contextflow_messaging::redis::FieldExtractor::from_entry(&entry);
    /// assert_eq!(extractor.get("traceparent"), None);
    /// ```
    pub fn from_entry(entry: &'a StreamId) -> Self {
        FieldExtractor::new(&entry.map)
    }
}

impl Extractor for FieldExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // The exact name first (one hash lookup: `add` writes lower-case names), then without
        // regard to case.
        let value = match self.fields.get(key) {
            Some(value) => value,
            None => {
                self.fields
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(key))?
                    .1
            }
        };
        as_str(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.fields.keys().map(String::as_str).collect()
    }

    /// Every field named `key` without regard to case, in name order (`traceparent` and
    /// `TraceParent` are two values, so a repeated single-valued field is seen as repeated); a
    /// value that is not text counts, as an empty one. (The same name twice in one entry
    /// reaches us once: redis-rs keeps the last.)
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let mut named: Vec<(&String, &Value)> = self
            .fields
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(key))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let all: Vec<&str> = named
            .into_iter()
            .map(|(_, v)| as_str(v).unwrap_or(""))
            .collect();
        (!all.is_empty()).then_some(all)
    }
}

/// A field value as text: strings only, and only valid UTF-8.
fn as_str(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

// ===== publish =====

/// The propagation fields of the current context, as `publisher` writes them: the pairs to add
/// to a stream entry (for pipelines, or `XADD` options that [`add`] does not cover).
///
/// ```
/// use contextflow_messaging::{redis::fields, Publisher};
/// use contextflow_otel::{RequestId, REQUEST_ID};
///
/// let pairs = REQUEST_ID.sync_scope("r-2".parse::<RequestId>()?, || fields(&Publisher::new()));
/// assert_eq!(pairs, [("x-request-id".to_owned(), "r-2".to_owned())]);
/// # Ok::<(), contextflow_otel::InvalidRequestId>(())
/// ```
pub fn fields(publisher: &Publisher) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    publisher.inject(&mut contextflow_otel::carrier::InjectFn(
        |k: &str, v: String| pairs.push((k.to_owned(), v)),
    ));
    pairs
}

/// Appends an entry to the stream `key` (`XADD key * ...`) with `items` plus the propagation
/// fields of the current context (OpenTelemetry's global propagator plus the request id), and
/// returns the new entry's id.
///
/// # Errors
///
/// Those of the `XADD` command.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(mut con: redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
/// let id = contextflow_messaging::redis::add(&mut con, "jobs:email", &[("to", "a@example.com")]).await?;
/// assert!(id.contains('-'));
/// # Ok(()) }
/// ```
pub async fn add<F, V>(
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
    items: &[(F, V)],
) -> RedisResult<String>
where
    F: ToRedisArgs + Send + Sync,
    V: ToRedisArgs + Send + Sync,
{
    redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg(items)
        .arg(fields(&Publisher::new()))
        .query_async(con)
        .await
}

// ===== consume =====

/// A [`Consumer`] for the stream `key` (`messaging.system = "redis"`).
///
/// ```
/// let consumer = contextflow_messaging::redis::consumer("jobs:email");
/// # drop(consumer);
/// ```
pub fn consumer(key: &str) -> Consumer {
    Consumer::new().system(SYSTEM).destination(key)
}

/// The context of the stream entry `entry` (read with `XREADGROUP`, `XAUTOCLAIM`, `XCLAIM` or
/// `XRANGE`), made by `consumer` from its fields.
///
/// ```
/// use contextflow_messaging::redis::{consumer, context};
/// use redis::{streams::StreamId, Value};
///
/// let mut entry = StreamId::default();
/// entry.map.insert("x-request-id".to_owned(), Value::BulkString(b"job-7".to_vec()));
/// let message = context(&consumer("jobs:email"), &entry);
/// assert_eq!(message.request_id().as_str(), "job-7");
/// message.finish();
/// ```
pub fn context(consumer: &Consumer, entry: &StreamId) -> MessageContext {
    consumer.context(&FieldExtractor::from_entry(entry))
}

/// Runs `handler` for the stream entry `entry` in the context its fields carry; see
/// [`Consumer::scope`].
///
/// ```
/// use contextflow_messaging::redis::{consumer, scope};
/// use redis::{streams::StreamId, Value};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut entry = StreamId::default();
/// entry.map.insert("x-request-id".to_owned(), Value::BulkString(b"job-8".to_vec()));
/// let id = scope(&consumer("jobs:email"), &entry, async { contextflow_otel::current_request_id() }).await;
/// assert_eq!(id.unwrap().as_str(), "job-8");
/// # }
/// ```
pub fn scope<F: std::future::Future>(
    consumer: &Consumer,
    entry: &StreamId,
    handler: F,
) -> Consumed<F> {
    consumer.scope(&FieldExtractor::from_entry(entry), handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differing_in_case_are_all_returned_in_name_order() {
        let fields: HashMap<String, Value> = [
            ("traceparent", Value::BulkString(b"a".to_vec())),
            ("TraceParent", Value::BulkString(b"b".to_vec())),
            ("TRACEPARENT", Value::Int(1)),
            ("other", Value::BulkString(b"c".to_vec())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let extractor = FieldExtractor::new(&fields);
        assert_eq!(extractor.get_all("traceparent").unwrap(), ["", "b", "a"]);
        assert_eq!(extractor.get_all("missing"), None);
    }
}
