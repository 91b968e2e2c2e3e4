//! A context value whose `Display` logs, under a global subscriber: tracing-core stops a nested
//! event only under a scoped (`with_default`) dispatcher, so without a guard of our own the
//! nested event renders the same value again, and again, until the stack overflows. Its own
//! test binary: the global subscriber is set once per process.

use std::fmt;

use contextflow::AsyncLocal;
use contextflow_tracing::{ContextFields, MemoryWriter};
use tracing::info;

/// A value that logs while it is displayed.
struct Chatty;

impl fmt::Display for Chatty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        tracing::warn!("displaying a chatty value");
        f.write_str("chatty")
    }
}

static CHATTY: AsyncLocal<Chatty> = AsyncLocal::named("chatty");

#[test]
fn a_context_value_that_logs_does_not_recurse() {
    let log = MemoryWriter::new();
    let fields = ContextFields::new().field("chatty", &CHATTY);
    tracing_subscriber::fmt()
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .event_format(
            fields.text(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false),
            ),
        )
        .with_writer(log.clone())
        .init();
    CHATTY.sync_scope(Chatty, || info!("outer"));
    let out = log.contents();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "[<recursive>]  WARN displaying a chatty value",
            "[chatty]  INFO outer"
        ],
        "{out}"
    );
}
