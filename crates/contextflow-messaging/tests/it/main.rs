//! Behaviour of contextflow-messaging through its public API.

#[cfg(feature = "lapin")]
mod amqp;
mod consume;
mod process;
mod publish;
