//! gRPC: a tonic server and client through the tower layers, on both runtimes. Metadata in
//! (the server's context), metadata out (the client's context), one trace.

#[allow(dead_code)] // `main` is the example's entry point, unused here.
#[path = "../examples/grpc.rs"]
mod example;

use contextflow_otel::carrier::Pairs;

async fn metadata_in_and_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(example::serve(listener));
    let mut client = example::client(addr).await.unwrap();
    for i in 0..20 {
        let request_id = format!("grpc-{i}");
        let trace_id = format!("{:032x}", 0xabc0 + i);
        let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
        let cx = contextflow_otel::extract(&Pairs::new([
            ("traceparent", traceparent.as_str()),
            ("x-request-id", request_id.as_str()),
        ]));
        let reply = contextflow_otel::scope(cx, example::say(&mut client, "hi"))
            .await
            .unwrap();
        assert_eq!(
            reply,
            format!("hi request_id={request_id} trace_id={trace_id} span_id=00f067aa0ba902b7"),
            "no SDK: the caller's span passes through the client and the server"
        );
    }
    // Outside any request: the server makes a request id and has no trace.
    let reply = example::say(&mut client, "bare").await.unwrap();
    assert!(reply.ends_with("trace_id= span_id="), "{reply}");
    assert!(!reply.contains("request_id= "), "{reply}");
}

#[tokio::test(flavor = "current_thread")]
async fn metadata_in_and_out_current_thread() {
    metadata_in_and_out().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_in_and_out_multi_thread() {
    metadata_in_and_out().await;
}
