//! `MemoryWriter`: log output kept in memory, for tests and examples.

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
};

use tracing_subscriber::fmt::MakeWriter;

/// A [`MakeWriter`] that appends every line to one shared in-memory buffer: for tests and
/// examples that check what was logged. Clones share the buffer. `tracing_subscriber`'s `fmt`
/// layer writes each event with a single write, taken whole under a lock, so lines from
/// concurrent threads never interleave.
///
/// ```
/// use contextflow_tracing::MemoryWriter;
///
/// let log = MemoryWriter::new();
/// let subscriber = tracing_subscriber::fmt()
///     .without_time()
///     .with_ansi(false)
///     .with_target(false)
///     .with_writer(log.clone())
///     .finish();
/// tracing::subscriber::with_default(subscriber, || tracing::warn!("disk almost full"));
/// assert_eq!(log.lines(), [" WARN disk almost full"]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryWriter {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl MemoryWriter {
    /// An empty buffer.
    ///
    /// ```
    /// assert_eq!(contextflow_tracing::MemoryWriter::new().contents(), "");
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far (invalid UTF-8, which `fmt` never writes, is replaced).
    ///
    /// ```
    /// use std::io::Write;
    /// use tracing_subscriber::fmt::MakeWriter;
    /// let log = contextflow_tracing::MemoryWriter::new();
    /// log.make_writer().write_all(b"a\nb\n")?;
    /// assert_eq!(log.contents(), "a\nb\n");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn contents(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The lines written so far, without their newlines.
    ///
    /// ```
    /// use std::io::Write;
    /// use tracing_subscriber::fmt::MakeWriter;
    /// let log = contextflow_tracing::MemoryWriter::new();
    /// log.make_writer().write_all(b"a\nb\n")?;
    /// assert_eq!(log.lines(), ["a", "b"]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn lines(&self) -> Vec<String> {
        self.contents().lines().map(str::to_owned).collect()
    }

    /// Empties the buffer.
    ///
    /// ```
    /// use std::io::Write;
    /// use tracing_subscriber::fmt::MakeWriter;
    /// let log = contextflow_tracing::MemoryWriter::new();
    /// log.make_writer().write_all(b"a\n")?;
    /// log.clear();
    /// assert!(log.lines().is_empty());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn clear(&self) {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl io::Write for MemoryWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for MemoryWriter {
    type Writer = MemoryWriter;

    fn make_writer(&'a self) -> MemoryWriter {
        self.clone()
    }
}
