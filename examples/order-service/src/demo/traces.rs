//! The trace check: every span the run exported over OTLP, as the in-process receiver decoded
//! it, must form connected traces, one per request.
//!
//! A trace is *connected* when it has exactly one root span and every other span's parent is
//! a span of the same trace that arrived; otherwise it is *fragmented* (a missing parent, two
//! roots). Each created order's trace must also reach every process on its path: the demo
//! client's root span, the order service's server span, the payment stub's server span and
//! the queue consumer's `process` span, which (the OpenTelemetry messaging conventions for a
//! consumer handling one message) is a child of the producer's span and links to it.

use std::collections::{BTreeMap, HashMap, HashSet};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use super::check::{Check, Run, Verdict};
use crate::telemetry::{SpanRecord, DEMO_CLIENT, ORDER_SERVICE, PAYMENT_SERVICE};

/// Every exported trace is connected and each created order's trace spans every process.
#[derive(Debug, Default)]
pub struct TraceCheck;

/// What [`analyze`] found in a set of spans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceAnalysis {
    /// Distinct trace ids.
    pub traces: usize,
    /// Traces with one root and every parent present.
    pub connected: usize,
    /// Traces that are not connected.
    pub fragmented: usize,
    /// Consumer spans without a link to a producer span that arrived.
    pub unlinked: usize,
    /// What is wrong with each fragmented trace or unlinked span (one line each, all of them).
    pub problems: Vec<String>,
}

/// Groups `spans` by trace and checks each trace's shape; see the module docs.
pub fn analyze(spans: &[SpanRecord]) -> TraceAnalysis {
    let mut by_trace: BTreeMap<&str, Vec<&SpanRecord>> = BTreeMap::new();
    for span in spans {
        by_trace.entry(&span.trace_id).or_default().push(span);
    }
    let by_id: HashMap<(&str, &str), &SpanRecord> = spans
        .iter()
        .map(|s| ((s.trace_id.as_str(), s.span_id.as_str()), s))
        .collect();
    let mut analysis = TraceAnalysis {
        traces: by_trace.len(),
        ..TraceAnalysis::default()
    };
    for (trace_id, members) in &by_trace {
        let ids: HashSet<&str> = members.iter().map(|s| s.span_id.as_str()).collect();
        let roots: Vec<&&SpanRecord> = members
            .iter()
            .filter(|s| s.parent_span_id.is_none())
            .collect();
        let orphans: Vec<&&SpanRecord> = members
            .iter()
            .filter(|s| {
                s.parent_span_id
                    .as_deref()
                    .is_some_and(|p| !ids.contains(p))
            })
            .collect();
        if roots.len() == 1 && orphans.is_empty() {
            analysis.connected += 1;
            continue;
        }
        analysis.fragmented += 1;
        let mut problem = format!("trace {trace_id}: {} root(s)", roots.len());
        for root in &roots {
            problem.push_str(&format!(" [{}]", describe(root)));
        }
        for orphan in &orphans {
            problem.push_str(&format!(
                "; parent {} of [{}] missing",
                orphan.parent_span_id.as_deref().unwrap_or_default(),
                describe(orphan)
            ));
        }
        analysis.problems.push(problem);
    }
    for consumer in spans.iter().filter(|s| s.kind == SpanKind::Consumer) {
        // Its own producer: the span it is the child of, in its trace (a link to any other
        // producer, say the first message's, would be a wrong one).
        let linked = consumer.links.iter().any(|(trace, span)| {
            *trace == consumer.trace_id
                && consumer.parent_span_id.as_deref() == Some(span.as_str())
                && by_id
                    .get(&(trace.as_str(), span.as_str()))
                    .is_some_and(|s| s.kind == SpanKind::Producer)
        });
        if !linked {
            analysis.unlinked += 1;
            analysis.problems.push(format!(
                "trace {}: consumer span [{}] links to no producer span that arrived",
                consumer.trace_id,
                describe(consumer)
            ));
        }
    }
    analysis
}

fn describe(span: &SpanRecord) -> String {
    format!(
        "{} {:?} {} of {}",
        span.span_id,
        span.kind,
        span.name,
        if span.service.is_empty() {
            "?"
        } else {
            &span.service
        }
    )
}

/// The spans a created order's trace is made of, each exactly once (the queue publish at
/// least once: the outbox asks again after a publish the broker did not confirm): (service,
/// span kind, what it is). A span missing (a call made without its own span) or repeated (a
/// payment asked for twice) fails the check.
pub const PATH: [(&str, SpanKind, &str); 6] = [
    (DEMO_CLIENT, SpanKind::Client, "client"),
    (ORDER_SERVICE, SpanKind::Server, "order service"),
    (ORDER_SERVICE, SpanKind::Client, "payment call"),
    (PAYMENT_SERVICE, SpanKind::Server, "payment stub"),
    (ORDER_SERVICE, SpanKind::Producer, "queue publish"),
    (ORDER_SERVICE, SpanKind::Consumer, "queue consumer"),
];

impl Check for TraceCheck {
    fn name(&self) -> &'static str {
        "traces"
    }

    fn check(&self, run: &Run) -> Verdict {
        let analysis = analyze(&run.traces);
        let mut services: Vec<&str> = run.traces.iter().map(|s| s.service.as_str()).collect();
        services.sort_unstable();
        services.dedup();
        let mut by_trace: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
        for span in &run.traces {
            by_trace.entry(&span.trace_id).or_default().push(span);
        }
        let mut incomplete = Vec::new();
        let created: Vec<&str> = run.load.created_ids().collect();
        for request_id in &created {
            let Some(want) = run.load.expected.get(*request_id) else {
                continue;
            };
            let spans = by_trace.get(want.trace_id.as_str());
            let mut wrong = Vec::new();
            for (service, kind, what) in PATH {
                let n = spans.map_or(0, |spans| {
                    spans
                        .iter()
                        .filter(|s| s.service == service && s.kind == kind)
                        .count()
                });
                let retried = kind == SpanKind::Producer;
                if n == 0 || (n > 1 && !retried) {
                    wrong.push(format!("{n} spans of {what}"));
                }
            }
            if !wrong.is_empty() {
                incomplete.push(format!(
                    "{request_id} (trace {}): {}",
                    want.trace_id,
                    wrong.join(", ")
                ));
            }
        }
        let complete = created.len() - incomplete.len();
        // One trace per created order: a span that lost its context and started a root of its
        // own would be a connected trace of its own.
        let ok = run.trace_errors.is_empty()
            && analysis.traces == created.len()
            && analysis.fragmented == 0
            && analysis.unlinked == 0
            && incomplete.is_empty();
        let mut verdict = Verdict {
            name: self.name(),
            ok,
            summary: format!(
                "{} connected, {} fragmented; {} spans from {} over OTLP; {complete}/{} orders' traces have one span each of client, order service, payment call, payment stub and queue consumer, and a queue publish (linked to its producer: {} unlinked)",
                analysis.connected,
                analysis.fragmented,
                run.traces.len(),
                services.join(", "),
                created.len(),
                analysis.unlinked,
            ),
            counts: vec![
                ("traces", analysis.traces),
                ("connected", analysis.connected),
                ("fragmented", analysis.fragmented),
                ("unlinked", analysis.unlinked),
                ("spans", run.traces.len()),
                ("complete", complete),
            ],
            examples: Vec::new(),
        };
        for error in &run.trace_errors {
            verdict.example(|| format!("export: {error}"));
        }
        for problem in analysis.problems.iter().chain(&incomplete) {
            verdict.example(|| problem.clone());
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, id: &str, parent: Option<&str>, kind: SpanKind) -> SpanRecord {
        SpanRecord {
            service: ORDER_SERVICE.into(),
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_owned),
            name: format!("span {id}"),
            kind,
            links: Vec::new(),
            trace_flags: 1,
        }
    }

    /// root -> server -> producer -> consumer (linked), in one trace.
    fn good_trace(trace: &str) -> Vec<SpanRecord> {
        let mut consumer = span(trace, "04", Some("03"), SpanKind::Consumer);
        consumer.links.push((trace.into(), "03".into()));
        vec![
            span(trace, "01", None, SpanKind::Client),
            span(trace, "02", Some("01"), SpanKind::Server),
            span(trace, "03", Some("02"), SpanKind::Producer),
            consumer,
        ]
    }

    #[test]
    fn connected_traces_pass() {
        let mut spans = good_trace("aa");
        spans.extend(good_trace("bb"));
        let analysis = analyze(&spans);
        assert_eq!(
            (analysis.traces, analysis.connected, analysis.fragmented),
            (2, 2, 0)
        );
        assert_eq!(analysis.unlinked, 0);
        assert!(analysis.problems.is_empty(), "{:?}", analysis.problems);
    }

    #[test]
    fn a_missing_parent_fragments_the_trace() {
        let mut spans = good_trace("aa");
        spans.extend(good_trace("bb"));
        // The server span of trace bb never arrived: its children point at nothing.
        spans.retain(|s| !(s.trace_id == "bb" && s.span_id == "02"));
        let analysis = analyze(&spans);
        assert_eq!((analysis.connected, analysis.fragmented), (1, 1));
        assert_eq!(analysis.problems.len(), 1, "{:?}", analysis.problems);
        assert!(
            analysis.problems[0].contains("trace bb: 1 root(s)")
                && analysis.problems[0].contains("parent 02 of [03 Producer"),
            "{:?}",
            analysis.problems
        );
    }

    #[test]
    fn two_roots_fragment_the_trace() {
        let mut spans = good_trace("aa");
        // The server span restarted the trace instead of continuing it.
        spans[1].parent_span_id = None;
        let analysis = analyze(&spans);
        assert_eq!((analysis.connected, analysis.fragmented), (0, 1));
        assert!(
            analysis.problems[0].starts_with("trace aa: 2 root(s)"),
            "{:?}",
            analysis.problems
        );
    }

    #[test]
    fn a_parent_in_another_trace_does_not_count() {
        let mut spans = good_trace("aa");
        let mut stray = span("cc", "05", Some("02"), SpanKind::Internal);
        stray.name = "stray".into();
        spans.push(stray);
        let analysis = analyze(&spans);
        assert_eq!((analysis.connected, analysis.fragmented), (1, 1));
        assert!(analysis.problems[0].contains("trace cc: 0 root(s)"));
    }

    /// The demo fails, naming the trace, when a trace is fragmented or a request's trace
    /// misses a process.
    #[test]
    fn the_check_fails_the_run_on_a_fragmented_trace() {
        use crate::{
            demo::{
                check::{DatabaseCounts, Phases},
                load::{Expected, Load, Outcome},
            },
            logging::LogFormat,
        };
        let mut load = Load::default();
        load.expected.insert(
            "r-1".into(),
            Expected {
                reference: "o-1".into(),
                trace_id: "aa".into(),
                tenant: "acme".into(),
                order_id: None,
            },
        );
        load.outcomes.push(Outcome {
            request_id: "r-1".into(),
            latency: std::time::Duration::ZERO,
            status: Some(201),
            detail: String::new(),
            order_id: None,
        });
        // client -> order service -> (payment call -> payment stub, producer -> consumer)
        let mut traces = good_trace("aa");
        traces[0].service = DEMO_CLIENT.into();
        traces.push(span("aa", "06", Some("02"), SpanKind::Client));
        traces.push(SpanRecord {
            service: PAYMENT_SERVICE.into(),
            ..span("aa", "05", Some("06"), SpanKind::Server)
        });
        let mut run = Run {
            run_id: "x".into(),
            load,
            events: Vec::new(),
            spans: Vec::new(),
            phases: Phases::default(),
            output: Vec::new(),
            format: LogFormat::Text,
            database: DatabaseCounts::default(),
            traces,
            trace_errors: Vec::new(),
        };
        let verdict = TraceCheck.check(&run);
        assert!(verdict.ok, "{verdict}");
        assert!(
            verdict.summary.starts_with("1 connected, 0 fragmented"),
            "{verdict}"
        );

        // The payment asked for twice: one span too many of the call and of the stub.
        run.traces
            .push(span("aa", "07", Some("02"), SpanKind::Client));
        run.traces.push(SpanRecord {
            service: PAYMENT_SERVICE.into(),
            ..span("aa", "08", Some("07"), SpanKind::Server)
        });
        let verdict = TraceCheck.check(&run);
        assert!(!verdict.ok);
        assert!(
            verdict.to_string().contains("2 spans of payment stub"),
            "{verdict}"
        );
        run.traces.truncate(run.traces.len() - 2);
        // A publish the broker did not confirm is made again: a second producer span, its own
        // consumer still linked to the one it came from. That passes.
        run.traces
            .push(span("aa", "09", Some("02"), SpanKind::Producer));
        let verdict = TraceCheck.check(&run);
        assert!(verdict.ok, "{verdict}");
        run.traces.pop();

        run.traces.retain(|s| s.span_id != "02");
        let verdict = TraceCheck.check(&run);
        assert!(!verdict.ok);
        assert_eq!(verdict.count("fragmented"), Some(1));
        let shown = verdict.to_string();
        assert!(
            shown.contains("FAIL traces") && shown.contains("0 connected, 1 fragmented"),
            "{shown}"
        );
        assert!(shown.contains("trace aa: 1 root(s)"), "{shown}");
        assert!(shown.contains("0 spans of order service"), "{shown}");
    }

    #[test]
    fn a_consumer_without_its_producer_link_is_reported() {
        let mut spans = good_trace("aa");
        spans[3].links.clear();
        let analysis = analyze(&spans);
        assert_eq!((analysis.connected, analysis.unlinked), (1, 1));
        // A link to a span that is not a producer does not count either.
        spans[3].links.push(("aa".into(), "02".into()));
        assert_eq!(analyze(&spans).unlinked, 1);
        // Nor a link to another message's producer (say, the first one's, cached).
        spans.extend(good_trace("bb"));
        spans[3].links = vec![("bb".into(), "03".into())];
        assert_eq!(analyze(&spans).unlinked, 1);
    }
}
