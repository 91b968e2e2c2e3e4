//! Child processes: the OpenTelemetry environment-variable carrier.
//!
//! [`CommandExt::inject_context`] writes the current context into one child's environment
//! (never the parent's): `TRACEPARENT`, `TRACESTATE`, `BAGGAGE` (the names the OpenTelemetry
//! environment carrier uses) and the request id as [`REQUEST_ID_ENV`]; another configured
//! propagator's field goes in upper case, with characters other than letters and digits as
//! `_`. Each of those variables is first removed from the child's environment, so a value the
//! parent inherited from its own parent never reaches the child as if it were current.
//!
//! In the child, [`from_env`] reads them back, as untrusted input (bounded, validated, a
//! malformed or non-UTF-8 value dropped with a `debug` log, a fresh request id when there is
//! none), and returns the context to run `main` in:
//!
//! ```
//! // In the child's `main`:
//! contextflow_otel::sync_scope(contextflow_messaging::process::from_env(), || {
//!     // Logs, spans and requests made here continue the parent's trace and request id.
//!     println!("{:?}", contextflow_otel::current_request_id());
//! })
//! ```
//!
//! ```no_run
//! // The parent, inside a request.
//! use contextflow_messaging::process::CommandExt as _;
//!
//! let status = std::process::Command::new("worker").inject_context().status()?;
//! assert!(status.success());
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! With feature `tokio`, `tokio::process::Command` has the same method.
//! Only what a propagator writes crosses: never the tenant, the user or a transaction. Inside
//! [`contextflow::suppress_flow`] nothing crosses (the variables are only removed): a
//! long-lived child started there does not keep the request's ids or trace.

use std::ffi::OsString;

use contextflow_otel::{carrier::Pairs, Propagation, X_REQUEST_ID};
use opentelemetry::{propagation::Injector, Context};

/// The environment variable holding the request id.
pub const REQUEST_ID_ENV: &str = "CONTEXTFLOW_REQUEST_ID";

/// Writes the current context into a child process's environment; implemented for
/// `std::process::Command` and, with feature `tokio`, `tokio::process::Command`.
///
/// ```
/// use contextflow_messaging::process::CommandExt as _;
/// use contextflow_otel::carrier::Pairs;
///
/// let cx = contextflow_otel::extract(&Pairs::new([("x-request-id", "job-1")]));
/// let mut cmd = std::process::Command::new("true");
/// contextflow_otel::sync_scope(cx, || cmd.inject_context());
/// let request_id = cmd.get_envs().find(|(k, _)| *k == "CONTEXTFLOW_REQUEST_ID").and_then(|(_, v)| v);
/// assert_eq!(request_id, Some("job-1".as_ref()));
/// ```
pub trait CommandExt {
    /// Writes the current context with OpenTelemetry's global propagator (plus the request
    /// id) into this command's environment.
    fn inject_context(&mut self) -> &mut Self;

    /// Writes the current context with `propagation` into this command's environment.
    ///
    /// ```
    /// use contextflow_messaging::process::CommandExt as _;
    /// use contextflow_otel::{Propagation, TraceContextPropagator};
    ///
    /// let propagation = Propagation::with_propagator(TraceContextPropagator::new());
    /// let mut cmd = std::process::Command::new("true");
    /// cmd.inject_context_with(&propagation);
    /// // Outside any context: the trace variables are removed, not set.
    /// assert!(cmd.get_envs().any(|(k, v)| k == "TRACEPARENT" && v.is_none()));
    /// ```
    fn inject_context_with(&mut self, propagation: &Propagation) -> &mut Self;
}

/// The context a child process runs in: read from the variables [`CommandExt`] writes, with
/// OpenTelemetry's global propagator (plus the request id). Always holds a request id.
///
/// ```
/// let cx = contextflow_messaging::process::from_env();
/// let id = contextflow_otel::sync_scope(cx, contextflow_otel::current_request_id);
/// assert!(id.is_some());
/// ```
pub fn from_env() -> Context {
    from_env_with(&Propagation::global())
}

/// The context a child process runs in, read with `propagation`; see [`from_env`].
///
/// ```
/// use contextflow_otel::{Propagation, TraceContextPropagator};
/// let cx = contextflow_messaging::process::from_env_with(&Propagation::with_propagator(TraceContextPropagator::new()));
/// # drop(cx);
/// ```
pub fn from_env_with(propagation: &Propagation) -> Context {
    let mut values: Vec<(String, String)> = Vec::new();
    for field in propagation.fields() {
        // A field listed twice in two spellings (`x-request-id` by us, `X-Request-ID` by a
        // composed propagator) is one variable: read once, or the extractor sees it repeated
        // and drops it.
        if values.iter().any(|(f, _)| f.eq_ignore_ascii_case(&field)) {
            continue;
        }
        let name = env_name(&field);
        let Some(value) = std::env::var_os(&name) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => values.push((field, value)),
            Err(value) => tracing::debug!(
                variable = %name,
                bytes = value.len(),
                "dropped a non-UTF-8 propagation variable"
            ),
        }
    }
    let pairs = Pairs::new(values.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    propagation.extract_with_context(&Context::new(), &pairs)
}

/// The environment variable a propagation field travels in.
///
/// ```
/// use contextflow_messaging::process::env_name;
/// assert_eq!(env_name("traceparent"), "TRACEPARENT");
/// assert_eq!(env_name("x-request-id"), "CONTEXTFLOW_REQUEST_ID");
/// assert_eq!(env_name("x-b3-traceid"), "X_B3_TRACEID");
/// ```
pub fn env_name(field: &str) -> String {
    if field.eq_ignore_ascii_case(X_REQUEST_ID) {
        return REQUEST_ID_ENV.to_owned();
    }
    field
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// What to remove from and set in a child's environment.
struct EnvChanges {
    remove: Vec<String>,
    set: Vec<(String, OsString)>,
}

impl EnvChanges {
    fn current(propagation: &Propagation) -> Self {
        // The propagation's own fields, and always the default ones: a parent started with
        // `BAGGAGE` in its own environment (its parent's request) must not hand that on as if
        // it were the current request's, whatever propagator this call uses.
        let mut remove: Vec<String> = propagation.fields().iter().map(|f| env_name(f)).collect();
        for field in ["traceparent", "tracestate", "baggage", X_REQUEST_ID] {
            let name = env_name(field);
            if !remove.contains(&name) {
                remove.push(name);
            }
        }
        let mut set = Vec::new();
        // Inside `contextflow::suppress_flow` a child starts empty, as a spawned task does.
        if !contextflow::is_flow_suppressed() {
            propagation.inject(
                &contextflow_otel::current_context(),
                &mut EnvInjector(&mut set),
            );
        }
        EnvChanges { remove, set }
    }
}

struct EnvInjector<'a>(&'a mut Vec<(String, OsString)>);

impl Injector for EnvInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((env_name(key), value.into()));
    }
}

impl CommandExt for std::process::Command {
    fn inject_context(&mut self) -> &mut Self {
        self.inject_context_with(&Propagation::global())
    }

    fn inject_context_with(&mut self, propagation: &Propagation) -> &mut Self {
        let changes = EnvChanges::current(propagation);
        for name in &changes.remove {
            self.env_remove(name);
        }
        self.envs(changes.set)
    }
}

#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
impl CommandExt for tokio::process::Command {
    fn inject_context(&mut self) -> &mut Self {
        self.inject_context_with(&Propagation::global())
    }

    fn inject_context_with(&mut self, propagation: &Propagation) -> &mut Self {
        let changes = EnvChanges::current(propagation);
        for name in &changes.remove {
            self.env_remove(name);
        }
        self.envs(changes.set)
    }
}
