//! Shared test helpers: an in-memory log sink.
#![allow(dead_code)]

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
};

use tracing_subscriber::fmt::MakeWriter;

/// A `MakeWriter` that appends everything to one shared buffer. The fmt layer writes each
/// event with a single `write_all`, and `write` takes the whole slice under the lock, so lines
/// from concurrent threads never interleave.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub(crate) fn contents(&self) -> String {
        let buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8(buf.clone()).expect("log output is UTF-8")
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.contents().lines().map(str::to_owned).collect()
    }

    pub(crate) fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Parses a text line's context prefix `[first k=v ...] rest` into (first, [(k, v)], rest).
/// Only handles the bare values the proof tests use.
pub(crate) fn parse_prefix(line: &str) -> Option<(Vec<(String, String)>, String)> {
    let rest = line.strip_prefix('[')?;
    let (inside, rest) = rest.split_once("] ")?;
    let fields = inside
        .split(' ')
        .map(|part| match part.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (String::new(), part.to_owned()),
        })
        .collect();
    Some((fields, rest.to_owned()))
}
