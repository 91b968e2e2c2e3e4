//! Which local services (databases, brokers) a test run has, decided once at build time so a
//! test that needs a missing service is reported as **ignored, with its reason**, never as a
//! pass.
//!
//! libtest cannot mark a test ignored while it runs, so the decision is made by the build
//! script of each crate whose tests need a service:
//!
//! ```no_run
//! // build.rs, with `contextflow-testenv` as a build-dependency and a dev-dependency
//! contextflow_testenv::build::emit();
//! ```
//!
//! It sets `cfg(cf_service_<name>)` for every [`Service`] whose URL variable is set (or for all
//! of them under `CONTEXTFLOW_REQUIRE_SERVICES=1`, so that CI fails instead of ignoring), and
//! asks cargo to rebuild when one of those variables changes. A test then reads:
//!
//! ```ignore
//! #[tokio::test]
//! #[cfg_attr(not(cf_service_postgres), ignore = "needs PostgreSQL: set CONTEXTFLOW_PG_URL")]
//! async fn commits() {
//!     let url = contextflow_testenv::url(contextflow_testenv::Service::Postgres);
//!     // ...
//! }
//! ```
//!
//! `cargo test` without the variable prints `test commits ... ignored, needs PostgreSQL: set
//! CONTEXTFLOW_PG_URL`; with it the test runs, and [`url`] panics with a clear message if the
//! variable was set at build time but is missing when the test runs.

/// A service some tests need, with the environment variable that holds its URL.
///
/// ```
/// use contextflow_testenv::Service;
///
/// assert_eq!(Service::Postgres.var(), "CONTEXTFLOW_PG_URL");
/// assert_eq!(Service::Postgres.cfg(), "cf_service_postgres");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Service {
    /// PostgreSQL, `CONTEXTFLOW_PG_URL` (CI: `postgres://postgres@127.0.0.1:5432/test`).
    Postgres,
    /// MySQL or MariaDB, `CONTEXTFLOW_MYSQL_URL` (CI: `mysql://root@127.0.0.1:3306/test`).
    MySql,
    /// RabbitMQ over AMQP 0-9-1, `CONTEXTFLOW_AMQP_URL` (CI: `amqp://guest:guest@127.0.0.1:5672/%2f`).
    Amqp,
    /// NATS with JetStream, `CONTEXTFLOW_NATS_URL` (CI: `nats://127.0.0.1:4222`).
    Nats,
    /// Redis, `CONTEXTFLOW_REDIS_URL` (CI: `redis://127.0.0.1:6379`).
    Redis,
    /// An MQTT 5 broker (Mosquitto), `CONTEXTFLOW_MQTT_URL` (CI: `mqtt://127.0.0.1:1883`).
    Mqtt,
    /// A Python interpreter with OpenTelemetry's SDK (`opentelemetry-sdk`) installed, for the
    /// interop tests: `CONTEXTFLOW_OTEL_PYTHON` holds its path instead of a URL (CI: the
    /// virtual environment `.ci/run` makes, `target/interop-venv/bin/python`).
    OtelPython,
}

impl Service {
    /// Every service, in a fixed order.
    ///
    /// ```
    /// assert!(contextflow_testenv::Service::ALL.contains(&contextflow_testenv::Service::Redis));
    /// ```
    pub const ALL: [Service; 7] = [
        Service::Postgres,
        Service::MySql,
        Service::Amqp,
        Service::Nats,
        Service::Redis,
        Service::Mqtt,
        Service::OtelPython,
    ];

    /// The environment variable that holds the service's URL.
    ///
    /// ```
    /// assert_eq!(contextflow_testenv::Service::Nats.var(), "CONTEXTFLOW_NATS_URL");
    /// ```
    pub const fn var(self) -> &'static str {
        match self {
            Service::Postgres => "CONTEXTFLOW_PG_URL",
            Service::MySql => "CONTEXTFLOW_MYSQL_URL",
            Service::Amqp => "CONTEXTFLOW_AMQP_URL",
            Service::Nats => "CONTEXTFLOW_NATS_URL",
            Service::Redis => "CONTEXTFLOW_REDIS_URL",
            Service::Mqtt => "CONTEXTFLOW_MQTT_URL",
            Service::OtelPython => "CONTEXTFLOW_OTEL_PYTHON",
        }
    }

    /// The `cfg` the build script sets when the service is available.
    ///
    /// ```
    /// assert_eq!(contextflow_testenv::Service::Mqtt.cfg(), "cf_service_mqtt");
    /// ```
    pub const fn cfg(self) -> &'static str {
        match self {
            Service::Postgres => "cf_service_postgres",
            Service::MySql => "cf_service_mysql",
            Service::Amqp => "cf_service_amqp",
            Service::Nats => "cf_service_nats",
            Service::Redis => "cf_service_redis",
            Service::Mqtt => "cf_service_mqtt",
            Service::OtelPython => "cf_service_otel_python",
        }
    }

    /// A human name for messages.
    ///
    /// ```
    /// assert_eq!(contextflow_testenv::Service::Amqp.name(), "RabbitMQ (AMQP)");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Service::Postgres => "PostgreSQL",
            Service::MySql => "MySQL/MariaDB",
            Service::Amqp => "RabbitMQ (AMQP)",
            Service::Nats => "NATS",
            Service::Redis => "Redis",
            Service::Mqtt => "MQTT",
            Service::OtelPython => "Python with opentelemetry-sdk",
        }
    }
}

/// The variable that turns a missing service into a failure (CI sets it to `1`).
pub const REQUIRE_VAR: &str = "CONTEXTFLOW_REQUIRE_SERVICES";

/// Whether `CONTEXTFLOW_REQUIRE_SERVICES=1` is set. A build-time switch for the tests: the
/// build scripts read it (see [`build::emit`]); a test binary built without it keeps its
/// service tests ignored whatever the variable says when it runs.
///
/// # Panics
/// When it is set to anything but `0`, `1` or nothing: `true` or `yes` must not quietly mean
/// "not required".
///
/// ```
/// let _strict: bool = contextflow_testenv::required();
/// ```
pub fn required() -> bool {
    match std::env::var(REQUIRE_VAR).as_deref() {
        Ok("1") => true,
        Ok("0" | "") | Err(_) => false,
        Ok(other) => panic!("{REQUIRE_VAR}={other:?}: set it to 1 (or 0, or leave it unset)"),
    }
}

/// The URL of `service`, from its environment variable, if set and not empty.
///
/// ```
/// use contextflow_testenv::{try_url, Service};
///
/// if let Some(url) = try_url(Service::Redis) {
///     assert!(!url.is_empty());
/// }
/// ```
pub fn try_url(service: Service) -> Option<String> {
    std::env::var(service.var())
        .ok()
        .filter(|url| !url.is_empty())
}

/// The URL of `service`, for a test that was built to run (its `cfg` is set).
///
/// # Panics
/// When the variable is unset or empty: the test binary was built with the service available
/// (or with `CONTEXTFLOW_REQUIRE_SERVICES=1`) but runs without it.
///
/// ```
/// // The variable is removed, so this panics with a message naming it.
/// std::env::remove_var("CONTEXTFLOW_MQTT_URL");
/// let panic = std::panic::catch_unwind(|| {
///     contextflow_testenv::url(contextflow_testenv::Service::Mqtt)
/// })
/// .unwrap_err();
/// let message = panic.downcast_ref::<String>().unwrap();
/// assert!(message.starts_with("CONTEXTFLOW_MQTT_URL is not set"), "{message}");
/// ```
#[track_caller]
pub fn url(service: Service) -> String {
    match try_url(service) {
        Some(url) => url,
        None => panic!(
            "{} is not set: this test needs {} (set the variable, e.g. as .ci/run does; with \
             {}=1 a missing service is a failure)",
            service.var(),
            service.name(),
            REQUIRE_VAR,
        ),
    }
}

/// For build scripts: decide which services the tests of this build have.
pub mod build {
    use super::{Service, REQUIRE_VAR};

    /// Emits, for a build script, `cfg(cf_service_<name>)` for each available service, the
    /// `check-cfg` declarations for all of them, and `rerun-if-env-changed` for their variables.
    ///
    /// A service is available when its URL variable is set and not empty, or when
    /// `CONTEXTFLOW_REQUIRE_SERVICES=1` (then a missing URL fails the test instead of ignoring it).
    ///
    /// ```no_run
    /// // build.rs
    /// contextflow_testenv::build::emit();
    /// ```
    pub fn emit() {
        let required = super::required();
        println!("cargo::rerun-if-env-changed={REQUIRE_VAR}");
        for service in Service::ALL {
            println!("cargo::rustc-check-cfg=cfg({})", service.cfg());
            println!("cargo::rerun-if-env-changed={}", service.var());
            let set = std::env::var(service.var()).is_ok_and(|url| !url.is_empty());
            if set || required {
                println!("cargo::rustc-cfg={}", service.cfg());
            }
        }
    }
}
