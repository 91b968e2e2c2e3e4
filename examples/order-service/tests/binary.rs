//! The `order-service` binary as a user runs it: `demo` and serving.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_order-service");

#[test]
fn demo_subcommand_checks_out_and_exits_zero() {
    let output = Command::new(BIN)
        .args(["demo", "--orders", "30", "--concurrency", "8"])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" 0 mismatched, 0 unattributed"), "{stdout}");
    assert!(stdout.contains("30 orders paid, 30 confirmed"), "{stdout}");
    assert!(stdout.contains("result              OK"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn bad_arguments_exit_non_zero() {
    let output = Command::new(BIN)
        .args(["demo", "--orders", "zero"])
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--orders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_orders_and_prints_its_address() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = order_service::app::sqlite_url(&dir.path().join("bin.db"));
    let mut child = Command::new(BIN)
        .args(["--addr", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the service");
    let stdout = child.stdout.take().expect("stdout");
    // The address is printed once the service listens; log lines may come first.
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let addr = lines
            .by_ref()
            .take(50)
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("order-service listening on ")
                    .map(str::to_string)
            });
        // Keep draining so the service never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        addr
    })
    .await
    .expect("reader")
    .expect("the service printed its address");

    let client = reqwest::Client::new();
    let created: serde_json::Value = client
        .post(format!("{addr}/orders"))
        .header("authorization", "Bearer token-initech")
        .json(&serde_json::json!({"reference": "bin-1", "items": [{"sku": "sku-pear", "quantity": 3}]}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(created["reference"], "bin-1", "{created}");
    let id = created["id"].as_i64().expect("id");
    let response = client
        .get(format!("{addr}/orders/{id}"))
        .header("authorization", "Bearer token-initech")
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    child.kill().expect("stop the service");
    let _ = child.wait();
}
