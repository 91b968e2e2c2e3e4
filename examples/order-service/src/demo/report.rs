//! The demo's report: one request's path as a tree, the load's figures, every check's
//! verdict.

use std::{fmt, time::Duration};

use super::{
    check::{Run, Verdict},
    load,
    milestones::MILESTONES,
    tree, DemoOptions,
};
use crate::{db::Backend, logging::LogFormat};

/// What the demo saw.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Orders sent.
    pub requests: usize,
    /// Requests answered `201 Created`.
    pub created: usize,
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Which database.
    pub backend: Backend,
    /// The log format.
    pub format: LogFormat,
    /// The concurrency used.
    pub concurrency: usize,
    /// What the queue ran on (`in-process`, `RabbitMQ`, `NATS`, `Redis Streams`).
    pub queue: &'static str,
    /// One request's path, drawn as a tree.
    pub tree: String,
    /// Every check's verdict, in order.
    pub verdicts: Vec<Verdict>,
}

impl DemoReport {
    pub(crate) fn new(
        run: &Run,
        opts: &DemoOptions,
        backend: Backend,
        verdicts: Vec<Verdict>,
    ) -> Self {
        let first = load::request_id(&run.run_id, 0);
        let tree = run
            .load
            .expected
            .get(&first)
            .map(|want| tree::draw(&run.events, &run.spans, &first, want))
            .unwrap_or_default();
        DemoReport {
            requests: run.load.outcomes.len(),
            created: run.load.created(),
            elapsed: run.load.elapsed,
            p50: run.load.latency(0.50),
            p99: run.load.latency(0.99),
            backend,
            format: opts.format,
            concurrency: opts.concurrency,
            queue: opts.queue.name(),
            tree,
            verdicts,
        }
    }

    /// Whether every check passed (and there were requests to check).
    pub fn is_correct(&self) -> bool {
        self.requests > 0 && self.verdicts.iter().all(|v| v.ok)
    }

    /// The verdict of the check named `name`.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.verdicts.iter().find(|v| v.name == name)
    }

    /// Orders per second over the load.
    pub fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let backend = match self.backend {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        };
        let format = match self.format {
            LogFormat::Text => "text",
            LogFormat::Json => "JSON",
        };
        writeln!(f, "\nOne request's path, from its captured events:\n")?;
        writeln!(f, "{}", self.tree)?;
        writeln!(
            f,
            "Summary ({backend}, {format} logs, concurrency {}):",
            self.concurrency
        )?;
        writeln!(
            f,
            "  load                {} orders in {:.2} s, {:.0} orders/s; latency p50 {:.1} ms, p99 {:.1} ms",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            ms(self.p50),
            ms(self.p99)
        )?;
        // The queue's broker, and what crossed it (the count is the milestones check's).
        let events = self
            .verdict("milestones")
            .and_then(|v| v.count("queue events"))
            .unwrap_or(0);
        writeln!(
            f,
            "  queue               {}: queue events {events}/{} consumed under their request's id and trace",
            self.queue, self.created
        )?;
        writeln!(f, "  checks:")?;
        for verdict in &self.verdicts {
            write!(f, "{verdict}")?;
        }
        writeln!(f, "  milestones:")?;
        for milestone in MILESTONES {
            writeln!(
                f,
                "         {:<14} {:?}: {}",
                milestone.label, milestone.message, milestone.how
            )?;
        }
        writeln!(
            f,
            "  result              {}",
            if self.is_correct() { "OK" } else { "FAILED" }
        )
    }
}
