//! metald: a per-host daemon that runs customer workloads in microVMs, one VMM process per VM, and
//! keeps them running.
//!
//! The layers, from the wire down:
//!
//! * [`api`] parses and validates gRPC requests, then hands typed operations to the
//!   [`supervisor`], which routes each to the one [`controller`] that owns the VM.
//! * [`controller`]: one actor task per VM. It records the desired state in the [`store`] first,
//!   then drives the VMM toward it through a [`driver`], and watches the VMM process for exit.
//! * [`driver`]: the VMM drivers behind one trait (QEMU `microvm` over QMP, Firecracker over its
//!   REST API), and the guest agent protocol both use.
//! * [`process`]: pidfds, `/proc` inspection and detached spawning; never trusts a bare pid.
//! * [`store`]: the SQLite registry (WAL), the single source of truth.
//!
//! Beside them: [`guest`] (each VMM's guest agent task, reporting to its controller),
//! [`host`] (the host's mode: normal, readonly, maintenance), [`config`], [`model`] (validated VM specs and the lifecycle state machine),
//! [`daemon`] (wiring, listeners, health and reflection, bounded shutdown), [`transport`] (the
//! unix socket's HTTP/2 `:authority` fix that lets every stock gRPC client in) and [`telemetry`]
//! (structured logs).
// Casts that can truncate, wrap, lose a sign or precision, and indexing that can panic, are
// refused in the daemon's code: a bad length or a huge number from a VMM, the registry or a
// client must become an error value, never a panic or a silently wrong figure. Tests may index.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    clippy::cast_lossless,
    clippy::indexing_slicing
)]
#![cfg_attr(
    test,
    allow(
        clippy::indexing_slicing,
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap
    )
)]

pub mod api;
pub mod auth;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod events;
pub mod guest;
pub mod host;
pub mod logtail;
pub mod metrics;
pub mod model;
pub mod process;
pub mod recovery;
pub mod store;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod transport;
#[cfg(test)]
mod validate_props;

pub use error::{Error, Result};

/// A step boundary inside a multi-step operation where tests can kill metald (feature
/// `failpoints`): with `FAILPOINTS=<name>=return` in its environment, metald aborts right there,
/// as a SIGKILL at that instant would. Without the feature it compiles to nothing.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| { std::process::abort() })
    };
}
