//! A small HTTP/1.1 client over a unix socket, for VMMs whose control API is REST
//! (Firecracker): one-shot requests ([`call`]), and [`Kept`], one VMM's connection kept alive
//! between requests (its handle owns it). The kept connection is what lets metald keep driving a
//! VMM whose socket file was deleted, and it saves a connect per health check. A connection the
//! VMM closed (it exited, or a request on it timed out) is dropped and the next request connects
//! anew.
//!
//! Why not hyper's client: a health check is one small request and one small answer, once a
//! second for every VM, and with 1,000 VMs the client's own work was a third of metald's idle
//! CPU. An exchange here is one write and (nearly always) one read into a buffer the connection
//! keeps, parsed in place by `httparse` (hyper's own parser); it has no dispatch channel between
//! a request handle and a connection task, no header map, no body stream. It speaks what a VMM's
//! API server answers: a status line, headers, and a body delimited by `Content-Length`, by
//! chunked encoding, or by the end of the connection. It does not pipeline: a connection carries
//! one request at a time, and one that timed out is dropped, so a late answer is never read as
//! the next request's.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
pub use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let what = || format!("{method} {path}");
    let work = async {
        let mut conn = Conn::open(sock).await?;
        let (status, bytes) = conn.exchange(&method, path, body).await?;
        Ok((status, json(&bytes)?))
    };
    bounded(what, timeout, work).await
}

/// The most an answer's head may take: a VMM's is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// The most an answer's body may take (Firecracker's largest, the VM config, is a few KiB).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Headers parsed per answer.
const MAX_HEADERS: usize = 32;
/// What a read asks for at least: a VMM's answers are small, and a thousand kept connections
/// keep their buffers.
const READ_CHUNK: usize = 1024;

/// One HTTP/1.1 connection, with the buffer its answers are read into.
#[derive(Debug)]
struct Conn {
    stream: tokio::net::UnixStream,
    /// Bytes read and not yet used (kept between requests only when empty).
    buf: Vec<u8>,
    /// The server said it closes the connection after this answer (or delimited the body by
    /// closing it): not to be kept.
    closing: bool,
}

/// How an answer's body ends.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

impl Conn {
    async fn open(sock: &Path) -> Result<Conn, DriverError> {
        let stream = super::connect_unix(sock)
            .await
            .map_err(|e| DriverError::connect(sock, &e))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            closing: false,
        })
    }

    /// Whether the VMM closed the connection while it was idle (or sent something unasked,
    /// which puts it out of step): one non-blocking read, no wait.
    fn closed(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Ok(_) | Err(_) => true,
        }
    }

    /// Sends one request and reads its whole answer.
    async fn exchange(
        &mut self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), DriverError> {
        let req = request(method, path, body)?;
        self.stream
            .write_all(&req)
            .await
            .map_err(|e| io_error("sending the request", &e))?;
        self.buf.clear();
        let (status, framing, head_len) = self.read_head().await?;
        let body = match framing {
            Framing::Length(n) => self.read_exact_body(head_len, n).await?,
            Framing::Chunked => self.read_chunked(head_len).await?,
            Framing::UntilClose => {
                self.closing = true;
                self.read_to_close(head_len).await?
            }
        };
        self.buf.clear();
        Ok((status, body))
    }

    /// Reads more into the buffer; an end of stream is an error (`what` was still expected).
    async fn fill(&mut self, what: &str) -> Result<(), DriverError> {
        self.buf.reserve(READ_CHUNK);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| io_error(what, &e))?;
        if n == 0 {
            return Err(DriverError::Closed);
        }
        Ok(())
    }

    /// Reads until the head is whole; returns the status, how the body is framed, and where the
    /// body starts in the buffer. Interim (1xx) answers are skipped.
    async fn read_head(&mut self) -> Result<(StatusCode, Framing, usize), DriverError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    let status = StatusCode::from_u16(code).map_err(|_| {
                        DriverError::Protocol(format!("HTTP answer with status {code}"))
                    })?;
                    if status.is_informational() {
                        self.buf.drain(..len);
                        continue;
                    }
                    let framing = framing(status, resp.headers, &mut self.closing)?;
                    return Ok((status, framing, len));
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() >= MAX_HEAD {
                        return Err(DriverError::Protocol(format!(
                            "HTTP answer head over {MAX_HEAD} bytes"
                        )));
                    }
                    self.fill("reading the answer").await?;
                }
                Err(e) => return Err(DriverError::Protocol(format!("HTTP answer: {e}"))),
            }
        }
    }

    async fn read_exact_body(&mut self, start: usize, n: usize) -> Result<Bytes, DriverError> {
        if n > MAX_BODY {
            return Err(DriverError::Protocol(format!(
                "HTTP answer body of {n} bytes (at most {MAX_BODY})"
            )));
        }
        while self.buf.len() < start + n {
            self.fill("reading the answer body").await?;
        }
        if self.buf.len() > start + n {
            // More than the answer: the VMM is out of step with this connection.
            self.closing = true;
        }
        Ok(Bytes::copy_from_slice(
            self.buf.get(start..start + n).unwrap_or_default(),
        ))
    }

    async fn read_to_close(&mut self, start: usize) -> Result<Bytes, DriverError> {
        loop {
            if self.buf.len() - start > MAX_BODY {
                return Err(DriverError::Protocol(format!(
                    "HTTP answer body over {MAX_BODY} bytes"
                )));
            }
            match self.fill("reading the answer body").await {
                Ok(()) => {}
                Err(DriverError::Closed) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::copy_from_slice(
            self.buf.get(start..).unwrap_or_default(),
        ))
    }

    async fn read_chunked(&mut self, start: usize) -> Result<Bytes, DriverError> {
        let mut body = Vec::new();
        let mut at = start;
        loop {
            let rest = self.buf.get(at..).unwrap_or_default();
            match httparse::parse_chunk_size(rest) {
                Ok(httparse::Status::Complete((len, size))) => {
                    let size = usize::try_from(size).unwrap_or(usize::MAX);
                    if size > MAX_BODY.saturating_sub(body.len()) {
                        return Err(DriverError::Protocol(format!(
                            "HTTP answer body over {MAX_BODY} bytes"
                        )));
                    }
                    at += len;
                    if size == 0 {
                        // The last chunk; then trailers (none expected) and an empty line.
                        while !self.buf.get(at..).unwrap_or_default().starts_with(b"\r\n") {
                            if self.buf.len() >= at + 2 {
                                return Err(DriverError::Protocol(
                                    "HTTP answer with trailers".into(),
                                ));
                            }
                            self.fill("reading the answer body").await?;
                        }
                        if self.buf.len() > at + 2 {
                            self.closing = true;
                        }
                        return Ok(Bytes::from(body));
                    }
                    // The chunk's data and its CRLF.
                    while self.buf.len() < at + size + 2 {
                        self.fill("reading the answer body").await?;
                    }
                    body.extend_from_slice(self.buf.get(at..at + size).unwrap_or_default());
                    if self.buf.get(at + size..at + size + 2) != Some(b"\r\n") {
                        return Err(DriverError::Protocol(
                            "HTTP chunk longer than its size".into(),
                        ));
                    }
                    at += size + 2;
                }
                Ok(httparse::Status::Partial) => {
                    if rest.len() > 64 {
                        return Err(DriverError::Protocol(
                            "HTTP chunk size line too long".into(),
                        ));
                    }
                    self.fill("reading the answer body").await?;
                }
                Err(_) => return Err(DriverError::Protocol("HTTP chunk size malformed".into())),
            }
        }
    }
}

/// How an answer with `status` and `headers` frames its body; sets `closing` when the server
/// closes the connection after it.
fn framing(
    status: StatusCode,
    headers: &[httparse::Header<'_>],
    closing: &mut bool,
) -> Result<Framing, DriverError> {
    let mut length = None;
    let mut chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| DriverError::Protocol("HTTP Content-Length malformed".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(DriverError::Protocol(
                    "HTTP answer with two Content-Lengths".into(),
                ));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            *closing |= h
                .value
                .split(|&b| b == b',')
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    Ok(
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        },
    )
}

/// The request's bytes: request line, the headers a VMM's API expects, and the JSON body.
fn request(method: &Method, path: &str, body: Option<&Value>) -> Result<Vec<u8>, DriverError> {
    if path.is_empty() || !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(DriverError::Protocol(format!(
            "request path {path:?} is not an absolute path without spaces"
        )));
    }
    let payload = match body {
        Some(b) => serde_json::to_vec(b)
            .map_err(|e| DriverError::Protocol(format!("encoding the request body: {e}")))?,
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(128 + payload.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if body.is_some() {
        out.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
        out.extend_from_slice(payload.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&payload);
    Ok(out)
}

fn io_error(what: &str, e: &std::io::Error) -> DriverError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::UnexpectedEof => DriverError::Closed,
        _ => DriverError::Protocol(format!("HTTP {what}: {e}")),
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
        // rarely) opens a connection of its own. A kept connection the VMM closed a moment ago
        // is found closed before anything is sent; a fresh one is then safe to use for the
        // same request.
        let kept = self.slot().take().filter(|c| !c.closed());
        let work = async {
            let mut conn = match kept {
                Some(c) => c,
                None => Conn::open(&self.sock).await?,
            };
            let r = conn.exchange(&method, path, body).await;
            // Kept even if the VMM closes it right after this answer: the next request finds it
            // closed before sending anything.
            if r.is_ok() && !conn.closing {
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

/// A body as JSON (Null when empty).
fn json(bytes: &[u8]) -> Result<Value, DriverError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| DriverError::Protocol(format!("response is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory for a test's socket, removed when dropped (even when the test fails).
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("mdt-http-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server that answers each request on one connection with the next canned answer, as
    /// bytes, and records the requests it read.
    async fn serve(
        answers: Vec<&'static [u8]>,
    ) -> (
        Scratch,
        std::path::PathBuf,
        tokio::task::JoinHandle<Vec<Vec<u8>>>,
    ) {
        let dir = Scratch::new();
        let sock = dir.0.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for a in answers {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(buf[..n].to_vec());
                s.write_all(a).await.unwrap();
            }
            seen
        });
        (dir, sock, task)
    }

    #[tokio::test]
    async fn length_chunked_and_no_content_answers_on_one_kept_connection() {
        let (_d, sock, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":\"Running\"}",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"fau\r\n12\r\nlt_message\":\"bad\"}\r\n0\r\n\r\n",
        ])
        .await;
        let kept = Kept::new(&sock);
        let t = Duration::from_secs(5);
        let (s, v) = kept.call(Method::GET, "/", None, t).await.unwrap();
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("Running")));
        let body = serde_json::json!({"state": "Paused"});
        let (s, v) = kept
            .call(Method::PATCH, "/vm", Some(&body), t)
            .await
            .unwrap();
        assert_eq!((s, v), (StatusCode::NO_CONTENT, Value::Null));
        let (s, v) = kept.call(Method::PUT, "/actions", None, t).await.unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["fault_message"], "bad");
        let seen = server.await.unwrap();
        // One connection carried all three; the PATCH carried its body with its length.
        assert_eq!(seen.len(), 3);
        let patch = String::from_utf8(seen[1].clone()).unwrap();
        assert!(patch.starts_with("PATCH /vm HTTP/1.1\r\n"), "{patch}");
        assert!(patch.contains("Content-Length: 18\r\n"), "{patch}");
        assert!(patch.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{patch}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_reopened_and_a_closing_answer_is_not_kept() {
        let dir = Scratch::new();
        let sock = dir.0.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            for answer in [
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"[..],
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"a\":1}",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(answer).await.unwrap();
                // Every answer's connection is closed by the server after it.
                drop(s);
                let _ = closed_tx.send(());
            }
            accepted
        });
        let kept = Kept::new(&sock);
        let t = Duration::from_secs(5);
        kept.call(Method::GET, "/", None, t).await.unwrap();
        closed.recv().await.unwrap();
        // The server closed the kept connection: found closed, a new one is opened.
        let (_, v) = kept.call(Method::GET, "/", None, t).await.unwrap();
        assert_eq!(v["a"], 1);
        // Delimited by the close: not kept, so the next request connects again.
        kept.call(Method::GET, "/", None, t).await.unwrap();
        assert_eq!(server.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn bad_answers_are_protocol_errors() {
        let (_d, sock, _server) = serve(vec![b"HTTP/1.1 2000 Huh\r\n\r\n"]).await;
        let err = call(&sock, Method::GET, "/", None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::Protocol(_)), "{err:?}");
        let err = request(&Method::GET, "/a b", None).unwrap_err();
        assert!(matches!(err, DriverError::Protocol(_)), "{err:?}");
    }
}
