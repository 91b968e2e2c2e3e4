//! `order-service demo --queue URL` on each real broker, as a user runs it: the binary passes
//! every check, and every order's queue event was consumed by the audit consumer (a task of
//! its own, reading the broker) under the order's request id and trace. Fewer orders than the
//! default demo: what is checked is the same, CI time is not.
//!
//! CI runs these in its test step (the brokers are required there), so the demo on each
//! broker is proven on every run.

use std::process::Command;

use contextflow_testenv::Service;

const BIN: &str = env!("CARGO_BIN_EXE_order-service");
const ORDERS: usize = 60;

/// Runs the demo on the queue `service`'s URL names, and checks its summary.
fn demo_on(service: Service, broker: &str) {
    let url = contextflow_testenv::url(service);
    let orders = ORDERS.to_string();
    let output = Command::new(BIN)
        .args(["demo", "--queue", &url, "--orders", &orders])
        .args(["--concurrency", "16"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for expected in [
        format!("queue               {broker}: queue events {ORDERS}/{ORDERS} consumed"),
        format!("queue events {ORDERS}/{ORDERS}"),
        " 0 mismatched, 0 unattributed".to_owned(),
        "result              OK".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "no {expected:?} in\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
#[cfg_attr(
    not(cf_service_amqp),
    ignore = "needs RabbitMQ: set CONTEXTFLOW_AMQP_URL"
)]
fn demo_on_rabbitmq() {
    demo_on(Service::Amqp, "RabbitMQ");
}

#[test]
#[cfg_attr(not(cf_service_nats), ignore = "needs NATS: set CONTEXTFLOW_NATS_URL")]
fn demo_on_nats() {
    demo_on(Service::Nats, "NATS");
}

#[test]
#[cfg_attr(
    not(cf_service_redis),
    ignore = "needs Redis: set CONTEXTFLOW_REDIS_URL"
)]
fn demo_on_redis_streams() {
    demo_on(Service::Redis, "Redis Streams");
}
