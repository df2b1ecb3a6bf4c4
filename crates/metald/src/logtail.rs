//! StreamLog's follower: sends the end of a VM's console or VMM log, then what is written to
//! it, to one client.
//!
//! A log file is written by a process metald does not control, so there is no event for "the
//! file grew": the follower looks every [`POLL`] (what `tail -f` does), which costs one `stat`
//! per watcher and tick. A new VMM recreates its files: a file that shrank or was replaced is
//! read again from its start. The follower ends when the client goes away, when the VM is
//! deleted, and (with UNAVAILABLE) when metald stops.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use metald_api::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::model::VmId;
use crate::supervisor::Supervisor;

/// How often a followed file is looked at.
const POLL: Duration = Duration::from_millis(200);
/// The most one message carries.
const CHUNK: usize = 64 * 1024;

type Tx = mpsc::Sender<Result<pb::StreamLogResponse, Status>>;

/// The file as last read: which one (device, inode) and how far.
struct Cursor {
    file: Option<(std::fs::File, (u64, u64))>,
    offset: u64,
}

impl Cursor {
    /// Reads what `path` holds past the cursor (from `start` for a file not read before),
    /// reopening it when it was replaced or truncated.
    fn read_new(&mut self, path: &std::path::Path, start: impl Fn(u64) -> u64) -> Vec<u8> {
        let Ok(meta) = std::fs::metadata(path) else {
            return Vec::new();
        };
        let id = (meta.dev(), meta.ino());
        let same = self.file.as_ref().is_some_and(|(_, known)| *known == id);
        if !same || meta.len() < self.offset {
            let Ok(f) = std::fs::File::open(path) else {
                return Vec::new();
            };
            self.offset = if self.file.is_none() {
                start(meta.len())
            } else {
                0
            };
            self.file = Some((f, id));
        }
        let Some((f, _)) = self.file.as_mut() else {
            return Vec::new();
        };
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_ok() {
            let _ = f.take(16 << 20).read_to_end(&mut buf);
        }
        self.offset += buf.len() as u64;
        buf
    }
}

async fn send(tx: &Tx, data: Vec<u8>) -> bool {
    for chunk in data.chunks(CHUNK) {
        let msg = pb::StreamLogResponse {
            data: chunk.to_vec(),
        };
        if tx.send(Ok(msg)).await.is_err() {
            return false;
        }
    }
    true
}

/// Sends the last `tail` bytes of `path`, then, with `follow`, what is written to it.
pub async fn follow(
    sup: Arc<Supervisor>,
    vm: VmId,
    path: PathBuf,
    tail: u64,
    follow: bool,
    tx: Tx,
) {
    let mut cursor = Cursor {
        file: None,
        offset: 0,
    };
    let first = cursor.read_new(&path, |len| len.saturating_sub(tail));
    if !send(&tx, first).await || !follow {
        return;
    }
    let mut stopping = sup.stopping();
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(POLL) => false,
            () = tx.closed() => return,
            // Stopping (or the supervisor gone). The watch's guard is dropped here, before the
            // await below.
            _ = stopping.wait_for(|s| *s) => true,
        };
        if stop {
            let _ = tx
                .send(Err(Status::unavailable("metald is shutting down")))
                .await;
            return;
        }
        if sup.get(&vm).await.is_err() {
            // Deleted: its files are gone with it.
            return;
        }
        let new = cursor.read_new(&path, |_| 0);
        if !new.is_empty() && !send(&tx, new).await {
            return;
        }
    }
}
