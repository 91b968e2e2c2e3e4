//! Redis Streams through [`redis`]: a stream entry's fields as the carrier, for job queues on
//! consumer groups (the BullMQ pattern: `XADD`, `XREADGROUP`, `XACK`, and retries of failed
//! jobs with `XAUTOCLAIM` or `XCLAIM`).
//!
//! [`add`] appends an entry with the application's fields plus the propagation fields of the
//! current context (`traceparent`, `tracestate`, `baggage`, `x-request-id`), so the fields are
//! part of the job itself: a job claimed again after a failure, by any worker, runs in the
//! context of the request that queued it, however many retries it takes. An application field
//! with one of those names (in any case) is left out: the current context's is written.
//!
//! On consume, [`context`] and [`scope`] read an entry ([`StreamId`]) through
//! [`FieldExtractor`]: a field is read only when its value is a string (a bulk string that is
//! UTF-8, a simple or verbatim string), and everything is then validated and bounded as for any
//! carrier; a malformed value is dropped with a `debug` log and a fresh request id made.
//!
//! Read the entries with [`ReadReply`] (`XREAD`, `XREADGROUP`), [`AutoClaimReply`]
//! (`XAUTOCLAIM`) or [`Entries`] (`XRANGE`, `XCLAIM`) rather than redis-rs's own reply types:
//! with those, one entry whose field name is not UTF-8 fails the whole read, and the other
//! entries of that read, already delivered by the server, are never handled.
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
//! let reply: streams::ReadReply = con.xread_options(&["jobs:email"], &[">"], &options).await?;
//! for job in reply.into_entries() {
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
//! let reply: streams::AutoClaimReply =
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
    /// value that is not text counts, as an empty one. A name repeated within the entry, read
    /// by [`ReadReply`], [`AutoClaimReply`] or [`Entries`] (an array of its values), counts
    /// each value. (redis-rs's own reply types keep only the last of a repeated name.)
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let mut named: Vec<(&String, &Value)> = self
            .fields
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(key))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let mut all = Vec::with_capacity(named.len());
        for (_, value) in named {
            match value {
                Value::Array(values) => {
                    all.extend(values.iter().map(|v| as_str(v).unwrap_or("")));
                }
                value => all.push(as_str(value).unwrap_or("")),
            }
        }
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
    add_with(&Publisher::new(), con, key, items).await
}

/// [`add`] with the propagation fields that `publisher` writes. An application item named
/// like one of `publisher`'s fields, or like one of the default fields (`traceparent`,
/// `tracestate`, `baggage`, `x-request-id`, in any case), is left out, so a job re-queued
/// with its old fields through a publisher with a narrower propagator does not pass on the
/// first request's baggage or trace as the current one's.
///
/// # Errors
///
/// Those of the `XADD` command.
///
/// ```no_run
/// # #[allow(dead_code)]
/// # async fn run(mut con: redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
/// use contextflow_messaging::Publisher;
///
/// let publisher = Publisher::new().with_propagator(contextflow_otel::TraceContextPropagator::new());
/// let id = contextflow_messaging::redis::add_with(&publisher, &mut con, "jobs:email", &[("to", "a@example.com")]).await?;
/// assert!(id.contains('-'));
/// # Ok(()) }
/// ```
pub async fn add_with<F, V>(
    publisher: &Publisher,
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
    items: &[(F, V)],
) -> RedisResult<String>
where
    F: ToRedisArgs + Send + Sync,
    V: ToRedisArgs + Send + Sync,
{
    let names = publisher.replaced_fields();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg("*");
    for (field, value) in items {
        // An application field spelled as a propagation field (in any case) would make that
        // field repeated for the consumer: the current context's own is written instead.
        let is_propagation = match field.to_redis_args().as_slice() {
            [name] => names
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name)),
            _ => false,
        };
        if !is_propagation {
            cmd.arg(field).arg(value);
        }
    }
    cmd.arg(fields(publisher)).query_async(con).await
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

// ===== replies =====

/// The reply of `XREAD` or `XREADGROUP`, read as redis-rs's
/// [`StreamReadReply`](redis::streams::StreamReadReply) is, except that one entry cannot fail
/// the others: a field name, entry id or stream key that is not UTF-8 is decoded lossily (each
/// invalid sequence becomes U+FFFD) instead of failing the whole reply.
///
/// With redis-rs's own type, a single entry with a binary field name (any client may write
/// one) fails every `XREADGROUP` that reaches it: the entries of that read are delivered by the
/// server, so they sit in the consumer's pending list, yet the worker never sees them, and a
/// worker that reads its pending entries again (`0`) after an error fails on the same entry
/// forever. With this type the worker gets every entry and decides (a propagation field never
/// has such a name, so the entry's context is read as usual). A nil reply (`BLOCK` timed out) is
/// an empty one; a deleted entry still pending (`[id, nil]`) has no fields. A field name that
/// comes more than once in one entry (`XADD` allows it), or two names that read the same once
/// decoded, keep every value: the field's value is then a `Value::Array` of them, in order
/// (redis-rs's type keeps the last one only), and [`FieldExtractor`] reads such a propagation
/// field as repeated, so it is refused.
///
/// ```
/// use contextflow_messaging::redis::ReadReply;
/// use redis::{FromRedisValue as _, Value};
///
/// let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
/// // [[stream, [[id, [name, value, ...]], ...]]], as the server sends it.
/// let reply = Value::Array(vec![Value::Array(vec![
///     bulk(b"jobs"),
///     Value::Array(vec![
///         Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"\xff"), bulk(b"x")])]),
///         Value::Array(vec![bulk(b"2-0"), Value::Array(vec![bulk(b"x-request-id"), bulk(b"r-2")])]),
///     ]),
/// ])]);
/// assert!(redis::streams::StreamReadReply::from_redis_value(reply.clone()).is_err());
/// let ReadReply(read) = ReadReply::from_redis_value(reply)?;
/// let ids: Vec<&str> = read.keys[0].ids.iter().map(|e| e.id.as_str()).collect();
/// assert_eq!(ids, ["1-0", "2-0"]);
/// assert!(read.keys[0].ids[0].map.contains_key("\u{FFFD}"));
/// # Ok::<(), redis::ParsingError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ReadReply(pub redis::streams::StreamReadReply);

impl ReadReply {
    /// The entries of every stream of the reply, in order.
    ///
    /// ```
    /// let reply = contextflow_messaging::redis::ReadReply::default();
    /// assert_eq!(reply.into_entries().count(), 0);
    /// ```
    pub fn into_entries(self) -> impl Iterator<Item = StreamId> {
        self.0.keys.into_iter().flat_map(|key| key.ids)
    }
}

impl redis::FromRedisValue for ReadReply {
    fn from_redis_value(v: Value) -> Result<Self, redis::ParsingError> {
        // RESP2: an array of [key, entries] pairs; RESP3: a map of key to entries.
        let streams = match v {
            Value::Nil => Vec::new(),
            Value::Map(pairs) => pairs,
            Value::Array(rows) => rows
                .into_iter()
                .map(|row| match row {
                    Value::Array(pair) if pair.len() == 2 => {
                        let mut pair = pair.into_iter();
                        Ok((
                            pair.next().unwrap_or_default(),
                            pair.next().unwrap_or_default(),
                        ))
                    }
                    other => Err(not_a("stream of a read reply", &other)),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(not_a("read reply", &other)),
        };
        let keys = streams
            .into_iter()
            .map(|(key, entries)| {
                Ok(redis::streams::StreamKey {
                    key: lossy_text(key).ok_or_else(|| not_a_string("stream key"))?,
                    ids: lossy_entries(entries)?,
                })
            })
            .collect::<Result<_, redis::ParsingError>>()?;
        Ok(ReadReply(redis::streams::StreamReadReply { keys }))
    }
}

/// The reply of `XAUTOCLAIM`, read leniently as [`ReadReply`] is: the entries claimed, the id
/// to start the next call from, and (Redis 7 and later) the ids of entries that were deleted
/// while pending (they were removed from the pending list).
///
/// ```
/// use contextflow_messaging::redis::AutoClaimReply;
/// use redis::{FromRedisValue as _, Value};
///
/// let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
/// let reply = Value::Array(vec![
///     bulk(b"0-0"),
///     Value::Array(vec![Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"\xfe"), bulk(b"x")])])]),
///     Value::Array(vec![bulk(b"0-5")]),
/// ]);
/// let claimed = AutoClaimReply::from_redis_value(reply)?;
/// assert_eq!(claimed.next_stream_id, "0-0");
/// assert_eq!(claimed.claimed[0].id, "1-0");
/// assert_eq!(claimed.deleted_ids, ["0-5"]);
/// # Ok::<(), redis::ParsingError>(())
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct AutoClaimReply {
    /// Where the next `XAUTOCLAIM` starts (`0-0` once the whole pending list was scanned).
    pub next_stream_id: String,
    /// The entries claimed, with their fields.
    pub claimed: Vec<StreamId>,
    /// The ids of pending entries that no longer exist in the stream.
    pub deleted_ids: Vec<String>,
}

impl redis::FromRedisValue for AutoClaimReply {
    fn from_redis_value(v: Value) -> Result<Self, redis::ParsingError> {
        let Value::Array(items) = v else {
            return Err(not_a("XAUTOCLAIM reply", &v));
        };
        if !(2..=3).contains(&items.len()) {
            return Err("XAUTOCLAIM reply: expected 2 or 3 items".to_owned().into());
        }
        let mut items = items.into_iter();
        let next_stream_id = items
            .next()
            .and_then(lossy_text)
            .ok_or_else(|| not_a_string("XAUTOCLAIM next id"))?;
        let claimed = lossy_entries(items.next().unwrap_or_default())?;
        let deleted_ids = match items.next() {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Array(ids)) => ids.into_iter().filter_map(lossy_text).collect(),
            Some(other) => return Err(not_a("XAUTOCLAIM deleted ids", &other)),
        };
        Ok(AutoClaimReply {
            next_stream_id,
            claimed,
            deleted_ids,
        })
    }
}

/// The reply of `XRANGE`, `XREVRANGE` or `XCLAIM`: a list of entries, read leniently as
/// [`ReadReply`] is (entries deleted while pending, nil in some `XCLAIM` replies, are left out).
///
/// ```
/// use contextflow_messaging::redis::Entries;
/// use redis::{FromRedisValue as _, Value};
///
/// let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
/// let reply = Value::Array(vec![
///     Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"k"), bulk(b"v")])]),
///     Value::Nil,
/// ]);
/// let Entries(entries) = Entries::from_redis_value(reply)?;
/// assert_eq!(entries.len(), 1);
/// # Ok::<(), redis::ParsingError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Entries(pub Vec<StreamId>);

impl redis::FromRedisValue for Entries {
    fn from_redis_value(v: Value) -> Result<Self, redis::ParsingError> {
        lossy_entries(v).map(Entries)
    }
}

/// A list of entries: each `[id, [name, value, ...]]`, or with `XREADGROUP ... CLAIM`
/// `[id, fields, idle milliseconds, delivery count]`; nil entries are skipped.
fn lossy_entries(v: Value) -> Result<Vec<StreamId>, redis::ParsingError> {
    let list = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(list) => list,
        other => return Err(not_a("list of stream entries", &other)),
    };
    let mut entries = Vec::with_capacity(list.len());
    for entry in list {
        let parts = match entry {
            Value::Nil => continue,
            Value::Array(parts) if (2..=4).contains(&parts.len()) => parts,
            other => return Err(not_a("stream entry", &other)),
        };
        let mut parts = parts.into_iter();
        let id = parts
            .next()
            .and_then(lossy_text)
            .ok_or_else(|| not_a_string("entry id"))?;
        let pairs = match parts.next().unwrap_or_default() {
            Value::Nil => Vec::new(),
            Value::Map(pairs) => pairs,
            Value::Array(flat) if flat.len() % 2 == 0 => {
                let mut flat = flat.into_iter();
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                    pairs.push((name, value));
                }
                pairs
            }
            other => return Err(not_a("entry's fields", &other)),
        };
        let mut map: HashMap<String, Value> = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            // A name that is not a string at all is not a field anyone can read by name.
            let Some(name) = lossy_text(name) else {
                continue;
            };
            // A repeated name keeps every value (stream values are strings: an array is ours).
            match map.entry(name) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                std::collections::hash_map::Entry::Occupied(mut slot) => match slot.get_mut() {
                    Value::Array(values) => values.push(value),
                    first => {
                        let first = std::mem::replace(first, Value::Nil);
                        slot.insert(Value::Array(vec![first, value]));
                    }
                },
            }
        }
        let number = |v: Option<Value>| match v {
            Some(Value::Int(n)) => usize::try_from(n).ok(),
            _ => None,
        };
        entries.push(StreamId {
            id,
            map,
            milliseconds_elapsed_from_delivery: number(parts.next()),
            delivered_count: number(parts.next()),
        });
    }
    Ok(entries)
}

/// A string value as text, invalid UTF-8 replaced; `None` for values that are not strings.
fn lossy_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(bytes) => Some(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
        }),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn not_a(what: &str, v: &Value) -> redis::ParsingError {
    // The value's kind only: its content is untrusted and may be large.
    let kind = match v {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => "a string",
        Value::Array(_) => "an array of another shape",
        Value::Map(_) => "a map",
        _ => "another type",
    };
    format!("not a {what}: got {kind}").into()
}

fn not_a_string(what: &str) -> redis::ParsingError {
    format!("{what}: not a string").into()
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

    /// A name repeated within one entry, or two names that read the same once decoded, keep
    /// every value; a repeated propagation field reads as repeated.
    #[test]
    fn repeated_names_keep_every_value() {
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        let entry = Value::Array(vec![Value::Array(vec![
            bulk(b"1-0"),
            Value::Array(vec![
                bulk(b"x-request-id"),
                bulk(b"job-d"),
                bulk(b"\xff"),
                bulk(b"one"),
                bulk(b"x-request-id"),
                bulk(b"job-e"),
                bulk(b"\xfe"),
                bulk(b"two"),
                bulk(b"x-request-id"),
                bulk(b"job-f"),
            ]),
        ])]);
        let entries = lossy_entries(entry).unwrap();
        let map = &entries[0].map;
        assert_eq!(map.len(), 2, "{map:?}");
        assert_eq!(
            map["\u{FFFD}"],
            Value::Array(vec![bulk(b"one"), bulk(b"two")])
        );
        let extractor = FieldExtractor::from_entry(&entries[0]);
        assert_eq!(
            extractor.get_all("x-request-id").unwrap(),
            ["job-d", "job-e", "job-f"]
        );
        assert_eq!(extractor.get("x-request-id"), None);
        let (_, id) = contextflow_otel::Propagation::global()
            .extract_parts(&opentelemetry::Context::new(), &extractor);
        assert!(!id.as_str().starts_with("job-"), "{id}");
    }
}
