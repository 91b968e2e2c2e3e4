//! The server layer adds the request's bindings over the frame of whoever polls it: a binding
//! that an outer tower layer makes around this layer's future stays visible in the handler and
//! in the response body (issue 8, "an outer binding is hidden by the HTTP server layer").

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use contextflow::AsyncLocal;
use contextflow_http::{PropagateContextLayer, REQUEST_ID};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

static OUTER: AsyncLocal<&'static str> = AsyncLocal::named("outer");

/// The usual tower shape: call the inner service, then bind a variable around its future.
#[derive(Clone)]
struct Outer<S>(S);

impl<S, B> Service<Request<B>> for Outer<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(OUTER.scope("outer-layer", fut))
    }
}

struct OuterLayer;

impl<S> Layer<S> for OuterLayer {
    type Service = Outer<S>;

    fn layer(&self, inner: S) -> Outer<S> {
        Outer(inner)
    }
}

/// What the handler and the body saw: the outer binding and the request id.
type Seen = (Option<&'static str>, Option<String>);

fn seen() -> Seen {
    (OUTER.get(), REQUEST_ID.get().map(|id| id.to_string()))
}

/// A body whose every frame reports what it sees.
struct Reporting(Option<()>);

impl http_body::Body for Reporting {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|()| {
            let (outer, id) = seen();
            let text = format!("{}|{}", outer.unwrap_or("-"), id.unwrap_or_default());
            Ok(http_body::Frame::data(text.into()))
        }))
    }
}

async fn outer_binding_is_visible() {
    let svc = ServiceBuilder::new()
        .layer(OuterLayer)
        .layer(PropagateContextLayer::new())
        .service(service_fn(|_req: Request<()>| async {
            tokio::task::yield_now().await;
            let (outer, id) = seen();
            assert_eq!(
                outer,
                Some("outer-layer"),
                "the handler sees the outer binding"
            );
            assert_eq!(id.as_deref(), Some("req-layered"), "and the request's own");
            Ok::<_, Infallible>(Response::new(Reporting(Some(()))))
        }));
    let req = Request::builder()
        .header("x-request-id", "req-layered")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    // The body is polled after the outer layer's future has finished, as a server does.
    assert_eq!(OUTER.get(), None);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"outer-layer|req-layered", "the body sees both");
}

#[tokio::test(flavor = "current_thread")]
async fn outer_binding_is_visible_current_thread() {
    outer_binding_is_visible().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_binding_is_visible_multi_thread() {
    // In a spawned task, so the response future may move between workers.
    tokio::spawn(outer_binding_is_visible()).await.unwrap();
}
