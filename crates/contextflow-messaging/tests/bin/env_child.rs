//! The child process of the environment-carrier tests: prints the context it runs in, one
//! `key=value` line each.

fn main() {
    let cx = contextflow_messaging::process::from_env();
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
