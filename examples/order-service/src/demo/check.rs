//! The checks a demo run must pass, and the place where a new one plugs in.
//!
//! A check is a [`Check`]: it gets the whole [`Run`] (what the load sent and got back, every
//! captured event, the log stream, counts from the database) and returns a [`Verdict`]. The
//! demo passes when every verdict does. To add one, write it in a module of its own under
//! `src/demo/` and list it in [`checks`].

use std::fmt;

use super::{
    attribution::ContextCheck, load::Load, milestones::MilestoneCheck, output::OutputCheck,
    traces::TraceCheck,
};
use crate::{
    logging::{CapturedEvent, LogFormat, SpanOpened},
    telemetry::SpanRecord,
};

/// Everything a run produced, for the checks.
#[derive(Debug)]
pub struct Run {
    /// The run's id (request ids are `demo-<run_id>-<n>`, references `ord-<run_id>-<n>`).
    pub run_id: String,
    /// What the load sent and got back.
    pub load: Load,
    /// Every event, as structured data, in capture order.
    pub events: Vec<CapturedEvent>,
    /// Every span opening, in order (for the tree).
    pub spans: Vec<SpanOpened>,
    /// Where the load started and the shutdown began, as event positions.
    pub phases: Phases,
    /// Every line written to the log stream.
    pub output: Vec<String>,
    /// The log stream's format.
    pub format: LogFormat,
    /// What the database holds afterwards.
    pub database: DatabaseCounts,
    /// Every span exported over OTLP, as the in-process receiver decoded it.
    pub traces: Vec<SpanRecord>,
    /// What went wrong exporting them (flush failures, refused export requests).
    pub trace_errors: Vec<String>,
}

/// Event positions ([`CapturedEvent::seq`]) that split a run into start-up, load, shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// The first event after start-up.
    pub load_start: usize,
    /// The first event of the shutdown.
    pub shutdown_start: usize,
}

/// Orders of this run found in the database, over all tenants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatabaseCounts {
    /// Orders with status `paid`.
    pub paid: i64,
    /// Orders whose confirmation was sent exactly once.
    pub confirmed: i64,
    /// Orders whose confirmation was sent more than once (must be 0).
    pub repeated: i64,
    /// The same three counts for each tenant, as its own requests see the database: an order
    /// stored under another tenant shows up here, where the sums above would hide it.
    pub by_tenant: std::collections::BTreeMap<String, (i64, i64, i64)>,
    /// Each order of the run, by reference: the tenant it is stored under (read as that
    /// tenant), its status and its confirmation count. Counts can agree while orders sit under
    /// each other's tenants; this cannot.
    pub orders: std::collections::BTreeMap<String, StoredOrder>,
    /// The run's orders under any tenant at all (read across tenants): a copy stored under a
    /// tenant that none of the demo's reads as (`''`, `default`) shows here only.
    pub all_tenants: i64,
}

/// One order as the database holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredOrder {
    /// The tenants it was found under (more than one is a failure).
    pub tenants: Vec<String>,
    /// Its status.
    pub status: String,
    /// How many confirmations were sent.
    pub confirmation_sent: i64,
}

/// One check of a run.
pub trait Check {
    /// A short name for the report (at most 18 characters keeps the columns aligned).
    fn name(&self) -> &'static str;
    /// Looks at the run.
    fn check(&self, run: &Run) -> Verdict;
}

/// What a check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The check's name.
    pub name: &'static str,
    /// Whether the run passed it.
    pub ok: bool,
    /// One line for the report.
    pub summary: String,
    /// Named counts, for tests and tooling (`("mismatched", 0)`).
    pub counts: Vec<(&'static str, usize)>,
    /// A few failures, each with its evidence.
    pub examples: Vec<String>,
}

/// How many failures a verdict keeps as examples.
pub const MAX_EXAMPLES: usize = 5;

/// Every check the demo runs, in report order. A new check goes here.
pub fn checks() -> Vec<Box<dyn Check>> {
    vec![
        Box::new(RequestsCheck),
        Box::new(ContextCheck::default()),
        Box::new(OutputCheck),
        Box::new(MilestoneCheck),
        Box::new(DatabaseCheck),
        Box::new(TraceCheck),
    ]
}

// ===== impl Verdict =====

impl Verdict {
    /// The count named `name`, if the verdict has one.
    pub fn count(&self, name: &str) -> Option<usize> {
        self.counts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }

    /// Keeps `example` unless there are [`MAX_EXAMPLES`] already.
    pub fn example(&mut self, example: impl FnOnce() -> String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        writeln!(f, "  {mark} {:<18} {}", self.name, self.summary)?;
        for example in &self.examples {
            writeln!(f, "         {example}")?;
        }
        Ok(())
    }
}

// ===== the small checks =====

/// Every request was answered `201 Created`.
#[derive(Debug)]
pub struct RequestsCheck;

impl Check for RequestsCheck {
    fn name(&self) -> &'static str {
        "requests"
    }

    fn check(&self, run: &Run) -> Verdict {
        let sent = run.load.outcomes.len();
        let created = run.load.created();
        // A 201 must name the order it created: the checks below compare its id with the
        // events' `order_id`, and would skip a request without one.
        let without_id = run
            .load
            .outcomes
            .iter()
            .filter(|o| o.status == Some(201) && o.order_id.is_none())
            .count();
        let mut verdict = Verdict {
            name: self.name(),
            ok: created == sent && sent == run.load.expected.len() && without_id == 0,
            summary: format!("{created}/{sent} answered 201 Created"),
            counts: vec![("sent", sent), ("created", created)],
            examples: Vec::new(),
        };
        if without_id > 0 {
            verdict.example(|| format!("{without_id} answers 201 without an order id"));
        }
        for outcome in run.load.outcomes.iter().filter(|o| o.status != Some(201)) {
            verdict.example(|| {
                format!(
                    "{}: {} {}",
                    outcome.request_id,
                    outcome
                        .status
                        .map_or("transport error".to_string(), |s| s.to_string()),
                    outcome.detail
                )
            });
        }
        verdict
    }
}

/// Every created order is in the database, paid and confirmed exactly once, and nothing more.
#[derive(Debug)]
pub struct DatabaseCheck;

impl Check for DatabaseCheck {
    fn name(&self) -> &'static str {
        "database"
    }

    fn check(&self, run: &Run) -> Verdict {
        let created = run.load.created() as i64;
        let DatabaseCounts {
            paid,
            confirmed,
            repeated,
            ref by_tenant,
            ref orders,
            all_tenants,
        } = run.database;
        // Tenant by tenant: each tenant's paid and confirmed orders are exactly the ones its
        // requests created.
        let mut created_by_tenant: std::collections::BTreeMap<&str, i64> =
            std::collections::BTreeMap::new();
        for id in run.load.created_ids() {
            if let Some(expected) = run.load.expected.get(id) {
                *created_by_tenant
                    .entry(expected.tenant.as_str())
                    .or_default() += 1;
            }
        }
        let mut examples = Vec::new();
        let tenants: std::collections::BTreeSet<&str> = created_by_tenant
            .keys()
            .copied()
            .chain(by_tenant.keys().map(String::as_str))
            .collect();
        for tenant in tenants {
            let want = created_by_tenant.get(tenant).copied().unwrap_or(0);
            let (t_paid, t_confirmed, t_repeated) =
                by_tenant.get(tenant).copied().unwrap_or_default();
            if (t_paid, t_confirmed, t_repeated) != (want, want, 0) {
                examples.push(format!(
                    "tenant {tenant}: {t_paid} paid, {t_confirmed} confirmed once, {t_repeated} more than once, for {want} its requests created"
                ));
            }
        }
        // Order by order: each created order under its own request's tenant, paid, confirmed
        // once; and no order of the run that no request created.
        let mut misplaced = 0;
        let mut wanted = std::collections::BTreeSet::new();
        for id in run.load.created_ids() {
            let Some(expected) = run.load.expected.get(id) else {
                continue;
            };
            wanted.insert(expected.reference.as_str());
            let problem = match orders.get(&expected.reference) {
                None => Some("not found under any tenant".to_owned()),
                Some(order) if order.tenants != [expected.tenant.as_str()] => Some(format!(
                    "stored under {:?}, created by a request of tenant {}",
                    order.tenants, expected.tenant
                )),
                Some(order) if order.status != "paid" || order.confirmation_sent != 1 => {
                    Some(format!(
                        "{}, {} confirmations",
                        order.status, order.confirmation_sent
                    ))
                }
                Some(_) => None,
            };
            if let Some(problem) = problem {
                misplaced += 1;
                if examples.len() < 5 {
                    examples.push(format!("order {}: {problem}", expected.reference));
                }
            }
        }
        let extra: Vec<&String> = orders
            .keys()
            .filter(|reference| !wanted.contains(reference.as_str()))
            .collect();
        if let Some(reference) = extra.first() {
            examples.push(format!(
                "{} orders no created request accounts for, e.g. {reference}",
                extra.len()
            ));
        }
        if all_tenants != created {
            examples.push(format!(
                "{all_tenants} orders of the run across all tenants, for {created} created"
            ));
        }
        Verdict {
            name: self.name(),
            ok: paid == created
                && confirmed == created
                && repeated == 0
                && misplaced == 0
                && extra.is_empty()
                && examples.is_empty(),
            summary: format!(
                "{paid} orders paid, {confirmed} confirmed exactly once, {repeated} more than once, for {created} created (counted tenant by tenant; each order under its request's tenant)"
            ),
            counts: vec![
                ("paid", paid.max(0) as usize),
                ("confirmed", confirmed.max(0) as usize),
                ("repeated", repeated.max(0) as usize),
            ],
            examples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        demo::load::{Expected, Load, Outcome},
        logging::LogFormat,
    };

    fn run(created: &[(&str, &str)], by_tenant: &[(&str, (i64, i64, i64))]) -> Run {
        // Stored as created, unless a test says otherwise.
        let stored: Vec<(&str, &str)> = created.to_vec();
        run_stored(created, by_tenant, &stored)
    }

    /// `stored`: (request id, tenant) of each order as the database holds it.
    fn run_stored(
        created: &[(&str, &str)],
        by_tenant: &[(&str, (i64, i64, i64))],
        stored: &[(&str, &str)],
    ) -> Run {
        let mut load = Load::default();
        for (request_id, tenant) in created {
            load.expected.insert(
                (*request_id).into(),
                Expected {
                    reference: format!("ord-{request_id}"),
                    trace_id: "aa".into(),
                    tenant: (*tenant).into(),
                    order_id: None,
                },
            );
            load.outcomes.push(Outcome {
                request_id: (*request_id).into(),
                latency: std::time::Duration::ZERO,
                status: Some(201),
                detail: String::new(),
                order_id: None,
            });
        }
        let mut database = DatabaseCounts::default();
        for (tenant, counts) in by_tenant {
            database.paid += counts.0;
            database.confirmed += counts.1;
            database.repeated += counts.2;
            database.by_tenant.insert((*tenant).into(), *counts);
        }
        database.all_tenants = stored.len() as i64;
        for (request_id, tenant) in stored {
            database
                .orders
                .entry(format!("ord-{request_id}"))
                .or_insert_with(|| StoredOrder {
                    tenants: Vec::new(),
                    status: "paid".into(),
                    confirmation_sent: 1,
                })
                .tenants
                .push((*tenant).into());
        }
        Run {
            run_id: "x".into(),
            load,
            events: Vec::new(),
            spans: Vec::new(),
            phases: Phases::default(),
            output: Vec::new(),
            format: LogFormat::Text,
            database,
            traces: Vec::new(),
            trace_errors: Vec::new(),
        }
    }

    /// The totals can agree while an order sits under the wrong tenant: the check compares
    /// tenant by tenant.
    #[test]
    fn an_order_under_another_tenant_fails_the_database_check() {
        let created = [("r-1", "acme"), ("r-2", "acme"), ("r-3", "globex")];
        let right = run(&created, &[("acme", (2, 2, 0)), ("globex", (1, 1, 0))]);
        assert!(DatabaseCheck.check(&right).ok);
        let moved = run(&created, &[("acme", (1, 1, 0)), ("globex", (2, 2, 0))]);
        let verdict = DatabaseCheck.check(&moved);
        assert!(!verdict.ok, "{verdict}");
        assert!(
            verdict.to_string().contains("tenant acme: 1 paid"),
            "{verdict}"
        );
    }

    /// Orders swapped between tenants keep every tenant's counts: the order-by-order check
    /// still sees each one under the wrong tenant.
    #[test]
    fn orders_swapped_between_tenants_fail_the_database_check() {
        let created = [("r-1", "acme"), ("r-2", "globex")];
        let counts = [("acme", (1, 1, 0)), ("globex", (1, 1, 0))];
        let swapped = run_stored(&created, &counts, &[("r-1", "globex"), ("r-2", "acme")]);
        let verdict = DatabaseCheck.check(&swapped);
        assert!(!verdict.ok, "{verdict}");
        assert!(
            verdict.to_string().contains(
                "order ord-r-1: stored under [\"globex\"], created by a request of tenant acme"
            ),
            "{verdict}"
        );
    }

    /// A copy of an order under a tenant none of the demo's reads as (`''`, `default`) shows
    /// only in the count across tenants: it fails the check.
    #[test]
    fn a_copy_under_an_unread_tenant_fails_the_database_check() {
        let created = [("r-1", "acme")];
        let counts = [("acme", (1, 1, 0))];
        let mut run = run_stored(&created, &counts, &[("r-1", "acme")]);
        assert!(DatabaseCheck.check(&run).ok);
        run.database.all_tenants = 2;
        let verdict = DatabaseCheck.check(&run);
        assert!(!verdict.ok, "{verdict}");
        assert!(
            verdict
                .to_string()
                .contains("2 orders of the run across all tenants, for 1 created"),
            "{verdict}"
        );
    }
}
