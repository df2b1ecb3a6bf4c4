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
//! In a session, commands are written with an `id` by their callers and a reader task matches
//! each reply back by that id, so a reply that comes late (after its caller timed out) is
//! dropped instead of being taken for the next command's answer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{DriverError, bounded};

/// Runs one QMP command on its own connection to the socket at `path` and returns its `return`
/// value. The whole exchange, connection included, is bounded by `timeout`.
pub async fn execute(
    path: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, DriverError> {
    bounded(
        || format!("QMP {command}"),
        timeout,
        exchange(path, command, arguments),
    )
    .await
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
    let stream = super::connect_unix(path)
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
    if let Some(o) = msg.as_object_mut() {
        if let Some(args) = arguments {
            o.insert("arguments".into(), args);
        }
        if let Some(id) = id {
            o.insert("id".into(), json!(id));
        }
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

/// Sends `msg` with `fd` attached to its first bytes (SCM_RIGHTS), then the rest of it.
async fn send_with_fd(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    msg: &Value,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<(), DriverError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut line = msg.to_string();
    line.push('\n');
    let bytes = line.as_bytes();
    let io = |e: std::io::Error| DriverError::Io("writing QMP".into(), e);
    let stream: &tokio::net::UnixStream = wr.as_ref();
    let sent = loop {
        stream.writable().await.map_err(io)?;
        let attempt = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut ancillary = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("no room for the fd"));
            }
            rustix::net::sendmsg(
                stream,
                &[std::io::IoSlice::new(bytes)],
                &mut ancillary,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match attempt {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io(e)),
        }
    };
    // The fd went with the first bytes; the rest of the line follows as plain bytes.
    wr.write_all(bytes.get(sent..).unwrap_or_default())
        .await
        .map_err(io)
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
    qapi_reply("QMP", command, msg)
}

/// The `return` value of a QAPI reply (QMP's and the guest agent's share the shape), or the
/// error it carries; `protocol` names the peer in errors.
pub(crate) fn qapi_reply(protocol: &str, command: &str, msg: &Value) -> Result<Value, DriverError> {
    if let Some(ret) = msg.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = msg.get("error") {
        let desc = err
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(DriverError::Refused {
            what: format!("{protocol} {command}"),
            reason: desc.to_string(),
        });
    }
    Err(DriverError::Protocol(format!(
        "unexpected {protocol} message {msg}"
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

type Pending = HashMap<u64, (String, oneshot::Sender<Result<Value, DriverError>>)>;

/// A held QMP connection. Cheap to clone. A command is written by its caller and its reply is
/// handed back by the reader task, so a ping costs one write, one read and one wake-up. The
/// connection closes when the VMM closes it (it exited) or when every clone is dropped.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The map holds only reply channels; a panic elsewhere cannot leave it inconsistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many events may wait for the controller before the newest are dropped. QEMU sends a
/// handful per lifecycle change; a controller busy with a long operation catches up after it.
const EVENT_QUEUE: usize = 256;

impl Session {
    /// Connects to the QMP socket at `path` (bounded by `timeout`) and starts the task that
    /// reads from it. Events arrive on the returned receiver, in order, until the connection
    /// closes.
    pub async fn connect(
        path: &Path,
        timeout: Duration,
    ) -> Result<(Session, mpsc::Receiver<RawEvent>), DriverError> {
        let (lines, wr) = bounded(|| "QMP handshake".into(), timeout, handshake(path)).await?;
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        // The reader holds only a weak reference: when every Session clone is gone the write
        // half closes with the last one, QEMU closes its end, and the reader ends on EOF.
        tokio::spawn(read_session(lines, Arc::downgrade(&inner), ev_tx));
        Ok((Session { inner }, ev_rx))
    }

    /// Whether the connection is gone (the VMM closed it, or it failed).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Runs a command on the session, bounded by `timeout`.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        self.run(command, arguments, None, timeout).await
    }

    /// Runs a command that takes a file descriptor (`getfd`, `add-fd`): `fd` travels with the
    /// command's bytes as SCM_RIGHTS, and QEMU keeps its own copy.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: std::os::fd::BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        self.run(command, arguments, Some(fd), timeout).await
    }

    async fn run(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        if self.is_closed() {
            return Err(DriverError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.inner
            .pending()
            .insert(id, (command.to_string(), reply));
        let run = async {
            let msg = command_message(command, arguments, Some(id));
            let mut wr = self.inner.writer.lock().await;
            match fd {
                Some(fd) => send_with_fd(&mut wr, &msg, fd).await?,
                None => send(&mut wr, &msg).await?,
            }
            drop(wr);
            rx.await.map_err(|_| DriverError::Closed)?
        };
        let r = bounded(|| format!("QMP {command}"), timeout, run).await;
        // A reply that comes after its caller gave up is dropped, not taken for another's.
        if r.is_err() {
            self.inner.pending().remove(&id);
        }
        r
    }
}

async fn read_session(mut lines: Lines, inner: Weak<Inner>, events: mpsc::Sender<RawEvent>) {
    while let Ok(msg) = next_message(&mut lines, "reply").await {
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let ev = RawEvent {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            };
            // A full queue means the controller is far behind; dropping the newest event is
            // safer than blocking the replies it may be waiting for.
            let _ = events.try_send(ev);
            continue;
        }
        let Some(inner) = inner.upgrade() else { break };
        let id = msg.get("id").and_then(Value::as_u64);
        let waiting = id.and_then(|id| inner.pending().remove(&id));
        if let Some((name, reply)) = waiting {
            let _ = reply.send(reply_value(&name, &msg));
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.closed.store(true, Ordering::Release);
        for (_, (_, reply)) in inner.pending().drain() {
            let _ = reply.send(Err(DriverError::Closed));
        }
    }
}
