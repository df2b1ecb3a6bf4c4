//! A minimal QMP (QEMU Machine Protocol) client.
//!
//! Each command opens its own connection: greeting, `qmp_capabilities`, the command, close.
//! QEMU serves one QMP client at a time, and a fresh connection per command means no connection
//! state can go stale across a hung or restarted QEMU. The cost is about a millisecond locally.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::DriverError;

/// Runs one QMP command on the socket at `path` and returns its `return` value. The whole
/// exchange, connection included, is bounded by `timeout`.
pub async fn execute(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, DriverError> {
    match tokio::time::timeout(timeout, exchange(path, command, arguments)).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::Timeout {
            what: format!("QMP {command}"),
            millis: timeout.as_millis(),
        }),
    }
}

async fn exchange(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, DriverError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| DriverError::connect(path, &e))?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();

    let greeting = next_message(&mut lines, "greeting").await?;
    if greeting.get("QMP").is_none() {
        return Err(DriverError::Protocol(format!(
            "unexpected QMP greeting {greeting}"
        )));
    }
    send(&mut wr, &json!({"execute": "qmp_capabilities"})).await?;
    reply(&mut lines, "qmp_capabilities").await?;

    let mut msg = json!({"execute": command});
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    send(&mut wr, &msg).await?;
    reply(&mut lines, command).await
}

async fn send(wr: &mut tokio::net::unix::OwnedWriteHalf, msg: &Value) -> Result<(), DriverError> {
    let mut line = msg.to_string();
    line.push('\n');
    wr.write_all(line.as_bytes())
        .await
        .map_err(|e| DriverError::Io("writing QMP".into(), e))
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next_message(lines: &mut Lines, what: &str) -> Result<Value, DriverError> {
    let line = lines
        .next_line()
        .await
        .map_err(|e| DriverError::Io(format!("reading QMP {what}"), e))?
        .ok_or_else(|| DriverError::Protocol(format!("QMP connection closed awaiting {what}")))?;
    serde_json::from_str(&line).map_err(|e| DriverError::Protocol(format!("bad QMP JSON: {e}")))
}

/// Reads until the reply to `command`, skipping asynchronous events.
async fn reply(lines: &mut Lines, command: &str) -> Result<Value, DriverError> {
    loop {
        let msg = next_message(lines, command).await?;
        if msg.get("event").is_some() {
            continue;
        }
        if let Some(ret) = msg.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = msg.get("error") {
            let desc = err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(DriverError::Refused {
                what: format!("QMP {command}"),
                reason: desc.to_string(),
            });
        }
        return Err(DriverError::Protocol(format!(
            "unexpected QMP message {msg}"
        )));
    }
}
