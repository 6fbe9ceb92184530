//! A credential holder's own conversations, over the mesh: the memory
//! protocol's operations (list, export, delete one or all, keep a turn
//! whose entry failed) and the facts kept about a holder across its
//! conversations (long-term memory). The MemoryKeeper starts each in a
//! task of its own; a list asks every member, a deletion is a replicated
//! write that raises the conversation's floor, and what a kept turn is
//! ([`turn_entry`]) is the same here and on a chat's entry.

use crate::actors::memory_keeper::check_room;
use crate::actors::{NodeShared, error_frame};
use crate::replication::{self, Written};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::ids::ConversationId;
use zavod_proto::limits::MAX_LISTED_CONVERSATIONS;
use zavod_proto::memory::recall::{Scope, fact_turns, facts_in};
use zavod_proto::memory::{ConvKey, Entry, deletion_floor};
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};
use zavod_proto::wire::replica::{ReplicaReply, ReplicaRequest};
use zavod_proto::wire::{ErrorCode, ErrorFrame};

fn refused(e: ErrorFrame) -> MemoryReply {
    MemoryReply::Refused(e)
}

/// Asks every member this node takes to be alive, at once; their answers
/// in member order (a member that does not answer is left out).
async fn ask_members(
    shared: &Arc<NodeShared>,
    req: ReplicaRequest,
) -> Result<Vec<ReplicaReply>, ErrorFrame> {
    let (alive, _) = replication::members(shared).await?;
    let t = Duration::from_millis(shared.config.memory.replica_timeout_ms);
    let mut tasks = tokio::task::JoinSet::new();
    for m in alive {
        let (s, req) = (Arc::clone(shared), req.clone());
        tasks.spawn(async move { crate::protocol::replica::ask(&s, m, req, t).await });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Ok(reply)) = r {
            out.push(reply);
        }
    }
    Ok(out)
}

/// The holder's conversations anywhere in the mesh, by name.
async fn list(
    shared: &Arc<NodeShared>,
    owner: NodeId,
) -> Result<(Vec<zavod_proto::ConversationId>, bool), ErrorFrame> {
    let mut names = BTreeSet::new();
    let mut truncated = false;
    for reply in ask_members(shared, ReplicaRequest::List { owner }).await? {
        if let ReplicaReply::Names {
            names: n,
            truncated: t,
        } = reply
        {
            truncated |= t;
            names.extend(n);
        }
    }
    let mut names: Vec<_> = names.into_iter().collect();
    truncated |= names.len() > MAX_LISTED_CONVERSATIONS;
    names.truncate(MAX_LISTED_CONVERSATIONS);
    Ok((names, truncated))
}

/// Deletes one conversation on every replica: a replicated write that
/// raises its floor past everything read and past now. Whether any of it
/// was held.
async fn delete(shared: &Arc<NodeShared>, key: &ConvKey) -> Result<bool, ErrorFrame> {
    let held = replication::read(shared, key, false).await?;
    let newest = held.entries.last().map(|e| e.stamp.seq);
    let floor = deletion_floor(newest, held.floor, crate::clock::now_ms());
    if let Err(e) = replication::write(shared, key, floor, Vec::new()).await {
        return Err(error_frame(
            e.code,
            format!("the deletion did not reach enough replicas: {}", e.message),
        ));
    }
    // The facts about the holder that it stated go with it.
    if !key.conversation.is_reserved() {
        forget_facts_from(shared, key).await?;
    }
    Ok(!held.entries.is_empty())
}

/// Keeps a turn whose whole answer a target signed for but whose entry
/// failed before keeping it: the receipt must be a member's, for this
/// holder and this answer. Returns whether the turn was already kept.
async fn keep(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    turn: u64,
    message: String,
    answer: String,
    receipt: &zavod_proto::trust::Receipt,
) -> Result<bool, ErrorFrame> {
    let bad = |m: String| error_frame(ErrorCode::BadRequest, m);
    let body = receipt
        .verify(&receipt.signer, receipt.body.request, &answer)
        .map_err(|e| bad(format!("the answer's receipt does not hold: {e}")))?;
    if body.client != key.owner {
        return Err(bad("the answer's receipt is for another client".into()));
    }
    let (alive, _) = replication::members(shared).await?;
    if !alive.contains(&receipt.signer) {
        return Err(bad(format!(
            "the answer's receipt is signed by {}, not a member this node knows alive",
            receipt.signer.short()
        )));
    }
    let tokens = body.generated_tokens;
    check_room(shared, key)?;
    let held = replication::read(shared, key, false).await?;
    if held.entries.iter().any(|e| e.stamp.id == turn) {
        return Ok(true);
    }
    let stamp = zavod_proto::memory::Stamp {
        seq: zavod_proto::memory::next_seq(
            held.entries.last().map(|e| e.stamp.seq),
            crate::clock::now_ms(),
        ),
        id: turn,
    };
    // The receipt does not say the model: counts are estimated on the
    // safe side.
    let estimate = zavod_proto::chat::prompt::estimate_tokens;
    let user = Turn {
        role: Role::User,
        tokens: estimate(&message),
        text: message,
    };
    let answer = Turn {
        role: Role::Assistant,
        tokens,
        text: answer,
    };
    let (entry, holder_facts) = turn_entry(stamp, user, answer, estimate);
    match replication::write(shared, key, held.floor, vec![entry]).await? {
        Written::Acked => {
            if !holder_facts.is_empty() {
                keep_holder_facts(shared, key, turn, holder_facts).await;
            }
            Ok(false)
        }
        Written::Deleted => Err(error_frame(
            ErrorCode::Forbidden,
            "the conversation was deleted while this turn was answered",
        )),
    }
}

/// One holder's operation on its own conversations, over the mesh.
pub(crate) async fn own(shared: &Arc<NodeShared>, owner: NodeId, op: MemoryOp) -> MemoryReply {
    let key = |conversation| ConvKey {
        owner,
        conversation,
    };
    match op {
        MemoryOp::List => match list(shared, owner).await {
            // The node's own (the holder's facts) is exported and deleted
            // by name, and with --all, but not listed among the chats.
            Ok((mut names, truncated)) => {
                names.retain(|n| !n.is_reserved());
                MemoryReply::Conversations { names, truncated }
            }
            Err(e) => refused(e),
        },
        MemoryOp::Export { conversation, from } => {
            // From the replicas in placement order: the first that holds
            // the conversation answers the page.
            let k = key(conversation);
            let p = match replication::placement(shared, &k).await {
                Ok(p) => p,
                Err(e) => return refused(e),
            };
            let t = Duration::from_millis(shared.config.memory.replica_timeout_ms);
            let mut last_err = None;
            for r in p.replicas {
                let req = ReplicaRequest::Page {
                    key: k.clone(),
                    from,
                };
                match crate::protocol::replica::ask(shared, r, req, t).await {
                    Ok(ReplicaReply::Page {
                        turns,
                        next,
                        held: true,
                    }) => {
                        return MemoryReply::Turns {
                            turns,
                            next,
                            held: true,
                        };
                    }
                    Ok(ReplicaReply::Page { .. }) => {}
                    Ok(ReplicaReply::Refused(e)) => last_err = Some(e.message),
                    Ok(_) => {}
                    Err(e) => last_err = Some(e),
                }
            }
            match last_err {
                Some(e) => refused(error_frame(
                    ErrorCode::NoCapacity,
                    format!("no replica of the conversation could be read: {e}"),
                )),
                None => MemoryReply::Turns {
                    turns: Vec::new(),
                    next: None,
                    held: false,
                },
            }
        }
        MemoryOp::Delete { conversation } => match delete(shared, &key(conversation)).await {
            Ok(held) => MemoryReply::Deleted {
                conversations: u32::from(held),
            },
            Err(e) => refused(e),
        },
        MemoryOp::Keep {
            conversation,
            turn,
            message,
            answer,
            receipt,
        } => match keep(shared, &key(conversation), turn, message, answer, &receipt).await {
            Ok(already) => MemoryReply::Kept { already },
            Err(e) => refused(e),
        },
        MemoryOp::DeleteAll => {
            let mut deleted = 0u32;
            // Each round takes every one listed, so one round empties the
            // list unless writes race it; a few more take those.
            for _round in 0..4 {
                let names = match list(shared, owner).await {
                    Ok((n, _)) => n,
                    Err(e) => return refused(e),
                };
                if names.is_empty() {
                    break;
                }
                for c in names {
                    // The holder's facts go too, but are no conversation
                    // of theirs to count.
                    let counted = !c.is_reserved();
                    match delete(shared, &key(c)).await {
                        Ok(held) => deleted += u32::from(held && counted),
                        Err(e) => return refused(e),
                    }
                }
            }
            MemoryReply::Deleted {
                conversations: deleted,
            }
        }
    }
}

/// The facts kept about `owner` across its conversations, oldest first;
/// none when long-term memory is off or they cannot be read now (a chat
/// goes on without them, and the log says why).
pub(crate) async fn read_holder_facts(shared: &Arc<NodeShared>, owner: NodeId) -> Vec<String> {
    if shared.config.memory.recall_tokens == 0 {
        return Vec::new();
    }
    match replication::read(shared, &holder_facts_key(owner), false).await {
        Ok(held) => held
            .entries
            .into_iter()
            .flat_map(|e| e.turns)
            .filter(|t| t.role == Role::Fact)
            .map(|t| t.text)
            .collect(),
        Err(e) => {
            tracing::warn!(message = %e.message, "the holder's facts could not be read; this prompt goes without them");
            Vec::new()
        }
    }
}

/// The entry a turn is kept as: the user's turn, the answer and the facts
/// the user's turn stated about this conversation; and the facts it stated
/// about its holder in general, to be kept with the holder's.
pub(crate) fn turn_entry(
    stamp: zavod_proto::memory::Stamp,
    user: Turn,
    answer: Turn,
    count: impl Fn(&str) -> u32,
) -> (Entry, Vec<Turn>) {
    let facts = facts_in(&user.text);
    let mut turns = vec![user, answer];
    turns.extend(fact_turns(&facts, Scope::Conversation, &count));
    (
        Entry { stamp, turns },
        fact_turns(&facts, Scope::Holder, &count),
    )
}

/// Keeps facts about `owner` that hold across its conversations, under the
/// id of the turn that stated them (a turn kept twice keeps them once).
/// Off the client's path: a failure is logged, and the facts still live
/// with the turn's own conversation.
pub(crate) async fn keep_holder_facts(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    id: u64,
    facts: Vec<Turn>,
) {
    // Which conversation stated them, so that deleting it deletes them.
    let mut turns = vec![Turn {
        role: Role::System,
        tokens: 0,
        text: format!("{FROM}{}", key.conversation),
    }];
    turns.extend(facts);
    let entry = Entry {
        stamp: zavod_proto::memory::Stamp {
            seq: zavod_proto::memory::next_seq(None, crate::clock::now_ms()),
            id,
        },
        turns,
    };
    let owner = key.owner;
    let key = holder_facts_key(owner);
    if let Err(e) = check_room(shared, &key) {
        tracing::warn!(message = %e.message, "facts about a holder not kept");
        return;
    }
    match replication::write(shared, &key, 0, vec![entry]).await {
        Ok(_) => {}
        Err(e) => tracing::warn!(message = %e.message, "facts about a holder not kept"),
    }
}

/// How a holder's fact entry names the conversation that stated it.
const FROM: &str = "from conversation ";

/// Deletes the facts about `key`'s holder that `key`'s conversation
/// stated: the facts' floor is raised past them all and the others are
/// written again above it, in one replicated write.
async fn forget_facts_from(shared: &Arc<NodeShared>, key: &ConvKey) -> Result<(), ErrorFrame> {
    let facts = holder_facts_key(key.owner);
    let held = replication::read(shared, &facts, false).await?;
    let source = format!("{FROM}{}", key.conversation);
    let from = |e: &Entry| {
        e.turns
            .first()
            .is_some_and(|t| t.role == Role::System && t.text == source)
    };
    if !held.entries.iter().any(from) {
        return Ok(());
    }
    if held.truncated {
        return Err(error_frame(
            ErrorCode::Internal,
            format!(
                "the conversation is deleted, but the facts kept about you are too many to sift \
                 here; delete them all with: zavod memory delete --conversation {}",
                facts.conversation
            ),
        ));
    }
    let newest = held.entries.last().map(|e| e.stamp.seq);
    let floor = deletion_floor(newest, held.floor, crate::clock::now_ms());
    let kept: Vec<Entry> = held
        .entries
        .into_iter()
        .filter(|e| !from(e))
        .enumerate()
        .map(|(i, mut e)| {
            e.stamp.seq = floor.saturating_add(1 + i as u64);
            e
        })
        .collect();
    replication::write(shared, &facts, floor, kept)
        .await
        .map(|_| ())
}

/// Where the facts about a holder that hold across its conversations are
/// kept: a conversation of its own, replicated, listed, exported and
/// deleted like any other.
pub(crate) fn holder_facts_key(owner: NodeId) -> ConvKey {
    ConvKey {
        owner,
        conversation: ConversationId::holder_facts(),
    }
}
