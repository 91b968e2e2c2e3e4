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
//!         // Restored also when `f` panics (a panicking poll): the worker polls other tasks next.
//!         struct Restore(u32);
//!         impl Drop for Restore {
//!             fn drop(&mut self) {
//!                 ROLE.with(|r| r.set(self.0));
//!             }
//!         }
//!         let _restore = Restore(ROLE.with(|r| r.replace(*role)));
//!         f();
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

    /// Makes `value` current, calls `f`, and restores what was current before, also when `f`
    /// panics (a runtime catches a task's panic and goes on polling other tasks on the same
    /// thread: restore in a drop guard). Called around every poll of the child, while it is
    /// dropped, and around `Snapshot::run`.
    fn enter(&self, value: &Self::Value, f: &mut dyn FnMut());

    /// Makes "nothing" current (what [`capture`](Carrier::capture) reports as `None`), calls
    /// `f`, and restores what was current before. Called where [`enter`](Carrier::enter) would
    /// be when the snapshot carries no value of this carrier: one made by
    /// [`Snapshot::empty`](crate::Snapshot::empty), under
    /// [`suppress_flow`](crate::suppress_flow), by
    /// [`spawn_without_context`](crate::spawn_without_context), or captured while `capture`
    /// had nothing. Without it, such a child would see whatever the thread that polls it has
    /// current, for example the span of another request whose closure a rayon worker is
    /// running when it steals the job.
    ///
    /// The default calls `f` as it is, for a "current" that cannot be emptied (tracing's
    /// current span is one).
    ///
    /// ```
    /// use contextflow::{carry::{self, Carrier}, Snapshot};
    /// use std::cell::Cell;
    ///
    /// thread_local!(static ROLE: Cell<u32> = const { Cell::new(0) });
    ///
    /// struct RoleCarrier;
    /// impl Carrier for RoleCarrier {
    ///     type Value = u32;
    ///     fn capture(&self) -> Option<u32> {
    ///         Some(ROLE.with(Cell::get)).filter(|r| *r != 0)
    ///     }
    ///     fn enter(&self, role: &u32, f: &mut dyn FnMut()) {
    ///         // Restored also when `f` panics (a panicking poll): the worker polls other tasks next.
    ///         struct Restore(u32);
    ///         impl Drop for Restore {
    ///             fn drop(&mut self) {
    ///                 ROLE.with(|r| r.set(self.0));
    ///             }
    ///         }
    ///         let _restore = Restore(ROLE.with(|r| r.replace(*role)));
    ///         f();
    ///     }
    ///     fn enter_none(&self, f: &mut dyn FnMut()) {
    ///         self.enter(&0, f)
    ///     }
    /// }
    ///
    /// carry::register(RoleCarrier);
    /// ROLE.with(|r| r.set(7));
    /// // The empty snapshot replaces the thread's role too.
    /// assert_eq!(Snapshot::empty().run(|| ROLE.with(Cell::get)), 0);
    /// assert_eq!(ROLE.with(Cell::get), 7);
    /// ```
    fn enter_none(&self, f: &mut dyn FnMut()) {
        f()
    }

    /// Whether this carrier's value is entered inside the other carriers' values (around
    /// each poll of a child, its [`enter`](Carrier::enter) runs last), so that what it makes
    /// current wins over what another carrier's `enter` makes current as a side effect. The
    /// default is `false`: carriers are then entered in the order they were registered, the
    /// first one innermost; those that answer `true` are inside all of those, in the same
    /// order among themselves.
    ///
    /// `contextflow-otel`'s carrier of `opentelemetry::Context` answers `true`: entering a
    /// tracing span with `tracing-opentelemetry`'s context activation attaches that span's
    /// OpenTelemetry context, which would otherwise replace the context captured at the
    /// spawn (a request's remote parent, its baggage, a suppression of telemetry).
    ///
    /// ```
    /// use contextflow::carry::{self, Carrier};
    /// use std::cell::Cell;
    ///
    /// thread_local!(static SEEN: Cell<u32> = const { Cell::new(0) });
    ///
    /// /// Makes `SEEN` 1 as a side effect of entering its own value.
    /// struct Outer;
    /// impl Carrier for Outer {
    ///     type Value = ();
    ///     fn capture(&self) -> Option<()> { Some(()) }
    ///     fn enter(&self, _: &(), f: &mut dyn FnMut()) {
    ///         let prev = SEEN.with(|s| s.replace(1));
    ///         f();
    ///         SEEN.with(|s| s.set(prev));
    ///     }
    /// }
    ///
    /// /// Carries `SEEN` itself: entered inside `Outer`, so its value wins.
    /// struct Inner;
    /// impl Carrier for Inner {
    ///     type Value = u32;
    ///     fn capture(&self) -> Option<u32> { Some(SEEN.with(Cell::get)) }
    ///     fn enter(&self, seen: &u32, f: &mut dyn FnMut()) {
    ///         let prev = SEEN.with(|s| s.replace(*seen));
    ///         f();
    ///         SEEN.with(|s| s.set(prev));
    ///     }
    ///     fn innermost(&self) -> bool { true }
    /// }
    ///
    /// // Registered after `Outer`, yet entered inside it.
    /// carry::register(Outer);
    /// carry::register(Inner);
    /// SEEN.with(|s| s.set(7));
    /// let child = contextflow::thread::spawn(|| SEEN.with(Cell::get));
    /// assert_eq!(child.join().unwrap(), 7);
    /// ```
    fn innermost(&self) -> bool {
        false
    }
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
    if old
        .iter()
        .any(|c| c.carrier.carrier_type() == TypeId::of::<C>())
    {
        return false;
    }
    let mut list: Vec<Entry> = old.to_vec();
    // Leaked on purpose: carriers live for the rest of the process, and a capture on another
    // thread may be reading the previous list at this moment, so no list is ever freed either
    // (one per registration: a handful per process).
    let entry = Entry {
        carrier: Box::leak(Box::new(carrier)),
        index: old.len(),
    };
    // In capture order: the innermost first (each capture goes on top of the previous one,
    // and the top is entered outermost).
    let at = if entry.carrier.innermost() {
        list.iter().take_while(|e| e.carrier.innermost()).count()
    } else {
        list.len()
    };
    list.insert(at, entry);
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
        .any(|c| c.carrier.carrier_type() == TypeId::of::<C>())
}

// ===== internals =====

/// A registered carrier and its place in the order of registration (which never changes: a
/// captured value records it, to tell which carriers a frame carries).
#[derive(Clone, Copy)]
struct Entry {
    carrier: &'static dyn ErasedCarrier,
    index: usize,
}

/// The registered carriers, in capture order (see [`Carrier::innermost`]): a leaked,
/// never-freed list, replaced as a whole on registration (copy on write), so that captures
/// read it with one atomic load and no lock.
static CARRIERS: Registry = Registry::new(std::ptr::null_mut());
/// Serializes registrations, and keeps the lists that registrations replaced (their addresses),
/// which are never freed.
static WRITER: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The registry's atomic pointer (std's, even under loom: a `static` needs a `const`
/// constructor; the loom model drives [`publish`] and [`read`] with loom's own).
type Registry = std::sync::atomic::AtomicPtr<Vec<Entry>>;

/// The one thing a list pointer needs: load and store, so the loom model checks this code.
pub(crate) trait ListPtr<T> {
    fn load_acquire(&self) -> *mut T;
    fn store_release(&self, ptr: *mut T);
}

/// One body for std's atomic pointer and loom's (whose `Ordering` is std's), so that the
/// loom model checks the orderings that ship.
macro_rules! list_ptr {
    ($($atomic:ident)::+) => {
        impl<T> ListPtr<T> for $($atomic)::+<T> {
            fn load_acquire(&self) -> *mut T {
                self.load(Ordering::Acquire)
            }
            fn store_release(&self, ptr: *mut T) {
                self.store(ptr, Ordering::Release)
            }
        }
    };
}

list_ptr!(std::sync::atomic::AtomicPtr);
#[cfg(all(test, loom))]
list_ptr!(loom::sync::atomic::AtomicPtr);

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

fn registered() -> &'static [Entry] {
    read(&CARRIERS)
}

/// The key of every carried-value node (hidden; never a variable's key, which start at 2).
pub(crate) const CARRIED_KEY: usize = 1;

/// A captured value, stored in a hidden node on top of a captured frame. `#[repr(C)]` with
/// its [`CarriedHead`] first, so that [`run_in`] can enter it without knowing `C`.
#[repr(C)]
struct Carried<C: Carrier> {
    head: CarriedHead,
    carrier: &'static C,
    value: C::Value,
}

/// What [`run_in`] reads of a [`Carried`] of any carrier.
#[repr(C)]
struct CarriedHead {
    /// Enters the value ([`Carried::enter`]).
    enter: unsafe fn(*const (), &mut dyn FnMut()),
    /// The carrier's place in the order of registration ([`Entry::index`]).
    index: usize,
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
    /// [`Carrier::innermost`].
    fn innermost(&self) -> bool;
    /// [`Carrier::enter_none`].
    fn enter_none(&self, f: &mut dyn FnMut());
    /// Captures this carrier's current value, if any, as a hidden node on top of `frame`;
    /// `index` is the carrier's place in the registered list.
    fn capture_onto(&'static self, index: usize, frame: Option<NodeRef>) -> Option<NodeRef>;
}

impl<C: Carrier> ErasedCarrier for C {
    fn carrier_type(&self) -> TypeId {
        TypeId::of::<C>()
    }
    fn innermost(&self) -> bool {
        Carrier::innermost(self)
    }
    fn enter_none(&self, f: &mut dyn FnMut()) {
        Carrier::enter_none(self, f)
    }
    fn capture_onto(&'static self, index: usize, frame: Option<NodeRef>) -> Option<NodeRef> {
        match Carrier::capture(self) {
            Some(value) => Some(NodeRef::new_hidden(
                frame,
                CARRIED_KEY,
                Carried {
                    head: CarriedHead {
                        enter: Carried::<C>::enter,
                        index,
                    },
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
    carriers.iter().fold(frame, |frame, entry| {
        entry.carrier.capture_onto(entry.index, frame)
    })
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
/// A registered carrier of which `frame` carries no value makes its "nothing" current
/// ([`Carrier::enter_none`]): the frame replaces the thread's context, carriers' included.
/// The caller keeps `frame` alive for the call.
#[inline]
pub(crate) fn run_in<R>(frame: *const Header, f: impl FnOnce() -> R) -> R {
    // With no carrier registered, no frame has carried values: skip looking at the node.
    if !is_active() {
        let _entered = current::enter_borrowed(frame);
        return f();
    }
    let carriers = registered();
    // Which carriers (by their place in the order of registration) the frame carries a value
    // of; past the 64th, every carrier counts as carried (its "nothing" is not entered).
    let mut carried = if carriers.len() >= 64 {
        0
    } else {
        u64::MAX << carriers.len()
    };
    let mut node = frame;
    // SAFETY: the caller keeps the chain alive.
    while let Some(header) = unsafe { node.as_ref() } {
        if !header.is_hidden() {
            break;
        }
        // SAFETY: a hidden node holds a `Carried<C>`, which starts with its `CarriedHead`.
        let index = unsafe { (*header.value_ptr().cast::<CarriedHead>()).index };
        if index < 64 {
            carried |= 1 << index;
        }
        node = header.parent_ptr();
    }
    // `node` is `frame` below its carried values.
    let _entered = current::enter_borrowed(node);
    if carried == u64::MAX && node == frame {
        return f();
    }
    let mut f = Some(f);
    let mut out = None;
    // The "nothing"s outermost: what a carried value's entry makes current for another
    // carrier as a side effect (a tracing span that activates its OpenTelemetry context) is
    // not then undone.
    enter_nones(carriers, carried, &mut || {
        nest(frame, &mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        })
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
            // SAFETY: hidden nodes hold a `Carried<C>`, which starts with its `CarriedHead`,
            // and the value is alive with the node.
            unsafe {
                let value = header.value_ptr();
                let enter = (*value.cast::<CarriedHead>()).enter;
                enter(value, &mut || nest(header.parent_ptr(), f))
            }
        }
        _ => f(),
    }
}

/// Enters the "nothing" of each carrier in `carriers` whose bit (its [`Entry::index`]) in
/// `carried` is clear, then calls `f`.
fn enter_nones(carriers: &'static [Entry], carried: u64, f: &mut dyn FnMut()) {
    if carried == u64::MAX {
        return f();
    }
    let i = carried.trailing_ones() as usize;
    let rest = &mut || enter_nones(carriers, carried | 1 << i, f);
    match carriers.iter().find(|entry| entry.index == i) {
        Some(entry) => entry.carrier.enter_none(rest),
        // Every index below the list's length is in it (registration appends one each time).
        None => rest(),
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
