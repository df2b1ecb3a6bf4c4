//! The guest side of a VM: its agent connection and its probes, run for the VM's controller.
//!
//! Each VMM that has a guest agent channel gets one agent task, started and stopped by the VM's
//! controller with the VMM. The task holds the one connection to the agent (a QGA channel serves
//! one client) and does two things over it: it probes the guest on the VM's interval with
//! `guest-ping`, bounded by the probe timeout, and reports every result to the controller; and
//! it runs the controller's agent operations (guest info, guest shutdown) between probes. It
//! only reports: readiness, failures and what follows are decided by the controller, the VM's
//! one writer. A probe waiting on a silent guest therefore never holds up an API call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::GuestHealthConfig;
use crate::driver::qga::{Agent, GuestInfo};
use crate::driver::{DriverError, VmmControl};

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// `Ok` when the agent answered; otherwise why not.
    pub outcome: Result<(), String>,
    /// How long the probe took.
    pub took: Duration,
}

enum AgentOp {
    Info(oneshot::Sender<Result<GuestInfo, DriverError>>),
    Shutdown(oneshot::Sender<Result<(), DriverError>>),
}

/// The controller's end of a VMM's agent task. Dropping it stops the task and closes the
/// connection.
#[derive(Debug)]
pub struct AgentHandle {
    tx: mpsc::Sender<AgentOp>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long an agent operation other than a probe may take.
const OP_TIMEOUT: Duration = Duration::from_secs(3);

impl AgentHandle {
    /// Starts the agent task for the VMM `vmm`. With `probe` it pings the guest every
    /// `cfg.interval` and sends each result on the returned receiver; without, it only serves
    /// operations.
    pub fn start(
        vmm: Arc<dyn VmmControl>,
        cfg: GuestHealthConfig,
        probe: bool,
    ) -> (AgentHandle, mpsc::Receiver<ProbeResult>) {
        let (tx, rx) = mpsc::channel(4);
        let (res_tx, res_rx) = mpsc::channel(8);
        let task = tokio::spawn(run(vmm, cfg, probe, rx, res_tx));
        (AgentHandle { tx, task }, res_rx)
    }

    /// Asks the agent about its guest.
    pub async fn info(&self) -> Result<GuestInfo, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(AgentOp::Info(reply))
            .await
            .map_err(|_| DriverError::Closed)?;
        rx.await.map_err(|_| DriverError::Closed)?
    }

    /// Asks the agent to power the guest off (`guest-shutdown`). Returns once the request was
    /// delivered; the caller waits for the VMM's exit.
    pub async fn shutdown(&self) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(AgentOp::Shutdown(reply))
            .await
            .map_err(|_| DriverError::Closed)?;
        rx.await.map_err(|_| DriverError::Closed)?
    }
}

async fn run(
    vmm: Arc<dyn VmmControl>,
    cfg: GuestHealthConfig,
    probe: bool,
    mut ops: mpsc::Receiver<AgentOp>,
    results: mpsc::Sender<ProbeResult>,
) {
    let mut agent: Option<Agent> = None;
    // The first probe goes at once: a guest restored from a snapshot or moved to a new VMM
    // answers right away, and is ready an interval sooner; a booting guest's early failures
    // count for nothing (its startup deadline judges it).
    let mut next = Instant::now();
    loop {
        let due = async {
            if probe {
                tokio::time::sleep_until(next.into()).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            op = ops.recv() => {
                let Some(op) = op else { break };
                match op {
                    AgentOp::Info(reply) => {
                        let r = with_agent(OP_TIMEOUT, &mut agent, &*vmm, |a| Box::pin(a.info())).await;
                        let _ = reply.send(r);
                    }
                    AgentOp::Shutdown(reply) => {
                        // The agent answers guest-shutdown only with an error; a short wait for
                        // one, then it counts as delivered.
                        let r = with_agent(OP_TIMEOUT, &mut agent, &*vmm, |a| {
                            Box::pin(async move {
                                a.send_only("guest-shutdown", Some(serde_json::json!({"mode": "powerdown"}))).await?;
                                match tokio::time::timeout(Duration::from_millis(300), a.call("guest-ping", None)).await {
                                    Ok(Err(e @ DriverError::Refused { .. })) => Err(e),
                                    _ => Ok(()),
                                }
                            })
                        })
                        .await;
                        // Whatever it answered, the channel is out of step now.
                        agent = None;
                        let _ = reply.send(r);
                    }
                }
            }
            _ = due => {
                // Probes start on a fixed cadence; a slow probe delays the next, never stacks.
                next = Instant::now() + cfg.interval;
                let started = Instant::now();
                let r = with_agent(cfg.timeout, &mut agent, &*vmm, |a| {
                    Box::pin(async move { a.call("guest-ping", None).await.map(|_| ()) })
                })
                .await;
                let result = ProbeResult {
                    outcome: r.map_err(|e| e.to_string()),
                    took: started.elapsed(),
                };
                if results.send(result).await.is_err() {
                    break;
                }
            }
        }
    }
}

type AgentFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, DriverError>> + Send + 'a>>;

/// Runs `f` on the agent connection, connecting first when there is none, all within `limit`.
/// A connection that failed is dropped (the next use reconnects); one that only timed out is
/// kept, and its next command syncs it.
async fn with_agent<T>(
    limit: Duration,
    agent: &mut Option<Agent>,
    vmm: &dyn VmmControl,
    f: impl for<'a> FnOnce(&'a mut Agent) -> AgentFuture<'a, T>,
) -> Result<T, DriverError> {
    let work = async {
        if agent.is_none() {
            *agent = Some(Agent::new(vmm.agent_connect().await?));
        }
        match agent.as_mut() {
            Some(a) => f(a).await,
            None => Err(DriverError::Closed),
        }
    };
    let r = crate::driver::bounded(|| "the guest agent".into(), limit, work).await;
    // A connection that failed is dropped; one that timed out is kept (its next command syncs).
    if let Err(e) = &r
        && !matches!(e, DriverError::Refused { .. } | DriverError::Timeout { .. })
    {
        *agent = None;
    }
    r
}
