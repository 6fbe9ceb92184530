//! Breaker: one circuit per peer (zavod_proto::breaker). The Router asks
//! which candidates are routable; request outcomes are recorded here.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use zavod_proto::NodeId;
use zavod_proto::breaker::{BreakerBoard, BreakerConfig, BreakerState, Outcome};

use crate::clock::now_ms;

pub struct Breaker;

pub enum BreakerMsg {
    /// Keeps the routable nodes, in the given order. For a half-open peer
    /// this takes its single probe slot.
    Filter {
        nodes: Vec<NodeId>,
        reply: RpcReplyPort<Vec<NodeId>>,
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
