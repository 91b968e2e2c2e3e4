//! Carriers: string-keyed metadata that propagators read and write.
//!
//! A carrier is anything with string keys and string values that crosses a process boundary:
//! HTTP headers, gRPC metadata, AMQP or Kafka message headers, NATS headers, MQTT user
//! properties, a child process's environment. Propagators see them through OpenTelemetry's
//! [`Extractor`] and [`Injector`] traits, so every configured propagator (W3C trace context,
//! baggage, request id, B3, Datadog...) works on every transport. Two adapters make any
//! transport a one-liner:
//!
//! - [`Pairs`] reads any list of `(key, value)` string pairs (keys compared without regard to
//!   ASCII case; several values per key allowed);
//! - [`InjectFn`] writes through a closure.
//!
//! ```
//! use std::collections::BTreeMap;
//! use contextflow_otel::carrier::{InjectFn, Pairs};
//!
//! // A message broker's header map, here a plain map.
//! let mut headers: BTreeMap<String, String> = BTreeMap::new();
//! headers.insert("traceparent".into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
//! headers.insert("x-request-id".into(), "job-7".into());
//!
//! // Consume: one line to read the context, one to run the handler in it.
//! let cx = contextflow_otel::extract(&Pairs::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
//! let seen = contextflow_otel::sync_scope(cx, || {
//!     (contextflow_otel::current_trace_id().unwrap().to_string(), contextflow_otel::current_request_id().unwrap())
//! });
//! assert_eq!(seen.0, "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert_eq!(seen.1.as_str(), "job-7");
//!
//! // Publish: the current context into the next message's headers.
//! let mut out = BTreeMap::new();
//! contextflow_otel::inject(&mut InjectFn(|k: &str, v: String| { out.insert(k.to_owned(), v); }));
//! # drop(out);
//! ```
//!
//! Everything read is untrusted: [`extract`](crate::extract) ignores values longer than
//! [`MAX_VALUE_LEN`] and keys beyond [`MAX_PAIRS`] (with a `debug` log), and each
//! propagator validates its own fields, dropping a malformed one with a `debug` log that shows
//! the value escaped and cut to 64 bytes (baggage's only by its size: it carries user and
//! session data).

use std::fmt;

use opentelemetry::propagation::{Extractor, Injector};

/// Values longer than this many bytes are ignored by [`extract`](crate::extract).
pub const MAX_VALUE_LEN: usize = 8192;

/// [`Pairs`] keeps at most this many pairs; [`extract`](crate::extract) reads at most this
/// many values of one key.
pub const MAX_PAIRS: usize = 64;

/// An [`Extractor`] over `(key, value)` string pairs, keys compared without regard to ASCII
/// case. Keeps the first [`MAX_PAIRS`] pairs.
///
/// ```
/// use contextflow_otel::carrier::Pairs;
/// use opentelemetry::propagation::Extractor;
///
/// let pairs = Pairs::new([("Baggage", "a=1"), ("baggage", "b=2")]);
/// assert_eq!(pairs.get("baggage"), Some("a=1"));
/// assert_eq!(pairs.get_all("BAGGAGE"), Some(vec!["a=1", "b=2"]));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Pairs<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

/// An [`Injector`] that hands each `(key, value)` to a closure.
///
/// ```
/// use contextflow_otel::carrier::InjectFn;
/// use opentelemetry::propagation::Injector;
///
/// let mut seen = Vec::new();
/// InjectFn(|k: &str, v: String| seen.push(format!("{k}={v}"))).set("x-request-id", "r-1".into());
/// assert_eq!(seen, ["x-request-id=r-1"]);
/// ```
#[derive(Clone, Copy)]
pub struct InjectFn<F>(pub F);

/// An [`Extractor`] that enforces the bounds of [`extract`](crate::extract) on another one.
pub(crate) struct Bounded<'a>(pub(crate) &'a dyn Extractor);

/// A carrier that hands out the raw values of a field without allocating: what
/// [`Propagation::extract_parts_from`](crate::Propagation::extract_parts_from) reads on its fast
/// path (contextflow's own W3C propagators), with the same bounds and results as through
/// [`Extractor`].
///
/// `field_values(key)` must yield exactly what `get_all(key)` returns, in the same order, as
/// bytes (and nothing when `get_all` returns `None`), with one allowed difference: a value
/// that is not text, which an `Extractor` cannot hand out as it is (an HTTP header value that
/// is not UTF-8), is raw bytes here. The fast path then drops only the `baggage` members those
/// bytes spoil, where the `Extractor` path loses the whole value.
///
/// ```
/// use contextflow_otel::carrier::{FieldValues, Pairs};
/// use opentelemetry::propagation::Extractor;
///
/// struct One<'a>(Pairs<'a>);
/// impl Extractor for One<'_> {
///     fn get(&self, key: &str) -> Option<&str> { self.0.get(key) }
///     fn keys(&self) -> Vec<&str> { self.0.keys() }
///     fn get_all(&self, key: &str) -> Option<Vec<&str>> { self.0.get_all(key) }
/// }
/// impl FieldValues for One<'_> {
///     fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
///         self.0.get_all(key).unwrap_or_default().into_iter().map(str::as_bytes)
///     }
/// }
/// let carrier = One(Pairs::new([("x-request-id", "r-1")]));
/// let (_, id) = contextflow_otel::Propagation::global()
///     .extract_parts_from(&opentelemetry::Context::new(), &carrier);
/// assert_eq!(id.as_str(), "r-1");
/// ```
pub trait FieldValues: Extractor {
    /// Every value of the field `key` (a lower-case name), in order, as bytes.
    fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]>;

    /// For a carrier that can walk all its fields in one pass more cheaply than it can look up
    /// a few of them (an HTTP header map, where each lookup hashes the name): calls
    /// `f(i, value)` for every value of every field named `keys[i]` (lower-case names), in
    /// the carrier's order (for each key, the order of [`field_values`](Self::field_values),
    /// with the same values), and returns `true`. The default does nothing and returns
    /// `false`: the fields are then looked up one by one.
    ///
    /// ```
    /// use contextflow_otel::carrier::{FieldValues, Pairs};
    /// use opentelemetry::propagation::Extractor;
    ///
    /// struct Scanned<'a>(Pairs<'a>, Vec<(&'a str, &'a str)>);
    /// impl Extractor for Scanned<'_> {
    ///     fn get(&self, key: &str) -> Option<&str> { self.0.get(key) }
    ///     fn keys(&self) -> Vec<&str> { self.0.keys() }
    ///     fn get_all(&self, key: &str) -> Option<Vec<&str>> { self.0.get_all(key) }
    /// }
    /// impl FieldValues for Scanned<'_> {
    ///     fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
    ///         self.0.get_all(key).unwrap_or_default().into_iter().map(str::as_bytes)
    ///     }
    ///     fn scan_fields<'s>(&'s self, keys: &[&str], mut f: impl FnMut(usize, &'s [u8])) -> bool {
    ///         for (name, value) in &self.1 {
    ///             if let Some(i) = keys.iter().position(|k| k.eq_ignore_ascii_case(name)) {
    ///                 f(i, value.as_bytes());
    ///             }
    ///         }
    ///         true
    ///     }
    /// }
    /// let pairs = [("x-request-id", "r-1"), ("host", "example")];
    /// let carrier = Scanned(Pairs::new(pairs), pairs.to_vec());
    /// let (_, id) = contextflow_otel::Propagation::global()
    ///     .extract_parts_from(&opentelemetry::Context::new(), &carrier);
    /// assert_eq!(id.as_str(), "r-1");
    /// ```
    fn scan_fields<'s>(&'s self, keys: &[&str], f: impl FnMut(usize, &'s [u8])) -> bool {
        let _ = (keys, f);
        false
    }
}

/// The values of the fields the built-in propagators read, through [`Bounded`]'s bounds: the
/// one abstraction their extraction logic is written against, so the `dyn Extractor` path and
/// the allocation-free [`FieldValues`] path give the same results.
pub(crate) trait Source {
    /// `Extractor::get` through the bounds.
    fn first(&self, key: &str) -> Option<&[u8]>;
    /// `Extractor::get_all` through the bounds when it holds exactly one value: `Ok(value)`;
    /// more than one: `Err(first)`; none: `None`.
    fn single(&self, key: &str) -> Option<Result<&[u8], &[u8]>>;
    /// `Extractor::get_all` through the bounds.
    fn all(&self, key: &str) -> Option<Vec<&[u8]>>;
    /// Whether `key` has a value within the bounds: its first one, or, when that one is out of
    /// bounds (or not text), any other.
    fn present(&self, key: &str) -> bool {
        self.first(key).is_some() || self.all(key).is_some_and(|values| !values.is_empty())
    }
}

/// [`Bounded`]'s bounds over a [`FieldValues`] carrier, allocating only for `all`.
pub(crate) struct BoundedFields<'a, E>(pub(crate) &'a E);

/// [`BoundedFields`] over the first two values of a few fields, collected in one pass by
/// [`FieldValues::scan_fields`]; a field with more values is read through `BoundedFields`.
pub(crate) struct ScannedFields<'a, 'k, E, const N: usize> {
    carrier: BoundedFields<'a, E>,
    keys: [&'k str; N],
    seen: [Seen<'a>; N],
}

/// The first two values of a field, and how many it has.
#[derive(Clone, Copy, Default)]
struct Seen<'a> {
    first: Option<&'a [u8]>,
    second: Option<&'a [u8]>,
    count: usize,
}

/// An untrusted value made safe for a log line: escaped as ASCII (no control characters, no
/// newlines, no non-ASCII bytes) and cut to 64 bytes.
pub(crate) struct Escaped<'a>(pub(crate) &'a [u8]);

// ===== impl Pairs =====

impl<'a> Pairs<'a> {
    /// Collects up to [`MAX_PAIRS`] pairs.
    ///
    /// ```
    /// let env = [("TRACEPARENT", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")];
    /// let cx = contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new(env));
    /// assert!(opentelemetry::trace::TraceContextExt::has_active_span(&cx));
    /// ```
    pub fn new(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut pairs = pairs.into_iter();
        let kept: Vec<_> = pairs.by_ref().take(MAX_PAIRS).collect();
        if pairs.next().is_some() {
            tracing::debug!("ignored the pairs of a carrier past its first 64");
        }
        Pairs { pairs: kept }
    }
}

impl Extractor for Pairs<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|&(_, v)| v)
    }

    fn keys(&self) -> Vec<&str> {
        self.pairs.iter().map(|&(k, _)| k).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self
            .pairs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|&(_, v)| v)
            .collect();
        (!all.is_empty()).then_some(all)
    }
}

impl FieldValues for Pairs<'_> {
    /// The values of `key`, any ASCII case.
    ///
    /// ```
    /// use contextflow_otel::carrier::{FieldValues, Pairs};
    /// let pairs = Pairs::new([("X-Request-ID", "r-1"), ("host", "h")]);
    /// assert_eq!(pairs.field_values("x-request-id").collect::<Vec<_>>(), [b"r-1"]);
    /// ```
    fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|&(_, v)| v.as_bytes())
    }
}

// ===== impl InjectFn =====

impl<F: FnMut(&str, String)> Injector for InjectFn<F> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, value)
    }
}

impl<F> fmt::Debug for InjectFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InjectFn")
    }
}

// ===== impl Bounded =====

impl Bounded<'_> {
    fn check<'v>(&self, key: &str, value: &'v str) -> Option<&'v str> {
        check_bytes(key, value.as_bytes()).map(|_| value)
    }
}

impl Extractor for Bounded<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| self.check(key, v))
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = self.0.keys();
        keys.truncate(MAX_PAIRS);
        keys
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let mut all = self.0.get_all(key)?;
        if all.len() > MAX_PAIRS {
            tracing::debug!(key = %Escaped(key.as_bytes()), count = all.len(), "ignored values past 64");
            all.truncate(MAX_PAIRS);
        }
        if all.len() > 1 && is_single_valued(key) {
            // A repeated single-valued field is invalid whatever its values' lengths: an
            // over-long copy stays in the list (emptied) so that the repeat is seen.
            return Some(
                all.into_iter()
                    .map(|v| self.check(key, v).unwrap_or(""))
                    .collect(),
            );
        }
        let all: Vec<&str> = all.into_iter().filter_map(|v| self.check(key, v)).collect();
        (!all.is_empty()).then_some(all)
    }
}

// ===== impl BoundedFields =====

impl<E: FieldValues> BoundedFields<'_, E> {
    /// Calls `f` with each value `Bounded::get_all` keeps: among the first 64, each within
    /// the length bound.
    fn kept<'s>(&'s self, key: &str, mut f: impl FnMut(&'s [u8])) {
        let mut count = 0usize;
        for value in self.0.field_values(key) {
            count += 1;
            if count <= MAX_PAIRS {
                if let Some(value) = check_bytes(key, value) {
                    f(value);
                }
            }
        }
        if count > MAX_PAIRS {
            tracing::debug!(key = %Escaped(key.as_bytes()), count, "ignored values past 64");
        }
    }
}

impl<E: FieldValues> Source for BoundedFields<'_, E> {
    fn first(&self, key: &str) -> Option<&[u8]> {
        self.0
            .field_values(key)
            .next()
            .and_then(|v| check_bytes(key, v))
    }

    fn single(&self, key: &str) -> Option<Result<&[u8], &[u8]>> {
        let mut values = self.0.field_values(key);
        let first = values.next()?;
        // Repeated: invalid whatever the lengths (an over-long copy counts).
        if values.next().is_some() {
            return Some(Err(first));
        }
        check_bytes(key, first).map(Ok)
    }

    fn all(&self, key: &str) -> Option<Vec<&[u8]>> {
        let mut all = Vec::new();
        self.kept(key, |value| all.push(value));
        (!all.is_empty()).then_some(all)
    }
}

// ===== impl ScannedFields =====

impl<'a, 'k, E: FieldValues, const N: usize> ScannedFields<'a, 'k, E, N> {
    /// Scans `carrier` for `keys` in one pass; `None` when the carrier cannot scan.
    pub(crate) fn scan(carrier: &'a E, keys: [&'k str; N]) -> Option<Self> {
        let mut seen = [Seen::default(); N];
        let scanned = carrier.scan_fields(&keys, |i, value| {
            let Some(seen) = seen.get_mut(i) else {
                return;
            };
            match seen.count {
                0 => seen.first = Some(value),
                1 => seen.second = Some(value),
                _ => {}
            }
            seen.count += 1;
        });
        scanned.then_some(ScannedFields {
            carrier: BoundedFields(carrier),
            keys,
            seen,
        })
    }

    /// What was seen of `key`; `None` for a key not scanned or with more than two values
    /// (then read from the carrier).
    fn seen(&self, key: &str) -> Option<&Seen<'a>> {
        // The callers pass the same constants as the scan: the address usually settles it.
        let i = self.keys.iter().position(|k| {
            k.len() == key.len() && (std::ptr::eq(k.as_ptr(), key.as_ptr()) || *k == key)
        })?;
        let seen = &self.seen[i];
        (seen.count <= 2).then_some(seen)
    }
}

impl<E: FieldValues, const N: usize> Source for ScannedFields<'_, '_, E, N> {
    fn first(&self, key: &str) -> Option<&[u8]> {
        match self.seen(key) {
            Some(seen) => seen.first.and_then(|v| check_bytes(key, v)),
            None => self.carrier.first(key),
        }
    }

    fn single(&self, key: &str) -> Option<Result<&[u8], &[u8]>> {
        let Some(seen) = self.seen(key) else {
            return self.carrier.single(key);
        };
        let first = seen.first?;
        // Repeated: invalid whatever the lengths (an over-long copy counts).
        if seen.count > 1 {
            return Some(Err(first));
        }
        check_bytes(key, first).map(Ok)
    }

    fn all(&self, key: &str) -> Option<Vec<&[u8]>> {
        let Some(seen) = self.seen(key) else {
            return self.carrier.all(key);
        };
        let all: Vec<&[u8]> = [seen.first, seen.second]
            .into_iter()
            .flatten()
            .filter_map(|v| check_bytes(key, v))
            .collect();
        (!all.is_empty()).then_some(all)
    }

    fn present(&self, key: &str) -> bool {
        let Some(seen) = self.seen(key) else {
            return self.carrier.present(key);
        };
        // Most requests carry no `tracestate` or `baggage`: settled without a `Vec`.
        [seen.first, seen.second]
            .into_iter()
            .flatten()
            .any(|v| check_bytes(key, v).is_some())
    }
}

/// Whether `key` names a field that may appear once only (a repeat makes it invalid):
/// `traceparent` and the request id.
fn is_single_valued(key: &str) -> bool {
    key.eq_ignore_ascii_case(crate::traceparent::TRACEPARENT)
        || key.eq_ignore_ascii_case(crate::request_id::X_REQUEST_ID)
}

/// `Some(value)` when `value` is within the bounds; otherwise `None`, with a debug line giving
/// the field's name and size (never its value).
fn check_bytes<'v>(key: &str, value: &'v [u8]) -> Option<&'v [u8]> {
    if value.len() > MAX_VALUE_LEN {
        // The value is not logged: it may be baggage, which carries user and session data.
        tracing::debug!(
            key = %Escaped(key.as_bytes()),
            bytes = value.len(),
            "ignored an over-long propagation field"
        );
        return None;
    }
    Some(value)
}

// ===== impl Escaped =====

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 64;
        let bytes = self.0;
        write!(f, "\"{}\"", bytes[..bytes.len().min(MAX)].escape_ascii())?;
        if bytes.len() > MAX {
            write!(f, "... ({} bytes)", bytes.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_hides_control_characters() {
        let shown = Escaped(b"a\t\"b\xff\\\n").to_string();
        assert_eq!(shown, r#""a\t\"b\xff\\\n""#);
        assert!(Escaped(&[b'x'; 100])
            .to_string()
            .ends_with("... (100 bytes)"));
    }

    /// [`Pairs`] as a carrier of raw fields that can scan them in one pass.
    struct Fields<'a>(Pairs<'a>);

    impl Extractor for Fields<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys()
        }
        fn get_all(&self, key: &str) -> Option<Vec<&str>> {
            self.0.get_all(key)
        }
    }

    impl FieldValues for Fields<'_> {
        fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
            self.0
                .get_all(key)
                .unwrap_or_default()
                .into_iter()
                .map(str::as_bytes)
        }
        fn scan_fields<'s>(&'s self, keys: &[&str], mut f: impl FnMut(usize, &'s [u8])) -> bool {
            for &(name, value) in &self.0.pairs {
                if let Some(i) = keys.iter().position(|k| k.eq_ignore_ascii_case(name)) {
                    f(i, value.as_bytes());
                }
            }
            true
        }
    }

    /// A `traceparent` (or request id) repeated with an over-long copy is still repeated,
    /// on every path: the Extractor path, the field path and the one-pass scan.
    #[test]
    fn a_repeat_with_an_over_long_copy_is_a_repeat() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        for key in ["traceparent", "x-request-id"] {
            for pairs in [
                [(key, good), (key, long.as_str())],
                [(key, long.as_str()), (key, good)],
            ] {
                let fields = Fields(Pairs::new(pairs));
                assert_eq!(
                    Bounded(&fields).get_all(key).map(|v| v.len()),
                    Some(2),
                    "{key}"
                );
                assert!(
                    matches!(BoundedFields(&fields).single(key), Some(Err(_))),
                    "{key}"
                );
                let scanned = ScannedFields::scan(&fields, [key]).expect("scans");
                assert!(matches!(scanned.single(key), Some(Err(_))), "{key}");
            }
            let alone = Fields(Pairs::new([(key, long.as_str())]));
            assert_eq!(
                BoundedFields(&alone).single(key),
                None,
                "{key}: ignored, not invalid"
            );
        }
        // Fields that may repeat keep dropping the over-long copy.
        let pairs = Pairs::new([("tracestate", "a=1"), ("tracestate", long.as_str())]);
        assert_eq!(Bounded(&pairs).get_all("tracestate"), Some(vec!["a=1"]));
    }

    #[test]
    fn bounded_drops_long_values_and_many_values() {
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let many: Vec<(&str, &str)> = (0..100).map(|_| ("k", "v")).collect();
        let pairs = Pairs::new([("long", long.as_str())]);
        assert_eq!(Bounded(&pairs).get("long"), None);
        assert_eq!(Bounded(&pairs).get_all("long"), None);
        let pairs = Pairs::new(many);
        assert_eq!(Bounded(&pairs).get_all("k").unwrap().len(), MAX_PAIRS);
    }
}
