//! Behaviour of contextflow-http through its public API.

mod client;
#[cfg(feature = "reqwest")]
mod e2e;
mod fast_path;
mod layering;
mod logging;
mod server;
#[cfg(feature = "reqwest")]
mod validation_service;
