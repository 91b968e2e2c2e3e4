//! The environment carrier, with a real child process (`contextflow-messaging-env-child`).

use std::{collections::BTreeMap, ffi::OsStr, os::unix::ffi::OsStrExt as _, process::Command};

use contextflow_messaging::process::CommandExt as _;
use contextflow_otel::carrier::Pairs;

const CHILD: &str = env!("CARGO_BIN_EXE_contextflow-messaging-env-child");
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The child, without the propagation variables of the test's own environment (a CI runner
/// may set `TRACEPARENT` itself): each test sets what it means the child to see.
fn child() -> Command {
    let mut cmd = Command::new(CHILD);
    for key in AMBIENT {
        cmd.env_remove(key);
    }
    cmd
}

/// The variables the environment carrier reads.
const AMBIENT: [&str; 4] = [
    "TRACEPARENT",
    "TRACESTATE",
    "BAGGAGE",
    "CONTEXTFLOW_REQUEST_ID",
];

fn parse(out: std::process::Output) -> BTreeMap<String, String> {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn request() -> opentelemetry::Context {
    contextflow_otel::extract(&Pairs::new([
        ("traceparent", PARENT),
        ("x-request-id", "job-42"),
        ("baggage", "env=staging"),
    ]))
}

#[test]
fn trace_request_id_and_baggage_cross_into_the_child() {
    let own = (
        std::env::var_os("TRACEPARENT"),
        std::env::var_os("CONTEXTFLOW_REQUEST_ID"),
    );
    let mut cmd = child();
    contextflow_otel::sync_scope(request(), || cmd.inject_context());
    let seen = parse(cmd.output().unwrap());
    assert_eq!(seen["request_id"], "job-42");
    assert_eq!(seen["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        seen["span_id"], "00f067aa0ba902b7",
        "the parent's span is the child's parent"
    );
    assert_eq!(seen["baggage"], "env:staging");
    assert_eq!(
        (
            std::env::var_os("TRACEPARENT"),
            std::env::var_os("CONTEXTFLOW_REQUEST_ID")
        ),
        own,
        "the parent's own environment is untouched"
    );
}

/// Whatever propagator the call uses, the default variables a parent may have inherited from
/// its own parent are removed: with the W3C trace context alone, a stale `BAGGAGE` would
/// otherwise reach the child as the current request's.
#[test]
fn any_propagator_removes_the_default_variables() {
    let mut cmd = child();
    cmd.env("BAGGAGE", "tenant=old");
    let trace_only = contextflow_otel::Propagation::with_propagator(
        contextflow_otel::TraceContextPropagator::new(),
    );
    contextflow_otel::sync_scope(request(), || cmd.inject_context_with(&trace_only));
    let seen = parse(cmd.output().unwrap());
    assert_eq!(seen["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(seen["baggage"], "", "{seen:?}");
}

/// Review finding: a propagator listing the request id's header in another case
/// (`X-Request-ID`) made the child read `CONTEXTFLOW_REQUEST_ID` twice, as a repeated field,
/// and drop it: every child got a fresh request id.
#[test]
fn a_field_listed_in_two_spellings_is_read_once() {
    let mut cmd = child();
    cmd.env("ENV_CHILD_PROPAGATION", "lists-request-id");
    contextflow_otel::sync_scope(request(), || cmd.inject_context());
    let seen = parse(cmd.output().unwrap());
    assert_eq!(seen["request_id"], "job-42", "{seen:?}");
    assert_eq!(seen["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

/// Inside `suppress_flow` a child process starts empty, as a spawned task does: a daemon
/// started from a request does not keep its ids; the inherited variables are still removed.
#[test]
fn inside_suppress_flow_nothing_crosses() {
    let mut cmd = child();
    cmd.env("CONTEXTFLOW_REQUEST_ID", "stale");
    contextflow_otel::sync_scope(request(), || {
        contextflow::suppress_flow(|| cmd.inject_context());
    });
    let seen = parse(cmd.output().unwrap());
    assert_eq!(seen["trace_id"], "-", "{seen:?}");
    assert_ne!(seen["request_id"], "job-42");
    assert_ne!(seen["request_id"], "stale");
    assert_eq!(seen["baggage"], "");
}

#[test]
fn outside_a_context_stale_inherited_values_are_removed() {
    let mut cmd = child();
    // As if the parent had inherited these from its own parent.
    cmd.env("TRACEPARENT", PARENT)
        .env("CONTEXTFLOW_REQUEST_ID", "stale")
        .env("BAGGAGE", "k=v");
    cmd.inject_context();
    let seen = parse(cmd.output().unwrap());
    assert_eq!(seen["trace_id"], "-");
    assert_ne!(seen["request_id"], "stale");
    assert_eq!(seen["request_id"].len(), 36, "a fresh id: {seen:?}");
    assert_eq!(seen["baggage"], "");
}

#[test]
fn malformed_environment_values_are_dropped() {
    let long = "x".repeat(10_000);
    let cases: [(&str, &OsStr, &OsStr); 5] = [
        (
            "garbage traceparent",
            "TRACEPARENT".as_ref(),
            "garbage".as_ref(),
        ),
        (
            "escape sequence in the id",
            "CONTEXTFLOW_REQUEST_ID".as_ref(),
            "bad id\x1b[31m".as_ref(),
        ),
        (
            "over-long id",
            "CONTEXTFLOW_REQUEST_ID".as_ref(),
            long.as_ref(),
        ),
        (
            "non-UTF-8 id",
            "CONTEXTFLOW_REQUEST_ID".as_ref(),
            OsStr::from_bytes(b"id-\xff"),
        ),
        (
            "non-UTF-8 trace",
            "TRACEPARENT".as_ref(),
            OsStr::from_bytes(b"00-\xff"),
        ),
    ];
    for (reason, key, value) in cases {
        let out = child().env(key, value).output().unwrap();
        let seen = parse(out);
        assert_eq!(seen["trace_id"], "-", "{reason}");
        assert_eq!(
            seen["request_id"].len(),
            36,
            "{reason}: a fresh id, {seen:?}"
        );
        assert!(
            seen["request_id"]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-'),
            "{reason}"
        );
    }
}

#[cfg(feature = "tokio")]
#[test]
fn tokio_command_on_both_runtimes() {
    for multi in [false, true] {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .unwrap();
        let seen = rt.block_on(contextflow_otel::scope(request(), async {
            let mut cmd = tokio::process::Command::new(CHILD);
            for key in AMBIENT {
                cmd.env_remove(key);
            }
            cmd.inject_context();
            parse(cmd.output().await.unwrap())
        }));
        assert_eq!(seen["request_id"], "job-42", "multi={multi}");
        assert_eq!(
            seen["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
            "multi={multi}"
        );
    }
}
