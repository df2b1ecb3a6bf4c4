//! The registry: SQLite in WAL mode, the single source of truth for every VM.
//!
//! Every state change is committed (synchronous=FULL) before the API call that caused it
//! returns. Calls run on tokio's blocking pool so SQLite's fsyncs never stall the runtime. The
//! schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] only ever grows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::{Error, Result};
use crate::model::{
    Desired, GuestStatus, HealthStatus, OrphanReason, VmId, VmSpec, VmState, VmmEndpoint,
};

/// Schema migrations, applied in order; entry `i` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE vms (
    vm_id          TEXT PRIMARY KEY NOT NULL,
    customer_id    TEXT NOT NULL,
    spec           TEXT NOT NULL,
    desired_state  TEXT NOT NULL,
    observed_state TEXT NOT NULL,
    pid            INTEGER,
    start_time     INTEGER,
    control_socket TEXT,
    console_log    TEXT,
    last_exit      TEXT,
    created_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL
);
CREATE INDEX vms_observed ON vms(observed_state);
"#,
    r#"
ALTER TABLE vms ADD COLUMN health TEXT;
ALTER TABLE vms ADD COLUMN orphan_reason TEXT;
ALTER TABLE vms ADD COLUMN orphaned_at_ms INTEGER;
"#,
    r#"
ALTER TABLE vms ADD COLUMN recovery_streak INTEGER NOT NULL DEFAULT 0;
CREATE TABLE recovery_attempts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id         TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    duration_ms   INTEGER NOT NULL,
    outcome       TEXT NOT NULL,
    error         TEXT NOT NULL,
    trigger       TEXT NOT NULL
);
CREATE INDEX recovery_attempts_vm ON recovery_attempts(vm_id, id);
"#,
    r#"
CREATE TABLE vm_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id      TEXT NOT NULL,
    at_ms      INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    from_state TEXT NOT NULL,
    to_state   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX vm_events_vm ON vm_events(vm_id, seq);
"#,
    r#"
CREATE TABLE snapshots (
    snapshot_id   TEXT PRIMARY KEY NOT NULL,
    vm_id         TEXT NOT NULL,
    spec          TEXT NOT NULL,
    path          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE vms ADD COLUMN guest TEXT;
"#,
    r#"
CREATE TABLE host (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE vms ADD COLUMN saved TEXT;
"#,
    r#"
CREATE TABLE requests (
    request_id    TEXT PRIMARY KEY NOT NULL,
    method        TEXT NOT NULL,
    fingerprint   BLOB NOT NULL,
    response      BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE recovery_attempts ADD COLUMN method TEXT NOT NULL DEFAULT 'restart';
"#,
    r#"
ALTER TABLE snapshots ADD COLUMN boot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX snapshots_vm ON snapshots(vm_id);
"#,
];

/// How long a request_id's answer is kept for retries.
pub const REQUESTS_KEPT_MS: i64 = 24 * 3600 * 1000;

/// The answer to a call made with a request_id, kept so that a retry gets it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The RPC's name.
    pub method: String,
    /// The request without its request_id, encoded: a retry must be the same request.
    pub fingerprint: Vec<u8>,
    /// The encoded response.
    pub response: Vec<u8>,
}

/// A snapshot taken with SnapshotVm.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// Its id.
    pub snapshot_id: String,
    /// The VM it was taken of.
    pub vm_id: String,
    /// That VM's config (with its VMM kind fixed), which a VM made from it gets.
    pub spec: VmSpec,
    /// The directory holding its files.
    pub path: PathBuf,
    /// When, ms since the epoch.
    pub created_at_ms: i64,
    /// It is its VM's boot snapshot: taken once its guest was first ready, what a crashed VMM
    /// of a VM with `restore_from = boot_snapshot` is restored from.
    pub boot: bool,
    /// The size of its files.
    pub size_bytes: u64,
}

/// The columns a snapshot row is read with (see [`decode_snapshot`]).
const SNAPSHOT_COLUMNS: &str = "snapshot_id, vm_id, spec, path, created_at_ms, boot, size_bytes";

fn decode_snapshot(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SnapshotRecord>> {
    let (snapshot_id, vm_id, spec, path): (String, String, String, String) =
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
    let (created_at_ms, boot, size): (i64, bool, i64) = (r.get(4)?, r.get(5)?, r.get(6)?);
    Ok(serde_json::from_str(&spec)
        .map_err(|e| Error::CorruptRow {
            vm_id: vm_id.clone(),
            reason: format!("snapshot spec: {e}"),
        })
        .map(|spec| SnapshotRecord {
            snapshot_id,
            vm_id,
            spec,
            path: PathBuf::from(path),
            created_at_ms,
            boot,
            size_bytes: u64::try_from(size).unwrap_or(0),
        }))
}

/// One entry of a VM's event history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Global, increasing sequence number (0 until stored).
    pub seq: i64,
    /// The VM.
    pub vm_id: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// `state_changed`, `health_changed`, `orphaned`, `recovering`, `recovered`,
    /// `recovery_failed`, `failed`, `deleted`.
    pub kind: String,
    /// State before (for state changes).
    pub from_state: String,
    /// State after (for state changes).
    pub to_state: String,
    /// Orphan reason or trigger, where one applies.
    pub reason: String,
    /// Free text.
    pub message: String,
    /// The VM's customer, on live events (what scoped watchers are filtered by); empty on
    /// history read from the registry, which does not store it.
    pub customer_id: String,
}

/// Recovery attempts kept per VM.
pub const ATTEMPTS_KEPT: usize = 20;

/// One recovery attempt, as kept in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// 1-based attempt number within its failure streak.
    pub attempt: u32,
    /// When it started, ms since the epoch.
    pub started_at_ms: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// Whether it brought the VM back (stored as `success` or `failure`).
    pub succeeded: bool,
    /// The error, for a failure.
    pub error: String,
    /// What started it (an orphan reason, `guest_poweroff`, or `manual`).
    pub trigger: String,
    /// How it brought the VM back: `restart` (a new VMM, the guest booted), `migrate` (the
    /// guest moved to a new VMM without stopping), `restore` (a new VMM from a snapshot).
    pub method: String,
}

/// One VM's registry row.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// The VM.
    pub vm_id: VmId,
    /// Its owner.
    pub customer_id: String,
    /// Its validated config.
    pub spec: VmSpec,
    /// What the user asked for.
    pub desired: Desired,
    /// What metald last observed.
    pub observed: VmState,
    /// Where its VMM is, while it has one.
    pub endpoint: Option<VmmEndpoint>,
    /// How its last VMM ended, if one did.
    pub last_exit: Option<String>,
    /// Its health as last persisted.
    pub health: HealthStatus,
    /// Why it is orphaned, while it is.
    pub orphan_reason: Option<OrphanReason>,
    /// When it was orphaned (ms since the epoch), while it is.
    pub orphaned_at_ms: Option<i64>,
    /// Failed recovery attempts in a row (0 once a recovery succeeds).
    pub recovery_streak: u32,
    /// What its guest probe last found.
    pub guest: GuestStatus,
    /// Where its guest was saved by a host drain, while it is saved (no VMM; the next start
    /// restores it from there instead of booting it).
    pub saved: Option<PathBuf>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Last change, ms since the epoch.
    pub updated_at_ms: i64,
}

/// A handle to the registry; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

pub use crate::model::now_ms;

/// The right to write a VM: its row, its recovery attempts, its snapshots and its events. Every
/// such write takes one, and one is made only by [`Store::open`], which the daemon hands to the
/// controllers' shared settings (`controller::ControllerEnv`), in a field only the controller
/// module can read. So the one-writer rule is the compiler's, not a comment's: the supervisor,
/// the API, re-attach and the sweep cannot write a VM, only ask its controller to.
///
/// Outside this module a `Writer` cannot be made:
///
/// ```compile_fail,E0423
/// let _ = metald::store::Writer(());
/// ```
///
/// and a VM's row cannot be written without one:
///
/// ```compile_fail,E0061
/// async fn sneak(store: &metald::store::Store, id: &metald::model::VmId) {
///     let _ = store.delete(id).await;
/// }
/// ```
#[derive(Debug)]
pub struct Writer(());

impl Store {
    /// Opens (creating if needed) the registry at `path` and migrates it; with it, the one
    /// [`Writer`] of its VMs.
    pub fn open(path: &Path) -> Result<(Store, Writer)> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let store = Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        };
        Ok((store, Writer(())))
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied transaction behind
            // (SQLite rolls it back), so a poisoned lock is safe to keep using.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::io("registry task", std::io::Error::other(e.to_string())))?
    }

    /// Inserts a new VM; [`Error::AlreadyExists`] if the id is taken.
    pub async fn insert(&self, _: &Writer, rec: VmRecord) -> Result<()> {
        self.run(move |c| {
            let spec = serde_json::to_string(&rec.spec).map_err(|e| Error::CorruptRow {
                vm_id: rec.vm_id.to_string(),
                reason: e.to_string(),
            })?;
            let ep = rec.endpoint.as_ref();
            let res = c.execute(
                "INSERT INTO vms (vm_id, customer_id, spec, desired_state, observed_state, pid,
                     start_time, control_socket, console_log, last_exit, created_at_ms, updated_at_ms,
                     saved)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    rec.vm_id.as_str(),
                    rec.customer_id,
                    spec,
                    rec.desired.as_str(),
                    rec.observed.as_str(),
                    ep.map(|e| e.pid),
                    ep.map(|e| i64::try_from(e.start_time).unwrap_or(i64::MAX)),
                    ep.map(|e| e.control_socket.display().to_string()),
                    ep.map(|e| e.console_log.display().to_string()),
                    rec.last_exit,
                    rec.created_at_ms,
                    rec.updated_at_ms,
                    rec.saved.as_ref().map(|p| p.display().to_string()),
                ],
            );
            match res {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(Error::AlreadyExists(rec.vm_id.to_string()))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Records a new desired state.
    pub async fn set_desired(&self, _: &Writer, id: &VmId, desired: Desired) -> Result<()> {
        let id = id.clone();
        self.run(move |c| {
            let n = c.execute(
                "UPDATE vms SET desired_state = ?2, updated_at_ms = ?3 WHERE vm_id = ?1",
                params![id.as_str(), desired.as_str(), now_ms()],
            )?;
            if n == 0 {
                return Err(Error::NotFound(id.to_string()));
            }
            Ok(())
        })
        .await
    }

    /// Records everything observed about a VM's VMM: state, endpoint (none when there is no
    /// process), last exit, health and orphan reason.
    pub async fn save_runtime(&self, _: &Writer, rec: &VmRecord) -> Result<()> {
        let rec = rec.clone();
        self.run(move |c| {
            let ep = rec.endpoint.as_ref();
            let health = serde_json::to_string(&rec.health).unwrap_or_default();
            let n = c.execute(
                "UPDATE vms SET observed_state = ?2, pid = ?3, start_time = ?4, control_socket = ?5,
                     console_log = COALESCE(?6, console_log), last_exit = ?7, health = ?8,
                     orphan_reason = ?9, orphaned_at_ms = ?10, updated_at_ms = ?11,
                     recovery_streak = ?12, guest = ?13, saved = ?14
                 WHERE vm_id = ?1",
                params![
                    rec.vm_id.as_str(),
                    rec.observed.as_str(),
                    ep.map(|e| e.pid),
                    ep.map(|e| i64::try_from(e.start_time).unwrap_or(i64::MAX)),
                    ep.map(|e| e.control_socket.display().to_string()),
                    ep.map(|e| e.console_log.display().to_string()),
                    rec.last_exit,
                    health,
                    rec.orphan_reason.map(OrphanReason::as_str),
                    rec.orphaned_at_ms,
                    now_ms(),
                    rec.recovery_streak,
                    serde_json::to_string(&rec.guest).unwrap_or_default(),
                    rec.saved.as_ref().map(|p| p.display().to_string()),
                ],
            )?;
            if n == 0 {
                return Err(Error::NotFound(rec.vm_id.to_string()));
            }
            Ok(())
        })
        .await
    }

    /// Removes a VM's row and its history.
    pub async fn delete(&self, _: &Writer, id: &VmId) -> Result<()> {
        let id = id.clone();
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM recovery_attempts WHERE vm_id = ?1",
                params![id.as_str()],
            )?;
            tx.execute(
                "DELETE FROM vm_events WHERE vm_id = ?1",
                params![id.as_str()],
            )?;
            tx.execute("DELETE FROM vms WHERE vm_id = ?1", params![id.as_str()])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Replaces a VM's stored config.
    pub async fn set_spec(&self, _: &Writer, id: &VmId, spec: &VmSpec) -> Result<()> {
        let id = id.clone();
        let text = serde_json::to_string(spec).map_err(|e| Error::CorruptRow {
            vm_id: id.to_string(),
            reason: e.to_string(),
        })?;
        self.run(move |c| {
            let n = c.execute(
                "UPDATE vms SET spec = ?2, updated_at_ms = ?3 WHERE vm_id = ?1",
                params![id.as_str(), text, now_ms()],
            )?;
            if n == 0 {
                return Err(Error::NotFound(id.to_string()));
            }
            Ok(())
        })
        .await
    }

    /// Appends a recovery attempt, keeping the newest [`ATTEMPTS_KEPT`] per VM.
    pub async fn add_attempt(&self, _: &Writer, id: &VmId, a: AttemptRecord) -> Result<()> {
        let id = id.clone();
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO recovery_attempts (vm_id, attempt, started_at_ms, duration_ms, outcome,
                     error, trigger, method) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id.as_str(),
                    a.attempt,
                    a.started_at_ms,
                    a.duration_ms,
                    if a.succeeded { "success" } else { "failure" },
                    a.error,
                    a.trigger,
                    a.method
                ],
            )?;
            tx.execute(
                "DELETE FROM recovery_attempts WHERE vm_id = ?1 AND id NOT IN
                     (SELECT id FROM recovery_attempts WHERE vm_id = ?1 ORDER BY id DESC LIMIT ?2)",
                params![
                    id.as_str(),
                    i64::try_from(ATTEMPTS_KEPT).unwrap_or(i64::MAX)
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Appends an event, keeping the newest `keep` per VM; returns its sequence number.
    pub async fn add_event(&self, _: &Writer, ev: EventRecord, keep: usize) -> Result<i64> {
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO vm_events (vm_id, at_ms, kind, from_state, to_state, reason, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    ev.vm_id,
                    ev.at_ms,
                    ev.kind,
                    ev.from_state,
                    ev.to_state,
                    ev.reason,
                    ev.message
                ],
            )?;
            let seq = tx.last_insert_rowid();
            tx.execute(
                "DELETE FROM vm_events WHERE vm_id = ?1 AND seq NOT IN
                     (SELECT seq FROM vm_events WHERE vm_id = ?1 ORDER BY seq DESC LIMIT ?2)",
                params![ev.vm_id, i64::try_from(keep).unwrap_or(i64::MAX)],
            )?;
            tx.commit()?;
            Ok(seq)
        })
        .await
    }

    /// Events with `seq > after`, oldest first, at most `limit`, for one VM or all.
    pub async fn events(
        &self,
        vm_id: Option<String>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>> {
        self.run(move |c| {
            let lim = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut stmt = c.prepare(
                "SELECT seq, vm_id, at_ms, kind, from_state, to_state, reason, message FROM
                     (SELECT * FROM vm_events WHERE seq > ?1 AND (?2 IS NULL OR vm_id = ?2)
                      ORDER BY seq DESC LIMIT ?3)
                 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![after, vm_id, lim], |r| {
                Ok(EventRecord {
                    seq: r.get(0)?,
                    vm_id: r.get(1)?,
                    at_ms: r.get(2)?,
                    kind: r.get(3)?,
                    from_state: r.get(4)?,
                    to_state: r.get(5)?,
                    reason: r.get(6)?,
                    message: r.get(7)?,
                    customer_id: String::new(),
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records a snapshot.
    pub async fn insert_snapshot(&self, _: &Writer, snap: SnapshotRecord) -> Result<()> {
        let spec = serde_json::to_string(&snap.spec).map_err(|e| Error::CorruptRow {
            vm_id: snap.vm_id.clone(),
            reason: e.to_string(),
        })?;
        self.run(move |c| {
            c.execute(
                "INSERT INTO snapshots (snapshot_id, vm_id, spec, path, created_at_ms, boot,
                     size_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    snap.snapshot_id,
                    snap.vm_id,
                    spec,
                    snap.path.display().to_string(),
                    snap.created_at_ms,
                    snap.boot,
                    i64::try_from(snap.size_bytes).unwrap_or(i64::MAX)
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// One snapshot.
    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let id = id.to_string();
        self.run(move |c| {
            c.query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE snapshot_id = ?1"),
                params![id],
                decode_snapshot,
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Every snapshot (or `vm`'s), oldest first.
    pub async fn snapshots(&self, vm: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let vm = vm.map(str::to_string);
        self.run(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE ?1 IS NULL OR vm_id = ?1
                 ORDER BY created_at_ms, snapshot_id"
            ))?;
            let rows = stmt.query_map(params![vm], decode_snapshot)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r??);
            }
            Ok(out)
        })
        .await
    }

    /// A VM other than `except` whose guest waits in `path` (made from that snapshot, not
    /// started from it yet).
    pub async fn vm_saved_at(&self, path: &Path, except: Option<&str>) -> Result<Option<String>> {
        let path = path.display().to_string();
        let except = except.map(str::to_string);
        self.run(move |c| {
            Ok(c.query_row(
                "SELECT vm_id FROM vms WHERE saved = ?1 AND (?2 IS NULL OR vm_id != ?2) LIMIT 1",
                params![path, except],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Gives snapshot `id` to VM `vm` (one made from it, when the VM it was taken of goes).
    pub async fn reassign_snapshot(&self, _: &Writer, id: &str, vm: &str) -> Result<()> {
        let (id, vm) = (id.to_string(), vm.to_string());
        self.run(move |c| {
            c.execute(
                "UPDATE snapshots SET vm_id = ?2, boot = 0 WHERE snapshot_id = ?1",
                params![id, vm],
            )?;
            Ok(())
        })
        .await
    }

    /// Forgets a snapshot (its files are the caller's to remove, first).
    pub async fn delete_snapshot(&self, _: &Writer, id: &str) -> Result<()> {
        let id = id.to_string();
        self.run(move |c| {
            c.execute("DELETE FROM snapshots WHERE snapshot_id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    /// The answer kept for `request_id`, if it is younger than [`REQUESTS_KEPT_MS`].
    pub async fn request(&self, request_id: &str) -> Result<Option<RequestRecord>> {
        let id = request_id.to_string();
        self.run(move |c| {
            Ok(c.query_row(
                "SELECT method, fingerprint, response FROM requests
                 WHERE request_id = ?1 AND created_at_ms > ?2",
                params![id, now_ms() - REQUESTS_KEPT_MS],
                |r| {
                    Ok(RequestRecord {
                        method: r.get(0)?,
                        fingerprint: r.get(1)?,
                        response: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    /// Keeps the answer to `request_id`, and forgets answers older than [`REQUESTS_KEPT_MS`].
    pub async fn put_request(&self, request_id: &str, rec: RequestRecord) -> Result<()> {
        let id = request_id.to_string();
        self.run(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM requests WHERE created_at_ms <= ?1",
                params![now_ms() - REQUESTS_KEPT_MS],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO requests
                     (request_id, method, fingerprint, response, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, rec.method, rec.fingerprint, rec.response, now_ms()],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Where every recorded snapshot is.
    pub async fn snapshot_paths(&self) -> Result<Vec<PathBuf>> {
        self.run(|c| {
            let mut st = c.prepare("SELECT path FROM snapshots")?;
            let paths = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(paths.into_iter().map(PathBuf::from).collect())
        })
        .await
    }

    /// A VM's recovery attempts, newest first.
    pub async fn attempts(&self, id: &VmId) -> Result<Vec<AttemptRecord>> {
        let id = id.clone();
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT attempt, started_at_ms, duration_ms, outcome, error, trigger, method
                 FROM recovery_attempts WHERE vm_id = ?1 ORDER BY id DESC",
            )?;
            let rows = stmt.query_map(params![id.as_str()], |r| {
                Ok(AttemptRecord {
                    attempt: r.get(0)?,
                    started_at_ms: r.get(1)?,
                    duration_ms: r.get(2)?,
                    succeeded: r.get::<_, String>(3)? == "success",
                    error: r.get(4)?,
                    trigger: r.get(5)?,
                    method: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One VM's row.
    pub async fn get(&self, id: &VmId) -> Result<Option<VmRecord>> {
        let id = id.clone();
        self.run(move |c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM vms WHERE vm_id = ?1"),
                params![id.as_str()],
                |r| Ok(decode(r)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Every row, ordered by id.
    pub async fn all(&self) -> Result<Vec<VmRecord>> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!("SELECT {COLUMNS} FROM vms ORDER BY vm_id"))?;
            let rows = stmt.query_map([], |r| Ok(decode(r)))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r??);
            }
            Ok(out)
        })
        .await
    }

    /// A page of rows with `vm_id > after`, ordered by id, filtered by observed state (all
    /// states when `states` is empty), plus the total count matching the filter. Rows being
    /// deleted are left out.
    pub async fn page(
        &self,
        states: Vec<VmState>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<VmRecord>, usize)> {
        self.run(move |c| {
            let filter = if states.is_empty() {
                String::new()
            } else {
                let list: Vec<String> =
                    states.iter().map(|s| format!("'{}'", s.as_str())).collect();
                format!(" AND observed_state IN ({})", list.join(","))
            };
            let total: i64 = c.query_row(
                &format!("SELECT COUNT(*) FROM vms WHERE desired_state != 'deleted'{filter}"),
                [],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare(&format!(
                "SELECT {COLUMNS} FROM vms WHERE desired_state != 'deleted' AND vm_id > ?1{filter}
                 ORDER BY vm_id LIMIT ?2"
            ))?;
            let lim = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows =
                stmt.query_map(params![after.unwrap_or_default(), lim], |r| Ok(decode(r)))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r??);
            }
            Ok((out, usize::try_from(total).unwrap_or(0)))
        })
        .await
    }

    /// The host mode an operator set, if any.
    pub async fn host_mode(&self) -> Result<Option<crate::host::HostMode>> {
        self.run(|c| {
            let v: Option<String> = c
                .query_row("SELECT value FROM host WHERE key = 'mode'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
        })
        .await
    }

    /// Records the host mode an operator set.
    pub async fn set_host_mode(&self, m: &crate::host::HostMode) -> Result<()> {
        let v = serde_json::to_string(m).unwrap_or_default();
        self.run(move |c| {
            c.execute(
                "INSERT INTO host (key, value) VALUES ('mode', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![v],
            )?;
            Ok(())
        })
        .await
    }

    /// A write that changes nothing of consequence, to learn whether the registry takes writes.
    pub async fn probe_write(&self) -> Result<()> {
        self.run(|c| {
            c.execute(
                "INSERT INTO host (key, value) VALUES ('probe', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![now_ms().to_string()],
            )?;
            Ok(())
        })
        .await
    }

    /// Runs a WAL checkpoint, so the main database file holds every committed change.
    pub async fn checkpoint(&self) -> Result<()> {
        self.run(|c| {
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
            Ok(())
        })
        .await
    }
}

const COLUMNS: &str = "vm_id, customer_id, spec, desired_state, observed_state, pid, start_time, \
                       control_socket, console_log, last_exit, created_at_ms, updated_at_ms, \
                       health, orphan_reason, orphaned_at_ms, recovery_streak, guest, saved";

fn decode(r: &Row<'_>) -> Result<VmRecord> {
    let id: String = r.get(0)?;
    let corrupt = |reason: String| Error::CorruptRow {
        vm_id: id.clone(),
        reason,
    };
    let vm_id = VmId::parse("vm_id", &id).map_err(|e| corrupt(e.to_string()))?;
    let spec: String = r.get(2)?;
    let spec: VmSpec = serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?;
    let desired: String = r.get(3)?;
    let desired =
        Desired::from_db(&desired).ok_or_else(|| corrupt(format!("desired_state {desired:?}")))?;
    let observed: String = r.get(4)?;
    let observed = VmState::from_db(&observed)
        .ok_or_else(|| corrupt(format!("observed_state {observed:?}")))?;
    let pid: Option<i32> = r.get(5)?;
    let start_time: Option<i64> = r.get(6)?;
    let sock: Option<String> = r.get(7)?;
    let console: Option<String> = r.get(8)?;
    let endpoint = match (pid, start_time, sock) {
        (Some(pid), Some(st), Some(sock)) => Some(VmmEndpoint {
            pid,
            start_time: u64::try_from(st).unwrap_or(0),
            control_socket: PathBuf::from(sock),
            console_log: PathBuf::from(console.clone().unwrap_or_default()),
        }),
        _ => None,
    };
    Ok(VmRecord {
        vm_id,
        customer_id: r.get(1)?,
        spec,
        desired,
        observed,
        endpoint,
        last_exit: r.get(9)?,
        created_at_ms: r.get(10)?,
        updated_at_ms: r.get(11)?,
        health: r
            .get::<_, Option<String>>(12)?
            .and_then(|h| serde_json::from_str(&h).ok())
            .unwrap_or_default(),
        orphan_reason: r
            .get::<_, Option<String>>(13)?
            .and_then(|s| OrphanReason::parse(&s)),
        orphaned_at_ms: r.get(14)?,
        recovery_streak: r.get(15)?,
        guest: r
            .get::<_, Option<String>>(16)?
            .and_then(|g| serde_json::from_str(&g).ok())
            .unwrap_or_default(),
        saved: r.get::<_, Option<String>>(17)?.map(PathBuf::from),
    })
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let current = usize::try_from(version).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(Error::Config(format!(
            "registry schema version {current} is newer than this metald ({}); refusing to \
             downgrade it",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Target;
    use std::collections::BTreeMap;

    fn rec(id: &str) -> VmRecord {
        VmRecord {
            vm_id: VmId::parse("vm_id", id).unwrap(),
            customer_id: "c1".into(),
            spec: VmSpec {
                vcpus: 1,
                memory_bytes: 128 << 20,
                kernel: "/k".into(),
                initrd: None,
                kernel_args: String::new(),
                drives: vec![],
                nics: vec![],
                console: true,
                metadata: BTreeMap::from([("a".into(), "b".into())]),
                restart_policy: Default::default(),
                auto_recover: true,
                vmm: None,
                vsock_cid: None,
                guest_health: Default::default(),
                vmm_binary: None,
                restore_from: Default::default(),
            },
            desired: Desired::State(Target::Created),
            observed: VmState::Created,
            endpoint: None,
            last_exit: None,
            created_at_ms: 1,
            updated_at_ms: 1,
            health: HealthStatus::default(),
            orphan_reason: None,
            orphaned_at_ms: None,
            recovery_streak: 0,
            guest: Default::default(),
            saved: None,
        }
    }

    #[tokio::test]
    async fn wal_roundtrip_pages_and_reopen() {
        let dir = std::env::temp_dir().join(format!("metald-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db");
        {
            let s = Store::open(&path).unwrap().0;
            for i in 0..5 {
                s.insert(&Writer(()), rec(&format!("vm{i}"))).await.unwrap();
            }
            assert!(matches!(
                s.insert(&Writer(()), rec("vm1")).await,
                Err(Error::AlreadyExists(_))
            ));
            let id = VmId::parse("vm_id", "vm3").unwrap();
            let ep = VmmEndpoint {
                pid: 42,
                start_time: 7,
                control_socket: "/s".into(),
                console_log: "/c".into(),
            };
            s.set_desired(&Writer(()), &id, Desired::State(Target::Running))
                .await
                .unwrap();
            let mut r = s.get(&id).await.unwrap().unwrap();
            r.observed = VmState::Running;
            r.endpoint = Some(ep.clone());
            r.orphan_reason = Some(OrphanReason::PidReused);
            r.health.consecutive_failures = 3;
            s.save_runtime(&Writer(()), &r).await.unwrap();
            let got = s.get(&id).await.unwrap().unwrap();
            assert_eq!(got.endpoint, Some(ep));
            assert_eq!(got.observed, VmState::Running);
            assert_eq!(got.orphan_reason, Some(OrphanReason::PidReused));
            assert_eq!(got.health.consecutive_failures, 3);
            let (page, total) = s.page(vec![], None, 2).await.unwrap();
            assert_eq!(total, 5);
            assert_eq!(page.len(), 2);
            let (page2, _) = s.page(vec![], Some("vm1".into()), 10).await.unwrap();
            assert_eq!(page2.first().map(|r| r.vm_id.as_str()), Some("vm2"));
            let (running, n) = s.page(vec![VmState::Running], None, 10).await.unwrap();
            assert_eq!((running.len(), n), (1, 1));
            s.set_desired(
                &Writer(()),
                &VmId::parse("vm_id", "vm4").unwrap(),
                Desired::Deleted,
            )
            .await
            .unwrap();
            assert_eq!(s.page(vec![], None, 10).await.unwrap().1, 4);
        }
        let s = Store::open(&path).unwrap().0;
        let mode: String = s
            .conn
            .lock()
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let all = s.all().await.unwrap();
        assert_eq!(all.len(), 5);
        let id = VmId::parse("vm_id", "vm0").unwrap();
        for n in 0..(ATTEMPTS_KEPT as u32 + 5) {
            s.add_attempt(
                &Writer(()),
                &id,
                AttemptRecord {
                    attempt: n,
                    started_at_ms: 1,
                    duration_ms: 2,
                    succeeded: false,
                    error: "e".into(),
                    trigger: "process_dead".into(),
                    method: "restart".into(),
                },
            )
            .await
            .unwrap();
        }
        let hist = s.attempts(&id).await.unwrap();
        assert_eq!(hist.len(), ATTEMPTS_KEPT);
        assert_eq!(hist[0].attempt, ATTEMPTS_KEPT as u32 + 4, "newest first");
        s.delete(&Writer(()), &id).await.unwrap();
        assert!(s.attempts(&id).await.unwrap().is_empty());
        assert_eq!(all[0].spec.metadata.get("a").map(String::as_str), Some("b"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
