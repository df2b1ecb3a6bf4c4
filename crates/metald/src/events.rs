//! VM event history: state transitions, health changes, orphan detections and recovery
//! attempts, appended to the registry (bounded per VM) and broadcast live to watchers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::model::{EventKind, VmState};
use crate::store::{EventRecord, Store, Writer, now_ms};

/// At most this many events wait in memory for a registry that refuses writes; beyond it the
/// oldest are dropped (and counted in the log), so a long outage cannot grow metald without
/// bound.
const PENDING_MAX: usize = 4096;

/// Appends events and fans them out to live watchers.
#[derive(Debug)]
pub struct EventBus {
    store: Store,
    tx: broadcast::Sender<EventRecord>,
    keep: usize,
    /// Events the registry refused (a full disk), oldest first: written, in order, before any
    /// newer one once it accepts writes again.
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    events: VecDeque<EventRecord>,
    dropped: u64,
}

impl EventBus {
    /// A bus writing to `store`, keeping `keep` events per VM.
    pub fn new(store: Store, keep: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(EventBus {
            store,
            tx,
            keep: keep.max(1),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means a panic elsewhere; the queue itself is still whole.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many events wait for the registry.
    pub fn pending_count(&self) -> usize {
        self.pending().events.len()
    }

    /// Writes the events the registry refused earlier, oldest first, stopping at the first that
    /// it still refuses. Returns whether none is left.
    pub async fn flush(&self, w: &Writer) -> bool {
        loop {
            let Some(ev) = self.pending().events.front().cloned() else {
                return true;
            };
            if let Err(e) = self.store.add_event(w, ev, self.keep).await {
                warn!(error = %e, pending = self.pending_count(), "vm events still not recorded");
                return false;
            }
            let mut p = self.pending();
            p.events.pop_front();
            if p.events.is_empty() {
                info!(
                    dropped = p.dropped,
                    "vm events held while the registry refused writes are recorded"
                );
                p.dropped = 0;
            }
        }
    }

    /// Records an event. A registry failure is logged, not returned: history must never stop
    /// a VM from being driven.
    /// `from` and `to` are the VM's observed state before and after (the same for an event that
    /// changed nothing).
    // Seven arguments of data; the eighth, the writer, is a proof of who calls, not data.
    #[allow(clippy::too_many_arguments)]
    pub async fn emit(
        &self,
        w: &Writer,
        vm_id: &str,
        customer_id: &str,
        kind: EventKind,
        from: VmState,
        to: VmState,
        reason: &str,
        message: &str,
    ) {
        let mut ev = EventRecord {
            seq: 0,
            vm_id: vm_id.to_string(),
            at_ms: now_ms(),
            kind: kind.as_str().to_string(),
            from_state: from.as_str().to_string(),
            to_state: to.as_str().to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            customer_id: customer_id.to_string(),
        };
        // Behind held events the new one waits its turn, so that history stays in order.
        let recorded = if self.flush(w).await {
            match self.store.add_event(w, ev.clone(), self.keep).await {
                Ok(seq) => Some(seq),
                Err(e) => {
                    warn!(vm_id, error = %e, "recording vm event failed; held until the registry accepts it");
                    None
                }
            }
        } else {
            None
        };
        match recorded {
            Some(seq) => ev.seq = seq,
            None => {
                let mut p = self.pending();
                if p.events.len() >= PENDING_MAX {
                    p.events.pop_front();
                    p.dropped += 1;
                }
                p.events.push_back(ev.clone());
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    /// Sends an event to live watchers only (for a VM whose history is being deleted with it,
    /// so that none of its held events is written after it is gone).
    pub fn announce(&self, vm_id: &str, customer_id: &str, kind: EventKind, message: &str) {
        self.pending().events.retain(|e| e.vm_id != vm_id);
        let _ = self.tx.send(EventRecord {
            seq: 0,
            vm_id: vm_id.to_string(),
            at_ms: now_ms(),
            kind: kind.as_str().to_string(),
            from_state: String::new(),
            to_state: String::new(),
            reason: String::new(),
            message: message.to_string(),
            customer_id: customer_id.to_string(),
        });
    }

    /// A live feed of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.tx.subscribe()
    }
}
