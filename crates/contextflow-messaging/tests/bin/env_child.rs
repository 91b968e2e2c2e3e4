//! The child process of the environment-carrier tests: prints the context it runs in, one
//! `key=value` line each.

use opentelemetry::{
    propagation::{text_map_propagator::FieldIter, Extractor, Injector, TextMapPropagator},
    Context,
};

/// The W3C trace context, listing the request id's header as `X-Request-ID` as well (a
/// propagator of another crate may spell it so).
#[derive(Debug)]
struct ListsRequestId {
    inner: contextflow_otel::TraceContextPropagator,
    fields: Vec<String>,
}

impl TextMapPropagator for ListsRequestId {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        self.inner.inject_context(cx, injector);
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        self.inner.extract_with_context(cx, extractor)
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(&self.fields)
    }
}

fn main() {
    // `ENV_CHILD_PROPAGATION=lists-request-id`: read with `ListsRequestId`.
    let cx = if std::env::var_os("ENV_CHILD_PROPAGATION").is_some_and(|v| v == "lists-request-id") {
        let inner = contextflow_otel::TraceContextPropagator::new();
        let mut fields: Vec<String> = inner.fields().map(str::to_owned).collect();
        fields.push("X-Request-ID".to_owned());
        contextflow_messaging::process::from_env_with(
            &contextflow_otel::Propagation::with_propagator(ListsRequestId { inner, fields }),
        )
    } else {
        contextflow_messaging::process::from_env()
    };
    contextflow_otel::sync_scope(cx, || {
        let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        println!(
            "request_id={}",
            show(contextflow_otel::current_request_id().map(|id| id.to_string()))
        );
        println!(
            "trace_id={}",
            show(contextflow_otel::current_trace_id().map(|id| id.to_string()))
        );
        println!(
            "span_id={}",
            show(contextflow_otel::current_span_id().map(|id| id.to_string()))
        );
        let baggage = {
            use opentelemetry::baggage::BaggageExt as _;
            let cx = opentelemetry::Context::current();
            let mut members: Vec<String> = cx
                .baggage()
                .iter()
                .map(|(k, (v, _))| format!("{k}:{v}"))
                .collect();
            members.sort();
            members.join(",")
        };
        println!("baggage={baggage}");
    });
}
