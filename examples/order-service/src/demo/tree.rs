//! One request's path drawn as a tree, from its captured events and their spans.
//!
//! Spans are told apart by their unique id, so a second query of the same kind is its own
//! node. Another server's request span (the payment stub's) hangs under the client call that
//! caused it, and a queue consumer's span under the publish that sent the message: that is
//! where the context crossed a boundary.

use std::sync::Arc;

use super::load::Expected;
use crate::logging::{CapturedEvent, SpanOpened, SpanRecord};

/// A span (with children) or an event (a leaf).
#[derive(Debug)]
enum Node {
    Span {
        span: Arc<SpanRecord>,
        children: Vec<Node>,
    },
    Event(String),
}

/// Draws the events of `request_id`, and the spans opened under the spans they happened in
/// (a query that logged nothing at INFO still shows).
pub(crate) fn draw(
    events: &[CapturedEvent],
    spans: &[SpanOpened],
    request_id: &str,
    want: &Expected,
) -> String {
    // The request's items in order: span openings (path only) and events (path and a leaf).
    let mut items: Vec<(Vec<Arc<SpanRecord>>, Option<String>)> = Vec::new();
    let mut opened = spans
        .iter()
        .filter(|s| s.request_id.as_deref() == Some(request_id))
        .peekable();
    for event in events {
        while let Some(span) = opened.next_if(|s| s.after_events <= event.seq) {
            items.push((span.path.clone(), None));
        }
        if event.context.request_id.as_deref() == Some(request_id) {
            items.push((event.spans.clone(), Some(format!("• {}", event.summary()))));
        }
    }
    items.extend(opened.map(|s| (s.path.clone(), None)));

    let mut roots: Vec<Node> = Vec::new();
    // Where the spans of another process (the payment stub) or task (the queue consumer) hang.
    let mut client_call: Vec<Arc<SpanRecord>> = Vec::new();
    let mut publish: Vec<Arc<SpanRecord>> = Vec::new();
    for (mut path, event) in items {
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
        match event {
            Some(event) => insert(&mut roots, &path, event),
            None => insert_path(&mut roots, &path),
        }
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

/// Adds the spans of `path` that are not there yet, with no event.
fn insert_path(nodes: &mut Vec<Node>, path: &[Arc<SpanRecord>]) {
    let Some((head, rest)) = path.split_first() else {
        return;
    };
    let at = span_node(nodes, head);
    if let Node::Span { children, .. } = &mut nodes[at] {
        insert_path(children, rest);
    }
}

/// The index of `span`'s node among `nodes`, added if missing.
fn span_node(nodes: &mut Vec<Node>, span: &Arc<SpanRecord>) -> usize {
    nodes
        .iter()
        .position(|n| matches!(n, Node::Span { span: s, .. } if s.uid == span.uid))
        .unwrap_or_else(|| {
            nodes.push(Node::Span {
                span: span.clone(),
                children: Vec::new(),
            });
            nodes.len() - 1
        })
}

fn insert(nodes: &mut Vec<Node>, path: &[Arc<SpanRecord>], event: String) {
    let Some((head, rest)) = path.split_first() else {
        nodes.push(Node::Event(event));
        return;
    };
    let at = span_node(nodes, head);
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
        let mut events = [
            event(&[&request], "started", "r"),
            event(&[&request, &db1], "query ok", "r"),
            event(&[&request, &db2], "query ok", "r"),
            event(&[&request, &client], "calling", "r"),
            event(&[&stub], "authorized", "r"),
            event(&[&request], "someone else", "other"),
            event(&[&request], "finished", "r"),
        ];
        for (i, event) in events.iter_mut().enumerate() {
            event.seq = i;
        }
        let want = Expected {
            reference: "ord".into(),
            trace_id: "t".into(),
            tenant: "acme".into(),
        };
        // A span opened under the request with no event of its own still shows.
        let quiet = span(6, "db", &[("statement", "UPDATE")]);
        let spans = [SpanOpened {
            after_events: 6,
            request_id: Some("r".into()),
            path: vec![request.clone(), quiet],
        }];
        let tree = draw(&events, &spans, "r", &want);
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
    ├── db{statement=UPDATE}
    └── • finished
";
        assert_eq!(tree, expected);
    }
}
