//! Request context in every `tracing` log line, and tracing spans carried across
//! contextflow spawns.
//!
//! GUIDE
#![forbid(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod escape;
mod fields;
mod format;
mod span;

pub use crate::{
    fields::{ContextFields, DEFAULT_MAX_LEN, TRUNCATED_MARKER},
    format::ContextFormat,
    span::{carry_spans, SpanCarrier},
};
