//! A QMP (QEMU Machine Protocol) client: one-shot commands, and a persistent session that carries
//! QEMU's asynchronous events.
//!
//! QEMU serves one client per QMP socket at a time: a second connection waits in the listen
//! backlog, without a greeting, until the first one closes. So once the controller holds a VM's
//! [`Session`] (for its events: `SHUTDOWN` with the reason, `STOP`, `RESUME`, `GUEST_PANICKED`,
//! `RESET`), every command for that VM must go through the session too. [`execute`] opens a
//! connection of its own and is only used where no session exists (a VMM still starting up, or one
//! whose session was lost).
//!
//! A session is one task that owns the socket: commands are written with an `id` and their
//! replies matched back by that id, so a reply that comes late (after its caller timed out) is
//! dropped instead of being taken for the next command's answer.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::DriverError;

/// Runs one QMP command on its own connection to the socket at `path` and returns its `return`
/// value. The whole exchange, connection included, is bounded by `timeout`.
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
    let (mut lines, mut wr) = handshake(path).await?;
    send(&mut wr, &command_message(command, arguments, None)).await?;
    loop {
        let msg = next_message(&mut lines, command).await?;
        if msg.get("event").is_some() {
            continue;
        }
        return reply_value(command, &msg);
    }
}

/// Connects, reads the greeting and leaves capabilities negotiation mode.
async fn handshake(path: &Path) -> Result<(Lines, tokio::net::unix::OwnedWriteHalf), DriverError> {
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
    loop {
        let msg = next_message(&mut lines, "qmp_capabilities").await?;
        if msg.get("event").is_none() {
            reply_value("qmp_capabilities", &msg)?;
            return Ok((lines, wr));
        }
    }
}

fn command_message(command: &str, arguments: Option<Value>, id: Option<u64>) -> Value {
    let mut msg = json!({ "execute": command });
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    if let Some(id) = id {
        msg["id"] = json!(id);
    }
    msg
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
        .ok_or(DriverError::Closed)?;
    serde_json::from_str(&line).map_err(|e| DriverError::Protocol(format!("bad QMP JSON: {e}")))
}

/// The `return` value of a reply, or the error QEMU answered with.
fn reply_value(command: &str, msg: &Value) -> Result<Value, DriverError> {
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
    Err(DriverError::Protocol(format!(
        "unexpected QMP message {msg}"
    )))
}

/// An asynchronous QMP event, as QEMU sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// The event name (`SHUTDOWN`, `STOP`, ...).
    pub name: String,
    /// Its `data` member (Null when absent).
    pub data: Value,
}

struct Command {
    name: String,
    arguments: Option<Value>,
    reply: oneshot::Sender<Result<Value, DriverError>>,
}

/// A held QMP connection. Cheap to clone; the connection closes when the VMM closes it (it
/// exited) or when every clone and the event receiver are dropped.
#[derive(Debug, Clone)]
pub struct Session {
    tx: mpsc::Sender<Command>,
}

/// How many events may wait for the controller before the oldest are dropped. QEMU sends a
/// handful per lifecycle change; a controller busy with a long operation catches up after it.
const EVENT_QUEUE: usize = 256;

impl Session {
    /// Connects to the QMP socket at `path` (bounded by `timeout`) and starts the task that owns
    /// the connection. Events arrive on the returned receiver, in order, until the connection
    /// closes.
    pub async fn connect(
        path: &Path,
        timeout: Duration,
    ) -> Result<(Session, mpsc::Receiver<RawEvent>), DriverError> {
        let (lines, wr) = match tokio::time::timeout(timeout, handshake(path)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(DriverError::Timeout {
                    what: "QMP handshake".into(),
                    millis: timeout.as_millis(),
                });
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(run_session(lines, wr, rx, ev_tx));
        Ok((Session { tx }, ev_rx))
    }

    /// Whether the connection is gone (the VMM closed it, or it failed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Runs a command on the session, bounded by `timeout`.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command {
            name: command.to_string(),
            arguments,
            reply,
        };
        let run = async {
            self.tx.send(cmd).await.map_err(|_| DriverError::Closed)?;
            rx.await.map_err(|_| DriverError::Closed)?
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: format!("QMP {command}"),
                millis: timeout.as_millis(),
            }),
        }
    }
}

async fn run_session(
    mut lines: Lines,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<RawEvent>,
) {
    let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, DriverError>>)> =
        HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                // Every handle dropped and no one listening for events: nothing left to do.
                let Some(cmd) = cmd else {
                    if events.is_closed() { break } else { continue }
                };
                let id = next_id;
                next_id += 1;
                let msg = command_message(&cmd.name, cmd.arguments, Some(id));
                if let Err(e) = send(&mut wr, &msg).await {
                    let _ = cmd.reply.send(Err(e));
                    break;
                }
                pending.insert(id, (cmd.name, cmd.reply));
            }
            msg = next_message(&mut lines, "reply") => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(_) => break,
                };
                if let Some(name) = msg.get("event").and_then(Value::as_str) {
                    let ev = RawEvent {
                        name: name.to_string(),
                        data: msg.get("data").cloned().unwrap_or(Value::Null),
                    };
                    // A full queue means the controller is far behind; dropping the newest event
                    // is safer than blocking replies it may be waiting for.
                    let _ = events.try_send(ev);
                    continue;
                }
                let id = msg.get("id").and_then(Value::as_u64);
                if let Some((name, reply)) = id.and_then(|id| pending.remove(&id)) {
                    // The caller may have timed out and gone; then the reply is dropped.
                    let _ = reply.send(reply_value(&name, &msg));
                }
            }
        }
    }
    for (_, (_, reply)) in pending.drain() {
        let _ = reply.send(Err(DriverError::Closed));
    }
}
