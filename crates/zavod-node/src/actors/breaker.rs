//! Breaker: one circuit per peer (zavod_proto::mesh::breaker). The Router asks
//! which candidates are routable, places among them, then confirms its
//! choice here, which takes a half-open peer's single probe slot; request
//! outcomes are recorded here, and a placement that ends without one
//! releases the slot it held.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use zavod_proto::mesh::breaker::{BreakerBoard, BreakerConfig, BreakerState, Outcome};
use zavod_proto::{NodeId, RequestId};

use crate::clock::now_ms;

pub(crate) struct Breaker;

pub enum BreakerMsg {
    /// Keeps the routable nodes, in the given order (no side effect).
    Filter {
        nodes: Vec<NodeId>,
        reply: RpcReplyPort<Vec<NodeId>>,
    },
    /// Confirms that `request` may go to `node`: false when its circuit
    /// opened meanwhile, or it is half-open and its probe is taken.
    Acquire {
        node: NodeId,
        request: RequestId,
        until_ms: u64,
        reply: RpcReplyPort<bool>,
    },
    /// `request`, placed on `node`, is over.
    Release {
        node: NodeId,
        request: RequestId,
    },
    Record {
        node: NodeId,
        outcome: Outcome,
    },
    States(RpcReplyPort<Vec<(NodeId, BreakerState)>>),
}

impl ractor::Message for BreakerMsg {}

impl Actor for Breaker {
    type Msg = BreakerMsg;
    type State = BreakerBoard;
    type Arguments = BreakerConfig;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        cfg: BreakerConfig,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(BreakerBoard::new(cfg))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        board: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        match msg {
            BreakerMsg::Filter { nodes, reply } => {
                let ok = nodes
                    .into_iter()
                    .filter(|n| board.is_routable(n, now))
                    .collect();
                let _ = reply.send(ok);
            }
            BreakerMsg::Acquire {
                node,
                request,
                until_ms,
                reply,
            } => {
                let _ = reply.send(board.try_acquire(&node, request, now, until_ms));
            }
            BreakerMsg::Release { node, request } => board.release(&node, request),
            BreakerMsg::Record { node, outcome } => {
                let before = board.state(&node, now);
                board.record(&node, outcome, now);
                let after = board.state(&node, now);
                if before.name() != after.name() {
                    tracing::warn!(peer = %node.short(), from = before.name(), to = after.name(), "breaker changed state");
                }
            }
            BreakerMsg::States(reply) => {
                let _ = reply.send(board.states(now));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The half-open rule as the node keeps it: however many requests
    /// want a recovering peer at once, one probe goes through until its
    /// outcome, or its end, is known.
    #[tokio::test]
    async fn a_half_open_peer_gets_one_probe_at_a_time() {
        let cfg = BreakerConfig {
            failure_threshold: 1,
            open_ms: 1,
        };
        let (b, handle) = Actor::spawn(None, Breaker, cfg).await.expect("spawn");
        let peer = NodeId([7; 32]);
        b.cast(BreakerMsg::Record {
            node: peer,
            outcome: Outcome::Failure,
        })
        .expect("cast");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let until = now_ms() + 60_000;
        let acquire = |request: u128| {
            let b = b.clone();
            async move {
                ractor::call_t!(
                    b,
                    |reply| BreakerMsg::Acquire {
                        node: peer,
                        request: RequestId(request),
                        until_ms: until,
                        reply,
                    },
                    1_000
                )
                .expect("call")
            }
        };
        let filter = || {
            let b = b.clone();
            async move {
                ractor::call_t!(
                    b,
                    |reply| BreakerMsg::Filter {
                        nodes: vec![peer],
                        reply,
                    },
                    1_000
                )
                .expect("call")
            }
        };
        assert_eq!(filter().await, vec![peer], "half-open: may be tried");
        assert!(acquire(1).await, "the probe");
        assert!(filter().await.is_empty(), "the probe is out");
        assert!(!acquire(2).await, "a second request is not let through");
        // The probe was cancelled before any outcome: the slot is free.
        b.cast(BreakerMsg::Release {
            node: peer,
            request: RequestId(1),
        })
        .expect("cast");
        assert!(acquire(3).await);
        b.cast(BreakerMsg::Record {
            node: peer,
            outcome: Outcome::Success,
        })
        .expect("cast");
        assert!(acquire(4).await && acquire(5).await, "closed again");
        b.stop(None);
        handle.await.expect("stopped");
    }
}
