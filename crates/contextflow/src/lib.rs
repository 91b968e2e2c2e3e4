//! Request-scoped context for async Rust: Node.js's `AsyncLocalStorage`, done the Rust way.
//!
//! A value set once, at the edge of a request, is visible to all the code the request runs:
//! through every `.await`, in tasks and threads it spawns through contextflow, and in the
//! destructors of its futures, while thousands of concurrent requests on the same threads each
//! see only their own. No parameter plumbing: the controller, the service and the repository
//! read the request id, the tenant or the trace without receiving them as arguments.
//!
//! Store *infrastructure metadata* in it (ids, tenant, user, session, trace): never business
//! data.
//!
//! # Tour
//!
//! ```
//! use contextflow::AsyncLocal;
//!
//! // 1. Declare typed variables, once, as statics.
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! static TENANT: AsyncLocal<u64> = AsyncLocal::named("tenant");
//!
//! // 3. Read them anywhere below, without parameters.
//! async fn repository_insert() -> String {
//!     let id = REQUEST_ID.get().unwrap_or_default();
//!     let tenant = TENANT.with(|t| t.copied()).unwrap_or(0);
//!     format!("[{id}] insert for tenant {tenant}")
//! }
//!
//! async fn service() -> String {
//!     tokio::task::yield_now().await; // context survives every .await
//!     repository_insert().await
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // 2. Bind them at the edge of a request, for the whole request.
//! let line = REQUEST_ID
//!     .scope("req-123".into(), TENANT.scope(42, service()))
//!     .await;
//! assert_eq!(line, "[req-123] insert for tenant 42");
//! assert_eq!(REQUEST_ID.get(), None); // and nowhere else
//! # }
//! ```
//!
//! The model, in one paragraph: every execution point has a current *frame*, an immutable map
//! from variable to value. A scope makes a new frame (the current one plus one binding) for the
//! code inside it and restores the previous one afterwards, whatever happens (return, panic,
//! cancellation). Children never change their parent's frame. A plain future sees the frame of
//! whoever polls it; only [`spawn`] and friends, [`FutureExt::in_current_context`],
//! [`Snapshot::capture`] and [`Snapshot::bind`] capture a frame at the call.
//!
//! # Replace or layer
//!
//! Two kinds of operation make a frame current, and they differ in what happens to the frame
//! of whoever runs them:
//!
//! - **Layer** (the current frame plus bindings): [`AsyncLocal::scope`],
//!   [`AsyncLocal::sync_scope`], [`AsyncLocal::unset`], [`AsyncLocal::enter`],
//!   [`Binding::run`] (a binding entered again and again, made once per frame). A binding made
//!   outside stays visible inside unless the same variable is rebound. Bind a request's
//!   variables this way (as `contextflow-http`'s server layer, `contextflow-messaging`'s
//!   consumer and `contextflow_otel::scope` do), so an outer middleware's binding
//!   (`let fut = inner.call(req); X.scope(v, fut)`) reaches the handler.
//! - **Replace** (the captured frame instead of the current one, like TC39's `Snapshot.run`):
//!   [`Snapshot::run`], [`Snapshot::enter`], [`FutureExt::with_snapshot`],
//!   [`FutureExt::in_current_context`], [`spawn_with`] and the spawn helpers (a task starts
//!   from the frame captured at the spawn). Use them to carry a context to where it does not
//!   flow, not to add bindings.
//!
//! # Recipes
//!
//! **Request id in every log line.** Bind it in middleware (the `contextflow-http` server
//! layer does) and let the `contextflow-tracing` formatter print it; in your own code:
//!
//! ```
//! # use contextflow::AsyncLocal;
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//!
//! fn log(msg: &str) -> String {
//!     REQUEST_ID.with(|id| match id {
//!         Some(id) => format!("[{id}] {msg}"),
//!         None => msg.to_string(),
//!     })
//! }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let line = REQUEST_ID.scope("req-1".into(), async { log("Inventory validated") }).await;
//! assert_eq!(line, "[req-1] Inventory validated");
//! # }
//! ```
//!
//! **Tenant, set by authenticated code only.** Untrusted input (a header) never sets the
//! tenant; the code that checked the credentials does:
//!
//! ```
//! # use contextflow::AsyncLocal;
//! #[derive(Clone, Debug, PartialEq)]
//! struct TenantId(String);
//! static TENANT: AsyncLocal<TenantId> = AsyncLocal::named("tenant");
//!
//! async fn authenticated<F: std::future::Future>(token: &str, handler: F) -> Option<F::Output> {
//!     let tenant = match token {
//!         "secret-acme" => TenantId("acme".into()),
//!         _ => return None, // 401
//!     };
//!     Some(TENANT.scope(tenant, handler).await)
//! }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let seen = authenticated("secret-acme", async { TENANT.get() }).await;
//! assert_eq!(seen, Some(Some(TenantId("acme".into()))));
//! # }
//! ```
//!
//! **A background job from a request** keeps the request's context (for its logs), but a
//! database transaction, marked [`Inherit::Never`], stays with the request:
//!
//! ```
//! # #![allow(dead_code)] // without the `tokio` feature
//! # use contextflow::{AsyncLocal, Inherit};
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! struct Tx;
//! static TX: AsyncLocal<Tx> = AsyncLocal::named("tx").inherit(Inherit::Never);
//!
//! # #[cfg(feature = "tokio")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let job = REQUEST_ID
//!     .scope("req-9".into(), TX.scope(Tx, async {
//!         contextflow::spawn(async { (REQUEST_ID.get(), TX.is_set()) })
//!     }))
//!     .await;
//! assert_eq!(job.await.unwrap(), (Some("req-9".to_string()), false));
//! # }
//! # #[cfg(not(feature = "tokio"))] fn main() {}
//! ```
//!
//! **A cron job** starts from nothing: `contextflow::spawn_without_context` or
//! [`Snapshot::empty`], then binds its own run id.
//!
//! **`spawn_blocking`** (CPU work, a blocking driver) keeps the context:
//!
//! ```
//! # #![allow(dead_code)] // without the `tokio` feature
//! # use contextflow::AsyncLocal;
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//! # #[cfg(feature = "tokio")]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let id = REQUEST_ID
//!     .scope("req-3".into(), async {
//!         contextflow::spawn_blocking(|| REQUEST_ID.get()).await.unwrap()
//!     })
//!     .await;
//! assert_eq!(id.as_deref(), Some("req-3"));
//! # }
//! # #[cfg(not(feature = "tokio"))] fn main() {}
//! ```
//!
//! **Worker threads.** `contextflow::rayon` (feature `rayon`) has rayon's `join`, `scope`,
//! `spawn` and a parallel-iterator adaptor (`par_iter().in_current_context()`) that run every
//! closure in the caller's context on whichever worker; [`thread::scope`] is
//! `std::thread::scope` with inheriting threads; a [`channel`] carries each message's sender
//! context to the worker that handles it. Other executors and callback APIs: carry a
//! [`Snapshot`] and [`Snapshot::run`] it there, or wrap the callback with [`Snapshot::bind`].
//!
//! **Long-lived work started from a request** (a cache refresher) must not keep the request:
//! start it inside [`suppress_flow`], and nothing it starts inherits.
//!
//! **Which task is this, and who started it?** [`tree::execution_id`], [`tree::trigger_id`],
//! and the task tree of a request ([`tree::Root`]), printable while the request runs.
//!
//! **"Why is my context missing?"** Print the current frame: `println!("{:?}",
//! Snapshot::capture())` names every variable set, innermost first. With the feature
//! `diagnostics`, contextflow tells you itself: a read of a variable that a spawn dropped is
//! reported with the read site, the spawn site and where the variable was set. The repository's
//! `docs/lost-context.md` walks through finding where a context was lost.
//!
//! # What propagates
//!
//! | Boundary | Context follows? | On a hooked runtime ([`runtime`], feature `runtime-hooks`) |
//! |---|---|---|
//! | `.await` inside a scope | yes | yes |
//! | `join!` / `select!` of futures inside a scope | yes (they are polled by the scope) | yes |
//! | [`contextflow::spawn`](spawn), [`spawn_blocking`], [`spawn_local`], [`spawn_in`] (`JoinSet`) | yes, except [`Inherit::Never`] variables | the same |
//! | [`contextflow::thread::spawn`](thread::spawn), [`thread::scope`] | yes, except [`Inherit::Never`] variables | the same |
//! | `contextflow::rayon` (`join`, `scope`, `spawn`, `in_current_context` on parallel iterators) | yes, except [`Inherit::Never`] variables | the same |
//! | a message through a [`channel`] (`Carried::run`) | yes, the sender's, except [`Inherit::Never`] variables | the same |
//! | `fut.in_current_context()` handed to any executor | yes, except [`Inherit::Never`] variables | the same |
//! | plain `tokio::spawn`, `JoinSet::spawn`, `Handle::spawn` (also from an OS thread) | **no**: the spawner's context is not carried; the task sees whatever is current where tokio polls it: nothing on a `multi_thread` worker, but on a `current_thread` runtime the context around the `block_on` call (see below) | [`Inherit::Everywhere`] variables only (ids, the trace); not the tenant, the user, a transaction, nor a carried tracing span (each poll starts from nothing) |
//! | plain `tokio::task::spawn_blocking` | **no** | **no** (tokio runs no hook there) |
//! | plain `spawn_local` on a `LocalSet` | **no**: the spawner's context is not carried; the tasks see the context of whoever polls the `LocalSet` (`run_until` or `.await` on it inside a scope shows that scope to every one of its tasks, [`Inherit::Never`] variables included) | the same (tokio runs no hook there) |
//! | the future given to `block_on` | the calling thread's context; on a `current_thread` runtime, plain tasks polled during that `block_on` see it too: call `block_on` outside any scope, and set the context inside the future | the future as without hooks; plain tasks as in the rows above |
//! | plain `std::thread::spawn`, plain rayon, a C callback | **no**: carry a [`Snapshot`] (`run`/`bind`) | **no** |
//! | destructors of a scoped future (cancelled, aborted) | yes | yes; a plain task's destructors too when aborted, not at runtime shutdown |
//! | another process (HTTP, a queue, a child process) | only what a propagator writes (see `contextflow-http`) | the same |
//!
//! To forbid plain `tokio::spawn` (and an [`EnterGuard`] held across an `.await`) in your code
//! base, copy this repository's `docs/clippy.toml` (`disallowed-methods`,
//! `await-holding-invalid-types`).
//!
//! # Compared with the alternatives
//!
//! | | contextflow | `tokio::task_local!` | tracing span | `opentelemetry::Context` |
//! |---|---|---|---|---|
//! | typed values, any number | yes | yes | fields only, write-once | yes, keyed by type |
//! | survives `tokio::spawn` | with `contextflow::spawn` | no (re-scope by hand) | with `.in_current_span()` by hand | with `.with_current_context()` by hand |
//! | `spawn_blocking`, OS threads | yes | no | by hand | by hand |
//! | per-variable "do not inherit" | yes ([`Inherit::Never`]) | n/a | no | no |
//! | destructors see the value | yes | yes | no | no |
//! | capture all of it, O(1) | [`Snapshot::capture`] | no | `Span::current()` | `Context::current()` |
//!
//! contextflow also carries the other two with every spawn once their integration crates
//! register a [carrier](carry), so the three "current context" systems agree. Measured costs
//! are in the `contextflow-bench` crate's README.
//!
//! # Feature flags
//!
//! - `tokio` (default): the inheriting spawn helpers.
//! - `futures`: [`StreamExt`] for `futures_core::Stream`.
//! - `runtime-hooks`: [`runtime`], tokio task hooks that make plain `tokio::spawn` inherit the
//!   variables marked [`Inherit::Everywhere`]. Needs `RUSTFLAGS="--cfg tokio_unstable"`; without
//!   it, installing the hooks returns an error.
//! - `diagnostics`: `contextflow::diagnostics`, "why is my context missing?" answered:
//!   a read of a variable that a spawn dropped on the way (a plain `tokio::spawn` on a hooked
//!   runtime, `spawn_without_context`, `suppress_flow`) is reported with the read site, the spawn
//!   site and where the variable was set; a `tree::Root` that ends while its tasks still hold its
//!   context reports them. Reports go to a pluggable sink, or panic in a test mode. Nothing of it
//!   exists without the feature.
//! - `rayon`: `contextflow::rayon`, rayon's `join`, `scope`, `spawn`, `install` and parallel
//!   iterators in the caller's context.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.95, declared in `rust-version`. It is the only toolchain our CI machines can install,
//! so it is the only one we can check: CI fails when its `rustc` is not the declared version.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings))))]

mod binding;
pub mod carry;
pub mod channel;
mod current;
#[cfg(feature = "diagnostics")]
#[cfg_attr(docsrs, doc(cfg(feature = "diagnostics")))]
pub mod diagnostics;
mod flow;
mod local;
mod loom;
mod node;
#[cfg(feature = "rayon")]
#[cfg_attr(docsrs, doc(cfg(feature = "rayon")))]
pub mod rayon;
#[cfg(feature = "runtime-hooks")]
#[cfg_attr(docsrs, doc(cfg(feature = "runtime-hooks")))]
pub mod runtime;
mod snapshot;
#[cfg(feature = "tokio")]
mod spawn;
pub mod thread;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub mod tree;

#[cfg(feature = "futures")]
#[cfg_attr(docsrs, doc(cfg(feature = "futures")))]
pub use crate::snapshot::StreamExt;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[allow(deprecated)]
pub use crate::spawn::spawn_detached;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use crate::spawn::{
    spawn, spawn_blocking, spawn_in, spawn_local, spawn_with, spawn_without_context,
};
pub use crate::{
    binding::Binding,
    current::EnterGuard,
    flow::{is_flow_suppressed, suppress_flow},
    local::{AsyncLocal, Inherit, Scope},
    snapshot::{FutureExt, Snapshot, WithContext},
};
