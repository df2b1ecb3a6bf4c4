//! VM event history: state transitions, health changes, orphan detections and recovery
//! attempts, appended to the registry (bounded per VM) and broadcast live to watchers.

use std::sync::Arc;

use tokio::sync::broadcast;
use tracing::warn;

use crate::store::{EventRecord, Store, now_ms};

/// Appends events and fans them out to live watchers.
#[derive(Debug)]
pub struct EventBus {
    store: Store,
    tx: broadcast::Sender<EventRecord>,
    keep: usize,
}

impl EventBus {
    /// A bus writing to `store`, keeping `keep` events per VM.
    pub fn new(store: Store, keep: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(EventBus {
            store,
            tx,
            keep: keep.max(1),
        })
    }

    /// Records an event. A registry failure is logged, not returned: history must never stop
    /// a VM from being driven.
    pub async fn emit(
        &self,
        vm_id: &str,
        kind: &str,
        from: &str,
        to: &str,
        reason: &str,
        message: &str,
    ) {
        let mut ev = EventRecord {
            seq: 0,
            vm_id: vm_id.to_string(),
            at_ms: now_ms(),
            kind: kind.to_string(),
            from_state: from.to_string(),
            to_state: to.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
        };
        match self.store.add_event(ev.clone(), self.keep).await {
            Ok(seq) => ev.seq = seq,
            Err(e) => warn!(vm_id, error = %e, "recording vm event failed"),
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    /// Sends an event to live watchers only (for a VM whose history is being deleted with it).
    pub fn announce(&self, vm_id: &str, kind: &str, message: &str) {
        let _ = self.tx.send(EventRecord {
            seq: 0,
            vm_id: vm_id.to_string(),
            at_ms: now_ms(),
            kind: kind.to_string(),
            from_state: String::new(),
            to_state: String::new(),
            reason: String::new(),
            message: message.to_string(),
        });
    }

    /// A live feed of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.tx.subscribe()
    }
}
