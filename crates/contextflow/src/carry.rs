//! Carriers: other "current context" systems that travel with a spawn.
//!
//! tracing's current span and `opentelemetry::Context` each have their own thread-local notion
//! of "current", and both are lost at a plain `tokio::spawn`. A [`Carrier`] teaches contextflow
//! to capture such a thing whenever it captures context for a child (the spawn helpers,
//! [`FutureExt::in_current_context`](crate::FutureExt::in_current_context),
//! [`Snapshot::capture_inheritable`](crate::Snapshot::capture_inheritable),
//! [`Snapshot::bind`](crate::Snapshot::bind), [`thread::spawn`](crate::thread::spawn)) and to
//! re-enter it around every poll of the child, so that the three systems agree.
//!
//! The core knows nothing of tracing or OpenTelemetry: the integration crates register
//! carriers (`contextflow-tracing`, `contextflow-otel`). With no carrier registered the cost is
//! one relaxed atomic load per capture and per poll.
//!
//! The captured values ride in the snapshot itself (as a hidden binding on top of the frame),
//! so a spawned task still grows by one pointer only.
//!
//! ```
//! use contextflow::carry::{self, Carrier};
//! use std::cell::Cell;
//!
//! thread_local!(static ROLE: Cell<u32> = const { Cell::new(0) });
//!
//! /// Carries a thread-local "role" of some other library across contextflow spawns.
//! struct RoleCarrier;
//! impl Carrier for RoleCarrier {
//!     type Value = u32;
//!     fn capture(&self) -> Option<u32> {
//!         Some(ROLE.with(Cell::get)).filter(|r| *r != 0)
//!     }
//!     fn enter(&self, role: &u32, f: &mut dyn FnMut()) {
//!         let prev = ROLE.with(|r| r.replace(*role));
//!         f();
//!         ROLE.with(|r| r.set(prev));
//!     }
//! }
//!
//! carry::register(RoleCarrier);
//! ROLE.with(|r| r.set(7));
//! let child = contextflow::thread::spawn(|| ROLE.with(Cell::get));
//! assert_eq!(child.join().unwrap(), 7);
//! ```

use std::{
    any::{Any, TypeId},
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use crate::{current, node::Header, node::NodeRef, AsyncLocal, Inherit};

/// Something with its own notion of "current" that should follow contextflow's spawns.
///
/// See the [module docs](self) for an example.
pub trait Carrier: Send + Sync + 'static {
    /// What is captured on the spawning side.
    type Value: Send + Sync + 'static;

    /// Captures the current value on the spawning thread; `None` when there is nothing to
    /// carry (nothing is then stored).
    fn capture(&self) -> Option<Self::Value>;

    /// Makes `value` current, calls `f`, and restores what was current before. Called around
    /// every poll of the child, while it is dropped, and around `Snapshot::run`.
    fn enter(&self, value: &Self::Value, f: &mut dyn FnMut());
}

/// Registers `carrier` for the rest of the process. Returns `false` (and changes nothing) if a
/// carrier of the same type is already registered, so libraries may call it on every start-up.
///
/// ```
/// use contextflow::carry::{self, Carrier};
///
/// struct Nothing;
/// impl Carrier for Nothing {
///     type Value = ();
///     fn capture(&self) -> Option<()> { None }
///     fn enter(&self, _: &(), f: &mut dyn FnMut()) { f() }
/// }
/// assert!(carry::register(Nothing));
/// assert!(!carry::register(Nothing));
/// ```
pub fn register<C: Carrier>(carrier: C) -> bool {
    // A poisoned lock only means another registration panicked; the list itself is intact.
    let mut slot = CARRIERS.write().unwrap_or_else(|e| e.into_inner());
    let mut carriers: Vec<_> = slot.as_deref().cloned().unwrap_or_default();
    if carriers
        .iter()
        .any(|c| c.carrier_type() == TypeId::of::<C>())
    {
        return false;
    }
    carriers.push(Arc::new(carrier));
    *slot = Some(Arc::new(carriers));
    REGISTERED.store(true, Ordering::Release);
    true
}

/// Whether any carrier is registered.
///
/// ```
/// // Integration crates register theirs at start-up (for example when installing a layer).
/// let _ = contextflow::carry::is_active();
/// ```
pub fn is_active() -> bool {
    REGISTERED.load(Ordering::Relaxed)
}

// ===== internals =====

static REGISTERED: AtomicBool = AtomicBool::new(false);
/// Copy-on-write, so captures call the carriers outside the lock (a carrier may register
/// another one, or take a while).
static CARRIERS: RwLock<Option<Carriers>> = RwLock::new(None);

/// The registered carriers, shared by every capture that reads them.
type Carriers = Arc<Vec<Arc<dyn ErasedCarrier>>>;

/// The hidden binding that holds captured carrier values. Not inherited: each capture for a
/// child replaces it with freshly captured values, so a task that respawns itself does not
/// pile up the carried values of every generation before it.
static CARRIED: AsyncLocal<Carried> =
    AsyncLocal::named("contextflow.carried").inherit(Inherit::Never);

/// One captured value and the carrier that knows how to enter it.
type Entry = (Arc<dyn ErasedCarrier>, Box<dyn Any + Send + Sync>);

struct Carried {
    entries: Vec<Entry>,
}

trait ErasedCarrier: Send + Sync {
    fn carrier_type(&self) -> TypeId;
    fn capture(&self) -> Option<Box<dyn Any + Send + Sync>>;
    fn enter(&self, value: &(dyn Any + Send + Sync), f: &mut dyn FnMut());
}

impl<C: Carrier> ErasedCarrier for C {
    fn carrier_type(&self) -> TypeId {
        TypeId::of::<C>()
    }
    fn capture(&self) -> Option<Box<dyn Any + Send + Sync>> {
        Carrier::capture(self).map(|v| Box::new(v) as Box<dyn Any + Send + Sync>)
    }
    fn enter(&self, value: &(dyn Any + Send + Sync), f: &mut dyn FnMut()) {
        match value.downcast_ref::<C::Value>() {
            Some(value) => Carrier::enter(self, value, f),
            // Cannot happen (the value was captured by this carrier); run `f` regardless.
            None => f(),
        }
    }
}

/// Adds the captured carrier values on top of `frame`, if any carrier is registered and has
/// something to carry.
pub(crate) fn capture_into(frame: Option<NodeRef>) -> Option<NodeRef> {
    if !REGISTERED.load(Ordering::Relaxed) {
        return frame;
    }
    let Some(carriers) = CARRIERS.read().unwrap_or_else(|e| e.into_inner()).clone() else {
        return frame;
    };
    let entries: Vec<_> = carriers
        .iter()
        .filter_map(|c| c.capture().map(|v| (Arc::clone(c), v)))
        .collect();
    if entries.is_empty() {
        return frame;
    }
    Some(NodeRef::new_value(
        frame,
        CARRIED.key(),
        CARRIED.name(),
        false,
        Carried { entries },
    ))
}

/// Enters `frame` (which its owner keeps alive for the call) and, when it starts with captured
/// carrier values, enters those too; then calls `f`.
#[inline]
pub(crate) fn run_in<R>(frame: *const Header, f: impl FnOnce() -> R) -> R {
    let _entered = current::enter_borrowed(frame);
    if !REGISTERED.load(Ordering::Relaxed) || frame.is_null() {
        return f();
    }
    // SAFETY: the caller keeps `frame` alive for this call.
    let top = unsafe { &*frame };
    if top.key != CARRIED.key() {
        return f();
    }
    // SAFETY: the key is `CARRIED`'s, so the node holds a `Carried`.
    let carried = unsafe { top.value::<Carried>() };
    let mut f = Some(f);
    let mut out = None;
    nest(&carried.entries, &mut || {
        if let Some(f) = f.take() {
            out = Some(f());
        }
    });
    match out {
        Some(out) => out,
        // A carrier that did not call `f` broke its contract; calling `f` here is the only
        // way to return a value.
        None => (f
            .take()
            .expect("f is taken only by the closure above, which did not run"))(),
    }
}

fn nest(entries: &[Entry], f: &mut dyn FnMut()) {
    match entries.split_first() {
        None => f(),
        Some(((carrier, value), rest)) => carrier.enter(&**value, &mut || nest(rest, f)),
    }
}

impl fmt::Debug for Carried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Carried")
            .field("values", &self.entries.len())
            .finish()
    }
}
