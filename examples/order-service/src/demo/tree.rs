//! One request's path drawn as a tree, from its captured events and their spans.
//!
//! Spans are told apart by their unique id, so a second query of the same kind is its own
//! node. Another server's request span (the payment stub's) hangs under the client call that
//! caused it, and a queue consumer's span under the publish that sent the message: that is
//! where the context crossed a boundary.

use std::sync::Arc;

use super::load::Expected;
use crate::logging::{CapturedEvent, SpanRecord};

/// A span (with children) or an event (a leaf).
#[derive(Debug)]
enum Node {
    Span {
        span: Arc<SpanRecord>,
        children: Vec<Node>,
    },
    Event(String),
}

/// Draws the events of `request_id`.
pub(crate) fn draw(events: &[CapturedEvent], request_id: &str, want: &Expected) -> String {
    let mut roots: Vec<Node> = Vec::new();
    // Where the spans of another process (the payment stub) or task (the queue consumer) hang.
    let mut client_call: Vec<Arc<SpanRecord>> = Vec::new();
    let mut publish: Vec<Arc<SpanRecord>> = Vec::new();
    for event in events {
        if event.context.request_id.as_deref() != Some(request_id) {
            continue;
        }
        let mut path = event.spans.clone();
        if let Some(at) = path.iter().position(|s| s.name == "http.client") {
            client_call = path[..=at].to_vec();
        }
        if let Some(at) = path.iter().position(|s| s.name == "queue.publish") {
            publish = path[..=at].to_vec();
        }
        let graft_under = match path.first() {
            Some(root) if is_payment_server(root) => Some(&client_call),
            Some(root) if root.name == "queue.consume" => Some(&publish),
            _ => None,
        };
        if let Some(parent) = graft_under {
            let mut grafted = parent.clone();
            grafted.append(&mut path);
            path = grafted;
        }
        insert(&mut roots, &path, format!("• {}", event.summary()));
    }
    let mut out = format!(
        "POST /orders  request_id={request_id}  trace_id={}  tenant={}  reference={}\n",
        want.trace_id, want.tenant, want.reference
    );
    let count = roots.len();
    for (i, node) in roots.iter().enumerate() {
        render(node, "", i + 1 == count, &mut out);
    }
    out
}

fn is_payment_server(span: &SpanRecord) -> bool {
    span.name == "http.request" && span.field("service") == Some("payment")
}

fn insert(nodes: &mut Vec<Node>, path: &[Arc<SpanRecord>], event: String) {
    let Some((head, rest)) = path.split_first() else {
        nodes.push(Node::Event(event));
        return;
    };
    let at = nodes
        .iter()
        .position(|n| matches!(n, Node::Span { span, .. } if span.uid == head.uid));
    let at = at.unwrap_or_else(|| {
        nodes.push(Node::Span {
            span: head.clone(),
            children: Vec::new(),
        });
        nodes.len() - 1
    });
    if let Node::Span { children, .. } = &mut nodes[at] {
        insert(children, rest, event);
    }
}

fn render(node: &Node, prefix: &str, last: bool, out: &mut String) {
    out.push_str(prefix);
    out.push_str(if last { "└── " } else { "├── " });
    let children = match node {
        Node::Event(label) => {
            out.push_str(label);
            out.push('\n');
            return;
        }
        Node::Span { span, children } => {
            out.push_str(&span.to_string());
            out.push_str(note(span));
            out.push('\n');
            children
        }
    };
    let child_prefix = format!("{prefix}{}", if last { "    " } else { "│   " });
    for (i, child) in children.iter().enumerate() {
        render(child, &child_prefix, i + 1 == children.len(), out);
    }
}

/// How the context got there, where it crossed something.
fn note(span: &SpanRecord) -> &'static str {
    match span.name {
        "outbox.deliver" => "   <- outbox worker: context from the outbox row",
        "resolver" => "   <- resolver: context from the pending order's row",
        "queue.consume" => "   <- another task: context from the message headers",
        "transaction" => "   <- bound in the context: every query below joins it",
        _ if is_payment_server(span) => {
            "   <- another server: context from traceparent / x-request-id"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;
    use crate::logging::EventContext;

    fn span(uid: u64, name: &'static str, fields: &[(&str, &str)]) -> Arc<SpanRecord> {
        Arc::new(SpanRecord {
            uid,
            name,
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn event(spans: &[&Arc<SpanRecord>], message: &str, request_id: &str) -> CapturedEvent {
        CapturedEvent {
            seq: 0,
            level: Level::INFO,
            target: "t".into(),
            message: message.into(),
            fields: vec![],
            spans: spans.iter().map(|s| Arc::clone(s)).collect(),
            context: EventContext {
                request_id: Some(request_id.into()),
                ..EventContext::default()
            },
        }
    }

    #[test]
    fn spans_nest_by_id_and_remote_spans_hang_under_their_call() {
        let request = span(1, "http.request", &[("service", "orders")]);
        let db1 = span(2, "db", &[("statement", "SELECT")]);
        let db2 = span(3, "db", &[("statement", "SELECT")]);
        let client = span(4, "http.client", &[]);
        let stub = span(5, "http.request", &[("service", "payment")]);
        let events = [
            event(&[&request], "started", "r"),
            event(&[&request, &db1], "query ok", "r"),
            event(&[&request, &db2], "query ok", "r"),
            event(&[&request, &client], "calling", "r"),
            event(&[&stub], "authorized", "r"),
            event(&[&request], "someone else", "other"),
            event(&[&request], "finished", "r"),
        ];
        let want = Expected {
            reference: "ord".into(),
            trace_id: "t".into(),
            tenant: "acme".into(),
        };
        let tree = draw(&events, "r", &want);
        let expected = "\
POST /orders  request_id=r  trace_id=t  tenant=acme  reference=ord
└── http.request{service=orders}
    ├── • started
    ├── db{statement=SELECT}
    │   └── • query ok
    ├── db{statement=SELECT}
    │   └── • query ok
    ├── http.client
    │   ├── • calling
    │   └── http.request{service=payment}   <- another server: context from traceparent / x-request-id
    │       └── • authorized
    └── • finished
";
        assert_eq!(tree, expected);
    }
}
