"""A peer in another language for the order service: Python's OpenTelemetry SDK.

Run by examples/order-service/tests/interop.rs (not by hand). The protocol, one line each:

1. it starts a payment provider (POST /payments) on 127.0.0.1 and prints ``{"port": N}``;
2. it reads the order service's base URL from stdin;
3. it starts a client span, puts ``traceparent`` and ``baggage`` on ``POST /orders`` with the
   W3C propagators, and sends it; the order service calls its payment provider back here,
   where a server span continues the trace the order service's ``traceparent`` names;
4. it prints one JSON object: the answer's status, the client span, the server span, and what
   the payment request carried (``traceparent``, ``baggage``, the baggage the server read).

Every span is kept in memory (InMemorySpanExporter); nothing leaves the machine. It exits on
its own after 60 s whatever happens.
"""

import json
import signal
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

BAGGAGE = {"interop.peer": "python", "order.channel": "partner-api"}

exporter = InMemorySpanExporter()
provider = TracerProvider(resource=Resource.create({"service.name": "python-peer"}))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("contextflow-interop")
propagate.set_global_textmap(
    CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
)

seen = {}


def span_json(span):
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "parent_is_remote": bool(parent and parent.is_remote),
    }


class Payments(BaseHTTPRequestHandler):
    def do_POST(self):
        length = min(int(self.headers.get("content-length") or 0), 65536)
        body = self.rfile.read(length)
        carrier = {k.lower(): v for k, v in self.headers.items()}
        incoming = propagate.extract(carrier)
        with tracer.start_as_current_span(
            "POST /payments", context=incoming, kind=SpanKind.SERVER
        ):
            seen["traceparent"] = carrier.get("traceparent")
            seen["baggage_header"] = carrier.get("baggage")
            seen["baggage"] = dict(baggage.get_all(incoming))
            seen["request_id"] = carrier.get("x-request-id")
            try:
                reference = json.loads(body).get("reference", "")
            except ValueError:
                reference = ""
            answer = json.dumps({"payment_id": "py_" + reference}).encode()
        # The span has ended before the answer goes out, so it is recorded when the order
        # service gets it.
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def main():
    signal.alarm(60)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Payments)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_address[1]}), flush=True)

    base = sys.stdin.readline().strip()
    ctx = context.get_current()
    for key, value in BAGGAGE.items():
        ctx = baggage.set_baggage(key, value, context=ctx)
    with tracer.start_as_current_span(
        "POST /orders", context=ctx, kind=SpanKind.CLIENT
    ) as span:
        headers = {
            "content-type": "application/json",
            "authorization": "Bearer token-acme",
            "x-request-id": "interop-python-1",
        }
        # The client span over the baggage set above.
        propagate.inject(headers, context=trace.set_span_in_context(span, ctx))
        order = {"reference": "interop-1", "items": [{"sku": "sku-apple", "quantity": 1}]}
        request = urllib.request.Request(
            base + "/orders", data=json.dumps(order).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
        except urllib.error.HTTPError as err:
            status = err.code
    server.shutdown()
    spans = [span_json(s) for s in exporter.get_finished_spans()]
    print(
        json.dumps(
            {
                "status": status,
                "sent": headers,
                "client": next(s for s in spans if s["kind"] == "CLIENT"),
                "server": next((s for s in spans if s["kind"] == "SERVER"), None),
                "seen": seen,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
