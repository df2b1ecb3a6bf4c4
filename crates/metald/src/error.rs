//! The library's error type. Each variant maps to one gRPC status code in [`crate::api`], so a
//! caller always learns which field or precondition was at fault.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside metald.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is invalid; `field` is the request path (for example `config.cpu.vcpu_count`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Dotted path of the offending request field.
        field: String,
        /// Why the value was refused.
        reason: String,
    },
    /// No VM with this id exists.
    #[error("vm {0} not found")]
    NotFound(String),
    /// A VM with this id exists already.
    #[error("vm {0} already exists")]
    AlreadyExists(String),
    /// The operation is not valid in the VM's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The VM's controller is busy or gone (the daemon is shutting down).
    #[error("vm {0} is unavailable: {1}")]
    Unavailable(String, String),
    /// The host's mode refuses the call (readonly).
    #[error("{0}")]
    HostMode(String),
    /// A wait ran out before what it waited for happened.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The VMM driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The registry failed.
    #[error("registry: {0}")]
    Store(#[from] rusqlite::Error),
    /// A state change the lifecycle table does not allow (`model::VmState::observe`): a bug in
    /// metald, refused rather than recorded.
    #[error("illegal state change of vm {vm_id}: {from} -> {to} ({cause})")]
    IllegalTransition {
        /// The VM.
        vm_id: String,
        /// Its observed state.
        from: &'static str,
        /// The state it was to be set to.
        to: &'static str,
        /// What moved it.
        cause: &'static str,
    },
    /// A registry row could not be decoded.
    #[error("registry row for vm {vm_id} is corrupt: {reason}")]
    CorruptRow {
        /// The VM whose row is corrupt.
        vm_id: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A filesystem or OS call failed.
    #[error("{context}: {source}")]
    Io {
        /// What metald was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A migration failed at `step`; the guest stayed in its VMM, the VM unchanged.
    #[error("migration failed at step {step}: {reason}; the guest stays in its VMM")]
    MigrationFailed {
        /// The step that failed.
        step: MigrationStep,
        /// Why.
        reason: String,
    },
    /// A create would pass a quota (`[quota]`): the message names the cap and what is in use.
    #[error("{0}")]
    QuotaExceeded(String),
}

/// The steps of a migration, named in its errors and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStep {
    /// Starting the new VMM beside the running one.
    StartTarget,
    /// Moving the guest's state into it.
    Transfer,
    /// A delete of the VM arrived and won.
    Cancelled,
}

impl MigrationStep {
    /// Stable name, for logs, events and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStep::StartTarget => "start_target",
            MigrationStep::Transfer => "transfer",
            MigrationStep::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for MigrationStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether this is the registry refusing writes for a reason of the host's (a full disk, an
    /// I/O error, a read-only file system), rather than a fault in the request.
    pub fn registry_unwritable(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            Error::Store(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                C::DiskFull
                    | C::ReadOnly
                    | C::SystemIoFailure
                    | C::CannotOpen
                    | C::DatabaseBusy
                    | C::DatabaseLocked
                    | C::OutOfMemory
            ),
            Error::Io { source, .. } => is_resource_fault(source),
            _ => false,
        }
    }

    /// Wraps an I/O error with what metald was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether an OS error is the host running out of space, files or memory (the caller may retry
/// once it is back): RESOURCE_EXHAUSTED.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC | libc::EDQUOT | libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::EAGAIN
        )
    )
}

/// Whether an OS error is the host running out of something or failing (a full disk, quota,
/// read-only file system, I/O error, no memory, too many files), not a fault in the request.
pub fn is_resource_fault(e: &std::io::Error) -> bool {
    is_exhaustion(e) || matches!(e.raw_os_error(), Some(libc::EROFS | libc::EIO))
}

/// Errors from a VMM driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The VMM process could not be started.
    #[error("starting the VMM failed: {0}")]
    Spawn(String),
    /// The VMM's control socket did not appear or could not be reached.
    #[error("control socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
        /// Nobody is listening there (missing file, connection refused). False when something
        /// is listening but not accepting, as with a stopped VMM whose backlog is full.
        unreachable: bool,
    },
    /// The VMM did not answer in time.
    #[error("the VMM did not answer {what} within {millis} ms")]
    Timeout {
        /// The command that timed out.
        what: String,
        /// The timeout.
        millis: u128,
    },
    /// The VMM answered with an error.
    #[error("the VMM refused {what}: {reason}")]
    Refused {
        /// The command.
        what: String,
        /// The VMM's error message.
        reason: String,
    },
    /// The VMM spoke something other than its protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The VMM exited while starting.
    #[error("the VMM exited during start-up: {0}")]
    EarlyExit(String),
    /// A VM's config cannot run on this driver; `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidSpec {
        /// Dotted path of the request field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The driver does not support this operation.
    #[error("{0} is not supported by the {1} driver")]
    Unsupported(&'static str, &'static str),
    /// An OS call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The VMM closed its control connection (it is exiting, or was told to quit).
    #[error("the VMM closed its control connection")]
    Closed,
}
