//! Limits on what a client sends, and how slowly: each refusal is a JSON error where the HTTP
//! stack lets the service write one, and always a log line. Its own process: it installs the
//! global subscriber to read those lines.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use order_service::{
    app::{self, Config, RunningService},
    context::{TenantId, TENANT},
    db::OrderRepository,
    http::server::{Limits, HARD_MAX_HEADERS},
    logging::{self, EventCapture, LogFormat, LogSink},
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn capture() -> &'static EventCapture {
    static CAPTURE: OnceLock<EventCapture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = EventCapture::new(logging::context_fields());
        logging::init_captured(LogFormat::Text, LogSink::new(), &capture)
            .expect("the only subscriber of this process");
        capture
    })
}

const SHORT: Limits = Limits {
    head_timeout: Duration::from_millis(300),
    body_timeout: Duration::from_millis(300),
    request_timeout: Duration::from_millis(800),
    max_body_bytes: 4096,
    max_headers: 100,
    max_connections: 4,
    write_timeout: Duration::from_millis(500),
};

async fn start(payment_url: Option<String>) -> (RunningService, tempfile::TempDir) {
    start_with(SHORT, payment_url).await
}

async fn start_with(
    limits: Limits,
    payment_url: Option<String>,
) -> (RunningService, tempfile::TempDir) {
    capture();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::local(&app::sqlite_url(&dir.path().join("limits.db")));
    config.limits = limits;
    config.payment_url = payment_url;
    (app::start(config).await.expect("start"), dir)
}

/// Sends `raw` bytes and reads until the server closes: `(status line, body)`.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The captured event whose summary contains `needle`. The service logs a refusal before the
/// answer is written or, for hyper's own answers, before the socket is closed, so the line is
/// there once the client has read the answer.
async fn logged(needle: &str) -> String {
    capture()
        .events()
        .iter()
        .find(|e| e.summary().contains(needle))
        .map(|e| e.summary())
        .unwrap_or_else(|| panic!("no log line containing {needle:?}"))
}

fn json_error(body: &str, contains: &str) -> Value {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let error = value["error"].as_str().unwrap_or_else(|| panic!("{value}"));
    assert!(
        error.contains(contains),
        "{error:?} should mention {contains:?}"
    );
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_head_gets_408_json_and_a_log_line() {
    let (service, _dir) = start(None).await;
    // Half a request head, then nothing.
    let (status, body) = raw_exchange(
        service.addr,
        b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-ty",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    json_error(&body, "request head not received in time");
    logged("request head not received in time: answered 408").await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_gets_408_json() {
    let (service, _dir) = start(None).await;
    let (status, body) = raw_exchange(
        service.addr,
        b"POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer token-acme\r\ncontent-type: application/json\r\nx-request-id: slow-body-1\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{\"refer",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    let value = json_error(&body, "request body not received within 300 ms");
    assert_eq!(value["request_id"], "slow-body-1");
    logged("request rejected status=408").await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_gets_413_json() {
    let (service, _dir) = start(None).await;
    let big = format!(r#"{{"reference":"{}","items":[]}}"#, "x".repeat(8192));
    let response = reqwest::Client::new()
        .post(format!("http://{}/orders", service.addr))
        .header("authorization", "Bearer token-acme")
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413);
    json_error(&response.text().await.unwrap(), "length limit exceeded");
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_gets_503_json_and_leaves_its_order_pending() {
    // A payment provider that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider = listener.local_addr().unwrap();
    let hang = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let (service, _dir) = start(Some(format!("http://{provider}"))).await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/orders", service.addr))
        .header("authorization", "Bearer token-acme")
        .header("x-request-id", "slow-request-1")
        .json(&serde_json::json!({"reference": "slow-1", "items": [{"sku": "sku-apple", "quantity": 1}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    let value = json_error(
        &response.text().await.unwrap(),
        "not completed within 800 ms",
    );
    assert_eq!(value["request_id"], "slow-request-1");
    let line = logged("request failed status=503").await;
    assert!(line.contains("800 ms"), "{line}");
    // The order was recorded before the payment call: the request's end leaves it pending,
    // for the resolver to decide (tests/it/cancellation.rs).
    let orders = OrderRepository::new(&service.state.db);
    let order = TENANT
        .scope(TenantId::new("acme"), orders.find_by_reference("slow-1"))
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(order.status, "pending");
    hang.abort();
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_get_431_json_then_hyper_431_with_a_log_line() {
    let (service, _dir) = start(None).await;
    let request = |count: usize| {
        let mut raw = String::from("GET /orders/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for i in 0..count {
            raw.push_str(&format!("x-filler-{i}: {i}\r\n"));
        }
        raw.push_str("\r\n");
        raw
    };
    // Review finding: 100 fields (the limit) were refused as 101, counting the request id
    // the context layer adds. 100 fields pass (to authentication: no token, 401); 101 do not.
    let (status, _) = raw_exchange(service.addr, request(98).as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 401"), "100 fields: {status}");
    let (status, body) = raw_exchange(service.addr, request(99).as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "101 fields: {status}");
    json_error(&body, "101 header fields; at most 100 accepted");
    // 150 fields: above our limit, below hyper's: a JSON answer.
    let (status, body) = raw_exchange(service.addr, request(150).as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    json_error(&body, "at most 100 accepted");
    logged("request rejected status=431").await;
    // Above hyper's own limit: hyper answers, without a body; the service logs it.
    let (status, body) =
        raw_exchange(service.addr, request(HARD_MAX_HEADERS + 10).as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    assert_eq!(body, "");
    logged("request head too large").await;
    service.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_head_gets_400_and_a_log_line() {
    let (service, _dir) = start(None).await;
    let (status, _) = raw_exchange(
        service.addr,
        b"GET /orders/1 HTTP/1.1\r\nhost: x\r\nbad header name: v\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    logged("malformed request head: hyper answered 400").await;
    service.shutdown().await.expect("clean shutdown");
}

/// At `max_connections` open connections a new one waits, unanswered, until one closes; then
/// it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_a_free_one() {
    // Idle connections kept open for the whole test (the head timeout also closes idle ones).
    let limits = Limits {
        head_timeout: Duration::from_secs(60),
        ..SHORT
    };
    let (service, _dir) = start_with(limits, None).await;
    let addr = service.addr;
    // Four idle keep-alive connections, each past one answered request.
    let mut open = Vec::new();
    for _ in 0..limits.max_connections {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("read");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 "),
            "answered"
        );
        open.push(stream);
    }
    // A fifth: accepted by the kernel, not by the server, so its request gets no answer yet.
    let mut fifth = TcpStream::connect(addr).await.expect("connect");
    fifth
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(200), fifth.read(&mut buf)).await;
    assert!(early.is_err(), "no answer while four connections are open");
    // One closes: the fifth is taken and answered.
    drop(open.pop());
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), fifth.read_to_end(&mut answer))
        .await
        .expect("answered once a connection closed")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 "),
        "answered"
    );
    drop(open);
    service.shutdown().await.expect("clean shutdown");
}

/// A client that pipelines requests and never reads the answers: once the socket has taken no
/// answer byte for `write_timeout`, the server closes the connection (it would otherwise hold
/// one of the `max_connections` slots for as long as the client likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_no_answers_is_disconnected() {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    let (service, _dir) = start(None).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(service.addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    // Requests sent whole, in chunks, until the connection fails.
    const CHUNK: usize = 256;
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let sending = tokio::spawn(async move {
        let chunk = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".repeat(CHUNK);
        while writer.write_all(&chunk).await.is_ok() {
            counter.fetch_add(CHUNK, Ordering::SeqCst);
        }
    });
    // The server stops reading once its socket is full of answers, and gives up on the
    // connection 500 ms later (the buffers take a few seconds to fill).
    let gave_up = "client took no answer bytes in time: connection closed";
    tokio::time::timeout(Duration::from_secs(120), async {
        while !capture()
            .events()
            .iter()
            .any(|e| e.summary().contains(gave_up))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the server gave up on the connection");
    // What is left to read ends (the server closed the connection), and sending fails.
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed the connection");
    tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("sending fails once the connection is closed")
        .expect("task");
    let answered = String::from_utf8_lossy(&answers)
        .matches("HTTP/1.1 200")
        .count();
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 0, "requests were sent");
    assert!(
        answered < sent,
        "the server gave up on the connection: {answered} answers to {sent} requests"
    );
    service.shutdown().await.expect("clean shutdown");
}

/// A request whose head is still arriving when the shutdown begins has a short grace, then
/// gets `503` with a JSON error: no request starts long after the signal, and the shutdown
/// does not wait for the head timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_still_arriving_at_shutdown_gets_503_after_the_grace() {
    let text = answer_to_a_head_at_shutdown(None).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    json_error(body, "shutting down");
    logged("request head not received within the grace: answered 503").await;
}

/// Starts the service (a long head timeout), sends `first` (a whole request, whose answer is
/// read) if given, then the start of a head, and begins the shutdown: returns what the
/// connection receives (within 10 s, not the head timeout), once the shutdown has ended
/// cleanly.
async fn answer_to_a_head_at_shutdown(first: Option<&[u8]>) -> String {
    let limits = Limits {
        head_timeout: Duration::from_secs(60),
        ..SHORT
    };
    let (service, _dir) = start_with(limits, None).await;
    let mut stream = TcpStream::connect(service.addr).await.expect("connect");
    if let Some(first) = first {
        stream.write_all(first).await.expect("write");
        let mut answer = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .expect("the first answer")
            .expect("read");
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 404"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
    }
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nHost: t\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(service.shutdown());
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answered within the grace, not the head timeout")
        .expect("read");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the shutdown ends")
        .expect("task")
        .expect("clean shutdown");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Review finding: on a kept-alive connection hyper takes the connection for idle until a
/// whole head has come, and closed it at once on shutdown: a second request's head that had
/// started got no answer at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_arriving_on_a_kept_alive_connection_at_shutdown_gets_503() {
    let text =
        answer_to_a_head_at_shutdown(Some(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    logged("request head still arriving on a kept-alive connection: answered 503").await;
}

/// Review finding: the shutdown's 503 took "bytes arrived since the last write" for a head
/// still arriving, but a request whose handler runs writes `100 Continue` and then receives
/// its body: the 503 cut it off mid-way. Requests in flight are now counted until their
/// answer is done, and such a request is answered by its handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_not_cut_by_the_grace() {
    let limits = Limits {
        head_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(20),
        ..SHORT
    };
    let (service, _dir) = start_with(limits, None).await;
    let mut stream = TcpStream::connect(service.addr).await.expect("connect");
    let body = br#"{"reference":"continue-1","items":[{"sku":"sku-apple","quantity":1}]}"#;
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer token-acme\r\n\
         content-type: application/json\r\nexpect: 100-continue\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut interim = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut interim))
        .await
        .expect("100 Continue")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&interim[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim[..n])
    );
    // Part of the body, then the shutdown, then the rest after the grace.
    stream.write_all(&body[..10]).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(service.shutdown());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(&body[10..]).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 201"),
        "the order was made: {text}"
    );
    assert!(text.contains("continue-1"), "{text}");
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the shutdown ends")
        .expect("task")
        .expect("clean shutdown");
}
