//! A channel whose messages carry their sender's context, for worker pools.
//!
//! A worker thread serves every request and none: it takes a job from a channel and should
//! run it in the context of whoever sent it. [`channel`] and [`sync_channel`] are
//! [`std::sync::mpsc`]'s, except that each [`send`](Sender::send) captures the sender's
//! inheritable context (O(1); [`Inherit::Never`](crate::Inherit::Never) variables stay
//! behind) and the receiver gets a [`Carried`] message to [`run`](Carried::run) in it.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use contextflow::AsyncLocal;
//!
//! static REQUEST_ID: AsyncLocal<String> = AsyncLocal::named("request_id");
//!
//! let (jobs, queue) = contextflow::channel::channel::<u32>();
//! let (results, done) = std::sync::mpsc::channel();
//! let queue = Arc::new(Mutex::new(queue));
//! let workers: Vec<_> = (0..4)
//!     .map(|_| {
//!         let (queue, results) = (queue.clone(), results.clone());
//!         std::thread::spawn(move || loop {
//!             let job = queue.lock().unwrap().recv();
//!             let Ok(job) = job else { break };
//!             // The job runs in its sender's context, then the worker's frame is restored.
//!             job.run(|n| results.send((n, REQUEST_ID.get())).unwrap());
//!         })
//!     })
//!     .collect();
//! for n in 0..8 {
//!     REQUEST_ID.sync_scope(format!("req-{n}"), || jobs.send(n).unwrap());
//! }
//! drop(jobs);
//! workers.into_iter().for_each(|w| w.join().unwrap());
//! drop(results);
//! for (n, id) in done {
//!     assert_eq!(id, Some(format!("req-{n}")));
//! }
//! ```

use std::{
    fmt,
    sync::mpsc::{self, RecvError, RecvTimeoutError, SendError, TryRecvError, TrySendError},
    time::Duration,
};

use crate::Snapshot;

/// An unbounded channel whose messages carry the sender's context (as [`std::sync::mpsc::channel`]).
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let (tx, rx) = contextflow::channel::channel();
/// ID.sync_scope(1, || tx.send("job").unwrap());
/// assert_eq!(rx.recv().unwrap().run(|job| (job, ID.get())), ("job", Some(1)));
/// ```
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel();
    (Sender { inner: tx }, Receiver { inner: rx })
}

/// A bounded channel whose messages carry the sender's context (as
/// [`std::sync::mpsc::sync_channel`]: `send` blocks while `bound` messages wait).
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let (tx, rx) = contextflow::channel::sync_channel(1);
/// ID.sync_scope(2, || tx.send(()).unwrap());
/// assert!(ID.sync_scope(3, || tx.try_send(())).is_err(), "full");
/// assert_eq!(rx.recv().unwrap().snapshot().get(&ID), Some(2));
/// ```
pub fn sync_channel<T>(bound: usize) -> (SyncSender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::sync_channel(bound);
    (SyncSender { inner: tx }, Receiver { inner: rx })
}

/// The sending half of [`channel`]; cheap to clone.
///
/// ```
/// let (tx, rx) = contextflow::channel::channel();
/// let tx2 = tx.clone();
/// tx2.send(1).unwrap();
/// assert_eq!(rx.recv().unwrap().into_inner(), 1);
/// ```
pub struct Sender<T> {
    inner: mpsc::Sender<Carried<T>>,
}

/// The sending half of [`sync_channel`]; cheap to clone.
///
/// ```
/// let (tx, rx) = contextflow::channel::sync_channel(4);
/// tx.clone().send(1).unwrap();
/// assert_eq!(rx.recv().unwrap().into_inner(), 1);
/// ```
pub struct SyncSender<T> {
    inner: mpsc::SyncSender<Carried<T>>,
}

/// The receiving half of [`channel`] and [`sync_channel`]; share it between workers behind a
/// `Mutex`.
///
/// ```
/// let (tx, rx) = contextflow::channel::channel::<u8>();
/// drop(tx);
/// assert!(rx.recv().is_err(), "every sender is gone");
/// ```
pub struct Receiver<T> {
    inner: mpsc::Receiver<Carried<T>>,
}

/// A message with the context its sender had; [`run`](Self::run) handles it there.
///
/// ```
/// use contextflow::AsyncLocal;
/// static ID: AsyncLocal<u32> = AsyncLocal::new();
///
/// let (tx, rx) = contextflow::channel::channel();
/// ID.sync_scope(5, || tx.send(10).unwrap());
/// let message = rx.recv().unwrap();
/// assert_eq!(*message.get_ref(), 10);
/// let (value, snapshot) = message.into_parts();
/// assert_eq!(snapshot.run(|| value * ID.get().unwrap()), 50);
/// ```
pub struct Carried<T> {
    value: T,
    snapshot: Snapshot,
}

// ===== impl Sender =====

impl<T> Sender<T> {
    /// Sends `value` with the current inheritable context (as [`mpsc::Sender::send`]).
    ///
    /// # Errors
    /// When the receiver is gone: the value comes back in the error.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// drop(rx);
    /// assert_eq!(tx.send(3).unwrap_err().0, 3);
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.inner
            .send(Carried::capture(value))
            .map_err(|SendError(carried)| SendError(carried.value))
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

// ===== impl SyncSender =====

impl<T> SyncSender<T> {
    /// Sends `value` with the current inheritable context, blocking while the channel is full
    /// (as [`mpsc::SyncSender::send`]).
    ///
    /// # Errors
    /// When the receiver is gone: the value comes back in the error.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::sync_channel(1);
    /// tx.send('a').unwrap();
    /// drop(rx);
    /// assert_eq!(tx.send('b').unwrap_err().0, 'b');
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.inner
            .send(Carried::capture(value))
            .map_err(|SendError(carried)| SendError(carried.value))
    }

    /// Sends `value` with the current inheritable context if there is room (as
    /// [`mpsc::SyncSender::try_send`]).
    ///
    /// # Errors
    /// When the channel is full or the receiver is gone: the value comes back in the error.
    ///
    /// ```
    /// use std::sync::mpsc::TrySendError;
    /// let (tx, _rx) = contextflow::channel::sync_channel(0);
    /// assert!(matches!(tx.try_send(1), Err(TrySendError::Full(1))));
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        self.inner
            .try_send(Carried::capture(value))
            .map_err(|err| match err {
                TrySendError::Full(carried) => TrySendError::Full(carried.value),
                TrySendError::Disconnected(carried) => TrySendError::Disconnected(carried.value),
            })
    }
}

impl<T> Clone for SyncSender<T> {
    fn clone(&self) -> Self {
        SyncSender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for SyncSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncSender").finish_non_exhaustive()
    }
}

// ===== impl Receiver =====

impl<T> Receiver<T> {
    /// Waits for the next message (as [`mpsc::Receiver::recv`]).
    ///
    /// # Errors
    /// When the channel is empty and every sender is gone.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// tx.send(1).unwrap();
    /// assert_eq!(rx.recv().unwrap().into_inner(), 1);
    /// ```
    pub fn recv(&self) -> Result<Carried<T>, RecvError> {
        self.inner.recv()
    }

    /// The next message if there is one (as [`mpsc::Receiver::try_recv`]).
    ///
    /// # Errors
    /// When the channel is empty, or empty and every sender is gone.
    ///
    /// ```
    /// let (_tx, rx) = contextflow::channel::channel::<u8>();
    /// assert!(rx.try_recv().is_err());
    /// ```
    pub fn try_recv(&self) -> Result<Carried<T>, TryRecvError> {
        self.inner.try_recv()
    }

    /// Waits at most `timeout` for the next message (as [`mpsc::Receiver::recv_timeout`]).
    ///
    /// # Errors
    /// On timeout, or when the channel is empty and every sender is gone.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel::<u8>();
    /// drop(tx);
    /// assert!(rx.recv_timeout(std::time::Duration::from_secs(1)).is_err());
    /// ```
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Carried<T>, RecvTimeoutError> {
        self.inner.recv_timeout(timeout)
    }

    /// The messages, until every sender is gone (as [`mpsc::Receiver::iter`]).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let (tx, rx) = contextflow::channel::channel();
    /// for n in 1..=3 {
    ///     ID.sync_scope(n, || tx.send(n).unwrap());
    /// }
    /// drop(tx);
    /// assert!(rx.iter().all(|m| m.run(|n| ID.get() == Some(n))));
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = Carried<T>> + '_ {
        self.inner.iter()
    }
}

impl<T> IntoIterator for Receiver<T> {
    type Item = Carried<T>;
    type IntoIter = mpsc::IntoIter<Carried<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.inner.into_iter()
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

// ===== impl Carried =====

impl<T> Carried<T> {
    /// `value` with the current inheritable context: what the senders send.
    ///
    /// ```
    /// use contextflow::{channel::Carried, AsyncLocal};
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let carried = ID.sync_scope(4, || Carried::capture("x"));
    /// assert_eq!(carried.run(|_| ID.get()), Some(4));
    /// ```
    #[cfg_attr(feature = "diagnostics", track_caller)]
    pub fn capture(value: T) -> Self {
        Carried {
            value,
            snapshot: Snapshot::capture_inheritable(),
        }
    }

    /// Handles the message: `f(value)` in the sender's context, the receiver's frame restored
    /// afterwards (also when `f` panics).
    ///
    /// ```
    /// use contextflow::AsyncLocal;
    /// static ID: AsyncLocal<u32> = AsyncLocal::new();
    ///
    /// let (tx, rx) = contextflow::channel::channel();
    /// ID.sync_scope(6, || tx.send(()).unwrap());
    /// let message = rx.recv().unwrap();
    /// assert_eq!(message.run(|()| ID.get()), Some(6));
    /// assert_eq!(ID.get(), None);
    /// ```
    pub fn run<R>(self, f: impl FnOnce(T) -> R) -> R {
        let Carried { value, snapshot } = self;
        snapshot.run(|| f(value))
    }

    /// The sender's context.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// tx.send(()).unwrap();
    /// assert!(rx.recv().unwrap().snapshot().is_empty());
    /// ```
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The value, without running anything.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// tx.send(2).unwrap();
    /// assert_eq!(*rx.recv().unwrap().get_ref(), 2);
    /// ```
    pub fn get_ref(&self) -> &T {
        &self.value
    }

    /// The value, dropping the context.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// tx.send("v").unwrap();
    /// assert_eq!(rx.recv().unwrap().into_inner(), "v");
    /// ```
    pub fn into_inner(self) -> T {
        self.value
    }

    /// The value and the sender's context.
    ///
    /// ```
    /// let (tx, rx) = contextflow::channel::channel();
    /// tx.send(1).unwrap();
    /// let (value, snapshot) = rx.recv().unwrap().into_parts();
    /// assert_eq!((value, snapshot.is_empty()), (1, true));
    /// ```
    pub fn into_parts(self) -> (T, Snapshot) {
        (self.value, self.snapshot)
    }
}

impl<T: fmt::Debug> fmt::Debug for Carried<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Carried")
            .field("value", &self.value)
            .field("snapshot", &self.snapshot)
            .finish()
    }
}
