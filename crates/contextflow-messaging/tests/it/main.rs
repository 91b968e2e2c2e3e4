//! Behaviour of contextflow-messaging through its public API.

mod consume;
mod process;
mod publish;
