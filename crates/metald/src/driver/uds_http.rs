//! A minimal HTTP/1.1 client over a unix socket, for VMMs whose control API is REST
//! (Firecracker). One connection per request, like the QMP client: no connection state can go
//! stale across a hung or restarted VMM.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::DriverError;

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
    match tokio::time::timeout(timeout, exchange(sock, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::Timeout {
            what,
            millis: timeout.as_millis(),
        }),
    }
}

async fn exchange(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), DriverError> {
    let stream = UnixStream::connect(sock)
        .await
        .map_err(|e| DriverError::connect(sock, &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| DriverError::Protocol(format!("HTTP handshake: {e}")))?;
    // The connection task ends with the request; its error, if any, surfaces below.
    tokio::spawn(async move {
        let _ = conn.await;
    });
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
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::Protocol(format!("response is not JSON: {e}")))?
    };
    Ok((status, value))
}
