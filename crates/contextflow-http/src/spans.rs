//! Which tracer the layers start their spans with, and the spans' cheap attributes.

use std::{
    borrow::Cow,
    fmt,
    sync::{Arc, OnceLock},
};

use http::Method;
use opentelemetry::{
    global::BoxedTracer,
    trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _},
    Context, KeyValue,
};

/// Where a layer's tracer comes from.
#[derive(Clone)]
pub(crate) enum Spans {
    /// The global tracer provider's, resolved at the first request (`None`: a no-op tracer,
    /// no SDK installed then).
    Global(Arc<OnceLock<Option<BoxedTracer>>>),
    /// A tracer given to the layer.
    Tracer(Arc<BoxedTracer>),
    /// No span: the extracted (server) or current (client) context is used as it is.
    Off,
}

/// The instrumentation scope name of the spans the layers start.
pub(crate) const SCOPE: &str = "contextflow-http";

impl Spans {
    pub(crate) fn global() -> Self {
        Spans::Global(Arc::new(OnceLock::new()))
    }

    pub(crate) fn tracer<T>(tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        Spans::Tracer(Arc::new(BoxedTracer::new(Box::new(tracer))))
    }

    fn get(&self) -> Option<&BoxedTracer> {
        match self {
            Spans::Global(cell) => cell
                .get_or_init(|| {
                    let tracer = opentelemetry::global::tracer(SCOPE);
                    (!is_no_op(&tracer)).then_some(tracer)
                })
                .as_ref(),
            Spans::Tracer(tracer) => Some(tracer),
            Spans::Off => None,
        }
    }

    /// Starts a span of `kind` named after `method` (or the gRPC call `rpc` finds, asked only
    /// when there is a tracer) under `parent`; `None` when spans are off.
    /// `attributes` adds the span's attributes at its start, where the sampler sees them (the
    /// semantic conventions' sampling-relevant attributes), in one `Vec` the span keeps (with
    /// room for the status code added at its end).
    ///
    /// A gRPC call ([`grpc_call`]) is named `{service}/{method}` and gets `rpc.system`,
    /// `rpc.service` and `rpc.method`, as the RPC conventions say.
    pub(crate) fn start<'a>(
        &self,
        kind: SpanKind,
        method: &Method,
        rpc: impl FnOnce() -> Option<GrpcCall<'a>>,
        parent: &Context,
        attributes: impl FnOnce(&mut Vec<KeyValue>),
    ) -> Option<Context> {
        let tracer = self.get()?;
        let rpc = rpc();
        let mut attrs = Vec::with_capacity(if rpc.is_some() { 9 } else { 6 });
        let known = method_name(method);
        let other = known == "_OTHER";
        attrs.push(KeyValue::new("http.request.method", known.clone()));
        if other {
            // The conventions: a method outside RFC 9110 is `_OTHER`, kept as sent in
            // `http.request.method_original`, and the span is named `HTTP`. (A method is a
            // token: no spaces or controls; at most 64 bytes of it are kept.)
            let original = method.as_str();
            let cut = original.len().min(64);
            attrs.push(KeyValue::new(
                "http.request.method_original",
                original[..cut].to_owned(),
            ));
        }
        let name = match rpc {
            Some(call) => {
                attrs.push(KeyValue::new("rpc.system", "grpc"));
                attrs.push(KeyValue::new("rpc.service", call.service.to_owned()));
                attrs.push(KeyValue::new("rpc.method", call.method.to_owned()));
                Cow::Owned(call.path.to_owned())
            }
            None if other => Cow::Borrowed("HTTP"),
            None => known,
        };
        attributes(&mut attrs);
        let mut builder = tracer.span_builder(name).with_kind(kind);
        builder.attributes = Some(attrs);
        let span = tracer.build_with_context(builder, parent);
        if !span.span_context().is_valid()
            || (!span.is_recording() && span.span_context() == parent.span().span_context())
        {
            // A no-op tracer (no SDK installed) passes the parent through: nothing to own. An
            // SDK that returns an invalid span (its provider shut down while requests are still
            // in flight, or telemetry suppressed) would hide the caller's trace from the handler
            // and from every outgoing call: the parent passes through then too.
            return None;
        }
        Some(parent.with_span(span))
    }
}

/// Whether `tracer` is a no-op (OpenTelemetry's default when no SDK is installed): asked for
/// a span under a valid parent with telemetry suppressed, a no-op tracer hands back the parent's
/// span context, where the SDK (and any tracer that honours suppression) records nothing and
/// returns an invalid one. Nothing is exported either way.
fn is_no_op(tracer: &BoxedTracer) -> bool {
    let parent = opentelemetry::trace::SpanContext::new(
        opentelemetry::trace::TraceId::from(1u128),
        opentelemetry::trace::SpanId::from(1u64),
        opentelemetry::trace::TraceFlags::default(),
        true,
        opentelemetry::trace::TraceState::default(),
    );
    let cx = Context::new()
        .with_remote_span_context(parent.clone())
        .with_telemetry_suppressed();
    let probe = tracer.build_with_context(tracer.span_builder("probe"), &cx);
    !probe.is_recording() && *probe.span_context() == parent
}

impl fmt::Debug for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Spans::Global(_) => "Spans::Global",
            Spans::Tracer(_) => "Spans::Tracer",
            Spans::Off => "Spans::Off",
        })
    }
}

/// The semantic conventions' method name: the method, or `_OTHER` for one outside RFC 9110.
pub(crate) fn method_name(method: &Method) -> Cow<'static, str> {
    Cow::Borrowed(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    })
}

/// A gRPC call, as its request names it: `POST /{service}/{method}` with a
/// `content-type` of `application/grpc` (or `application/grpc+proto`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GrpcCall<'a> {
    /// `{service}/{method}`, the span's name.
    pub(crate) path: &'a str,
    /// The fully qualified service, `package.Service`.
    pub(crate) service: &'a str,
    /// The method's name.
    pub(crate) method: &'a str,
}

/// The longest `{service}/{method}` taken for a gRPC call's span name; a longer path is
/// named as any HTTP request (by its method).
const MAX_GRPC_PATH: usize = 256;

/// The gRPC call a request makes, if it is one. The path comes from the peer: only a path of
/// protobuf identifiers (`[A-Za-z0-9_]`, dots between a service's parts) of at most
/// [`MAX_GRPC_PATH`] bytes names the span, so a span name never carries spaces, escapes or
/// other text a caller made up.
pub(crate) fn grpc_call<'a>(
    method: &Method,
    headers: &http::HeaderMap,
    uri: &'a http::Uri,
) -> Option<GrpcCall<'a>> {
    if *method != Method::POST {
        return None;
    }
    let content_type = headers.get(http::header::CONTENT_TYPE)?.as_bytes();
    let grpc = content_type
        .get(..16)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        && matches!(content_type.get(16), None | Some(b'+' | b';'));
    if !grpc {
        return None;
    }
    let path = uri.path().strip_prefix('/')?;
    if path.len() > MAX_GRPC_PATH {
        return None;
    }
    let (service, name) = path.split_once('/')?;
    let ident = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !ident(name) || !service.split('.').all(ident) {
        return None;
    }
    Some(GrpcCall {
        path,
        service,
        method: name,
    })
}

/// The status code of a gRPC response: its `grpc-status` (in the headers of a trailers-only
/// response, which is how tonic answers a call that fails before any message, or in the
/// trailers), when it is a code of the protocol (0 to 16).
pub(crate) fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    // A constant name: no parsing of the name on every response.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    let code: u8 = headers
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (code <= 16).then_some(code)
}

/// gRPC's `UNIMPLEMENTED`: the server has no such method.
const UNIMPLEMENTED: u8 = 12;

/// Ends the span of `cx` with the response status: an error status for 5xx on a server span,
/// for 4xx and 5xx on a client span. A gRPC answer (`grpc`, its `grpc-status`) is recorded as
/// `rpc.grpc.status_code` and fails the span as the RPC conventions say: any code but `OK` on
/// a client span; `UNKNOWN`, `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE`
/// and `DATA_LOSS` on a server span (the others are the caller's doing). gRPC answers these
/// with HTTP 200, so the HTTP status alone would call every failed call a success.
pub(crate) fn end_with_status(cx: &Context, status: u16, kind: SpanKind, grpc: Option<u8>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        // `error.type` is required on a failed span (HTTP semantic conventions): the status
        // code that failed it, as a string.
        let mut failed = match kind {
            SpanKind::Client => status >= 400,
            _ => status >= 500,
        }
        .then(|| status.to_string());
        if let Some(code) = grpc {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            let grpc_failed = match kind {
                SpanKind::Client => code != 0,
                _ => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            };
            if grpc_failed {
                failed = Some(code.to_string());
            }
            if kind == SpanKind::Server && code == UNIMPLEMENTED {
                // A method the service does not have: the name came from the caller, who could
                // make up one per call. Named after the system instead, as the RPC conventions
                // name a span whose method is not recognized.
                span.update_name("grpc");
            }
        }
        if let Some(error_type) = failed {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(opentelemetry::trace::Status::error(""));
        }
    }
    span.end();
}

/// Ends a client span: with the answer's status (and gRPC status) when there is one, as a
/// failure (`_OTHER`) when the call failed.
pub(crate) fn end_client(cx: &Context, answer: Option<(http::StatusCode, &http::HeaderMap)>) {
    match answer {
        Some((status, headers)) => {
            end_with_status(cx, status.as_u16(), SpanKind::Client, grpc_status(headers))
        }
        None => end_with_error(cx, "_OTHER"),
    }
}

/// Ends the span of `cx` as failed (`error.type` set to `kind`).
pub(crate) fn end_with_error(cx: &Context, error_type: &'static str) {
    end_failed(cx, error_type, None, None);
}

/// Ends the span of `cx` as failed (`error.type` set to `kind`), with the response status
/// when one was sent (a body cut short or failing after its status line: the conventions
/// want `http.response.status_code` whenever there was one).
pub(crate) fn end_failed(
    cx: &Context,
    error_type: &'static str,
    status: Option<u16>,
    grpc: Option<u8>,
) {
    let span = cx.span();
    if span.is_recording() {
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(code) = grpc {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            if code == UNIMPLEMENTED {
                // As in `end_with_status`: not named after a path the caller made up.
                span.update_name("grpc");
            }
        }
        span.set_attribute(KeyValue::new("error.type", error_type));
        span.set_status(opentelemetry::trace::Status::error(error_type));
    }
    span.end();
}
