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
    any::TypeId,
    fmt,
    sync::{atomic::Ordering, Mutex},
};

use crate::{
    current,
    node::{Header, NodeRef},
};

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
/// assert!(!carry::is_registered::<Nothing>());
/// assert!(carry::register(Nothing));
/// assert!(carry::is_registered::<Nothing>());
/// assert!(!carry::register(Nothing), "a second registration is refused");
/// ```
pub fn register<C: Carrier>(carrier: C) -> bool {
    // Writers take a lock (registration is rare); readers never do. A poisoned lock only means
    // another registration panicked; the list itself is intact.
    let mut retired = WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let old = registered();
    if old.iter().any(|c| c.carrier_type() == TypeId::of::<C>()) {
        return false;
    }
    let mut list: Vec<&'static dyn ErasedCarrier> = old.to_vec();
    // Leaked on purpose: carriers live for the rest of the process, and a capture on another
    // thread may be reading the previous list at this moment, so no list is ever freed either
    // (one per registration: a handful per process).
    list.push(Box::leak(Box::new(carrier)));
    // Kept reachable (not freed: a capture may still read it), so leak checkers see a list
    // that is still referenced rather than a lost one.
    retired.push(CARRIERS.load(Ordering::Relaxed) as usize);
    publish(&CARRIERS, list);
    true
}

/// Whether any carrier is registered.
///
/// ```
/// use contextflow::carry::{self, Carrier};
/// struct Role;
/// impl Carrier for Role {
///     type Value = u32;
///     fn capture(&self) -> Option<u32> { Some(7) }
///     fn enter(&self, _: &u32, f: &mut dyn FnMut()) { f() }
/// }
/// carry::register(Role);
/// assert!(carry::is_active());
/// ```
#[inline]
pub fn is_active() -> bool {
    !CARRIERS.load(Ordering::Relaxed).is_null()
}

/// Whether a carrier of type `C` is registered.
///
/// ```
/// use contextflow::carry::{self, Carrier};
/// struct Unused;
/// impl Carrier for Unused {
///     type Value = ();
///     fn capture(&self) -> Option<()> { None }
///     fn enter(&self, _: &(), f: &mut dyn FnMut()) { f() }
/// }
/// assert!(!carry::is_registered::<Unused>());
/// ```
pub fn is_registered<C: Carrier>() -> bool {
    registered()
        .iter()
        .any(|c| c.carrier_type() == TypeId::of::<C>())
}

// ===== internals =====

/// The registered carriers: a leaked, never-freed list, replaced as a whole on registration
/// (copy on write), so that captures read it with one atomic load and no lock.
static CARRIERS: Registry = Registry::new(std::ptr::null_mut());
/// Serializes registrations, and keeps the lists that registrations replaced (their addresses),
/// which are never freed.
static WRITER: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The registry's atomic pointer (std's, even under loom: a `static` needs a `const`
/// constructor; the loom model drives [`publish`] and [`read`] with loom's own).
type Registry = std::sync::atomic::AtomicPtr<Vec<&'static dyn ErasedCarrier>>;

/// The one thing a list pointer needs: load and store, so the loom model checks this code.
pub(crate) trait ListPtr<T> {
    fn load_acquire(&self) -> *mut T;
    fn store_release(&self, ptr: *mut T);
}

impl<T> ListPtr<T> for std::sync::atomic::AtomicPtr<T> {
    fn load_acquire(&self) -> *mut T {
        self.load(Ordering::Acquire)
    }
    fn store_release(&self, ptr: *mut T) {
        self.store(ptr, Ordering::Release)
    }
}

#[cfg(all(test, loom))]
impl<T> ListPtr<T> for loom::sync::atomic::AtomicPtr<T> {
    fn load_acquire(&self) -> *mut T {
        self.load(loom::sync::atomic::Ordering::Acquire)
    }
    fn store_release(&self, ptr: *mut T) {
        self.store(ptr, loom::sync::atomic::Ordering::Release)
    }
}

/// Publishes `list` as the registered list. The previous list is leaked (see [`register`]).
pub(crate) fn publish<T, P: ListPtr<Vec<T>>>(slot: &P, list: Vec<T>) {
    // Release: a reader that loads the new pointer (Acquire) sees the list fully written.
    slot.store_release(Box::into_raw(Box::new(list)));
}

/// The published list, empty if none.
pub(crate) fn read<T, P: ListPtr<Vec<T>>>(slot: &P) -> &'static [T] {
    let ptr = slot.load_acquire();
    // SAFETY: a non-null pointer was published by `publish` from a leaked `Box`, is never freed
    // or written again, and the Acquire load pairs with its Release store.
    unsafe { ptr.as_ref() }.map_or(&[], |list| list.as_slice())
}

fn registered() -> &'static [&'static dyn ErasedCarrier] {
    read(&CARRIERS)
}

/// The key of every carried-value node (hidden; never a variable's key, which start at 2).
pub(crate) const CARRIED_KEY: usize = 1;

/// A captured value, stored in a hidden node on top of a captured frame. `#[repr(C)]` with the
/// entry function first, so that [`run_in`] can enter it without knowing `C`.
#[repr(C)]
struct Carried<C: Carrier> {
    enter: unsafe fn(*const (), &mut dyn FnMut()),
    carrier: &'static C,
    value: C::Value,
}

impl<C: Carrier> Carried<C> {
    /// # Safety
    /// `this` must point to a live `Carried<C>`.
    unsafe fn enter(this: *const (), f: &mut dyn FnMut()) {
        // SAFETY: by the caller's contract.
        let this = unsafe { &*this.cast::<Carried<C>>() };
        this.carrier.enter(&this.value, f)
    }
}

trait ErasedCarrier: Send + Sync {
    fn carrier_type(&self) -> TypeId;
    /// Captures this carrier's current value, if any, as a hidden node on top of `frame`.
    fn capture_onto(&'static self, frame: Option<NodeRef>) -> Option<NodeRef>;
}

impl<C: Carrier> ErasedCarrier for C {
    fn carrier_type(&self) -> TypeId {
        TypeId::of::<C>()
    }
    fn capture_onto(&'static self, frame: Option<NodeRef>) -> Option<NodeRef> {
        match Carrier::capture(self) {
            Some(value) => Some(NodeRef::new_hidden(
                frame,
                CARRIED_KEY,
                Carried {
                    enter: Carried::<C>::enter,
                    carrier: self,
                    value,
                },
            )),
            None => frame,
        }
    }
}

/// Adds the registered carriers' current values on top of `frame`, one hidden node each.
#[inline]
pub(crate) fn capture_into(frame: Option<NodeRef>) -> Option<NodeRef> {
    let carriers = registered();
    if carriers.is_empty() {
        return frame;
    }
    carriers
        .iter()
        .fold(frame, |frame, carrier| carrier.capture_onto(frame))
}

/// `frame` without the carried values on top of it: the frame a snapshot makes current.
///
/// # Safety
/// `frame` must be null or point to a live node.
#[inline]
pub(crate) unsafe fn below_carried(mut frame: *const Header) -> *const Header {
    // SAFETY: a live chain by the caller's contract.
    while let Some(header) = unsafe { frame.as_ref() } {
        if !header.is_hidden() {
            break;
        }
        frame = header.parent_ptr();
    }
    frame
}

/// Makes `frame` current (without the carried values on top of it, which are entered through
/// their carriers instead, so they never pile up under later bindings), then calls `f`.
/// The caller keeps `frame` alive for the call.
#[inline]
pub(crate) fn run_in<R>(frame: *const Header, f: impl FnOnce() -> R) -> R {
    // With no carrier registered, no frame has carried values: skip looking at the node.
    if !is_active() {
        let _entered = current::enter_borrowed(frame);
        return f();
    }
    // SAFETY: the caller keeps `frame` alive.
    let top = unsafe { frame.as_ref() };
    if !top.is_some_and(Header::is_hidden) {
        let _entered = current::enter_borrowed(frame);
        return f();
    }
    // SAFETY: as above.
    let _entered = current::enter_borrowed(unsafe { below_carried(frame) });
    let mut f = Some(f);
    let mut out = None;
    nest(frame, &mut || {
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

/// Enters the carried values from `node` down, outermost first, then calls `f`.
fn nest(node: *const Header, f: &mut dyn FnMut()) {
    // SAFETY: `run_in`'s caller keeps the chain alive.
    match unsafe { node.as_ref() } {
        Some(header) if header.is_hidden() => {
            // SAFETY: hidden nodes hold a `Carried<C>`, whose first field is its entry
            // function, and the value is alive with the node.
            unsafe {
                let value = header.value_ptr();
                let enter = *value.cast::<unsafe fn(*const (), &mut dyn FnMut())>();
                enter(value, &mut || nest(header.parent_ptr(), f))
            }
        }
        _ => f(),
    }
}

impl<C: Carrier> fmt::Debug for Carried<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Carried")
            .field("carrier", &std::any::type_name::<C>())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, loom))]
mod loom_tests;
