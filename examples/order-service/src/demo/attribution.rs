//! The main check: every event belongs to the request that caused it.
//!
//! An event that carries a request id must carry one the load sent, with that request's trace
//! id, its tenant (where the event has one) and its order reference (where the event or one of
//! its spans has a `reference` field). An event without a request id is allowed only outside
//! the load (start-up and shutdown, at most [`LIFECYCLE_BOUND`] of them); during the load it
//! is *unattributed*, a failure: its context was lost somewhere.

use std::collections::HashMap;

use super::{
    check::{Check, Phases, Run, Verdict},
    load::Expected,
};
use crate::logging::CapturedEvent;

/// The most events without a request id that start-up and shutdown may write.
pub const LIFECYCLE_BOUND: usize = 64;

/// Checks each event's context against the request it names.
#[derive(Clone, Copy, Debug)]
pub struct ContextCheck {
    /// The most events allowed outside any request, before and after the load.
    pub lifecycle_bound: usize,
}

/// What [`attribute`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Events looked at.
    pub events: usize,
    /// Events attributed to a request, context matching.
    pub matched: usize,
    /// Events that name a request but carry another one's trace, tenant or reference, or a
    /// request id never sent.
    pub mismatched: usize,
    /// Events without a request id during the load.
    pub unattributed: usize,
    /// Events without a request id at start-up or shutdown.
    pub lifecycle: usize,
    /// Events whose order reference was compared.
    pub with_reference: usize,
    /// The same, request by request.
    pub references_by_request: std::collections::HashMap<String, usize>,
    /// A few failures, with the event.
    pub examples: Vec<String>,
}

/// Events per created order that must name its reference (the controller's, the service's and
/// the payment lines do: 4 per order in every run of 2026-11-27).
const MIN_REFERENCES: usize = 4;

impl Default for ContextCheck {
    fn default() -> Self {
        ContextCheck {
            lifecycle_bound: LIFECYCLE_BOUND,
        }
    }
}

impl Check for ContextCheck {
    fn name(&self) -> &'static str {
        "log context"
    }

    fn check(&self, run: &Run) -> Verdict {
        let found = attribute(&run.events, &run.load.expected, run.phases);
        // The reference and order id checks are the evidence that does not come from the
        // context itself: each created order's events must carry its reference at least
        // `MIN_REFERENCES` times, or a run whose events lost their reference would pass.
        let short_of_references = run
            .load
            .created_ids()
            .filter(|id| {
                found.references_by_request.get(*id).copied().unwrap_or(0) < MIN_REFERENCES
            })
            .count();
        let ok = found.mismatched == 0
            && found.unattributed == 0
            && found.lifecycle <= self.lifecycle_bound
            && found.matched + found.lifecycle == found.events
            && short_of_references == 0;
        Verdict {
            name: self.name(),
            ok,
            summary: format!(
                "{} events: {} matched their request, {} mismatched, {} unattributed during the load, {} at start-up/shutdown (at most {}); {} carried an order reference",
                found.events,
                found.matched,
                found.mismatched,
                found.unattributed,
                found.lifecycle,
                self.lifecycle_bound,
                found.with_reference
            ),
            counts: vec![
                ("events", found.events),
                ("matched", found.matched),
                ("mismatched", found.mismatched),
                ("unattributed", found.unattributed),
                ("lifecycle", found.lifecycle),
                ("with_reference", found.with_reference),
            ],
            examples: {
                let mut examples = found.examples;
                if short_of_references > 0 {
                    examples.push(format!(
                        "{short_of_references} created orders with fewer than {MIN_REFERENCES} events naming their reference"
                    ));
                }
                examples
            },
        }
    }
}

/// Targets of the code that runs as the request's tenant: each of their events carries it.
const TENANT_REQUIRED: [&str; 4] = [
    "order_service::http::auth",
    "order_service::service",
    "order_service::db",
    "order_service::outbox",
];

/// Attributes every event to a request, or to start-up/shutdown, or finds it has none.
pub fn attribute(
    events: &[CapturedEvent],
    expected: &HashMap<String, Expected>,
    phases: Phases,
) -> Attribution {
    let mut found = Attribution {
        events: events.len(),
        ..Attribution::default()
    };
    let example = |found: &mut Attribution, why: &str, event: &CapturedEvent| {
        if found.examples.len() < super::check::MAX_EXAMPLES {
            found.examples.push(format!("{why}: {event}"));
        }
    };
    for event in events {
        let Some(request_id) = event.context.request_id.as_deref() else {
            if (phases.load_start..phases.shutdown_start).contains(&event.seq) {
                found.unattributed += 1;
                example(&mut found, "no request id during the load", event);
            } else {
                found.lifecycle += 1;
            }
            continue;
        };
        let Some(want) = expected.get(request_id) else {
            found.mismatched += 1;
            example(&mut found, "request id was never sent", event);
            continue;
        };
        let mut problems = Vec::new();
        if event.context.trace_id.as_deref() != Some(want.trace_id.as_str()) {
            problems.push("trace id of another request");
        }
        match event.context.tenant.as_deref() {
            Some(tenant) if tenant != want.tenant => problems.push("tenant of another request"),
            // The business code runs only for an authenticated request (or, in the outbox
            // worker, in the row's tenant): there a missing tenant is a lost one. The payment
            // stub and the queue consumer get no tenant by design.
            None if TENANT_REQUIRED.iter().any(|t| event.target.starts_with(t)) => {
                problems.push("no tenant in a step that runs as the tenant")
            }
            _ => {}
        }
        // Every `reference` the event names, its own field and its spans', must be the request's.
        let mut references = event
            .field("reference")
            .into_iter()
            .chain(event.spans.iter().filter_map(|s| s.field("reference")))
            .peekable();
        if references.peek().is_some() {
            found.with_reference += 1;
            *found
                .references_by_request
                .entry(request_id.to_owned())
                .or_default() += 1;
            if references.any(|r| r != want.reference) {
                problems.push("order reference of another request");
            }
        }
        // Every `order_id` it names (the outbox worker's span, the consumer's event) must be
        // the order the request created, when its answer said which.
        if let Some(order_id) = want.order_id {
            let order_id = order_id.to_string();
            if event
                .field("order_id")
                .into_iter()
                .chain(event.spans.iter().filter_map(|s| s.field("order_id")))
                .any(|id| id != order_id)
            {
                problems.push("order id of another request");
            }
        }
        // The tenant the consumer read from the message's payload (`order_tenant`) must be the
        // request's too: it comes from the database row, not from the context.
        if event
            .field("order_tenant")
            .is_some_and(|tenant| tenant != want.tenant)
        {
            problems.push("order tenant of another request");
        }
        if problems.is_empty() {
            found.matched += 1;
        } else {
            found.mismatched += 1;
            example(&mut found, &problems.join(", "), event);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use tracing::Level;

    use super::*;
    use crate::logging::{EventContext, SpanRecord};

    fn expected(n: usize) -> HashMap<String, Expected> {
        (0..n)
            .map(|i| {
                (
                    format!("r-{i}"),
                    Expected {
                        reference: format!("ord-{i}"),
                        trace_id: format!("{i:032x}"),
                        tenant: ["acme", "globex", "initech"][i % 3].into(),
                        order_id: Some(1000 + i as i64),
                    },
                )
            })
            .collect()
    }

    /// A well-attributed event of request `i`: `shape` picks which of tenant, an event
    /// reference and a span reference it carries.
    fn event_of(i: usize, shape: u8, seq: usize) -> CapturedEvent {
        let tenant = ["acme", "globex", "initech"][i % 3];
        let mut fields = vec![("lines".to_string(), "2".to_string())];
        if shape & 2 != 0 {
            fields.push(("reference".into(), format!("ord-{i}")));
        }
        let mut spans = vec![Arc::new(SpanRecord {
            uid: 1,
            name: "http.request",
            fields: vec![],
        })];
        if shape & 4 != 0 {
            spans.push(Arc::new(SpanRecord {
                uid: 2,
                name: "controller",
                fields: vec![("reference".into(), format!("ord-{i}"))],
            }));
        }
        if shape & 8 != 0 {
            spans.push(Arc::new(SpanRecord {
                uid: 3,
                name: "outbox.deliver",
                fields: vec![("order_id".into(), format!("{}", 1000 + i))],
            }));
        }
        CapturedEvent {
            seq,
            level: Level::INFO,
            target: "order_service::x".into(),
            message: "m".into(),
            fields,
            spans,
            context: EventContext {
                request_id: Some(format!("r-{i}")),
                trace_id: Some(format!("{i:032x}")),
                tenant: (shape & 1 != 0).then(|| tenant.into()),
            },
        }
    }

    fn lifecycle(seq: usize) -> CapturedEvent {
        CapturedEvent {
            seq,
            level: Level::INFO,
            target: "order_service::app".into(),
            message: "started".into(),
            fields: vec![],
            spans: vec![],
            context: EventContext::default(),
        }
    }

    /// One way to break an event's attribution.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        ForeignTrace,
        ForeignTenant,
        ForeignEventReference,
        ForeignSpanReference,
        UnknownRequest,
        MissingTrace,
        LostContext,
        /// The tenant gone from an event of the code that runs as the tenant.
        LostTenant,
        /// Another order's id on the event's span (an outbox row delivered in the wrong
        /// context).
        ForeignOrderId,
    }

    fn break_event(event: &mut CapturedEvent, fault: Fault, owner: usize, other: usize) {
        let ctx = &mut event.context;
        match fault {
            Fault::ForeignTrace => ctx.trace_id = Some(format!("{other:032x}")),
            Fault::ForeignTenant => {
                let foreign = ["acme", "globex", "initech"][(owner + 1) % 3];
                ctx.tenant = Some(foreign.into());
            }
            Fault::ForeignEventReference => {
                event.fields.retain(|(name, _)| name != "reference");
                event
                    .fields
                    .push(("reference".into(), format!("ord-{other}")));
            }
            Fault::ForeignSpanReference => event.spans.push(Arc::new(SpanRecord {
                uid: 9,
                name: "controller",
                fields: vec![("reference".into(), format!("ord-{other}"))],
            })),
            Fault::UnknownRequest => ctx.request_id = Some("r-never-sent".into()),
            Fault::MissingTrace => ctx.trace_id = None,
            Fault::LostContext => *ctx = EventContext::default(),
            Fault::LostTenant => {
                ctx.tenant = None;
                event.target = "order_service::service".into();
            }
            Fault::ForeignOrderId => event.spans.push(Arc::new(SpanRecord {
                uid: 10,
                name: "outbox.deliver",
                fields: vec![("order_id".into(), format!("{}", 1000 + other))],
            })),
        }
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            Just(Fault::ForeignTrace),
            Just(Fault::ForeignTenant),
            Just(Fault::ForeignEventReference),
            Just(Fault::ForeignSpanReference),
            Just(Fault::UnknownRequest),
            Just(Fault::MissingTrace),
            Just(Fault::LostContext),
            Just(Fault::LostTenant),
            Just(Fault::ForeignOrderId),
        ]
    }

    proptest! {
        /// Well-attributed events of any shape pass; start-up and shutdown events are counted
        /// apart; breaking one event, in any way, makes exactly that event a failure.
        #[test]
        fn one_broken_event_is_found(
            requests in 2usize..12,
            shapes in prop::collection::vec((0usize..64, 0u8..16), 1..60),
            startup in 0usize..4,
            shutdown in 0usize..4,
            victim in any::<prop::sample::Index>(),
            other_offset in 1usize..12,
            fault in fault(),
        ) {
            let expected = expected(requests);
            let mut events: Vec<CapturedEvent> = (0..startup).map(lifecycle).collect();
            for (i, shape) in &shapes {
                let seq = events.len();
                events.push(event_of(i % requests, *shape, seq));
            }
            let phases = Phases { load_start: startup, shutdown_start: events.len() };
            for _ in 0..shutdown {
                let seq = events.len();
                events.push(lifecycle(seq));
            }

            let clean = attribute(&events, &expected, phases);
            prop_assert_eq!(clean.matched, shapes.len());
            prop_assert_eq!(clean.lifecycle, startup + shutdown);
            prop_assert_eq!(clean.mismatched + clean.unattributed, 0);
            let references = shapes.iter().filter(|(_, s)| s & 6 != 0).count();
            prop_assert_eq!(clean.with_reference, references);

            let at = startup + victim.index(shapes.len());
            let owner = shapes[at - startup].0 % requests;
            // Another request than the owner, never the owner itself (1 to requests - 1 ahead).
            let other = (owner + 1 + other_offset % (requests - 1)) % requests;
            break_event(&mut events[at], fault, owner, other);
            let broken = attribute(&events, &expected, phases);
            prop_assert_eq!(broken.mismatched + broken.unattributed, 1, "{:?}", fault);
            prop_assert_eq!(broken.matched, shapes.len() - 1);
            prop_assert_eq!(broken.examples.len(), 1);
            if matches!(fault, Fault::LostContext) {
                prop_assert_eq!(broken.unattributed, 1);
            }
        }
    }

    #[test]
    fn no_request_id_is_lifecycle_only_outside_the_load() {
        let expected = expected(1);
        let events: Vec<CapturedEvent> = (0..5).map(lifecycle).collect();
        let phases = Phases {
            load_start: 1,
            shutdown_start: 3,
        };
        let found = attribute(&events, &expected, phases);
        assert_eq!((found.lifecycle, found.unattributed), (3, 2));
    }
}
