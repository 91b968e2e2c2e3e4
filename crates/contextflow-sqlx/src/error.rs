//! [`TransactionClosed`]: the error for a transaction that can no longer be used.

use std::{error::Error, fmt, io};

/// The transaction bound to the current context can no longer be used.
///
/// Code normally never sees this: a query inside a [`transaction`](crate::TxPool::transaction)
/// block runs before the block ends. It shows up when the transaction's context outlives the
/// block (a task given a full [`Snapshot::capture`](contextflow::Snapshot::capture) that still
/// runs after the block returned), or when a savepoint could not be rolled back, which leaves
/// the transaction fit only to be rolled back as a whole.
///
/// It reaches callers inside a [`sqlx::Error::Io`] of kind
/// [`NotConnected`](std::io::ErrorKind::NotConnected), so repository code keeps a single error
/// type; [`TransactionClosed::find`] picks it out.
///
/// ```
/// use contextflow_sqlx::TransactionClosed;
///
/// let err = sqlx::Error::RowNotFound;
/// assert!(TransactionClosed::find(&err).is_none());
/// ```
#[derive(Debug)]
pub struct TransactionClosed {
    poisoned: bool,
}

// ===== impl TransactionClosed =====

impl TransactionClosed {
    /// The `TransactionClosed` inside `err`, if `err` is one.
    ///
    /// ```
    /// use contextflow_sqlx::TransactionClosed;
    ///
    /// let err = sqlx::Error::PoolTimedOut;
    /// assert!(TransactionClosed::find(&err).is_none());
    /// ```
    pub fn find(err: &sqlx::Error) -> Option<&TransactionClosed> {
        match err {
            sqlx::Error::Io(io) => io.get_ref()?.downcast_ref(),
            _ => None,
        }
    }

    /// Whether the transaction is still open but may only be rolled back (a savepoint could
    /// not be rolled back), rather than already ended.
    ///
    /// ```
    /// # use contextflow_sqlx::TransactionClosed;
    /// # let err = sqlx::Error::PoolTimedOut;
    /// if let Some(closed) = TransactionClosed::find(&err) {
    ///     eprintln!("transaction unusable (poisoned: {})", closed.is_poisoned());
    /// }
    /// ```
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The error for a transaction that has already ended.
    pub(crate) fn ended() -> sqlx::Error {
        Self::wrap(false)
    }

    /// The error for a transaction that may only be rolled back.
    pub(crate) fn poisoned() -> sqlx::Error {
        Self::wrap(true)
    }

    fn wrap(poisoned: bool) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(
            io::ErrorKind::NotConnected,
            TransactionClosed { poisoned },
        ))
    }
}

impl fmt::Display for TransactionClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.poisoned {
            f.write_str("a savepoint of the current transaction failed to roll back; the transaction can only be rolled back")
        } else {
            f.write_str("the transaction bound to the current context has already ended")
        }
    }
}

impl Error for TransactionClosed {}
