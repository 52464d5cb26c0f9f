//! The callback relay (docs/contract.md §5): `POST /callbacks/{token}` from AgentAssist becomes a
//! `transfer.callback` event on the results exchange. The token authenticates the caller and
//! says which command the callback is about; the body is relayed as received.
//!
//! The listener is public, so what a caller can hold is bounded before it has shown a token:
//! the token is checked as soon as the request's headers are in and before any byte of the body
//! is read, a refused caller's connection is closed, the relay serves at most
//! [`MAX_CONNECTIONS`] connections at once, and headers and bodies that do not arrive in time
//! ([`HEADER_READ_TIMEOUT`], [`BODY_READ_TIMEOUT`]) cost the caller its connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::broker::CurrentLink;
use crate::callbacks::token::TokenSigner;
use crate::contract::event::{Event, Subject, callback_event_id};
use crate::json;
use crate::ops::metrics::{Metrics, RelayResult};

/// Largest callback body accepted.
pub const MAX_CALLBACK_BYTES: usize = 256 * 1024;

/// A caller that has not sent its whole request by then gets 408 and loses its connection, so
/// slow clients cannot pile up on a public listener. Longer than any publish confirm wait.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections the relay serves at once; further ones wait in the listen backlog (and past it
/// the kernel refuses them) until one closes. AgentAssist sends one short callback per event and
/// a callback is done in the time of a publish confirm (milliseconds), so even a busy fleet
/// needs a handful; 128 leaves room for bursts and for senders that keep idle connections,
/// while bounding what the relay holds for callers it does not know: 128 sockets, and at most
/// 128 × [`MAX_CALLBACK_BYTES`] = 32 MiB of bodies (a body is read only after its token
/// verified).
pub const MAX_CONNECTIONS: usize = 128;

/// Time a connection gets to send a request's headers, counted from when the relay starts
/// waiting for them: from the connection's opening, and after each answer on a kept-alive
/// one. Headers are a few hundred bytes, one packet; 10 s outlasts several lost packets. A
/// silent connection, or one trickling its headers (slow loris), is closed then, so it holds
/// a place for 10 s at most.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time an authenticated caller gets to send its body once its token verified: 256 KiB in
/// 10 s is 26 KB/s, far slower than any server-to-server link. Past it: 408, and the
/// connection is closed.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay needs.
#[derive(Debug, Clone)]
pub struct Relay {
    /// Verifies tokens.
    pub signer: TokenSigner,
    /// Publishes.
    pub link: Arc<CurrentLink>,
    /// Counts.
    pub metrics: Arc<Metrics>,
}

/// The relay's routes.
pub fn router(relay: Relay) -> Router {
    Router::new()
        .route("/callbacks/{token}", post(receive))
        // A bug while handling one callback answers 500 (the sender retries) and costs nothing
        // else.
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(Arc::new(relay))
}

/// Serves `router` (the relay's) on `listener`: HTTP/1.1, at most [`MAX_CONNECTIONS`]
/// connections at once, each closed when its headers take longer than [`HEADER_READ_TIMEOUT`].
/// Once `stop` is cancelled it takes no new connection, lets open requests finish within
/// `drain`, then closes what is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    drain: Duration,
) {
    let listener = BoundedListener {
        tcp: listener,
        places: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let handle = axum_server::Handle::new();
    let mut server = axum_server::Server::<Peer>::from_listener(listener)
        .handle(handle.clone())
        // Callbacks are HTTP/1.1. Without protocol detection a connection is in HTTP/1's
        // hands from its first byte, so the header timeout covers a silent one too.
        .http1_only();
    server
        .http_builder()
        .http1()
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let stopping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            handle.graceful_shutdown(Some(drain));
            // Should this task's server be dropped before its grace has run out, what is still
            // open is closed all the same.
            tokio::time::sleep(drain).await;
            handle.shutdown();
        })
    };
    if let Err(e) = server.serve(router.into_make_service()).await {
        tracing::error!(error = %e, "callback relay failed");
    }
    if !stop.is_cancelled() {
        stopping.abort();
    }
}

/// The address of a peer of the relay, as `axum_server` names listeners by their address type.
#[derive(Debug, Clone)]
struct Peer(SocketAddr);

impl axum_server::Address for Peer {
    type Stream = Admitted;
    type Listener = BoundedListener;
}

/// A TCP listener that accepts a connection only when one of [`MAX_CONNECTIONS`] places is
/// free; the connection holds its place until it is closed.
struct BoundedListener {
    tcp: TcpListener,
    places: Arc<Semaphore>,
}

impl axum_server::AddrListener<Admitted, Peer> for BoundedListener {
    async fn bind_to(addr: Peer) -> io::Result<Self> {
        Ok(Self {
            tcp: TcpListener::bind(addr.0).await?,
            places: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    async fn accept_stream(&self) -> io::Result<(Admitted, Peer)> {
        // Waits before accepting, so what waits is the kernel's, not the relay's.
        let place = (self.places.clone().acquire_owned().await)
            .map_err(|_| io::Error::other("the relay's places are closed"))?;
        let (stream, peer) = self.tcp.accept().await?;
        Ok((
            Admitted {
                stream,
                _place: place,
            },
            Peer(peer),
        ))
    }

    fn get_local_addr(&self) -> io::Result<Peer> {
        self.tcp.local_addr().map(Peer)
    }
}

/// An accepted connection, holding its place until dropped.
struct Admitted {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// An answer after which the connection is closed: the request's body, if any, is left
/// unread, so the connection cannot carry another request.
fn closing(status: StatusCode, text: &'static str) -> Response {
    let mut response = (status, text).into_response();
    (response.headers_mut()).insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why a body was not read.
enum Unread {
    /// Over [`MAX_CALLBACK_BYTES`], announced or sent.
    TooLarge,
    /// Not all in within [`BODY_READ_TIMEOUT`].
    TooSlow,
    /// The connection failed or the framing was wrong.
    Broken,
}

/// Reads `body` (of a request whose token verified) up to [`MAX_CALLBACK_BYTES`] and within
/// [`BODY_READ_TIMEOUT`]. A body announced larger is refused without reading any of it.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Unread> {
    let announced = (headers.get(header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_CALLBACK_BYTES as u64) {
        return Err(Unread::TooLarge);
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut got = Vec::with_capacity(announced.unwrap_or(0) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| Unread::Broken)?;
            if got.len() + chunk.len() > MAX_CALLBACK_BYTES {
                return Err(Unread::TooLarge);
            }
            got.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(got))
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(Unread::TooSlow))
}

async fn receive(
    State(relay): State<Arc<Relay>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received_at = SystemTime::now();
    // The token is checked before any byte of the body is read: an unauthenticated caller
    // learns nothing, not even the size limit, and holds nothing: not even "100 Continue" is
    // sent, and its connection is closed with the body unread.
    let ids = match relay.signer.verify(&token) {
        Ok(ids) => ids,
        Err(e) => {
            // Debug only: it tells an operator why (say, a previous secret dropped too early),
            // while every caller gets the same answer.
            tracing::debug!(reason = %e, "callback token refused");
            relay.metrics.callback(RelayResult::Forbidden);
            return closing(StatusCode::NOT_FOUND, "not found\n");
        }
    };
    let body = match read_body(&headers, body).await {
        Ok(body) => body,
        Err(Unread::TooLarge) => {
            relay.metrics.callback(RelayResult::TooLarge);
            return closing(
                StatusCode::PAYLOAD_TOO_LARGE,
                "callback body over 256 KiB\n",
            );
        }
        Err(Unread::TooSlow) => {
            return closing(
                StatusCode::REQUEST_TIMEOUT,
                "callback body not received in time\n",
            );
        }
        Err(Unread::Broken) => return closing(StatusCode::BAD_REQUEST, "cannot read the body\n"),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let payload = json::value_or_string(&body);
    let subject = Subject {
        command_id: &ids.command_id,
        stream_id: Some(&ids.stream_id),
        bot_session_id: Some(&ids.bot_session_id),
        target: Some(&ids.target),
    };
    let id = callback_event_id(&token, &body);
    let event = Event::callback(subject, id, received_at, content_type, &payload);
    let Some(publisher) = relay.link.publisher() else {
        relay.metrics.callback(RelayResult::Unavailable);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable; retry\n",
        )
            .into_response();
    };
    match publisher.publish(&event, None, None).await {
        Ok(()) => {
            relay.metrics.callback(RelayResult::Published);
            relay.metrics.published(event.kind);
            tracing::info!(command_id = %ids.command_id, event_id = %event.id, "callback relayed");
            (StatusCode::OK, "ok\n").into_response()
        }
        Err(e) => {
            relay.metrics.callback(RelayResult::Unavailable);
            tracing::warn!(command_id = %ids.command_id, error = %e, "callback not relayed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker unavailable; retry\n",
            )
                .into_response()
        }
    }
}
