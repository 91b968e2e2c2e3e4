//! gRPC through contextflow's tower layers: a `tonic` server behind [`PropagateContextLayer`]
//! and a `tonic` client behind [`InjectContextLayer`]. The request id and the trace context
//! travel as gRPC metadata (HTTP/2 headers): metadata in, context in the handler, metadata out.
//! No code generation: the message is a hand-written `prost` message and the service a plain
//! tower service around `tonic::server::Grpc`.
//!
//! Run with: `cargo run -p contextflow-http --example grpc`

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin};

use contextflow_http::{InjectContext, InjectContextLayer, PropagateContextLayer};
use http::uri::PathAndQuery;
use tonic::{body::Body, client::Grpc, transport::Channel};
use tonic_prost::ProstCodec;
use tower::ServiceBuilder;

/// The one message of the example: text in, text out.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Echo {
    /// The text.
    #[prost(string, tag = "1")]
    pub(crate) text: String,
}

/// The service's full method path.
pub(crate) const SAY: &str = "/demo.Echo/Say";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `demo.Echo`: answers `Say` with what the handler sees in its context.
#[derive(Clone, Debug, Default)]
pub(crate) struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "demo.Echo";
}

impl tower::Service<http::Request<Body>> for EchoService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path() != SAY {
                return Ok(tonic::Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
            Ok(grpc.unary(Say, req).await)
        })
    }
}

/// The `Say` handler: no request object needed to know the request id and the trace.
struct Say;

impl tonic::server::UnaryService<Echo> for Say {
    type Response = Echo;
    type Future = BoxFuture<Result<tonic::Response<Echo>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Echo>) -> Self::Future {
        Box::pin(async move {
            let text = format!(
                "{} request_id={} trace_id={} span_id={}",
                request.into_inner().text,
                contextflow_http::current_request_id()
                    .map_or_else(String::new, |id| id.to_string()),
                contextflow_http::current_trace_id().map_or_else(String::new, |id| id.to_string()),
                contextflow_http::current_span_id().map_or_else(String::new, |id| id.to_string()),
            );
            Ok(tonic::Response::new(Echo { text }))
        })
    }
}

/// Serves `demo.Echo` behind the server layer on `listener`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .layer(PropagateContextLayer::new())
        .add_service(EchoService)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}

/// A gRPC client whose channel carries the current context in the metadata.
pub(crate) async fn client(
    addr: SocketAddr,
) -> Result<Grpc<InjectContext<Channel>>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Grpc::new(
        ServiceBuilder::new()
            .layer(InjectContextLayer::new())
            .service(channel),
    ))
}

/// Calls `Say` with `text`.
pub(crate) async fn say(
    client: &mut Grpc<InjectContext<Channel>>,
    text: &str,
) -> Result<String, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply: tonic::Response<Echo> = client
        .unary(
            tonic::Request::new(Echo { text: text.into() }),
            PathAndQuery::from_static(SAY),
            ProstCodec::default(),
        )
        .await?;
    Ok(reply.into_inner().text)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener));
    let mut client = client(addr).await?;
    // A request of ours, continuing a caller's trace: the server sees both.
    let cx = contextflow_otel::extract(&contextflow_otel::carrier::Pairs::new([
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "grpc-demo-1"),
    ]));
    let reply = contextflow_otel::scope(cx, say(&mut client, "hello")).await?;
    println!("{reply}");
    Ok(())
}
