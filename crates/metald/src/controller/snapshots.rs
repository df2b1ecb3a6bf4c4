//! A VM's snapshots as its controller keeps them: their size, their removal (one at a time, or
//! all with the VM), and the boot snapshot that a VM with `restore_from = boot_snapshot` is
//! restored from when its VMM dies (a warm restore: the guest comes back as it was at that
//! snapshot, in milliseconds, instead of booting).

#[allow(clippy::wildcard_imports)]
use super::*;

/// The total size of the files in `dir` (not recursive: a snapshot is flat).
pub(super) fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl ControllerEnv {
    /// Where snapshots are kept: beside the run directories, in the state directory.
    pub(super) fn snapshot_root(&self) -> PathBuf {
        self.run_root
            .parent()
            .unwrap_or(&self.run_root)
            .join("snapshots")
    }
}

impl Controller {
    /// Removes snapshot `snap` of this VM, unless a VM made from it (this one included) has
    /// not started from it yet: that VM's guest is still in it.
    pub(super) async fn remove_snapshot(&mut self, snap: &SnapshotRecord) -> Result<()> {
        if let Some(user) = self.env.store.vm_saved_at(&snap.path, None).await? {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} is in use: vm {user} was made from it and has not started from it yet",
                snap.snapshot_id
            )));
        }
        self.drop_snapshot(snap).await
    }

    /// Removes a snapshot's files, then its record.
    async fn drop_snapshot(&mut self, snap: &SnapshotRecord) -> Result<()> {
        match std::fs::remove_dir_all(&snap.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", snap.path.display()), e)),
        }
        self.env
            .store
            .delete_snapshot(&self.env.writer, &snap.snapshot_id)
            .await?;
        info!(vm_id = %self.rec.vm_id, snapshot_id = %snap.snapshot_id, "snapshot removed");
        Ok(())
    }

    /// Removes every snapshot of this VM that nothing else needs (the VM is being deleted).
    pub(super) async fn remove_snapshots(&mut self) {
        let snaps = match self
            .env
            .store
            .snapshots(Some(self.rec.vm_id.as_str()))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(vm_id = %self.rec.vm_id, error = %e, "listing the vm's snapshots failed; they are kept");
                return;
            }
        };
        for s in snaps {
            // One that a VM made from it still needs goes to that VM, whose controller then
            // owns it: it can be listed and deleted as that VM's, and goes with it.
            match self
                .env
                .store
                .vm_saved_at(&s.path, Some(self.rec.vm_id.as_str()))
                .await
            {
                Ok(Some(user)) => {
                    match self
                        .env
                        .store
                        .reassign_snapshot(&self.env.writer, &s.snapshot_id, &user)
                        .await
                    {
                        Ok(()) => {
                            info!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, to = %user, "snapshot handed to the vm made from it")
                        }
                        Err(e) => {
                            warn!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, error = %e, "handing a snapshot on failed; it is kept")
                        }
                    }
                }
                Ok(None) => {
                    if let Err(e) = self.drop_snapshot(&s).await {
                        warn!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, error = %e, "removing a snapshot failed; it is kept");
                    }
                }
                Err(e) => {
                    warn!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, error = %e, "snapshot kept");
                }
            }
        }
    }

    /// After a new boot snapshot `keep` is recorded, removes the VM's older ones.
    pub(super) async fn remove_other_boot_snapshots(&mut self, keep: &str) {
        let Ok(snaps) = self
            .env
            .store
            .snapshots(Some(self.rec.vm_id.as_str()))
            .await
        else {
            return;
        };
        for s in snaps.iter().filter(|s| s.boot && s.snapshot_id != keep) {
            if let Err(e) = self.remove_snapshot(s).await {
                warn!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, error = %e, "removing an old boot snapshot failed");
            }
        }
    }

    /// The VM's boot snapshot, if it has one whose files are there.
    pub(super) async fn boot_snapshot(&mut self) -> Option<SnapshotRecord> {
        self.env
            .store
            .snapshots(Some(self.rec.vm_id.as_str()))
            .await
            .ok()?
            .into_iter()
            .rev()
            .find(|s| s.boot && s.path.is_dir())
    }

    /// Takes the VM's boot snapshot now that its guest is ready, if it wants one and has none.
    /// The guest pauses while its state is written.
    pub(super) async fn take_boot_snapshot_if_wanted(&mut self) {
        if self.rec.spec.restore_from != crate::model::RestoreFrom::BootSnapshot
            || self.rec.observed != VmState::Running
            || self.boot_snapshot().await.is_some()
        {
            return;
        }
        let now = now_ms();
        let snapshot_id = format!("{}-boot-{now}", self.rec.vm_id);
        let dest = self.env.snapshot_root().join(&snapshot_id);
        let record = SnapshotRecord {
            snapshot_id: snapshot_id.clone(),
            vm_id: self.rec.vm_id.to_string(),
            spec: self.rec.spec.clone(),
            path: dest.clone(),
            created_at_ms: now,
            boot: true,
            size_bytes: 0,
        };
        match self.snapshot_recorded(dest, false, record).await {
            Ok(s) => {
                info!(vm_id = %self.rec.vm_id, snapshot_id = %s.snapshot_id, size_bytes = s.size_bytes, "boot snapshot taken");
            }
            Err(e) => {
                warn!(vm_id = %self.rec.vm_id, error = %e, "taking the boot snapshot failed; a crash boots the guest afresh");
            }
        }
    }

    /// How the next recovery brings the VM back: `restore` from its boot snapshot (set up for
    /// the next VMM start), or `restart`. A warm restore that failed is not tried again in the
    /// same streak: the next attempt boots afresh.
    pub(super) async fn recovery_method(&mut self) -> &'static str {
        if self.rec.spec.restore_from != crate::model::RestoreFrom::BootSnapshot
            || self.rec.saved.is_some()
            || self.warm_restore_failed
        {
            return "restart";
        }
        match self.boot_snapshot().await {
            Some(s) => {
                self.restore_from = Some(s.path);
                "restore"
            }
            None => "restart",
        }
    }
}
