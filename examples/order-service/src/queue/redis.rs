//! The queue on Redis Streams (`--queue redis://...`), as a job queue: a message is the same
//! JSON envelope as on RabbitMQ, in the `envelope` field of an entry of the service's stream,
//! next to the propagation fields `contextflow_messaging::redis::add` writes (so a job read
//! again after a failure still carries the context of the request that queued it).
//!
//! The audit consumer is one consumer of a consumer group, on a connection of its own (its
//! `XREADGROUP ... BLOCK` would hold up every other command of a shared one), in a task of its
//! own. It acknowledges each entry once handled and deletes it (`XACK` then `XDEL`: a handled
//! job leaves the stream). After a failed read it reconnects and reads its own pending entries
//! again first (`XREADGROUP ... 0`): delivery is at least once, the audit handles each once.
//!
//! The stream belongs to this process: it expires [`TTL_SECS`] after its consumer last
//! refreshed it, so a stopped service leaves nothing behind for long.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use redis::{
    aio::MultiplexedConnection,
    streams::{StreamId, StreamReadOptions},
    AsyncCommands as _, AsyncConnectionConfig, Value,
};

use contextflow_messaging::redis::FieldExtractor;

use super::amqp::Envelope;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The consumer group of the audit consumer.
const GROUP: &str = "order-service-audit";
/// The field that holds the envelope.
const ENVELOPE: &str = "envelope";
/// How long one `XREADGROUP` waits for entries.
const BLOCK: Duration = Duration::from_secs(2);
/// The stream expires this long after its consumer last refreshed it.
pub(super) const TTL_SECS: i64 = 600;
/// How often the consumer refreshes the stream's expiry.
const REFRESH: Duration = Duration::from_secs(60);
/// Entries per read.
const BATCH: usize = 128;
/// How long a publish waits for the server's reply.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to Redis and the service's stream.
#[derive(Clone, Debug)]
pub(super) struct Redis {
    client: redis::Client,
    /// The publishing connection; `None` after it failed (a multiplexed connection does not
    /// reconnect by itself): the next publish makes a new one.
    publish: std::sync::Arc<std::sync::Mutex<Option<MultiplexedConnection>>>,
    key: String,
}

/// One entry read from the stream: its id, its envelope (if it parses) and the context its
/// fields carry.
pub(super) struct Job {
    pub(super) id: String,
    pub(super) envelope: Option<Envelope>,
    pub(super) incoming: opentelemetry::Context,
}

/// The audit consumer's side of the stream.
pub(super) struct Jobs {
    client: redis::Client,
    con: Option<MultiplexedConnection>,
    key: String,
    consumer: String,
    read: VecDeque<StreamId>,
    /// Whether to read this consumer's own pending entries (`0`) before new ones (`>`).
    backlog: bool,
    refreshed: Instant,
    failures: u32,
}

impl Redis {
    /// Connects to `url` and makes the stream `key` with the audit consumer's group.
    pub(super) async fn connect(url: &str, key: &str) -> Result<Redis, BoxError> {
        let client = redis::Client::open(url)?;
        let mut publish = publishing_connection(&client).await?;
        create_group(&mut publish, key).await?;
        let _: bool = publish.expire(key, TTL_SECS).await?;
        Ok(Redis {
            client,
            publish: std::sync::Arc::new(std::sync::Mutex::new(Some(publish))),
            key: key.to_owned(),
        })
    }

    /// The slot of the publishing connection (a poisoned lock only means a panic while it was
    /// held: the slot holds a connection or none, either is fine).
    fn publish_slot(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.publish
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The publishing connection, made again if the last one failed.
    async fn publishing(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let current = self.publish_slot().clone();
        match current {
            Some(con) => Ok(con),
            None => {
                let con = publishing_connection(&self.client).await?;
                *self.publish_slot() = Some(con.clone());
                Ok(con)
            }
        }
    }

    /// Queues message `id` (`XADD`) with the current context in the entry's fields.
    pub(super) async fn publish(
        &self,
        id: i64,
        topic: &str,
        payload: serde_json::Value,
    ) -> Result<(), BoxError> {
        let body = serde_json::to_string(&Envelope {
            id,
            topic: topic.to_owned(),
            payload,
        })?;
        let mut con = self.publishing().await?;
        let added =
            contextflow_messaging::redis::add(&mut con, &self.key, &[(ENVELOPE, body)]).await;
        if let Err(err) = &added {
            if err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() {
                // Redis restarted, or the connection broke: the next publish reconnects (the
                // outbox keeps this row for it).
                *self.publish_slot() = None;
            }
        }
        added?;
        Ok(())
    }

    /// The entries of the stream for the consumer `consumer` of the audit group.
    pub(super) async fn jobs(&self, consumer: &str) -> Result<Jobs, BoxError> {
        let mut jobs = Jobs {
            client: self.client.clone(),
            con: None,
            key: self.key.clone(),
            consumer: consumer.to_owned(),
            read: VecDeque::new(),
            backlog: true,
            refreshed: Instant::now(),
            failures: 0,
        };
        jobs.connection().await?;
        Ok(jobs)
    }
}

/// A connection for publishing.
async fn publishing_connection(
    client: &redis::Client,
) -> Result<MultiplexedConnection, redis::RedisError> {
    // The client's default response timeout (500 ms) fails a publish on a loaded machine.
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(PUBLISH_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// `XGROUP CREATE key GROUP 0 MKSTREAM`, where a group that exists already is fine. From the
/// stream's first entry, not its end (`$`): a group made again after the stream vanished
/// (expired, evicted, flushed) and was made again by a publish (`XADD` makes a missing stream)
/// must read the entries published since, or those events are marked delivered and never
/// handled. A stream that already has a group keeps it (`BUSYGROUP`).
async fn create_group(con: &mut MultiplexedConnection, key: &str) -> Result<(), redis::RedisError> {
    let created: Result<(), redis::RedisError> = con.xgroup_create_mkstream(key, GROUP, "0").await;
    match created {
        Err(err) if err.code() != Some("BUSYGROUP") => Err(err),
        _ => Ok(()),
    }
}

impl Jobs {
    /// The consumer's connection, made when there is none.
    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, redis::RedisError> {
        if self.con.is_none() {
            // The blocking read must not time out before the server answers it.
            let config = AsyncConnectionConfig::new().set_response_timeout(Some(BLOCK * 3));
            let mut con = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            create_group(&mut con, &self.key).await?;
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("made above"))
    }

    /// The next entry, waiting for one; read errors are logged and retried.
    pub(super) async fn next(&mut self) -> Job {
        loop {
            if let Some(entry) = self.read.pop_front() {
                return job(entry);
            }
            match self.read_more().await {
                Ok(()) => self.failures = 0,
                Err(err) => {
                    self.failures += 1;
                    tracing::warn!(error = %err, failures = self.failures, "Redis read failed; reconnecting");
                    self.con = None;
                    self.backlog = true;
                    let backoff = 100u64 << self.failures.min(5);
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
            }
        }
    }

    /// One `XREADGROUP`: this consumer's pending entries while there are any, then new ones.
    async fn read_more(&mut self) -> Result<(), redis::RedisError> {
        let (key, start) = (self.key.clone(), if self.backlog { "0" } else { ">" });
        let mut options = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(BATCH);
        if !self.backlog {
            options = options.block(BLOCK.as_millis() as usize);
        }
        let con = self.connection().await?;
        // contextflow's lenient reply: with redis-rs's own, one entry with a binary field name
        // would fail every read of this consumer's pending list, forever.
        let reply: contextflow_messaging::redis::ReadReply =
            con.xread_options(&[&key], &[start], &options).await?;
        let entries: Vec<StreamId> = reply.into_entries().collect();
        if self.backlog && entries.is_empty() {
            self.backlog = false;
        }
        self.read.extend(entries);
        if self.refreshed.elapsed() >= REFRESH {
            let _: bool = self.connection().await?.expire(&key, TTL_SECS).await?;
            self.refreshed = Instant::now();
        }
        Ok(())
    }

    /// Acknowledges the entry `id` and deletes it (a failure is logged: the entry stays
    /// pending and is read again after a reconnection; the audit handles it once).
    pub(super) async fn done(&mut self, id: &str) {
        let key = self.key.clone();
        let result = match self.connection().await {
            Ok(con) => {
                redis::pipe()
                    .xack(&key, GROUP, &[id])
                    .ignore()
                    .xdel(&key, &[id])
                    .ignore()
                    .query_async::<()>(con)
                    .await
            }
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "Redis XACK failed");
            self.con = None;
            self.backlog = true;
        }
    }
}

/// An entry as a job: the envelope of its `envelope` field, and the context of its
/// propagation fields (untrusted input: validated and bounded by contextflow-otel).
fn job(entry: StreamId) -> Job {
    let incoming = contextflow_otel::extract(&FieldExtractor::from_entry(&entry));
    let envelope = match entry.map.get(ENVELOPE) {
        Some(Value::BulkString(bytes)) => serde_json::from_slice(bytes).ok(),
        _ => None,
    };
    Job {
        id: entry.id,
        envelope,
        incoming,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(key: &str) -> Redis {
        let url = contextflow_testenv::url(contextflow_testenv::Service::Redis);
        Redis::connect(&url, key).await.expect("connect to Redis")
    }

    /// Review finding: when the stream vanished (expired, evicted, flushed), a publish made it
    /// again without the consumer group, and the consumer made the group again at the
    /// stream's end: the events published in between were marked delivered and never handled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(cf_service_redis),
        ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
    )]
    async fn an_event_published_after_the_stream_vanished_is_consumed() {
        let key = format!("order-service-test-{}", uuid::Uuid::new_v4().simple());
        let redis = queue(&key).await;
        let mut jobs = redis.jobs("c1").await.unwrap();
        let mut con = redis.publishing().await.unwrap();
        let _: i64 = con.del(&key).await.unwrap();
        redis
            .publish(7, "order.confirmed", serde_json::json!({"order_id": 7}))
            .await
            .unwrap();
        let job = tokio::time::timeout(Duration::from_secs(15), jobs.next())
            .await
            .expect("the event is consumed");
        assert_eq!(job.envelope.map(|e| e.id), Some(7));
        let _: i64 = con.del(&key).await.unwrap();
    }

    /// Review finding: the publishing connection never reconnected: once it broke, every
    /// publish failed until the process restarted.
    #[tokio::test(flavor = "current_thread")]
    #[cfg_attr(
        not(cf_service_redis),
        ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
    )]
    async fn a_broken_publishing_connection_is_made_again() {
        let key = format!("order-service-test-{}", uuid::Uuid::new_v4().simple());
        let redis = queue(&key).await;
        // Redis drops the publishing connection (as a restart would).
        let mut con = redis.publishing().await.unwrap();
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut con)
            .await
            .unwrap();
        let mut admin = publishing_connection(&redis.client).await.unwrap();
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut admin)
            .await
            .unwrap();
        let payload = || serde_json::json!({"order_id": 8});
        // The first publish after the break may fail (the outbox keeps its row); one of the
        // next ones goes through on a new connection.
        let mut delivered = false;
        for _ in 0..3 {
            if redis.publish(8, "order.confirmed", payload()).await.is_ok() {
                delivered = true;
                break;
            }
        }
        assert!(delivered, "publishing never recovered");
        let _: i64 = admin.del(&key).await.unwrap();
    }
}
