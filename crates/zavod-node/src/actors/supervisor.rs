//! The node's supervisor: spawns the five actors linked to itself and
//! restarts any that fails or stops unexpectedly, after a backoff that
//! doubles while a child keeps failing soon after its start and resets once
//! it has run for `restart_reset_after_ms`. It never gives up: a node whose
//! engine keeps crashing stays up, serving errors and retrying, instead of
//! disappearing from the mesh.

use super::NodeShared;
use super::breaker::Breaker;
use super::gpu_monitor::GpuMonitor;
use super::memory_keeper::MemoryKeeper;
use super::model_worker::ModelWorker;
use super::router::Router;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Child {
    GpuMonitor,
    Breaker,
    MemoryKeeper,
    Router,
    /// The worker of the model at this index of `NodeShared::models`.
    ModelWorker(usize),
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::GpuMonitor => "GpuMonitor",
            Child::Breaker => "Breaker",
            Child::MemoryKeeper => "MemoryKeeper",
            Child::Router => "Router",
            Child::ModelWorker(_) => "ModelWorker",
        }
    }
}

pub(crate) struct NodeSupervisor;

pub(crate) enum SupervisorMsg {
    Restart(Child),
    /// How many times each child was restarted (for tests and status).
    Restarts(ractor::RpcReplyPort<BTreeMap<Child, u32>>),
}

impl ractor::Message for SupervisorMsg {}

struct Backoff {
    next: Duration,
    started: Instant,
    restarts: u32,
}

pub(crate) struct SupervisorState {
    shared: Arc<NodeShared>,
    children: BTreeMap<ActorId, Child>,
    backoff: BTreeMap<Child, Backoff>,
}

async fn spawn_child(
    child: Child,
    shared: &Arc<NodeShared>,
    sup: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    let s = Arc::clone(shared);
    let cell = match child {
        Child::GpuMonitor => {
            let (r, _) = Actor::spawn_linked(None, GpuMonitor, s, sup).await?;
            shared.directory.update(|d| d.monitor = Some(r.clone()));
            r.get_cell()
        }
        Child::Breaker => {
            let cfg = shared.config.breaker.clone();
            let (r, _) = Actor::spawn_linked(None, Breaker, cfg, sup).await?;
            shared.directory.update(|d| d.breaker = Some(r.clone()));
            r.get_cell()
        }
        Child::MemoryKeeper => {
            let (r, _) = Actor::spawn_linked(None, MemoryKeeper, s, sup).await?;
            shared.directory.update(|d| d.memory = Some(r.clone()));
            r.get_cell()
        }
        Child::Router => {
            let (r, _) = Actor::spawn_linked(None, Router, s, sup).await?;
            shared.directory.update(|d| d.router = Some(r.clone()));
            r.get_cell()
        }
        Child::ModelWorker(i) => {
            let (r, _) = Actor::spawn_linked(None, ModelWorker, (s, i), sup).await?;
            shared.directory.update(|d| {
                d.workers.insert(i, r.clone());
            });
            r.get_cell()
        }
    };
    Ok(cell)
}

impl SupervisorState {
    fn forget(&self, child: Child) {
        self.shared.directory.update(|d| match child {
            Child::GpuMonitor => d.monitor = None,
            Child::Breaker => d.breaker = None,
            Child::MemoryKeeper => d.memory = None,
            Child::Router => d.router = None,
            Child::ModelWorker(i) => {
                d.workers.remove(&i);
            }
        });
    }

    fn schedule_restart(&mut self, myself: &ActorRef<SupervisorMsg>, child: Child) {
        let sup = &self.shared.config.supervisor;
        let initial = Duration::from_millis(sup.restart_backoff_initial_ms);
        let max = Duration::from_millis(sup.restart_backoff_max_ms);
        let reset_after = Duration::from_millis(sup.restart_reset_after_ms);
        let b = self.backoff.entry(child).or_insert(Backoff {
            next: initial,
            started: Instant::now(),
            restarts: 0,
        });
        if b.started.elapsed() >= reset_after {
            b.next = initial;
        }
        let delay = b.next;
        b.next = (b.next * 2).min(max);
        b.restarts += 1;
        tracing::warn!(
            child = child.name(),
            delay_ms = delay.as_millis() as u64,
            "restarting after backoff"
        );
        myself.send_after(delay, move || SupervisorMsg::Restart(child));
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<NodeShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut st = SupervisorState {
            shared,
            children: BTreeMap::new(),
            backoff: BTreeMap::new(),
        };
        let mut kids = vec![
            Child::Breaker,
            Child::MemoryKeeper,
            Child::Router,
            Child::GpuMonitor,
        ];
        kids.extend((0..st.shared.models.len()).map(Child::ModelWorker));
        for child in kids {
            // At start every child must come up; a node that cannot start
            // its engine reports why instead of retrying silently.
            let cell = spawn_child(child, &st.shared, myself.get_cell()).await?;
            st.children.insert(cell.get_id(), child);
            st.backoff.insert(
                child,
                Backoff {
                    next: Duration::from_millis(
                        st.shared.config.supervisor.restart_backoff_initial_ms,
                    ),
                    started: Instant::now(),
                    restarts: 0,
                },
            );
        }
        Ok(st)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(child) => {
                match spawn_child(child, &st.shared, myself.get_cell()).await {
                    Ok(cell) => {
                        st.children.insert(cell.get_id(), child);
                        if let Some(b) = st.backoff.get_mut(&child) {
                            b.started = Instant::now();
                        }
                        tracing::info!(child = child.name(), "restarted");
                    }
                    Err(e) => {
                        tracing::error!(child = child.name(), error = %e, "restart failed");
                        st.schedule_restart(&myself, child);
                    }
                }
            }
            SupervisorMsg::Restarts(reply) => {
                let counts = st.backoff.iter().map(|(c, b)| (*c, b.restarts)).collect();
                let _ = reply.send(counts);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!("stopped: {}", reason.unwrap_or_else(|| "no reason".into())),
            ),
            _ => return Ok(()),
        };
        if let Some(child) = st.children.remove(&cell.get_id()) {
            tracing::error!(child = child.name(), reason = %why, "child actor ended");
            st.forget(child);
            st.schedule_restart(&myself, child);
        }
        Ok(())
    }
}
