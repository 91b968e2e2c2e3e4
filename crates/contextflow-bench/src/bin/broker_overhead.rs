//! Publish and consume overhead of contextflow-messaging's carriers, measured against the same
//! client without them, side by side in one run.
//!
//! Run with: `cargo run --release -p contextflow-bench --features brokers --bin broker-overhead`
//! (options: `--messages N` per round, default 2,000; `--rounds N`, default 7; `--smoke` for a
//! quick check that every row runs, numbers meaningless; `--instructions` for part 1 only, in
//! instructions per message under callgrind, deterministic: needs `valgrind`).
//!
//! Two parts:
//!
//! 1. **The carrier's own CPU cost, no network** (the stable number): per message, writing the
//!    current context into each client's header type (lapin `FieldTable`, async-nats
//!    `HeaderMap`, Redis stream entry fields, MQTT 5 user properties) and, on the consume side,
//!    making the message's context from them and running a handler in it
//!    (`Consumer::context` + `MessageContext::run` + `finish`). Anchors: OpenTelemetry's W3C
//!    `TraceContextPropagator` writing into / reading from a `HashMap` (then `Context::attach`,
//!    what a plain OpenTelemetry consumer does), and contextflow-http's `inject_headers` /
//!    `extract_headers` on an HTTP `HeaderMap`. Contenders are interleaved round by round, and
//!    the median is reported.
//! 2. **Round trips through the live brokers** (RabbitMQ with lapin, core NATS with async-nats,
//!    Redis Streams with a consumer group, MQTT 5 QoS 1 with rumqttc): each round publishes N
//!    messages from inside a request context and consumes the N, *plain* (the client's own
//!    publish, no headers; the handler reads the body), with *fixed headers* (the same fields
//!    the carrier writes, made once: what the client itself pays to carry headers) and with the
//!    *carrier* (the context injected on publish; on consume, the message's context made and
//!    the handler run in it, which checks the request id it sees). Each round starts with
//!    another variant; the median per-message time of each phase is reported with the ratio to
//!    plain. A broker whose `CONTEXTFLOW_*_URL` is unset is skipped, visibly.
//!
//! Without an OpenTelemetry SDK installed (none is here), the consumer span is the no-op
//! tracer's: this measures the carrier, not span export.

use std::{
    collections::HashMap,
    hint::black_box,
    time::{Duration, Instant},
};

use contextflow_messaging::{
    async_nats as cf_nats, lapin as cf_amqp, redis as cf_redis, rumqttc as cf_mqtt, Consumer,
    Publisher,
};
use contextflow_otel::RequestId;
use futures_util::StreamExt as _;
use opentelemetry::{
    propagation::TextMapPropagator as _,
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceId, TraceState},
    Context,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request context messages are published from: a sampled remote parent and a request id
/// (what crosses: `traceparent` and `x-request-id`).
fn request_context(i: u64) -> (Context, RequestId) {
    let trace_id = TraceId::from_bytes((u128::from(i) + 0x4bf9_2f35_77b3_4da6).to_be_bytes());
    let parent = SpanContext::new(
        trace_id,
        contextflow_otel::new_span_id(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let request_id: RequestId = format!("req-{i:08}").parse().expect("a valid request id");
    let cx = Context::new()
        .with_remote_span_context(parent)
        .with_value(request_id.clone());
    (cx, request_id)
}

struct Options {
    smoke: bool,
    messages: usize,
    rounds: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>().expect("a number"))
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    let options = Options {
        smoke,
        messages: opt("--messages").unwrap_or(if smoke { 50 } else { 2_000 }),
        rounds: opt("--rounds").unwrap_or(if smoke { 1 } else { 7 }),
    };
    if let Some(i) = args.iter().position(|a| a == "--count") {
        let arg = |k: usize| args[i + k].parse::<u64>().expect("--count SECTION ROW N");
        count_row(arg(1) as usize, arg(2) as usize, arg(3));
        return;
    }
    println!("# contextflow-messaging carrier overhead\n");
    if args.iter().any(|a| a == "--instructions") {
        instructions();
        return;
    }
    carrier_cpu(&options);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(round_trips(&options));
}

// ===== part 1: the carrier alone =====

/// One contender: a name and a closure running `n` iterations, returning nanoseconds.
type Contender<'a> = (&'static str, Box<dyn FnMut(u64) -> f64 + 'a>);

fn timed(n: u64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64
}

/// Median ns/op of each contender, interleaved round by round.
fn measure(options: &Options, contenders: &mut [Contender<'_>]) -> Vec<f64> {
    let (rounds, batch) = if options.smoke {
        (1, 200)
    } else {
        (21, 20_000)
    };
    for (_, run) in contenders.iter_mut() {
        run(batch / 10); // warm-up
    }
    let mut samples = vec![Vec::new(); contenders.len()];
    for _ in 0..rounds {
        for (i, (_, run)) in contenders.iter_mut().enumerate() {
            samples[i].push(run(batch) / batch as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

fn print_table(title: &str, unit: &str, names: &[&str], times: &[f64]) {
    println!("## {title}\n");
    println!(
        "| {:<62} | {:>9} | {:>10} | {:>11} |",
        "carrier", unit, "/ OTel W3C", "/ HTTP ours"
    );
    println!("|{:-<64}|{:->11}|{:->12}|{:->13}|", "", "", "", "");
    for (name, t) in names.iter().zip(times) {
        println!(
            "| {name:<62} | {t:>9.0} | {:>9.2}x | {:>10.2}x |",
            t / times[0],
            t / times[1]
        );
    }
    println!();
}

/// What the carrier rows work on: a request context, and a message's metadata written from it
/// in each client's header type.
struct Fixtures {
    cx: Context,
    w3c: opentelemetry_sdk::propagation::TraceContextPropagator,
    publisher: Publisher,
    consumer: Consumer,
    map: HashMap<String, String>,
    http: axum::http::HeaderMap,
    amqp: lapin::BasicProperties,
    nats: async_nats::HeaderMap,
    entry: redis::streams::StreamId,
    mqtt: rumqttc::v5::mqttbytes::v5::PublishProperties,
}

impl Fixtures {
    fn new() -> Fixtures {
        let (cx, _) = request_context(1);
        let w3c = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let publisher = Publisher::new();
        let mut map = HashMap::new();
        w3c.inject_context(&cx, &mut map);
        let mut http = axum::http::HeaderMap::new();
        let (amqp, nats, fields, mqtt) = contextflow_otel::sync_scope(cx.clone(), || {
            contextflow_http::inject_headers(&mut http);
            (
                cf_amqp::inject(&publisher, lapin::BasicProperties::default()),
                cf_nats::inject(&publisher, async_nats::HeaderMap::new()),
                cf_redis::fields(&publisher),
                cf_mqtt::inject(&publisher, Default::default()),
            )
        });
        let entry = redis::streams::StreamId {
            id: "1-0".to_owned(),
            map: fields
                .into_iter()
                .map(|(k, v)| (k, redis::Value::BulkString(v.into_bytes())))
                .collect(),
            ..Default::default()
        };
        Fixtures {
            cx,
            w3c,
            publisher,
            consumer: Consumer::new(),
            map,
            http,
            amqp,
            nats,
            entry,
            mqtt,
        }
    }

    /// The publish rows: the current context into each client's metadata type.
    fn inject_rows(&self) -> Vec<Contender<'_>> {
        let (cx, w3c, publisher) = (&self.cx, &self.w3c, &self.publisher);
        vec![
            (
                "OTel W3C TraceContextPropagator -> HashMap (anchor)",
                Box::new(move |n| {
                    timed(n, || {
                        let mut map = HashMap::<String, String>::new();
                        w3c.inject_context(cx, &mut map);
                        black_box(map);
                    })
                }),
            ),
            (
                "contextflow-http inject_headers -> http::HeaderMap",
                Box::new(move |n| {
                    contextflow_otel::sync_scope(cx.clone(), || {
                        timed(n, || {
                            let mut headers = axum::http::HeaderMap::new();
                            contextflow_http::inject_headers(&mut headers);
                            black_box(headers);
                        })
                    })
                }),
            ),
            (
                "lapin: inject -> BasicProperties headers (FieldTable)",
                Box::new(move |n| {
                    contextflow_otel::sync_scope(cx.clone(), || {
                        timed(n, || {
                            black_box(cf_amqp::inject(
                                publisher,
                                lapin::BasicProperties::default(),
                            ));
                        })
                    })
                }),
            ),
            (
                "async-nats: inject -> HeaderMap",
                Box::new(move |n| {
                    contextflow_otel::sync_scope(cx.clone(), || {
                        timed(n, || {
                            black_box(cf_nats::inject(publisher, async_nats::HeaderMap::new()));
                        })
                    })
                }),
            ),
            (
                "redis: fields -> stream entry fields",
                Box::new(move |n| {
                    contextflow_otel::sync_scope(cx.clone(), || {
                        timed(n, || {
                            black_box(cf_redis::fields(publisher));
                        })
                    })
                }),
            ),
            (
                "rumqttc: inject -> MQTT 5 user properties",
                Box::new(move |n| {
                    contextflow_otel::sync_scope(cx.clone(), || {
                        timed(n, || {
                            black_box(cf_mqtt::inject(publisher, Default::default()));
                        })
                    })
                }),
            ),
        ]
    }

    /// The consume rows: a message's context from its metadata, and a handler run in it.
    fn consume_rows(&self) -> Vec<Contender<'_>> {
        let consumer = &self.consumer;
        let handler = contextflow_otel::current_request_id;
        vec![
            (
                "OTel W3C extract from HashMap + attach (anchor)",
                Box::new(move |n| {
                    timed(n, || {
                        let cx = self.w3c.extract(&self.map);
                        let _attached = cx.attach();
                        black_box(Context::map_current(|cx| {
                            cx.span().span_context().trace_id()
                        }));
                    })
                }),
            ),
            (
                "contextflow-http extract_headers + sync_scope",
                Box::new(move |n| {
                    timed(n, || {
                        let cx = contextflow_http::extract_headers(&self.http);
                        black_box(contextflow_otel::sync_scope(cx, handler));
                    })
                }),
            ),
            (
                "lapin: Consumer::context(HeaderExtractor) + run + finish",
                Box::new(move |n| {
                    timed(n, || {
                        let extractor = cf_amqp::HeaderExtractor::from_properties(&self.amqp);
                        let m = consumer.context(&extractor);
                        black_box(m.run(handler));
                        m.finish();
                    })
                }),
            ),
            (
                "async-nats: Consumer::context(HeaderExtractor) + run + finish",
                Box::new(move |n| {
                    timed(n, || {
                        let m = consumer.context(&cf_nats::HeaderExtractor::new(Some(&self.nats)));
                        black_box(m.run(handler));
                        m.finish();
                    })
                }),
            ),
            (
                "redis: context(stream entry) + run + finish",
                Box::new(move |n| {
                    timed(n, || {
                        let m = cf_redis::context(consumer, &self.entry);
                        black_box(m.run(handler));
                        m.finish();
                    })
                }),
            ),
            (
                "rumqttc: Consumer::context(UserProperties) + run + finish",
                Box::new(move |n| {
                    timed(n, || {
                        let properties = cf_mqtt::UserProperties::new(&self.mqtt.user_properties);
                        let m = consumer.context(&properties);
                        black_box(m.run(handler));
                        m.finish();
                    })
                }),
            ),
        ]
    }
}

const PUBLISH_TITLE: &str =
    "publish: write the current context (traceparent, x-request-id) into the message";
const CONSUME_TITLE: &str = "consume: the message's context from its metadata, a handler run in it";

/// Inject and extract-and-run costs of each client's header type, no network: wall-clock
/// medians.
fn carrier_cpu(options: &Options) {
    let fixtures = Fixtures::new();
    for (title, mut rows) in [
        (PUBLISH_TITLE, fixtures.inject_rows()),
        (CONSUME_TITLE, fixtures.consume_rows()),
    ] {
        let names: Vec<&str> = rows.iter().map(|c| c.0).collect();
        let times = measure(options, &mut rows);
        print_table(title, "ns/msg", &names, &times);
    }
}

/// `--count SECTION ROW N`: runs one row `n` times and exits (what `--instructions` measures
/// under callgrind).
fn count_row(section: usize, row: usize, n: u64) {
    let fixtures = Fixtures::new();
    let mut rows = if section == 0 {
        fixtures.inject_rows()
    } else {
        fixtures.consume_rows()
    };
    (rows[row].1)(n);
}

/// `--instructions`: instructions per message of each carrier row, deterministic: this binary
/// runs each row N1 and N2 times under `valgrind --tool=callgrind`, and the difference of the
/// two totals divided by N2 - N1 is the cost of one message (start-up and fixtures cancel).
fn instructions() {
    let me = std::env::current_exe().expect("this binary");
    let (n1, n2) = (2_000u64, 12_000u64);
    let total = |section: usize, row: usize, n: u64| -> f64 {
        let output = std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&me)
            .args([
                "--count",
                &section.to_string(),
                &row.to_string(),
                &n.to_string(),
            ])
            .output()
            .expect("valgrind (apt-get install valgrind)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let collected = stderr
            .lines()
            .find_map(|l| {
                l.split_once("Collected :")
                    .map(|(_, n)| n.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no callgrind total in:\n{stderr}"));
        collected.parse().expect("a count")
    };
    let fixtures = Fixtures::new();
    for (section, title) in [(0, PUBLISH_TITLE), (1, CONSUME_TITLE)] {
        let names: Vec<&str> = if section == 0 {
            fixtures.inject_rows().iter().map(|c| c.0).collect()
        } else {
            fixtures.consume_rows().iter().map(|c| c.0).collect()
        };
        let per: Vec<f64> = (0..names.len())
            .map(|row| (total(section, row, n2) - total(section, row, n1)) / (n2 - n1) as f64)
            .collect();
        print_table(title, "instr/msg", &names, &per);
    }
}

// ===== part 2: round trips through the brokers =====

/// Per-message times of one round, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    publish: f64,
    consume: f64,
}

/// What a round publishes and how it consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The client's own publish, no headers; the handler reads the body.
    Plain,
    /// The client's publish with the same headers the carrier writes, made once beforehand
    /// (what the client itself pays to carry headers); handled like `Plain`.
    Headers,
    /// The carrier: the current context injected on publish; on consume, the message's context
    /// made from its headers and the handler run in it.
    Carrier,
}

const VARIANTS: [Variant; 3] = [Variant::Plain, Variant::Headers, Variant::Carrier];

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain (no headers)",
            Variant::Headers => "fixed headers (client only)",
            Variant::Carrier => "carrier (inject, extract, scope)",
        }
    }
}

/// The rounds of one broker, per variant (in `VARIANTS` order).
#[derive(Default)]
struct Samples {
    rounds: [Vec<Round>; 3],
    /// Carrier handlers that saw another request's id than the one that published.
    mismatched: usize,
}

/// One broker set up for every variant.
trait Bench {
    /// Publishes `n` messages (inside the request `request`) and consumes them; returns the
    /// per-message times and how many carrier handlers saw another id.
    async fn round(
        &mut self,
        variant: Variant,
        n: usize,
        request: &RequestId,
    ) -> Result<(Round, usize), BoxError>;
}

/// The headers the carrier writes for a request, made once (the `Headers` variant's).
fn fixed_headers<T>(make: impl FnOnce() -> T) -> T {
    let (cx, _) = request_context(0);
    contextflow_otel::sync_scope(cx, make)
}

async fn round_trips(options: &Options) {
    println!(
        "## round trips through the brokers ({} messages per round, {} rounds, medians; current_thread runtime)\n",
        options.messages, options.rounds
    );
    println!(
        "| {:<34} | {:<32} | {:>9} | {:>9} | {:>9} | {:>8} |",
        "broker (client)", "variant", "publish", "consume", "total", "/ plain"
    );
    println!(
        "|{:-<36}|{:-<34}|{:->11}|{:->11}|{:->11}|{:->10}|",
        "", "", "", "", "", ""
    );
    let brokers: [(&str, &str); 4] = [
        ("RabbitMQ (lapin)", "CONTEXTFLOW_AMQP_URL"),
        ("NATS core (async-nats)", "CONTEXTFLOW_NATS_URL"),
        ("Redis Streams (redis, XREADGROUP)", "CONTEXTFLOW_REDIS_URL"),
        ("MQTT 5 QoS 1 (rumqttc, by 500)", "CONTEXTFLOW_MQTT_URL"),
    ];
    for (name, var) in brokers {
        let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) else {
            println!("| {name:<34} | skipped: {var} is not set");
            continue;
        };
        let result = match var {
            "CONTEXTFLOW_AMQP_URL" => match Amqp::connect(&url).await {
                Ok(mut b) => run_rounds(&mut b, options).await,
                Err(e) => Err(e),
            },
            "CONTEXTFLOW_NATS_URL" => match Nats::connect(&url).await {
                Ok(mut b) => run_rounds(&mut b, options).await,
                Err(e) => Err(e),
            },
            "CONTEXTFLOW_REDIS_URL" => match Streams::connect(&url).await {
                Ok(mut b) => {
                    let result = run_rounds(&mut b, options).await;
                    b.remove().await;
                    result
                }
                Err(e) => Err(e),
            },
            _ => match Mqtt::connect(&url).await {
                Ok(mut b) => run_rounds(&mut b, options).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(samples) => print_rows(name, &samples),
            Err(err) => println!("| {name:<34} | skipped: {err}"),
        }
    }
    println!(
        "\nµs per message. publish = the publish loop (N publishes, then a flush where the client has one); consume = from the last publish until the N-th message was handled; total = both."
    );
}

async fn run_rounds(bench: &mut impl Bench, options: &Options) -> Result<Samples, BoxError> {
    let mut samples = Samples::default();
    // A warm-up round of each, not counted.
    let request: RequestId = "req-warm-up".parse().expect("valid");
    for variant in VARIANTS {
        bench
            .round(variant, options.messages.min(200), &request)
            .await?;
    }
    for round in 0..options.rounds {
        // Each round starts with another variant.
        for k in 0..VARIANTS.len() {
            let i = (round + k) % VARIANTS.len();
            let (cx, request) = request_context(round as u64);
            let round = bench.round(VARIANTS[i], options.messages, &request);
            let (time, mismatched) = contextflow_otel::scope(cx, round).await?;
            samples.rounds[i].push(time);
            samples.mismatched += mismatched;
        }
    }
    Ok(samples)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_rows(name: &str, s: &Samples) {
    let m = |rounds: &[Round], f: fn(&Round) -> f64| median(rounds.iter().map(f));
    let plain_total = m(&s.rounds[0], |r| r.publish + r.consume);
    for (i, variant) in VARIANTS.iter().enumerate() {
        let rounds = &s.rounds[i];
        let (publish, consume) = (m(rounds, |r| r.publish), m(rounds, |r| r.consume));
        let total = m(rounds, |r| r.publish + r.consume);
        println!(
            "| {:<34} | {:<32} | {publish:>9.2} | {consume:>9.2} | {total:>9.2} | {:>7.2}x |",
            if i == 0 { name } else { "" },
            variant.label(),
            total / plain_total
        );
    }
    if s.mismatched > 0 {
        println!(
            "| {name:<34} | {} carrier handlers saw another request's id!",
            s.mismatched
        );
    }
}

/// What a carrier handler checks: it runs under the request that published.
fn seen_is(request: &RequestId) -> bool {
    contextflow_otel::current_request_id().as_ref() == Some(request)
}

const BODY: &[u8] = b"{\"order_id\":17,\"reference\":\"ord-00000017\",\"tenant\":\"acme\"}";
const TIMEOUT: Duration = Duration::from_secs(30);

fn per_message(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

// ----- RabbitMQ -----

struct Amqp {
    channel: lapin::Channel,
    queue: String,
    deliveries: lapin::Consumer,
    consumer: Consumer,
    fixed: lapin::BasicProperties,
    _connection: lapin::Connection,
}

impl Amqp {
    async fn connect(url: &str) -> Result<Amqp, BoxError> {
        use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
        let properties = lapin::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let connection = lapin::Connection::connect(url, properties).await?;
        let channel = connection.create_channel().await?;
        let queue = format!("contextflow-bench-{}", RequestId::new());
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        channel
            .queue_declare(&queue, options, Default::default())
            .await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let deliveries = channel
            .basic_consume(&queue, "bench", no_ack, Default::default())
            .await?;
        Ok(Amqp {
            channel,
            consumer: cf_amqp::consumer(&queue),
            fixed: fixed_headers(|| {
                cf_amqp::inject(&Publisher::new(), lapin::BasicProperties::default())
            }),
            queue,
            deliveries,
            _connection: connection,
        })
    }
}

impl Bench for Amqp {
    async fn round(
        &mut self,
        variant: Variant,
        n: usize,
        request: &RequestId,
    ) -> Result<(Round, usize), BoxError> {
        let options = lapin::options::BasicPublishOptions::default();
        let start = Instant::now();
        for _ in 0..n {
            match variant {
                Variant::Carrier => {
                    let properties = lapin::BasicProperties::default();
                    cf_amqp::publish(&self.channel, "", &self.queue, options, BODY, properties)
                        .await?;
                }
                Variant::Headers => {
                    let properties = self.fixed.clone();
                    self.channel
                        .basic_publish("", &self.queue, options, BODY, properties)
                        .await?;
                }
                Variant::Plain => {
                    self.channel
                        .basic_publish("", &self.queue, options, BODY, Default::default())
                        .await?;
                }
            }
        }
        let published = start.elapsed();
        let mut mismatched = 0;
        for _ in 0..n {
            let delivery = tokio::time::timeout(TIMEOUT, self.deliveries.next())
                .await?
                .ok_or("the consumer stopped")??;
            if variant == Variant::Carrier {
                let message = cf_amqp::context(&self.consumer, &delivery);
                mismatched += usize::from(!message.run(|| seen_is(request)));
                message.finish();
            } else {
                black_box(delivery.data.len());
            }
        }
        let total = start.elapsed();
        Ok((
            Round {
                publish: per_message(published, n),
                consume: per_message(total - published, n),
            },
            mismatched,
        ))
    }
}

// ----- NATS -----

struct Nats {
    client: async_nats::Client,
    subject: String,
    subscriber: async_nats::Subscriber,
    consumer: Consumer,
    fixed: async_nats::HeaderMap,
}

impl Nats {
    async fn connect(url: &str) -> Result<Nats, BoxError> {
        let client = async_nats::connect(url).await?;
        let subject = format!("contextflow.bench.{}", RequestId::new());
        let subscriber = client.subscribe(subject.clone()).await?;
        client.flush().await?;
        Ok(Nats {
            consumer: cf_nats::consumer(&subject),
            fixed: fixed_headers(|| cf_nats::inject(&Publisher::new(), Default::default())),
            client,
            subject,
            subscriber,
        })
    }
}

impl Bench for Nats {
    async fn round(
        &mut self,
        variant: Variant,
        n: usize,
        request: &RequestId,
    ) -> Result<(Round, usize), BoxError> {
        let body = bytes::Bytes::from_static(BODY);
        let start = Instant::now();
        for _ in 0..n {
            match variant {
                Variant::Carrier => {
                    cf_nats::publish(&self.client, self.subject.clone(), body.clone()).await?;
                }
                Variant::Headers => {
                    let headers = self.fixed.clone();
                    self.client
                        .publish_with_headers(self.subject.clone(), headers, body.clone())
                        .await?;
                }
                Variant::Plain => {
                    self.client
                        .publish(self.subject.clone(), body.clone())
                        .await?;
                }
            }
        }
        self.client.flush().await?;
        let published = start.elapsed();
        let mut mismatched = 0;
        for _ in 0..n {
            let message = tokio::time::timeout(TIMEOUT, self.subscriber.next())
                .await?
                .ok_or("the subscription ended")?;
            if variant == Variant::Carrier {
                let cx = cf_nats::context(&self.consumer, &message);
                mismatched += usize::from(!cx.run(|| seen_is(request)));
                cx.finish();
            } else {
                black_box(message.payload.len());
            }
        }
        let total = start.elapsed();
        Ok((
            Round {
                publish: per_message(published, n),
                consume: per_message(total - published, n),
            },
            mismatched,
        ))
    }
}

// ----- Redis Streams -----

struct Streams {
    con: redis::aio::MultiplexedConnection,
    key: String,
    consumer: Consumer,
    fixed: Vec<(String, String)>,
}

const GROUP: &str = "bench";

impl Streams {
    async fn connect(url: &str) -> Result<Streams, BoxError> {
        use redis::AsyncCommands as _;
        let mut con = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let key = format!("contextflow-bench-{}", RequestId::new());
        let (): () = con.xgroup_create_mkstream(&key, GROUP, "$").await?;
        let _: bool = con.expire(&key, 600).await?;
        Ok(Streams {
            consumer: cf_redis::consumer(&key),
            fixed: fixed_headers(|| cf_redis::fields(&Publisher::new())),
            con,
            key,
        })
    }
}

impl Streams {
    /// Deletes the stream (it would expire anyway).
    async fn remove(mut self) {
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(&self.key)
            .query_async(&mut self.con)
            .await;
    }
}

impl Bench for Streams {
    async fn round(
        &mut self,
        variant: Variant,
        n: usize,
        request: &RequestId,
    ) -> Result<(Round, usize), BoxError> {
        use redis::{
            streams::{StreamReadOptions, StreamReadReply},
            AsyncCommands as _,
        };
        let start = Instant::now();
        for _ in 0..n {
            match variant {
                Variant::Carrier => {
                    cf_redis::add(&mut self.con, &self.key, &[("body", BODY)]).await?;
                }
                Variant::Headers => {
                    let _: String = redis::cmd("XADD")
                        .arg(&self.key)
                        .arg("*")
                        .arg("body")
                        .arg(BODY)
                        .arg(&self.fixed)
                        .query_async(&mut self.con)
                        .await?;
                }
                Variant::Plain => {
                    let _: String = redis::cmd("XADD")
                        .arg(&self.key)
                        .arg("*")
                        .arg("body")
                        .arg(BODY)
                        .query_async(&mut self.con)
                        .await?;
                }
            }
        }
        let published = start.elapsed();
        let mut mismatched = 0;
        let mut read = 0;
        let options = StreamReadOptions::default()
            .group(GROUP, "worker")
            .count(256);
        while read < n {
            let reply: Option<StreamReadReply> = self
                .con
                .xread_options(&[&self.key], &[">"], &options)
                .await?;
            let mut ids = Vec::new();
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                read += 1;
                if variant == Variant::Carrier {
                    let message = cf_redis::context(&self.consumer, &entry);
                    mismatched += usize::from(!message.run(|| seen_is(request)));
                    message.finish();
                } else {
                    black_box(entry.map.len());
                }
                ids.push(entry.id);
            }
            if !ids.is_empty() {
                let _: usize = self.con.xack(&self.key, GROUP, &ids).await?;
            }
            if start.elapsed() > TIMEOUT {
                return Err("Redis: messages missing after 30 s".into());
            }
        }
        let total = start.elapsed();
        // Keep the stream short between rounds (not timed).
        let _: usize = self
            .con
            .xtrim(&self.key, redis::streams::StreamMaxlen::Equals(0))
            .await?;
        Ok((
            Round {
                publish: per_message(published, n),
                consume: per_message(total - published, n),
            },
            mismatched,
        ))
    }
}

// ----- MQTT 5 -----

struct Mqtt {
    client: rumqttc::v5::AsyncClient,
    topic: String,
    received: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    consumer: Consumer,
    fixed: rumqttc::v5::mqttbytes::v5::PublishProperties,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Mqtt {
    async fn connect(url: &str) -> Result<Mqtt, BoxError> {
        use rumqttc::v5::{
            mqttbytes::{v5::Packet, QoS},
            AsyncClient, Event, MqttOptions,
        };
        let address = url
            .strip_prefix("mqtt://")
            .unwrap_or(url)
            .trim_end_matches('/');
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "1883"));
        let port: u16 = port.parse()?;
        let topic = format!("contextflow/bench/{}", RequestId::new());
        let options = |role: &str| {
            let mut o =
                MqttOptions::new(format!("cf-bench-{role}-{}", RequestId::new()), host, port);
            o.set_keep_alive(Duration::from_secs(30));
            o
        };
        let (subscriber, mut sub_events) = AsyncClient::new(options("sub"), 1024);
        subscriber
            .subscribe(topic.clone(), QoS::AtLeastOnce)
            .await?;
        loop {
            let event = tokio::time::timeout(TIMEOUT, sub_events.poll()).await??;
            if let Event::Incoming(Packet::SubAck(_)) = event {
                break;
            }
        }
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        let sub_task = tokio::spawn(async move {
            let _subscriber = subscriber;
            while let Ok(event) = sub_events.poll().await {
                if let Event::Incoming(Packet::Publish(publish)) = event {
                    if sender.send(publish).is_err() {
                        break;
                    }
                }
            }
        });
        let (client, mut pub_events) = AsyncClient::new(options("pub"), 1024);
        let pub_task = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
        Ok(Mqtt {
            consumer: cf_mqtt::consumer(&topic),
            fixed: fixed_headers(|| cf_mqtt::inject(&Publisher::new(), Default::default())),
            client,
            topic,
            received,
            tasks: vec![sub_task, pub_task],
        })
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Messages published before they are consumed, on MQTT: Mosquitto drops what exceeds a
/// subscriber's queue (`max_queued_messages`, 1,000 by default), so a round goes in chunks.
const MQTT_CHUNK: usize = 500;

impl Bench for Mqtt {
    async fn round(
        &mut self,
        variant: Variant,
        n: usize,
        request: &RequestId,
    ) -> Result<(Round, usize), BoxError> {
        use rumqttc::v5::mqttbytes::QoS;
        let (mut publishing, mut consuming) = (Duration::ZERO, Duration::ZERO);
        let mut mismatched = 0;
        let mut left = n;
        while left > 0 {
            let chunk = left.min(MQTT_CHUNK);
            left -= chunk;
            let start = Instant::now();
            for _ in 0..chunk {
                let topic = self.topic.clone();
                match variant {
                    Variant::Carrier => {
                        cf_mqtt::publish(&self.client, topic, QoS::AtLeastOnce, false, BODY)
                            .await?;
                    }
                    Variant::Headers => {
                        let properties = self.fixed.clone();
                        self.client
                            .publish_with_properties(
                                topic,
                                QoS::AtLeastOnce,
                                false,
                                BODY,
                                properties,
                            )
                            .await?;
                    }
                    Variant::Plain => {
                        self.client
                            .publish(topic, QoS::AtLeastOnce, false, BODY)
                            .await?;
                    }
                }
            }
            let published = start.elapsed();
            for _ in 0..chunk {
                let message = tokio::time::timeout(TIMEOUT, self.received.recv())
                    .await?
                    .ok_or("the MQTT subscriber stopped")?;
                if variant == Variant::Carrier {
                    let cx = cf_mqtt::context(&self.consumer, &message);
                    mismatched += usize::from(!cx.run(|| seen_is(request)));
                    cx.finish();
                } else {
                    black_box(message.payload.len());
                }
            }
            publishing += published;
            consuming += start.elapsed() - published;
        }
        Ok((
            Round {
                publish: per_message(publishing, n),
                consume: per_message(consuming, n),
            },
            mismatched,
        ))
    }
}
