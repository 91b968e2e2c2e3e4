//! Trace-context validation service (work in progress).

fn main() {}
