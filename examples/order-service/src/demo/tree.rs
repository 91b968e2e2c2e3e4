//! One request's path drawn as a tree, from its captured events and their spans.
//!
//! Spans are told apart by their unique id, so a second query of the same kind is its own
//! node. Another server's request span (the payment stub's) hangs under the client call that
//! caused it, and a queue consumer's span under the publish that sent the message: that is
//! where the context crossed a boundary. Where the work moves to another tokio task (the
//! request's connection task, the outbox worker that delivers the confirmation, the queue
//! consumer, the payment stub's connection), a `task <id>` node shows it, with the task's
//! execution id (`contextflow::tree::execution_id`) taken when the span opened.

use std::{collections::HashMap, sync::Arc};

use tokio::task::Id;

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
    // The task each span opened in.
    let tasks: HashMap<u64, Id> = spans
        .iter()
        .filter_map(|s| Some((s.path.last()?.uid, s.task?)))
        .collect();

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
        render(node, "", i + 1 == count, &tasks, None, &mut out);
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

/// Draws `node` below `prefix`; a span that opened in another task than `parent_task` gets a
/// `task <id>` node above it.
fn render(
    node: &Node,
    prefix: &str,
    last: bool,
    tasks: &HashMap<u64, Id>,
    parent_task: Option<Id>,
    out: &mut String,
) {
    let branch = if last { "└── " } else { "├── " };
    let deeper =
        |prefix: &str, last: bool| format!("{prefix}{}", if last { "    " } else { "│   " });
    let (span, children) = match node {
        Node::Event(label) => {
            out.push_str(&format!("{prefix}{branch}{label}\n"));
            return;
        }
        Node::Span { span, children } => (span, children),
    };
    let task = tasks.get(&span.uid).copied();
    let (prefix, last) = match task {
        Some(id) if task != parent_task => {
            out.push_str(&format!("{prefix}{branch}task {id}\n"));
            (deeper(prefix, last), true)
        }
        _ => (prefix.to_string(), last),
    };
    let branch = if last { "└── " } else { "├── " };
    out.push_str(&format!("{prefix}{branch}{span}{}\n", note(span)));
    let child_prefix = deeper(&prefix, last);
    let task = task.or(parent_task);
    for (i, child) in children.iter().enumerate() {
        render(
            child,
            &child_prefix,
            i + 1 == children.len(),
            tasks,
            task,
            out,
        );
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
            order_id: None,
        };
        // A span opened under the request with no event of its own still shows.
        let quiet = span(6, "db", &[("statement", "UPDATE")]);
        let spans = [SpanOpened {
            after_events: 6,
            request_id: Some("r".into()),
            path: vec![request.clone(), quiet],
            task: None,
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

    /// Spans opened in another task get a `task <id>` node with that task's execution id: the
    /// request's task, the outbox worker's, the queue consumer's.
    #[tokio::test(flavor = "current_thread")]
    async fn work_in_other_tasks_shows_as_task_nodes() {
        let request = span(1, "http.request", &[("service", "orders")]);
        let publish = span(2, "queue.publish", &[]);
        let deliver = span(3, "outbox.deliver", &[]);
        let consume = span(4, "queue.consume", &[]);
        let mut ids: Vec<Id> = Vec::new();
        for _ in 0..3 {
            ids.push(tokio::spawn(async { tokio::task::id() }).await.unwrap());
        }
        let (req_task, worker, consumer) = (ids[0], ids[1], ids[2]);
        let mut events = [
            event(&[&request], "order placed", "r"),
            event(&[&deliver], "confirmation sent", "r"),
            event(&[&deliver, &publish], "published", "r"),
            event(&[&consume], "audit", "r"),
        ];
        for (i, event) in events.iter_mut().enumerate() {
            event.seq = i;
        }
        let opened = |after_events, path: Vec<Arc<SpanRecord>>, task| SpanOpened {
            after_events,
            request_id: Some("r".into()),
            path,
            task: Some(task),
        };
        let spans = [
            opened(0, vec![request.clone()], req_task),
            opened(1, vec![deliver.clone()], worker),
            opened(2, vec![deliver.clone(), publish.clone()], worker),
            opened(3, vec![consume.clone()], consumer),
        ];
        let want = Expected {
            reference: "ord".into(),
            trace_id: "t".into(),
            tenant: "acme".into(),
            order_id: None,
        };
        let tree = draw(&events, &spans, "r", &want);
        let expected = format!(
            "\
POST /orders  request_id=r  trace_id=t  tenant=acme  reference=ord
├── task {req_task}
│   └── http.request{{service=orders}}
│       └── • order placed
└── task {worker}
    └── outbox.deliver   <- outbox worker: context from the outbox row
        ├── • confirmation sent
        └── queue.publish
            ├── • published
            └── task {consumer}
                └── queue.consume   <- another task: context from the message headers
                    └── • audit
"
        );
        assert_eq!(tree, expected);
    }
}
