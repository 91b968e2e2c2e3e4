//! Behaviour of contextflow-messaging through its public API.

#[cfg(feature = "lapin")]
mod amqp;
mod consume;
#[cfg(feature = "cron")]
mod cron;
#[cfg(feature = "rdkafka")]
mod kafka;
#[cfg(feature = "rumqttc")]
mod mqtt;
#[cfg(feature = "async-nats")]
mod nats;
mod process;
mod publish;
#[cfg(feature = "redis")]
mod redis_streams;

/// The property tests' oracle, from the raw metadata pairs (not through the extractor under
/// test): the values of `x-request-id`, in any spelling, among the first
/// [`MAX_PAIRS`](contextflow_otel::carrier::MAX_PAIRS) pairs. A carried request id is used only
/// when there is exactly one.
pub(crate) fn request_id_copies(pairs: &[(String, String)]) -> Vec<&str> {
    pairs
        .iter()
        .take(contextflow_otel::carrier::MAX_PAIRS)
        .filter(|(name, _)| name.eq_ignore_ascii_case("x-request-id"))
        .map(|(_, value)| value.as_str())
        .collect()
}
