//! Scheduled jobs (feature `cron`): every run starts from an empty root context, with a run id
//! and a trace of its own.
//!
//! A scheduled run belongs to no request. Whoever registered the job (a request handler, the
//! start-up code inside some scope) leaves nothing in the run: no variable, no tenant, no
//! transaction, no trace. Each run gets, on top of an empty frame:
//!
//! - a **run id**: a fresh [`RequestId`], bound as `contextflow_otel::REQUEST_ID`, so the
//!   run's log lines carry an id as a request's do;
//! - a **trace of its own**: with a tracer (the global provider's by default), a root span
//!   `job <name>`; without one, a fresh, valid trace context (a random trace id with a random
//!   parent span id, as an incoming request without a traceparent would get from an edge
//!   proxy), so messages the run publishes and calls it makes still share one trace id;
//! - the **job run**: [`JobRun`] (name, run id, scheduled time) in [`JOB_RUN`].
//!
//! Overlapping runs are an explicit choice per job ([`Overlap`]): allowed (each run has its
//! own id and trace), skipped, or queued. A run that panics is logged (inside its context)
//! and ends its span as failed; the scheduler goes on. [`Running::shutdown`] stops
//! scheduling and waits for the runs in progress; [`Running::cancel`] (or dropping the
//! [`Running`]) stops them, dropping each run's future inside its context.
//!
//! ```
//! use std::time::Duration;
//! use contextflow::AsyncLocal;
//! use contextflow_messaging::cron::{self, Overlap, Schedule, Scheduler};
//!
//! static TENANT: AsyncLocal<&'static str> = AsyncLocal::named("tenant");
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! // Registered inside some request: none of it reaches the runs.
//! let running = TENANT
//!     .scope("acme", async {
//!         Scheduler::new()
//!             .job("cleanup", Schedule::every(Duration::from_secs(60)), Overlap::Skip, move || {
//!                 let tx = tx.clone();
//!                 async move {
//!                     let run = cron::current_run().unwrap();
//!                     let request_id = contextflow_otel::current_request_id().unwrap();
//!                     tx.send((run.name().to_owned(), run.run_id() == &request_id, TENANT.get())).unwrap();
//!                 }
//!             })
//!             .start()
//!     })
//!     .await;
//! let (name, run_id_is_request_id, tenant) = rx.recv().await.unwrap();
//! assert_eq!((name.as_str(), run_id_is_request_id, tenant), ("cleanup", true, None));
//! running.shutdown().await;
//! # }
//! ```
//!
//! # Schedules
//!
//! [`Schedule::cron`] takes a cron expression with a seconds field (`sec min hour day-of-month
//! month day-of-week [year]`, UTC), parsed by the `cron` crate; [`Schedule::every`] a fixed
//! period. Times are kept on tokio's clock (anchored to the system clock when the scheduler
//! starts), so tests can use tokio's paused time. A job on a cron expression checks the system
//! clock at least once a minute and re-anchors its schedule when the clock was stepped (NTP
//! correcting a stale boot clock, a suspend that the monotonic clock does not count), so
//! `"0 30 2 * * *"` keeps firing at 02:30 UTC on the wall clock. As cron does, a step of up
//! to 3 hours keeps each due time's wall time (a step back does not run again what ran; a
//! step forward runs a missed time once, late), while a bigger step either way starts the
//! schedule again from the corrected now (nothing missed is run). A job on a fixed period
//! waits on the monotonic clock, whatever the system clock does; the wall time its runs
//! report ([`JobRun::scheduled`]) follows the stepped clock.
//!
//! # Why not `tokio-cron-scheduler`
//!
//! The scheduler is a small loop per job on tokio timers, with the `cron` crate for parsing
//! only. `tokio-cron-scheduler` spawns its runs itself (plain `tokio::spawn`), keeps job state
//! behind its own locks and storage traits and brings a large dependency tree; a run there
//! would still need wrapping to start from an empty context, and its overlap and shutdown
//! behaviour is not ours to choose. Here each run is one task started with
//! `Snapshot::empty()`, and the overlap policy, panic handling and shutdown are a few lines
//! each.

use std::{
    any::Any,
    fmt,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::{Duration, SystemTime},
};

use contextflow::{AsyncLocal, FutureExt as _, Snapshot};
use contextflow_otel::RequestId;
use opentelemetry::{
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState},
    Context, KeyValue,
};
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::spans::{self, Spans};

/// The job run the current code belongs to; set in every scheduled run.
///
/// ```
/// assert!(contextflow_messaging::cron::JOB_RUN.get().is_none(), "not in a run");
/// ```
pub static JOB_RUN: AsyncLocal<JobRun> = AsyncLocal::named("job_run");

/// The longest cron expression [`Schedule::cron`] accepts, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 256;

/// The shortest period of [`Schedule::every`]; shorter ones are raised to it.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);

/// One run of a scheduled job: its name, its run id and when it was due.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use contextflow_messaging::cron::{Overlap, Schedule, Scheduler};
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let running = Scheduler::new()
///     .job("report", Schedule::every(std::time::Duration::from_secs(1)), Overlap::Allow, move || {
///         let _ = tx.send(contextflow_messaging::cron::current_run());
///         async {}
///     })
///     .start();
/// let run = rx.recv().await.unwrap().expect("the handler is called inside its run");
/// assert_eq!(run.name(), "report");
/// assert_eq!(run.run_id().as_str().len(), 36);
/// running.cancel().await;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct JobRun {
    name: Arc<str>,
    run_id: RequestId,
    scheduled: SystemTime,
}

/// When a job runs: a cron expression or a fixed period.
///
/// ```
/// use contextflow_messaging::cron::Schedule;
/// let nightly: Schedule = "0 30 2 * * *".parse()?; // 02:30:00 UTC every day
/// let often = Schedule::every(std::time::Duration::from_secs(10));
/// # drop((nightly, often));
/// # Ok::<(), contextflow_messaging::cron::InvalidSchedule>(())
/// ```
#[derive(Clone)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Cron(Box<::cron::Schedule>),
    Every(Duration),
}

/// A cron expression that does not parse (or is longer than [`MAX_EXPRESSION_LEN`]).
///
/// ```
/// let err = contextflow_messaging::cron::Schedule::cron("every tuesday").unwrap_err();
/// assert!(err.to_string().starts_with("invalid cron expression"));
/// ```
#[derive(Clone, Debug)]
pub struct InvalidSchedule {
    reason: String,
}

/// What to do when a run is due while an earlier run of the same job is still going.
///
/// ```
/// use contextflow_messaging::cron::Overlap;
/// assert_ne!(Overlap::Skip, Overlap::Queue);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// Start it anyway: runs overlap, each with its own run id and trace.
    Allow,
    /// Skip it (a `debug` log line); the next due time is tried as usual.
    Skip,
    /// Start it when the running ones have finished; due times that pass meanwhile are
    /// merged into that one run.
    Queue,
}

/// Scheduled jobs, before they start; see the [module docs](self).
///
/// ```
/// use contextflow_messaging::cron::{Overlap, Schedule, Scheduler};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let running = Scheduler::new()
///     .job("noop", Schedule::every(std::time::Duration::from_secs(3600)), Overlap::Skip, || async {})
///     .start();
/// running.shutdown().await;
/// # }
/// ```
pub struct Scheduler {
    jobs: Vec<Job>,
    spans: Spans,
}

/// The started jobs: stop them with [`shutdown`](Self::shutdown) or
/// [`cancel`](Self::cancel). Dropping it cancels them too.
///
/// ```
/// use contextflow_messaging::cron::Scheduler;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let running = Scheduler::new().start();
/// assert_eq!(running.jobs(), 0);
/// running.shutdown().await;
/// # }
/// ```
pub struct Running {
    stop: watch::Sender<Option<Stop>>,
    drivers: Vec<JoinHandle<()>>,
}

type Handler = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Job {
    name: Arc<str>,
    schedule: Schedule,
    overlap: Overlap,
    handler: Handler,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Wait,
    Cancel,
}

/// The job run of the current code, if it runs in one.
///
/// ```
/// assert!(contextflow_messaging::cron::current_run().is_none());
/// ```
pub fn current_run() -> Option<JobRun> {
    JOB_RUN.get()
}

// ===== impl JobRun =====

impl JobRun {
    /// The job's name.
    ///
    /// ```
    /// assert!(contextflow_messaging::cron::current_run().map(|r| r.name().to_owned()).is_none());
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run id: a fresh request id, also bound as `contextflow_otel::REQUEST_ID`.
    ///
    /// ```
    /// assert!(contextflow_messaging::cron::current_run().map(|r| r.run_id().clone()).is_none());
    /// ```
    pub fn run_id(&self) -> &RequestId {
        &self.run_id
    }

    /// When the run was due (it starts at that time or, with [`Overlap::Queue`], later).
    ///
    /// ```
    /// assert!(contextflow_messaging::cron::current_run().map(|r| r.scheduled()).is_none());
    /// ```
    pub fn scheduled(&self) -> SystemTime {
        self.scheduled
    }
}

// ===== impl Schedule =====

impl Schedule {
    /// A cron expression with a seconds field, in UTC: `sec min hour day-of-month month
    /// day-of-week [year]`.
    ///
    /// # Errors
    /// When `expression` does not parse, or is longer than [`MAX_EXPRESSION_LEN`] bytes.
    ///
    /// ```
    /// use contextflow_messaging::cron::Schedule;
    /// assert!(Schedule::cron("*/5 * * * * *").is_ok());
    /// assert!(Schedule::cron("* * *").is_err(), "too few fields");
    /// ```
    pub fn cron(expression: &str) -> Result<Schedule, InvalidSchedule> {
        if expression.len() > MAX_EXPRESSION_LEN {
            return Err(InvalidSchedule {
                reason: format!("longer than {MAX_EXPRESSION_LEN} bytes"),
            });
        }
        let schedule = ::cron::Schedule::from_str(expression).map_err(|err| InvalidSchedule {
            reason: err.to_string(),
        })?;
        Ok(Schedule {
            kind: Kind::Cron(Box::new(schedule)),
        })
    }

    /// Every `period` from the start (at least [`MIN_PERIOD`]); the first run is one period
    /// after the scheduler starts. Due times missed while the runtime was busy are not made
    /// up for.
    ///
    /// ```
    /// let every_minute = contextflow_messaging::cron::Schedule::every(std::time::Duration::from_secs(60));
    /// # drop(every_minute);
    /// ```
    pub fn every(period: Duration) -> Schedule {
        Schedule {
            kind: Kind::Every(period.max(MIN_PERIOD)),
        }
    }

    /// Whether due times are wall times (a cron expression), as opposed to a period.
    fn is_wall_based(&self) -> bool {
        matches!(self.kind, Kind::Cron(_))
    }

    /// The first due time strictly after `after`, on `clock`; `None` when there is none.
    fn next(&self, clock: &Clock, after: Instant) -> Option<Instant> {
        match &self.kind {
            Kind::Every(period) => after.checked_add(*period),
            Kind::Cron(schedule) => {
                let wall: chrono::DateTime<chrono::Utc> = clock.wall_at(after).into();
                let next = schedule.after(&wall).next()?;
                Some(clock.instant_at(next.into()))
            }
        }
    }
}

impl FromStr for Schedule {
    type Err = InvalidSchedule;

    fn from_str(expression: &str) -> Result<Self, InvalidSchedule> {
        Schedule::cron(expression)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Cron(schedule) => f.debug_tuple("Cron").field(&schedule.source()).finish(),
            Kind::Every(period) => f.debug_tuple("Every").field(period).finish(),
        }
    }
}

impl fmt::Display for InvalidSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid cron expression: {}", self.reason)
    }
}

impl std::error::Error for InvalidSchedule {}

// ===== impl Scheduler =====

impl Scheduler {
    /// No jobs yet; run spans from OpenTelemetry's global tracer provider (none without an
    /// SDK).
    ///
    /// ```
    /// let scheduler = contextflow_messaging::cron::Scheduler::new();
    /// # drop(scheduler);
    /// ```
    pub fn new() -> Self {
        Scheduler {
            jobs: Vec::new(),
            spans: Spans::global(),
        }
    }

    /// Starts the runs' root spans with `tracer` instead of the global provider's.
    ///
    /// ```
    /// use opentelemetry::trace::TracerProvider as _;
    /// let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    /// let scheduler = contextflow_messaging::cron::Scheduler::new().with_tracer(provider.tracer("jobs"));
    /// # drop(scheduler);
    /// ```
    pub fn with_tracer<T>(mut self, tracer: T) -> Self
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        self.spans = Spans::tracer(tracer);
        self
    }

    /// Starts no spans: each run gets a fresh trace context only.
    ///
    /// ```
    /// let scheduler = contextflow_messaging::cron::Scheduler::new().without_spans();
    /// # drop(scheduler);
    /// ```
    pub fn without_spans(mut self) -> Self {
        self.spans = Spans::Off;
        self
    }

    /// Adds the job `name`: `handler` makes the future of one run, called inside the run's
    /// context, each time the job is due under `schedule` and `overlap` allows.
    ///
    /// ```
    /// use contextflow_messaging::cron::{Overlap, Scheduler};
    /// let scheduler = Scheduler::new().job("purge", "0 0 * * * *".parse()?, Overlap::Queue, || async {
    ///     tracing::info!("purging"); // with the run id
    /// });
    /// # drop(scheduler);
    /// # Ok::<(), contextflow_messaging::cron::InvalidSchedule>(())
    /// ```
    pub fn job<F, Fut>(
        mut self,
        name: impl Into<Arc<str>>,
        schedule: Schedule,
        overlap: Overlap,
        handler: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.jobs.push(Job {
            name: name.into(),
            schedule,
            overlap,
            handler: Arc::new(move || Box::pin(handler())),
        });
        self
    }

    /// Starts every job, each in a task of its own with an empty context.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let running = contextflow_messaging::cron::Scheduler::new().start();
    /// running.cancel().await;
    /// # }
    /// ```
    pub fn start(self) -> Running {
        let (stop, _) = watch::channel(None);
        let drivers = self
            .jobs
            .into_iter()
            .map(|job| {
                let driver = Driver {
                    job,
                    spans: self.spans.clone(),
                    stop: stop.subscribe(),
                };
                contextflow::spawn_without_context(driver.run())
            })
            .collect();
        Running { stop, drivers }
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new()
    }
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("jobs", &self.jobs)
            .field("spans", &self.spans)
            .finish()
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("overlap", &self.overlap)
            .finish_non_exhaustive()
    }
}

// ===== impl Running =====

impl Running {
    /// How many jobs were started.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use contextflow_messaging::cron::{Overlap, Schedule, Scheduler};
    /// let every = Schedule::every(std::time::Duration::from_secs(60));
    /// let running = Scheduler::new().job("a", every, Overlap::Skip, || async {}).start();
    /// assert_eq!(running.jobs(), 1);
    /// running.cancel().await;
    /// # }
    /// ```
    pub fn jobs(&self) -> usize {
        self.drivers.len()
    }

    /// Stops scheduling and waits for the runs in progress to finish (a queued run does not
    /// start). Dropping the returned future before it completes (a timeout around it) cancels
    /// the runs still in progress, as [`cancel`](Self::cancel) does.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// contextflow_messaging::cron::Scheduler::new().start().shutdown().await;
    /// # }
    /// ```
    pub async fn shutdown(self) {
        self.stop_with(Stop::Wait).await
    }

    /// Stops scheduling and cancels the runs in progress: each run's future is dropped
    /// inside its context, and its span ends as `cancelled`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// contextflow_messaging::cron::Scheduler::new().start().cancel().await;
    /// # }
    /// ```
    pub async fn cancel(self) {
        self.stop_with(Stop::Cancel).await
    }

    async fn stop_with(mut self, how: Stop) {
        self.stop.send_replace(Some(how));
        for driver in std::mem::take(&mut self.drivers) {
            if let Err(err) = driver.await {
                // The driver itself runs no user code; a failure here is a runtime shutdown.
                tracing::warn!(error = %err, "scheduler task ended abnormally");
            }
        }
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("jobs", &self.drivers.len())
            .finish()
    }
}

// ===== the driver: one task per job =====

struct Driver {
    job: Job,
    spans: Spans,
    stop: watch::Receiver<Option<Stop>>,
}

impl Driver {
    /// `shutdown`: waits for the runs in progress, unless the `Running` goes away meanwhile
    /// (the `shutdown` future dropped, by a timeout say) or asks to cancel: then returns with
    /// the rest still running, for the caller to cancel.
    async fn wait_for(&mut self, runs: &mut JoinSet<()>) {
        loop {
            tokio::select! {
                next = runs.join_next() => {
                    if next.is_none() {
                        return;
                    }
                }
                changed = self.stop.changed() => {
                    if changed.is_err() || *self.stop.borrow() == Some(Stop::Cancel) {
                        return;
                    }
                }
            }
        }
    }

    async fn run(mut self) {
        let mut clock = Clock::now();
        let mut runs = JoinSet::new();
        let mut queued: Option<Instant> = None;
        let mut next = self.job.schedule.next(&clock, clock.instant);
        // Cron times are wall times: wake at least every `CLOCK_CHECK` to see whether the
        // system clock was stepped (NTP after a boot with a stale clock, a suspend that the
        // monotonic clock does not count), and re-anchor the schedule if it was.
        let wall_based = self.job.schedule.is_wall_based();
        loop {
            let wake_at = match next {
                Some(at) if wall_based => Some(at.min(Instant::now() + CLOCK_CHECK)),
                // Nothing left on this clock: a clock stepped back may give the schedule
                // times again.
                None if wall_based => Some(Instant::now() + CLOCK_CHECK),
                other => other,
            };
            let due = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = self.stop.changed() => {
                    // A dropped `Running` closes the channel: cancel.
                    let how = match changed {
                        Ok(()) => self.stop.borrow().unwrap_or(Stop::Cancel),
                        Err(_) => Stop::Cancel,
                    };
                    if how == Stop::Wait {
                        self.wait_for(&mut runs).await;
                    }
                    runs.abort_all();
                    while runs.join_next().await.is_some() {}
                    return;
                }
                Some(_) = runs.join_next(), if !runs.is_empty() => {
                    // Runs catch their own panics (and log them in their context).
                    if runs.is_empty() {
                        if let Some(due_at) = queued.take() {
                            self.start_run(&mut runs, &clock, due_at);
                        }
                    }
                }
                () = due => {
                    if wall_based {
                        if let Some(fresh) = clock.stepped() {
                            (next, queued) =
                                reanchor(&self.job.schedule, &clock, &fresh, next, queued);
                            clock = fresh;
                            tracing::info!(job = %self.job.name, "system clock stepped: schedule re-anchored");
                            continue;
                        }
                    }
                    else if let Some(fresh) = clock.stepped() {
                        // A fixed period runs on the monotonic clock, unmoved by a step; only
                        // the wall time a run reports (`JobRun::scheduled`) needs the fresh
                        // anchoring, or it would stay off by every step and suspend since the
                        // job started.
                        clock = fresh;
                    }
                    let Some(due_at) = next else { continue };
                    if wall_based && Instant::now() < due_at {
                        // Only a clock check.
                        continue;
                    }
                    next = self.job.schedule.next(&clock, due_at);
                    if let Some(at) = next {
                        let now = Instant::now();
                        if at <= now {
                            // Late (a busy runtime): skip the missed due times.
                            next = self.job.schedule.next(&clock, now);
                        }
                    }
                    match self.job.overlap {
                        Overlap::Allow => self.start_run(&mut runs, &clock, due_at),
                        _ if runs.is_empty() => self.start_run(&mut runs, &clock, due_at),
                        Overlap::Skip => {
                            tracing::debug!(job = %self.job.name, "run skipped: the previous one is still going");
                        }
                        Overlap::Queue => {
                            queued.get_or_insert(due_at);
                        }
                    }
                }
            }
        }
    }

    fn start_run(&self, runs: &mut JoinSet<()>, clock: &Clock, due_at: Instant) {
        let name = self.job.name.clone();
        let run_id = RequestId::new();
        let attrs = vec![
            KeyValue::new("contextflow.job.name", name.to_string()),
            KeyValue::new("contextflow.job.run_id", run_id.as_str().to_owned()),
        ];
        let (cx, owns_span) = match self.spans.start_root(format!("job {name}"), attrs) {
            Some(cx) => (cx, true),
            None => (fresh_trace(), false),
        };
        let cx = cx.with_value(run_id.clone());
        let run = JobRun {
            name,
            run_id,
            scheduled: clock.wall_at(due_at),
        };
        let handler = self.job.handler.clone();
        let end = EndSpan {
            cx: cx.clone(),
            owns_span,
            done: false,
        };
        let body = async move {
            let mut end = end;
            // The handler is called inside the run's context too (it may read it).
            let outcome = CatchUnwind(Box::pin(async move { handler().await })).await;
            match outcome {
                Ok(()) => end.finish(None),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("(not a string)");
                    // Bounded, and quoted with its controls escaped (`Debug`): a panic message
                    // can be anything, a payload's text included.
                    let message: String = message.chars().take(512).collect();
                    tracing::error!(panic = ?message, "scheduled run panicked");
                    end.finish(Some("panic"));
                }
            }
        };
        // An empty root, then the run's own bindings layered on it.
        let fut =
            contextflow_otel::scope(cx, JOB_RUN.scope(run, body)).with_snapshot(Snapshot::empty());
        runs.spawn(fut);
    }
}

/// The next due time and the queued run's due time, moved from the `old` anchoring of the
/// wall clock to the `fresh` one after the system clock was stepped. A due time keeps its wall
/// time (due at once if that has passed): a small step back does not run again what already
/// ran, and a small step forward (a suspend, a daylight-saving-like hour) runs the missed
/// time once, late. A step of more than [`BIG_STEP`] either way (a clock that was far
/// ahead or far behind, corrected), or a schedule that had nothing left on the old clock,
/// starts again from the fresh clock's now, as cron does: waiting for the wall clock to come
/// back to the old due time would silence the job for the size of the step, and a due time
/// days old run at once would run a nightly job at boot time, off its schedule.
fn reanchor(
    schedule: &Schedule,
    old: &Clock,
    fresh: &Clock,
    next: Option<Instant>,
    queued: Option<Instant>,
) -> (Option<Instant>, Option<Instant>) {
    let expected = old.expected_wall(fresh);
    let back = expected.duration_since(fresh.wall).unwrap_or_default();
    let ahead = fresh.wall.duration_since(expected).unwrap_or_default();
    let next = match next {
        Some(at) if back <= BIG_STEP && ahead <= BIG_STEP => {
            Some(fresh.instant_at(old.wall_at(at)))
        }
        _ => schedule.next(fresh, fresh.instant),
    };
    // A queued run was due already: it stays due at once, unless the clock went back a
    // little (then it keeps its wall time).
    let queued = queued.map(|at| {
        if back <= BIG_STEP {
            fresh.instant_at(old.wall_at(at))
        } else {
            fresh.instant
        }
    });
    (next, queued)
}

/// A fresh, valid trace context for a run without a tracer: a random trace id under a random
/// remote parent span id, sampled (a downstream service with an SDK records the run's trace).
fn fresh_trace() -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        contextflow_otel::new_trace_id(),
        contextflow_otel::new_span_id(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Ends a run's span: as finished, failed, or (dropped before the end) cancelled.
struct EndSpan {
    cx: Context,
    owns_span: bool,
    done: bool,
}

impl EndSpan {
    fn finish(&mut self, error_type: Option<&'static str>) {
        if !self.done {
            self.done = true;
            if self.owns_span {
                spans::end(&self.cx, error_type);
            }
        }
    }
}

impl Drop for EndSpan {
    fn drop(&mut self) {
        self.finish(Some("cancelled"));
    }
}

/// Polls a future inside `catch_unwind`: a panicking run is a failed run, not a dead task.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// How often a job on a cron expression checks that the system clock was not stepped.
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// How far the system clock may move against the monotonic one before a cron job's schedule is
/// re-anchored.
const MAX_CLOCK_DRIFT: Duration = Duration::from_secs(2);
/// A step of the system clock by more than this (back or forward) is a correction of a clock
/// that was wrong, not a small adjustment: the schedule starts again from the corrected now
/// (Vixie cron's threshold for a time change).
const BIG_STEP: Duration = Duration::from_secs(3 * 3600);

/// tokio's clock, anchored to the system clock when a job starts (and again when the system
/// clock is stepped): cron expressions are wall times, waits are tokio instants (so paused
/// time works in tests).
struct Clock {
    wall: SystemTime,
    instant: Instant,
    /// The real monotonic time of the anchoring (tokio's may be paused, in tests).
    real: std::time::Instant,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            wall: SystemTime::now(),
            instant: Instant::now(),
            real: std::time::Instant::now(),
        }
    }

    /// A fresh anchoring when the system clock moved more than [`MAX_CLOCK_DRIFT`] against the
    /// real monotonic clock since this one was made; `None` otherwise.
    fn stepped(&self) -> Option<Clock> {
        let fresh = Clock::now();
        let expected = self.expected_wall(&fresh);
        let drift = match fresh.wall.duration_since(expected) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        (drift > MAX_CLOCK_DRIFT).then_some(fresh)
    }

    /// The wall time `later` should read had the system clock not been stepped since `self`.
    fn expected_wall(&self, later: &Clock) -> SystemTime {
        self.wall + later.real.saturating_duration_since(self.real)
    }

    /// The wall time of `at` on this anchoring, also for an instant before it (a queued or
    /// missed due time, reported after a re-anchoring).
    fn wall_at(&self, at: Instant) -> SystemTime {
        if at >= self.instant {
            self.wall + (at - self.instant)
        } else {
            self.wall - (self.instant - at)
        }
    }

    fn instant_at(&self, wall: SystemTime) -> Instant {
        self.instant + wall.duration_since(self.wall).unwrap_or_default()
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[tokio::test]
    async fn a_stepped_system_clock_is_noticed() {
        assert!(
            Clock::now().stepped().is_none(),
            "a fresh anchoring has no drift"
        );
        let hour = Duration::from_secs(3600);
        for wall in [SystemTime::now() - hour, SystemTime::now() + hour] {
            let stale = Clock {
                wall,
                instant: Instant::now(),
                real: std::time::Instant::now(),
            };
            let fresh = stale.stepped().expect("an hour of drift is noticed");
            // The same wall time lands on the fresh clock an hour earlier or later.
            let due = fresh.wall + Duration::from_secs(10);
            let on_fresh = fresh.instant_at(due);
            assert_eq!(on_fresh - fresh.instant, Duration::from_secs(10));
        }
    }

    /// A clock anchored `ahead` of the real wall clock (a machine booted with a wrong clock),
    /// and the fresh anchoring after the correction.
    fn corrected(ahead: Duration) -> (Clock, Clock) {
        let now = Clock::now();
        let wrong = Clock {
            wall: now.wall + ahead,
            ..now
        };
        (wrong, now)
    }

    // Review finding: a clock stepped back by a day left a job due a day later (its next due
    // time kept its wall time on the wrong clock), silent until the clock caught up.
    #[tokio::test]
    async fn a_big_step_back_starts_the_schedule_again_from_now() {
        let every_five_minutes = Schedule::cron("0 */5 * * * *").unwrap();
        let (wrong, fresh) = corrected(Duration::from_secs(86_400));
        let next = every_five_minutes.next(&wrong, wrong.instant);
        assert!(next.is_some());
        let (next, queued) = reanchor(
            &every_five_minutes,
            &wrong,
            &fresh,
            next,
            Some(wrong.instant),
        );
        let wait = next.expect("still scheduled") - fresh.instant;
        assert!(
            wait <= Duration::from_secs(300),
            "due within 5 minutes, not {wait:?}"
        );
        assert_eq!(
            queued,
            Some(fresh.instant),
            "a queued run is not held back a day"
        );
    }

    #[tokio::test]
    async fn a_small_step_back_does_not_run_again_what_ran() {
        let every_five_minutes = Schedule::cron("0 */5 * * * *").unwrap();
        let (wrong, fresh) = corrected(Duration::from_secs(600));
        let next = every_five_minutes.next(&wrong, wrong.instant).unwrap();
        let (moved, _) = reanchor(&every_five_minutes, &wrong, &fresh, Some(next), None);
        // The same wall time: ten minutes later on the corrected clock.
        assert_eq!(
            moved.unwrap() - fresh.instant,
            (next - wrong.instant) + Duration::from_secs(600)
        );
    }

    // Review finding: a clock far behind (a board without a battery-backed clock, a restored
    // VM), corrected by NTP, made a nightly job's stale due time (days old) run at once, at
    // boot time, off its schedule.
    #[tokio::test]
    async fn a_big_step_forward_starts_the_schedule_again_from_now() {
        let daily = Schedule::cron("0 30 2 * * *").unwrap();
        let three_days = Duration::from_secs(3 * 86_400);
        let now = Clock::now();
        let behind = Clock {
            wall: now.wall - three_days,
            ..now
        };
        let fresh = Clock::now();
        let next = daily.next(&behind, behind.instant);
        let (moved, queued) = reanchor(&daily, &behind, &fresh, next, Some(behind.instant));
        let at = |c: &Clock, i: Instant| c.wall_at(i);
        assert_eq!(
            moved.map(|i| at(&fresh, i)),
            daily.next(&fresh, fresh.instant).map(|i| at(&fresh, i)),
            "the next 02:30 of the corrected clock"
        );
        assert_eq!(queued, Some(fresh.instant), "a queued run stays due");
        // A small step forward runs the missed time once, at once.
        let behind = Clock {
            wall: now.wall - Duration::from_secs(600),
            ..now
        };
        let every_minute = Schedule::cron("0 * * * * *").unwrap();
        let next = every_minute.next(&behind, behind.instant);
        let (moved, _) = reanchor(&every_minute, &behind, &fresh, next, None);
        assert_eq!(moved, Some(fresh.instant));
    }

    // Review finding: a due time before the anchoring (a run queued before a re-anchoring)
    // was reported at the anchoring's wall time, up to a period late.
    #[tokio::test]
    async fn a_wall_time_before_the_anchoring_is_kept() {
        let clock = Clock::now();
        let earlier = clock.instant - Duration::from_secs(30);
        assert_eq!(clock.wall_at(earlier), clock.wall - Duration::from_secs(30));
        assert_eq!(
            clock.wall_at(clock.instant + Duration::from_secs(5)),
            clock.wall + Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn a_schedule_with_nothing_left_is_looked_at_again() {
        // Every day at 02:30, with nothing left on the old clock (as a year-limited expression
        // judged past on a wrong clock would have).
        let daily = Schedule::cron("0 30 2 * * *").unwrap();
        let (wrong, fresh) = corrected(Duration::from_secs(60));
        let (next, _) = reanchor(&daily, &wrong, &fresh, None, None);
        assert!(next.is_some());
    }
}
