//! Each created order passed through every stage of its life exactly once, and each stage
//! logged it under the order's own request: the payment stub (another server, reached over
//! HTTP), the outbox worker (another task, context stored in the outbox row) and the queue
//! consumer (another task, reached through the message's metadata: headers, or a Redis stream
//! entry's fields).

use std::collections::HashMap;

use super::check::{Check, Run, Verdict};
use crate::logging::CapturedEvent;

/// A stage every created order goes through once, recognised by its event's message.
#[derive(Clone, Copy, Debug)]
pub struct Milestone {
    /// The message of the event that marks it.
    pub message: &'static str,
    /// Its name in the report.
    pub label: &'static str,
    /// How the context got there.
    pub how: &'static str,
}

/// The stages, in the order an order passes them.
pub const MILESTONES: [Milestone; 3] = [
    Milestone {
        message: "payment authorized",
        label: "payment calls",
        how: "logged by the payment stub with the caller's request and trace id",
    },
    Milestone {
        message: "confirmation sent",
        label: "confirmations",
        how: "delivered by the outbox worker in the request's context, read from the outbox row",
    },
    Milestone {
        message: "audit: order confirmed",
        label: "queue events",
        how: "consumed under the request's id and trace (message metadata, not the tenant)",
    },
];

/// Counts each milestone per created request: it must be exactly one.
#[derive(Clone, Copy, Debug)]
pub struct MilestoneCheck;

impl Check for MilestoneCheck {
    fn name(&self) -> &'static str {
        "milestones"
    }

    fn check(&self, run: &Run) -> Verdict {
        let created: Vec<&str> = run.load.created_ids().collect();
        let counts = count(&run.events);
        let mut verdict = Verdict {
            name: self.name(),
            ok: true,
            summary: String::new(),
            counts: Vec::new(),
            examples: Vec::new(),
        };
        let mut parts = Vec::new();
        for (i, milestone) in MILESTONES.iter().enumerate() {
            let mut once = 0;
            for id in &created {
                let n = counts.get(*id).map_or(0, |c| c[i]);
                if n == 1 {
                    once += 1;
                } else {
                    verdict.example(|| format!("{id}: {:?} logged {n} times", milestone.message));
                }
            }
            verdict.ok &= once == created.len();
            verdict.counts.push((milestone.label, once));
            parts.push(format!("{} {once}/{}", milestone.label, created.len()));
        }
        verdict.summary = format!(
            "exactly once per created order, under its request: {}",
            parts.join(", ")
        );
        verdict
    }
}

/// Per request id, how many times each milestone was logged.
fn count(events: &[CapturedEvent]) -> HashMap<&str, [usize; MILESTONES.len()]> {
    let mut counts: HashMap<&str, [usize; MILESTONES.len()]> = HashMap::new();
    for event in events {
        let Some(id) = event.context.request_id.as_deref() else {
            continue;
        };
        if let Some(i) = MILESTONES.iter().position(|m| m.message == event.message) {
            counts.entry(id).or_default()[i] += 1;
        }
    }
    counts
}
