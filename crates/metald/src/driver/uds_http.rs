//! A minimal HTTP/1.1 client over a unix socket, for VMMs whose control API is REST
//! (Firecracker): one-shot requests ([`call`]), and [`Kept`], one VMM's connection kept alive
//! between requests (its handle owns it). The kept connection is what lets metald keep driving a VMM
//! whose socket file was deleted, and it saves a connect per health check. A connection the VMM
//! closed (it exited, or a request on it timed out) is dropped and the next request connects anew.
//!
//! A connection is driven by the task that uses it, not by a task of its own: a request polls
//! the connection beside the response it waits for. At one health check per VM per second that
//! halves the tasks woken per check, and an idle connection costs no task at all.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::{DriverError, bounded};

/// Sends one request with an optional JSON body and returns the status and the JSON body (Null
/// when empty). The whole exchange is bounded by `timeout`.
pub async fn call(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(StatusCode, Value), DriverError> {
    let what = format!("{method} {path}");
    bounded(|| what, timeout, exchange(sock, method, path, body)).await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Connection =
    hyper::client::conn::http1::Connection<TokioIo<tokio::net::UnixStream>, Full<Bytes>>;

/// One HTTP/1.1 connection: the handle requests go through, and the connection itself, which
/// whoever sends a request polls until the answer is in.
struct Conn {
    sender: Sender,
    conn: Connection,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    async fn open(sock: &Path) -> Result<Conn, DriverError> {
        let stream = super::connect_unix(sock)
            .await
            .map_err(|e| DriverError::connect(sock, &e))?;
        // Reads of 1 KiB rather than hyper's adaptive 8 KiB and up: a VMM's answers are small
        // (a state, a config), a bigger one is read in more pieces, and a thousand kept
        // connections hold their buffers all the time.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .read_buf_exact_size(Some(1024))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DriverError::Protocol(format!("HTTP handshake: {e}")))?;
        Ok(Conn { sender, conn })
    }

    /// Whether the VMM closed the connection while it was idle: polled once, a closed
    /// connection's future is done.
    async fn closed(&mut self) -> bool {
        use std::future::Future;
        let conn = &mut self.conn;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut *conn).poll(cx).is_ready())
        })
        .await
    }

    /// Sends one request and waits for its whole answer, driving the connection meanwhile.
    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), DriverError> {
        let answer = send(&mut self.sender, method, path, body);
        tokio::pin!(answer);
        tokio::select! {
            // The answer first: a connection that ends right after the answer is in (a VMM
            // exiting on a request) still gives the answer.
            biased;
            r = &mut answer => r,
            ended = &mut self.conn => match ended {
                Ok(()) => Err(DriverError::Closed),
                Err(e) => Err(DriverError::Protocol(format!("HTTP connection: {e}"))),
            },
        }
    }
}

/// One VMM's kept-alive connection: the idle connection to its socket between requests. A VMM's
/// handle owns one, so that its health checks and commands reuse one connection, and a VMM that
/// is gone takes its connection with it.
#[derive(Debug)]
pub struct Kept {
    sock: std::path::PathBuf,
    idle: std::sync::Mutex<Option<Conn>>,
}

impl Kept {
    /// No connection yet to `sock`; the first request opens one.
    pub fn new(sock: &Path) -> Kept {
        Kept {
            sock: sock.to_path_buf(),
            idle: std::sync::Mutex::new(None),
        }
    }

    /// The socket it connects to.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// Like [`call`], on the kept connection when there is a usable one.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), DriverError> {
        let (status, bytes) = self.call_raw(method, path, body, timeout).await?;
        Ok((status, json(&bytes)?))
    }

    /// Like [`Kept::call`], with the answer's body as it came, for a caller that reads only
    /// part of it (a health check wants one field of it, once a second).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), DriverError> {
        // Named only if it times out: this runs at every health check.
        let what = || format!("{method} {path}");
        // Taken out for the request: a second request meanwhile (the owner is one actor, so
        // rarely) opens a connection of its own.
        let kept = self.slot().take();
        let work = async {
            // A kept connection the VMM closed a moment ago is found closed before anything is
            // sent; a fresh one is then safe to use for the same request.
            let usable = match kept {
                Some(mut c) => (!c.closed().await).then_some(c),
                None => None,
            };
            let mut conn = match usable {
                Some(c) => c,
                None => Conn::open(&self.sock).await?,
            };
            let r = conn.exchange(method.clone(), path, body).await;
            // Kept even if the VMM closes it right after this answer: the next request finds it
            // closed before sending anything.
            if r.is_ok() {
                *self.slot() = Some(conn);
            }
            r
        };
        // A request that times out takes its connection with it: a late answer must not be
        // read as the next request's.
        bounded(what, timeout, work).await
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        // It holds only a connection; a panic elsewhere cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn exchange(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), DriverError> {
    let (status, bytes) = Conn::open(sock).await?.exchange(method, path, body).await?;
    Ok((status, json(&bytes)?))
}

/// A body as JSON (Null when empty).
fn json(bytes: &[u8]) -> Result<Value, DriverError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| DriverError::Protocol(format!("response is not JSON: {e}")))
}

async fn send(
    sender: &mut Sender,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Bytes), DriverError> {
    sender.ready().await.map_err(|_| DriverError::Closed)?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/json");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| DriverError::Protocol(format!("building request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| DriverError::Protocol(format!("HTTP request: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| DriverError::Protocol(format!("HTTP body: {e}")))?
        .to_bytes();
    Ok((status, bytes))
}
