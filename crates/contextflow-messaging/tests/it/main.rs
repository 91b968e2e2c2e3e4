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
