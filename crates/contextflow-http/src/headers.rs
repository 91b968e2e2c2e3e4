//! HTTP headers as propagation carriers: [`HeaderExtractor`] and [`HeaderInjector`], and the
//! one-line forms [`extract_headers`] and [`inject_headers`].

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};

/// The name of the `traceparent` header.
///
/// ```
/// assert_eq!(contextflow_http::TRACEPARENT, "traceparent");
/// ```
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The name of the `tracestate` header.
///
/// ```
/// assert_eq!(contextflow_http::TRACESTATE, "tracestate");
/// ```
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The name of the `baggage` header.
///
/// ```
/// assert_eq!(contextflow_http::BAGGAGE_HEADER, "baggage");
/// ```
pub const BAGGAGE_HEADER: HeaderName = HeaderName::from_static("baggage");

/// The name of the request id header.
///
/// ```
/// assert_eq!(contextflow_http::X_REQUEST_ID, "x-request-id");
/// ```
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An [`Extractor`] over an [`http::HeaderMap`] that sees every value of a repeated header (so
/// a propagator can tell two `traceparent` headers from one). A value that is not visible
/// ASCII is seen as `"\0"`, which no propagator accepts.
///
/// ```
/// use contextflow_http::HeaderExtractor;
/// use opentelemetry::propagation::Extractor;
///
/// let mut headers = http::HeaderMap::new();
/// headers.append("tracestate", "a=1".parse()?);
/// headers.append("tracestate", "b=2".parse()?);
/// assert_eq!(HeaderExtractor(&headers).get_all("tracestate"), Some(vec!["a=1", "b=2"]));
/// # Ok::<(), http::header::InvalidHeaderValue>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

/// An [`Injector`] into an [`http::HeaderMap`] that leaves alone the headers already there.
///
/// A trace context the caller set wins whole: when the request already has a valid
/// `traceparent` (one value that parses: a malformed or repeated one is replaced by ours),
/// no trace-identity header is added (not our `tracestate`, nor another format's, such as B3's
/// or Datadog's, which would name a second parent); other fields (baggage, the request id, a
/// custom propagator's own) still are. A `tracestate` the caller set without a `traceparent`
/// is kept, after our members when we write one (theirs with a key we write are dropped, and
/// so are members that break the W3C grammar or are not text, which would make a receiver
/// drop the list, and members beyond 32 or 512 characters); when the propagator writes no
/// `tracestate` (a span without members), the caller's is checked the same way when the
/// injector is dropped.
///
/// ```
/// use contextflow_http::HeaderInjector;
/// use opentelemetry::propagation::Injector;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-request-id", "mine".parse()?);
/// let mut injector = HeaderInjector::new(&mut headers);
/// injector.set("x-request-id", "theirs".into());
/// injector.set("baggage", "a=1".into());
/// drop(injector); // its last check runs on drop: the headers are read after it
/// assert_eq!(headers["x-request-id"], "mine");
/// assert_eq!(headers["baggage"], "a=1");
/// # Ok::<(), http::header::InvalidHeaderValue>(())
/// ```
#[derive(Debug)]
pub struct HeaderInjector<'a> {
    headers: &'a mut HeaderMap,
    caller_set_traceparent: bool,
    skip_baggage: bool,
    /// Whether the propagator wrote `tracestate` (the caller's members were merged then).
    wrote_tracestate: bool,
}

/// Reads the context an incoming request's headers carry, with the global propagation
/// (`contextflow_otel::Propagation::global`): trace context, baggage and a request id (the
/// caller's when valid, else a fresh one). Use it for transports that carry HTTP-style headers.
///
/// ```
/// use http::HeaderMap;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?);
/// headers.insert("x-request-id", "bad id".parse()?);
/// let cx = contextflow_http::extract_headers(&headers);
/// let (trace_id, request_id) = contextflow_otel::sync_scope(cx, || {
///     (contextflow_http::current_trace_id(), contextflow_http::current_request_id())
/// });
/// assert_eq!(trace_id.unwrap().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_ne!(request_id.unwrap().as_str(), "bad id", "an invalid id is replaced");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn extract_headers(headers: &HeaderMap) -> opentelemetry::Context {
    contextflow_otel::extract(&HeaderExtractor(headers))
}

/// Writes the current context into outgoing request headers with the global propagation:
/// `traceparent` naming the current span as parent, `tracestate`, `baggage` and
/// `x-request-id`. Headers the caller set are left alone (see [`HeaderInjector`]).
///
/// ```
/// use contextflow_otel::carrier::Pairs;
/// use http::HeaderMap;
///
/// let cx = contextflow_otel::extract(&Pairs::new([
///     ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
///     ("x-request-id", "r-1"),
/// ]));
/// let mut headers = HeaderMap::new();
/// contextflow_otel::sync_scope(cx, || contextflow_http::inject_headers(&mut headers));
/// assert_eq!(headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(headers["x-request-id"], "r-1");
/// ```
pub fn inject_headers(headers: &mut HeaderMap) {
    contextflow_otel::inject(&mut HeaderInjector::new(headers))
}

// ===== impl HeaderExtractor =====

impl HeaderExtractor<'_> {
    /// The values of `key`: a known propagation header by its constant name (no parsing of
    /// the name), any other by `key`.
    fn values(&self, key: &str) -> http::header::GetAll<'_, HeaderValue> {
        let known = match key {
            "traceparent" => Some(&TRACEPARENT),
            "tracestate" => Some(&TRACESTATE),
            "baggage" => Some(&BAGGAGE_HEADER),
            "x-request-id" => Some(&X_REQUEST_ID),
            _ => None,
        };
        match known {
            Some(name) => self.0.get_all(name),
            None => self.0.get_all(key),
        }
    }
}

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.values(key).iter().next().map(as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let mut values = self.values(key).iter().peekable();
        values.peek()?;
        Some(values.map(as_str).collect())
    }
}

/// The raw bytes of each value: the parsers are byte-based, so a byte that is not visible
/// ASCII (`obs-text`) invalidates only what it is part of (one baggage member), not the whole
/// header.
impl contextflow_otel::carrier::FieldValues for HeaderExtractor<'_> {
    fn field_values<'s>(&'s self, key: &str) -> impl Iterator<Item = &'s [u8]> {
        self.values(key).into_iter().map(HeaderValue::as_bytes)
    }

    /// One pass over the map, comparing names (most differ in length), where each lookup
    /// would hash its name: cheaper for the few headers a request has.
    fn scan_fields<'s>(&'s self, keys: &[&str], mut f: impl FnMut(usize, &'s [u8])) -> bool {
        for (name, value) in self.0 {
            let name = name.as_str();
            if let Some(i) = keys.iter().position(|k| *k == name) {
                f(i, value.as_bytes());
            }
        }
        true
    }
}

/// The value as text: UTF-8 (the bytes of `obs-text`, such as `café`, included, so that the
/// propagator drops only the baggage member they spoil, as the byte-based fast path does);
/// a value that is not UTF-8 reads as `"\0"`, which no propagator accepts.
fn as_str(value: &HeaderValue) -> &str {
    std::str::from_utf8(value.as_bytes()).unwrap_or("\0")
}

/// Headers that name a trace and its parent, in the formats in use: when the caller set a
/// `traceparent`, none of them is added.
fn is_trace_identity(name: &str) -> bool {
    matches!(
        name,
        "traceparent"
            | "tracestate"
            | "b3"
            | "x-b3-traceid"
            | "x-b3-spanid"
            | "x-b3-parentspanid"
            | "x-b3-sampled"
            | "x-b3-flags"
            | "uber-trace-id"
            | "x-datadog-trace-id"
            | "x-datadog-parent-id"
            | "x-datadog-sampling-priority"
            | "x-datadog-origin"
            | "x-datadog-tags"
            | "x-amzn-trace-id"
            | "x-cloud-trace-context"
            | "grpc-trace-bin"
            | "sw8"
            | "x-ot-span-context"
    )
}

/// The most members a `tracestate` list may have (W3C trace context).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// `ours`, then the members of `theirs` (each of the caller's header lines, in order) whose
/// keys `ours` does not have, as many as fit in the 32 members and 512 characters a
/// `tracestate` may have (whole members: one that does not fit is left out, the next may
/// still fit).
fn merge_tracestate<'t>(ours: &str, theirs: impl IntoIterator<Item = &'t str>) -> String {
    let key = |member: &str| member.split('=').next().unwrap_or("").trim().to_owned();
    let mut keys: Vec<String> = ours
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(key)
        .collect();
    let mut merged = ours.trim().to_owned();
    let members = theirs
        .into_iter()
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty());
    for member in members {
        if keys.len() == MAX_TRACESTATE_MEMBERS {
            break;
        }
        // A member that breaks the grammar would make a receiver drop the whole list, ours
        // included: left out.
        if contextflow_otel::TraceState::parse_bytes(member.as_bytes()).is_err() {
            tracing::debug!("left out a caller's tracestate member that breaks the W3C grammar");
            continue;
        }
        let member_key = key(member);
        let comma = usize::from(!merged.is_empty());
        if !keys.contains(&member_key) && merged.len() + comma + member.len() <= 512 {
            if comma == 1 {
                merged.push(',');
            }
            merged.push_str(member);
            keys.push(member_key);
        }
    }
    merged
}

/// Whether the caller set a `traceparent` to keep: one valid value. A malformed or repeated
/// one (copied on by a proxy, say) would break the trace: it is removed here, and ours is
/// written instead.
pub(crate) fn caller_traceparent(headers: &mut HeaderMap) -> bool {
    let mut values = headers.get_all(TRACEPARENT).iter();
    match (values.next(), values.next()) {
        (None, _) => false,
        (Some(one), None) if contextflow_otel::TraceParent::parse_bytes(one.as_bytes()).is_ok() => {
            true
        }
        _ => {
            tracing::debug!("removed a caller's malformed or repeated traceparent");
            headers.remove(TRACEPARENT);
            false
        }
    }
}

// ===== impl HeaderInjector =====

impl<'a> HeaderInjector<'a> {
    /// An injector into `headers`.
    ///
    /// ```
    /// let mut headers = http::HeaderMap::new();
    /// let _injector = contextflow_http::HeaderInjector::new(&mut headers);
    /// ```
    pub fn new(headers: &'a mut HeaderMap) -> Self {
        let caller_set_traceparent = caller_traceparent(headers);
        HeaderInjector {
            headers,
            caller_set_traceparent,
            skip_baggage: false,
            wrote_tracestate: false,
        }
    }

    /// Leaves `baggage` out (a destination outside the trust boundary): none is written, and
    /// one the caller put on the request (copied from an incoming request, say) is removed.
    pub(crate) fn without_baggage(mut self, skip: bool) -> Self {
        self.skip_baggage = skip;
        if skip {
            self.headers.remove(contextflow_otel::BAGGAGE);
        }
        self
    }

    /// Writes `ours` then the caller's members (of every `tracestate` line it set), but for
    /// keys we write, members that break the grammar, lines that are not text, and what does
    /// not fit; nothing at all when that leaves an empty list (OpenTelemetry SDK's W3C
    /// propagator writes one for a span without members, and the W3C text says to avoid an
    /// empty header).
    fn put_tracestate(&mut self, ours: &str) {
        self.wrote_tracestate = true;
        let mut lines = 0;
        let theirs: Vec<&str> = self
            .headers
            .get_all(&TRACESTATE)
            .iter()
            .filter_map(|line| {
                lines += 1;
                let text = line.to_str().ok();
                if text.is_none() {
                    tracing::debug!("left out a caller's tracestate line that is not text");
                }
                text
            })
            .collect();
        let merged = if theirs.is_empty() {
            ours.trim().to_owned()
        } else {
            merge_tracestate(ours, theirs.iter().copied())
        };
        let value = match HeaderValue::try_from(merged) {
            Ok(value) => value,
            Err(_) => {
                // Ours is not a header value: the caller's members alone (checked, so valid).
                tracing::debug!("propagator wrote an invalid tracestate; skipped");
                let theirs = merge_tracestate("", theirs.iter().copied());
                HeaderValue::try_from(theirs).unwrap_or_else(|_| HeaderValue::from_static(""))
            }
        };
        if value.is_empty() {
            if lines > 0 {
                self.headers.remove(&TRACESTATE);
            }
            return;
        }
        self.headers.insert(TRACESTATE, value);
    }
}

impl Drop for HeaderInjector<'_> {
    /// A propagator that wrote no `tracestate` (a span without members, or none at all) left
    /// the caller's unchecked: it is checked now, unless the caller's own valid `traceparent`
    /// goes with it (a trace context the caller set wins whole).
    fn drop(&mut self) {
        if !self.wrote_tracestate
            && !self.caller_set_traceparent
            && self.headers.contains_key(&TRACESTATE)
        {
            self.put_tracestate("");
        }
    }
}

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            tracing::debug!(key, "propagator wrote an invalid header name; skipped");
            return;
        };
        if (self.caller_set_traceparent && is_trace_identity(name.as_str()))
            || (self.skip_baggage && name.as_str() == contextflow_otel::BAGGAGE)
        {
            return;
        }
        if name == TRACESTATE {
            return self.put_tracestate(&value);
        }
        if self.headers.contains_key(&name) {
            return;
        }
        match HeaderValue::try_from(value) {
            Ok(value) => {
                self.headers.insert(name, value);
            }
            Err(_) => tracing::debug!(key, "propagator wrote an invalid header value; skipped"),
        }
    }
}
