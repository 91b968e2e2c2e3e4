//! The progress bar on stderr: a redraw per percent on a terminal, a line per quarter otherwise.

use std::io::{IsTerminal as _, Write as _};

/// Counts finished requests and draws the bar.
#[derive(Debug)]
pub(crate) struct Progress {
    total: usize,
    done: usize,
    shown: usize,
    enabled: bool,
    terminal: bool,
}

impl Progress {
    /// A bar for `total` requests; draws nothing unless `enabled`.
    pub(crate) fn new(total: usize, enabled: bool) -> Self {
        Progress {
            total,
            done: 0,
            shown: usize::MAX,
            enabled,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// One more request finished.
    pub(crate) fn tick(&mut self) {
        self.done += 1;
        if !self.enabled {
            return;
        }
        let steps = if self.terminal { 100 } else { 4 };
        let step = self.done * steps / self.total.max(1);
        if step == self.shown {
            return;
        }
        self.shown = step;
        let width = 40;
        let filled = self.done * width / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r  orders [{bar}] {}/{}", self.done, self.total);
        } else {
            let _ = writeln!(stderr, "  orders [{bar}] {}/{}", self.done, self.total);
        }
        let _ = stderr.flush();
    }

    /// Ends the bar's line on a terminal.
    pub(crate) fn finish(&self) {
        if self.enabled && self.terminal {
            eprintln!();
        }
    }
}
