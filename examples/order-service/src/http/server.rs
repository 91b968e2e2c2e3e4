//! The HTTP server loop: hyper's HTTP/1 connections with bounded heads, timeouts that answer
//! with a JSON error and a log line, and a shutdown that cannot miss its signal.
//!
//! Limits (see [`Limits`]):
//!
//! - **request head**: at most [`Limits::head_timeout`] to receive it. When it expires with
//!   part of a request received, the client gets `408` with a JSON error and the service logs
//!   a line; an idle keep-alive connection is closed quietly. At most [`HARD_MAX_HEADERS`]
//!   header fields and 64 KiB: beyond those hyper answers `400`/`431` itself, with no body
//!   (the HTTP stack does not let an application write that answer), and the service logs a
//!   line naming the peer and the reason. Below that, [`super::limits`] answers more than
//!   [`Limits::max_headers`] fields with a JSON `431`.
//! - **body** and **whole request**: enforced per request by [`super::limits`].
//! - **answers**: a client that stops reading them (pipelining requests without reading the
//!   answers, or a stalled reader) is disconnected once the socket has taken no byte for
//!   [`Limits::write_timeout`], so it cannot hold one of the [`Limits::max_connections`]
//!   slots forever.
//!
//! Shutdown: [`Shutdown::begin`] stores the signal in a `watch` channel, so a server that
//! checks it later still sees it. The accept loop stops at once; open connections finish the
//! request in flight and close. A request whose head is still arriving has
//! [`SHUTDOWN_HEAD_GRACE`] (at most the head timeout) to arrive whole; after that it gets `503`
//! with a JSON error and the connection closes, so that no request starts long after the
//! signal (the rest of the shutdown waits for the requests in flight).

use std::{
    error::Error as _,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, info, warn};

/// The most header fields hyper parses; requests with more get hyper's bare `431`.
pub const HARD_MAX_HEADERS: usize = 256;
/// The most bytes of a request head hyper buffers; more gets hyper's bare `431`.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a request head still arriving when the shutdown begins may take to arrive whole
/// (at most [`Limits::head_timeout`]).
pub const SHUTDOWN_HEAD_GRACE: Duration = Duration::from_secs(1);

/// How long the accept loop waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on what a client may send, and how slowly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time to receive a request's head (request line and headers).
    pub head_timeout: Duration,
    /// Time to receive a request's body.
    pub body_timeout: Duration,
    /// Time for the whole request, from its head to its answer.
    pub request_timeout: Duration,
    /// The largest body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The most header fields accepted (up to [`HARD_MAX_HEADERS`]).
    pub max_headers: usize,
    /// The most connections open at once; more wait in the listener's backlog until one
    /// closes (each may hold a head and a body buffer, so memory stays bounded).
    pub max_connections: usize,
    /// How long an answer may wait on a socket that takes no byte (a client that does not
    /// read) before the connection is closed.
    pub write_timeout: Duration,
}

impl Default for Limits {
    /// 10 s for the head, 10 s for the body, 30 s for the request, 64 KiB of body, 100
    /// headers, 1,024 connections, 30 s for a socket to take an answer's bytes.
    fn default() -> Self {
        Limits {
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 1024,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The shutdown signal shared by the servers; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            sender: Arc::new(watch::channel(false).0),
        }
    }
}

impl Shutdown {
    /// A signal not yet given.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Gives the signal; every server, even one that looks later, sees it.
    pub fn begin(&self) {
        self.sender.send_replace(true);
    }

    /// Waits until the signal is given (at once if it was).
    pub async fn wait(&self) {
        let mut receiver = self.sender.subscribe();
        // The sender lives in `self`, so `wait_for` only fails if it was dropped: never here.
        let _ = receiver.wait_for(|stopped| *stopped).await;
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open connections finish their
/// request. The task ends when every connection is closed.
pub fn serve(
    name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    // The server belongs to no request: it starts from an empty context.
    contextflow::spawn_without_context(async move {
        let mut connections = JoinSet::new();
        loop {
            let room = connections.len() < limits.max_connections;
            tokio::select! {
                () = shutdown.wait() => break,
                // At the limit, new connections wait in the backlog until one closes.
                accepted = listener.accept(), if room => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(connection(
                            stream,
                            peer,
                            router.clone(),
                            limits,
                            shutdown.clone(),
                        ));
                    }
                    // Out of file descriptors and the like: the next accept may succeed, once a
                    // connection has closed. Retrying at once would spin (the waiting connection
                    // stays in the backlog) and flood the log.
                    Err(err) => {
                        warn!(server = name, error = %err, "accept failed; retrying in 100 ms");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        info!(
            server = name,
            open_connections = connections.len(),
            "shutdown: stopped accepting connections"
        );
        while connections.join_next().await.is_some() {}
        info!(server = name, "shutdown: every connection closed");
    })
}

/// One connection, until it closes or the shutdown lets its last request finish.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    limits: Limits,
    shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    let stream = SharedStream::new(stream, limits.write_timeout);
    let raw = stream.clone();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_headers(HARD_MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES);
    let service = Dispatch {
        inner: TowerToHyperService::new(router),
        in_flight: raw.in_flight.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            // hyper closes an idle connection at once, but reads a head that has started
            // until the head timeout: give it a short grace instead.
            let grace = tokio::time::sleep(SHUTDOWN_HEAD_GRACE.min(limits.head_timeout));
            tokio::select! {
                result = conn.as_mut() => {
                    // hyper takes a kept-alive connection for idle until a whole head has
                    // come, and closes it at once: a head that had started gets its answer.
                    if result.is_ok() && raw.head_started() && !raw.in_flight() {
                        warn!(%peer, "shutdown: request head still arriving on a kept-alive \
                            connection: answered 503");
                        raw.try_write_all(&shutting_down_answer());
                        return;
                    }
                    result
                }
                () = grace => {
                    if raw.head_started() && !raw.in_flight() {
                        warn!(%peer, grace_ms = SHUTDOWN_HEAD_GRACE.as_millis() as u64,
                            "shutdown: request head not received within the grace: answered 503");
                        raw.try_write_all(&shutting_down_answer());
                        return;
                    }
                    conn.await
                }
            }
        }
    };
    let Err(err) = result else { return };
    if err.is_timeout() {
        if raw.head_started() {
            warn!(%peer, timeout_ms = limits.head_timeout.as_millis() as u64,
                "request head not received in time: answered 408");
            raw.try_write_all(&timeout_answer());
        } else {
            debug!(%peer, "idle connection closed");
        }
    } else if io_error_kind(&err) == Some(io::ErrorKind::TimedOut) {
        warn!(%peer, timeout_ms = limits.write_timeout.as_millis() as u64,
            "client took no answer bytes in time: connection closed");
    } else if err.is_parse_too_large() {
        warn!(%peer, error = %err, "request head too large (header count or size): hyper answered 431");
    } else if err.is_parse() {
        warn!(%peer, error = %err, "malformed request head: hyper answered 400");
    } else if err.is_incomplete_message() {
        debug!(%peer, error = %err, "client closed the connection mid-request");
    } else {
        debug!(%peer, error = %err, "connection error");
    }
}

/// The kind of the I/O error under a connection's error, if it is one.
fn io_error_kind(err: &hyper::Error) -> Option<io::ErrorKind> {
    let mut source = err.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = err.source();
    }
    None
}

/// The answer to a request head still arriving when the shutdown's grace ran out.
fn shutting_down_answer() -> Vec<u8> {
    let body = r#"{"error":"the server is shutting down","request_id":null}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// hyper's service, counting the requests in flight: from the request's hand-over until its
/// answer's body is done (or dropped).
struct Dispatch<S> {
    inner: S,
    in_flight: Arc<AtomicUsize>,
}

/// One request in flight, until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`InFlight`].
struct InFlightBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<S, R, B> hyper::service::Service<R> for Dispatch<S>
where
    S: hyper::service::Service<R, Response = hyper::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<InFlightBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight(self.in_flight.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await?;
            Ok(res.map(|inner| InFlightBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request head that did not arrive in time.
fn timeout_answer() -> Vec<u8> {
    let body = r#"{"error":"request head not received in time","request_id":null}"#;
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ===== SharedStream =====

/// A TCP stream hyper reads and writes while the connection task keeps a handle, to answer a
/// head timeout itself. It knows whether part of a request head arrived since the last answer,
/// and how many requests are in the service; a write that waits on a full socket
/// for longer than its timeout fails with `TimedOut`.
#[derive(Debug)]
struct SharedStream {
    stream: Arc<TcpStream>,
    head_started: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    write_timeout: Duration,
    /// Armed while a write waits for the socket to take bytes.
    write_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Clone for SharedStream {
    fn clone(&self) -> Self {
        SharedStream {
            stream: self.stream.clone(),
            head_started: self.head_started.clone(),
            in_flight: self.in_flight.clone(),
            write_timeout: self.write_timeout,
            write_deadline: None,
        }
    }
}

impl SharedStream {
    fn new(stream: TcpStream, write_timeout: Duration) -> Self {
        SharedStream {
            stream: Arc::new(stream),
            head_started: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            write_timeout,
            write_deadline: None,
        }
    }

    /// Whether bytes of a request arrived after the last answer was written.
    fn head_started(&self) -> bool {
        self.head_started.load(Ordering::Relaxed)
    }

    /// Whether a request was handed to the service and its answer is not done: an interim
    /// `100 Continue` or a pipelined request's bytes do not make a head that has started.
    fn in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Writes `bytes` without waiting; gives up on a full socket (the client is not reading).
    fn try_write_all(&self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.stream.try_write(bytes) {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes = &bytes[n..],
            }
        }
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    if n > 0 {
                        self.head_started.store(true, Ordering::Relaxed);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.stream.poll_write_ready(cx)?.is_pending() {
                // The socket is full: the client is not reading. Wait at most the timeout.
                let timeout = this.write_timeout;
                let deadline = this
                    .write_deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(deadline.as_mut().poll(cx));
                this.write_deadline = None;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no answer bytes in time",
                )));
            }
            match this.stream.try_write(buf) {
                Ok(n) => {
                    this.write_deadline = None;
                    // An answer is going out: the request it answers was received whole.
                    this.head_started.store(false, Ordering::Relaxed);
                    return Poll::Ready(Ok(n));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the last handle drops, right after hyper is done with it.
        Poll::Ready(Ok(()))
    }
}
