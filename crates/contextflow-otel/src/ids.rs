//! Random ids from a cryptographically secure generator.
//!
//! Request ids, trace ids and span ids are echoed to clients and written to logs, so they must
//! not reveal anything about the ids that come next. Every id here comes from `rand`'s
//! `ThreadRng`: a per-thread ChaCha12 generator seeded from the operating system and reseeded
//! periodically. It fills a buffer of 64 words at a time, so an id costs a few nanoseconds.
//!
//! With the feature `sdk`, [`SecureIdGenerator`] gives the OpenTelemetry SDK the same
//! generator (the SDK's default is a fast, non-cryptographic one).

use opentelemetry::trace::{SpanId, TraceId};
use rand::RngCore as _;

/// A random trace id (never all zero).
///
/// ```
/// let (a, b) = (contextflow_otel::new_trace_id(), contextflow_otel::new_trace_id());
/// assert_ne!(a, b);
/// assert_ne!(a, opentelemetry::trace::TraceId::INVALID);
/// ```
pub fn new_trace_id() -> TraceId {
    let mut rng = rand::rng();
    loop {
        let id = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

/// A random span id (never all zero).
///
/// ```
/// let (a, b) = (contextflow_otel::new_span_id(), contextflow_otel::new_span_id());
/// assert_ne!(a, b);
/// assert_ne!(a, opentelemetry::trace::SpanId::INVALID);
/// ```
pub fn new_span_id() -> SpanId {
    let mut rng = rand::rng();
    loop {
        let id = rng.next_u64();
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

/// Reseeds this thread's generator from the operating system.
///
/// Call it in a child process made with `fork()` that goes on without `exec` (a pre-forking
/// server, a daemon that forks workers): `rand`'s generator is not reseeded on fork, so parent
/// and child would otherwise produce the same ids until its next periodic reseed. (A `Command`
/// that runs another program needs nothing: nothing runs between its fork and its exec.)
///
/// # Errors
/// When the operating system's random source fails.
///
/// ```
/// contextflow_otel::reseed_after_fork()?;
/// assert_ne!(contextflow_otel::new_trace_id(), contextflow_otel::new_trace_id());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn reseed_after_fork() -> Result<(), std::io::Error> {
    rand::rng()
        .reseed()
        .map_err(|err| std::io::Error::other(err.to_string()))
}

/// 16 random bytes.
pub(crate) fn random_bytes() -> [u8; 16] {
    let mut rng = rand::rng();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.next_u64().to_ne_bytes());
    bytes[8..].copy_from_slice(&rng.next_u64().to_ne_bytes());
    bytes
}

/// An OpenTelemetry SDK id generator backed by the same per-thread ChaCha as [`new_trace_id`]
/// (feature `sdk`).
///
/// ```
/// use opentelemetry_sdk::trace::{IdGenerator, SdkTracerProvider};
///
/// let generator = contextflow_otel::SecureIdGenerator::default();
/// assert_ne!(generator.new_trace_id(), generator.new_trace_id());
/// let provider = SdkTracerProvider::builder().with_id_generator(generator).build();
/// # drop(provider);
/// ```
#[cfg(feature = "sdk")]
#[cfg_attr(docsrs, doc(cfg(feature = "sdk")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct SecureIdGenerator {
    _private: (),
}

#[cfg(feature = "sdk")]
impl opentelemetry_sdk::trace::IdGenerator for SecureIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        new_trace_id()
    }

    fn new_span_id(&self) -> SpanId {
        new_span_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_zero_and_differ() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&SpanId::INVALID));
        assert_ne!(random_bytes(), random_bytes());
    }
}
