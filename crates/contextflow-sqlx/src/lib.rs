//! contextflow integration (work in progress).
