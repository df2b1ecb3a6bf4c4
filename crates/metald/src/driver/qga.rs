//! A client for the QEMU guest agent protocol (QGA), spoken by a stock `qemu-guest-agent` in the
//! guest. Both drivers hand it a byte stream to the agent (a virtio-serial port on QEMU, a vsock
//! connection on Firecracker); the protocol on top is written once, here.
//!
//! QGA is JSON commands and replies, one per line, with no ids. A channel can hold stale bytes:
//! a reply that arrived after its caller gave up, or commands queued on the host side while the
//! guest had not yet opened the port. `guest-sync-delimited` puts the channel back in step: the
//! agent answers it with a `0xFF` byte (which resets its parser and marks where the answer
//! starts) and then the id it was sent. So every command that follows a timeout or a reconnect
//! is preceded by a sync.

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{AgentStream, DriverError};

/// The longest line the agent may send; a guest cannot make metald buffer more.
const MAX_LINE: usize = 64 * 1024;

/// One connection to a guest agent.
#[derive(Debug)]
pub struct Agent {
    stream: BufReader<AgentStream>,
    /// The channel is known to be in step (no command outstanding, nothing stale).
    synced: bool,
}

impl Agent {
    /// Wraps a connection the driver opened. The first command syncs it.
    pub fn new(stream: AgentStream) -> Self {
        Agent {
            stream: BufReader::new(stream),
            synced: false,
        }
    }

    /// Runs a command and returns its `return` value. A caller that bounds this with a timeout
    /// and gives up leaves the channel out of step; the next call syncs it first.
    pub async fn call(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, DriverError> {
        if !self.synced {
            self.sync().await?;
        }
        self.synced = false;
        self.write(command, arguments).await?;
        let msg = self.read_message().await?;
        let ret = reply_value(command, &msg)?;
        self.synced = true;
        Ok(ret)
    }

    /// Sends a command the agent does not answer when it succeeds (`guest-shutdown`): it fails
    /// only if the agent answers with an error within the caller's bound.
    pub async fn send_only(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<(), DriverError> {
        if !self.synced {
            self.sync().await?;
        }
        self.synced = false;
        self.write(command, arguments).await
    }

    async fn sync(&mut self) -> Result<(), DriverError> {
        let id: u32 = rand::random::<u32>() & 0x7fff_ffff;
        self.write("guest-sync-delimited", Some(json!({ "id": id })))
            .await?;
        loop {
            // Everything before the delimiter is stale.
            let mut skipped = Vec::new();
            let n = (&mut self.stream)
                .take(MAX_LINE as u64)
                .read_until(0xFF, &mut skipped)
                .await
                .map_err(|e| DriverError::Io("reading the guest agent".into(), e))?;
            if n == 0 {
                return Err(DriverError::Closed);
            }
            if skipped.last() != Some(&0xFF) {
                continue;
            }
            let msg = self.read_message().await?;
            // An older sync's answer: keep looking for ours.
            if msg.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                self.synced = true;
                return Ok(());
            }
        }
    }

    async fn write(&mut self, command: &str, arguments: Option<Value>) -> Result<(), DriverError> {
        let mut msg = json!({ "execute": command });
        if let (Some(a), Some(o)) = (arguments, msg.as_object_mut()) {
            o.insert("arguments".into(), a);
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(|e| DriverError::Io("writing to the guest agent".into(), e))
    }

    /// Reads the next JSON message, skipping blank lines and delimiter bytes.
    async fn read_message(&mut self) -> Result<Value, DriverError> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.stream)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| DriverError::Io("reading the guest agent".into(), e))?;
            if n == 0 {
                return Err(DriverError::Closed);
            }
            let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
            let text = String::from_utf8_lossy(&text);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .map_err(|e| DriverError::Protocol(format!("the guest agent sent bad JSON: {e}")));
        }
    }
}

fn reply_value(command: &str, msg: &Value) -> Result<Value, DriverError> {
    super::qmp::qapi_reply("guest agent", command, msg)
}

/// What the guest agent says about its guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInfo {
    /// The agent's version (`guest-info`).
    pub agent_version: String,
    /// The OS's pretty name (`guest-get-osinfo`), or its name.
    pub os_name: String,
    /// The OS version.
    pub os_version: String,
    /// The guest kernel's release.
    pub kernel_release: String,
    /// The guest's wall clock, ns since the epoch (`guest-get-time`).
    pub time_ns: i64,
}

impl Agent {
    /// Asks the agent about its guest. Commands the agent lacks leave their fields empty.
    pub async fn info(&mut self) -> Result<GuestInfo, DriverError> {
        let mut out = GuestInfo::default();
        let info = self.call("guest-info", None).await?;
        out.agent_version = str_field(&info, "version");
        match self.call("guest-get-osinfo", None).await {
            Ok(os) => {
                out.os_name = str_field(&os, "pretty-name");
                if out.os_name.is_empty() {
                    out.os_name = str_field(&os, "name");
                }
                out.os_version = str_field(&os, "version-id");
                out.kernel_release = str_field(&os, "kernel-release");
            }
            Err(DriverError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        match self.call("guest-get-time", None).await {
            Ok(t) => out.time_ns = t.as_i64().unwrap_or(0),
            Err(DriverError::Refused { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }
}

fn str_field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted agent on the other end of a socket pair: it answers a sync only after
    /// sending a stale reply, as a real channel can hold one.
    #[tokio::test]
    async fn sync_skips_stale_bytes_and_matches_the_id() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let mut b = BufReader::new(b);
            let mut line = String::new();
            b.read_line(&mut line).await.unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], "guest-sync-delimited");
            let id = req["arguments"]["id"].as_u64().unwrap();
            let w = b.get_mut();
            w.write_all(b"{\"return\": {}}\n\xff{\"return\": 7}\n\xff")
                .await
                .unwrap();
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            line.clear();
            b.read_line(&mut line).await.unwrap();
            assert!(line.contains("guest-ping"));
            b.get_mut().write_all(b"{\"return\": {}}\n").await.unwrap();
            let mut rest = Vec::new();
            let _ = b.read_to_end(&mut rest).await;
        });
        let mut agent = Agent::new(a);
        assert_eq!(agent.call("guest-ping", None).await.unwrap(), json!({}));
        drop(agent);
        peer.await.unwrap();
    }
}
