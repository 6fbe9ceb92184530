//! Running summaries, carried out (the rules are
//! `zavod_proto::memory::summary`): once a turn is kept, a conversation
//! whose prompt no longer holds some of its older turns has them folded,
//! with the summary before them, into a new summary by the mesh's own
//! model, and the summary is written to the conversation's replicas like
//! a turn.
//!
//! The request is an ordinary one, placed by the Router and granted like
//! any, at low priority: it never waits in a queue (a target with every
//! slot busy turns it away, and the fold is tried again after a later
//! turn), and it runs after the turn that asked for it was kept, never on
//! a chat's first-token path.
//!
//! Invariants: at most [`MAX_FOLDS_IN_FLIGHT`] folds run on a node at once,
//! one per conversation; every wait ends by [`FOLD_DEADLINE`].

use crate::actors::NodeShared;
use crate::actors::router::{PlaceAsk, RouterMsg};
use crate::protocol::call;
use crate::protocol::chat_entry::run_local;
use crate::protocol::run_client::{FetchEvent, fetch};
use crate::replication;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zavod_engine::EngineEvent;
use zavod_proto::chat::prompt::{affinity_key, run_hash};
use zavod_proto::limits::{MAX_FOLDS_IN_FLIGHT, SUMMARY_MAX_TOKENS};
use zavod_proto::memory::ConvKey;
use zavod_proto::memory::summary::{due, entry, request};
use zavod_proto::wire::{GenParams, RunRequest};

/// The longest a fold may take, from its read to its write.
const FOLD_DEADLINE: Duration = Duration::from_secs(120);

/// The conversations being folded on this node.
#[derive(Default)]
pub(crate) struct Folding(Mutex<BTreeSet<ConvKey>>);

impl Folding {
    /// Claims `key` for a fold; `false` when it is being folded already or
    /// too many are.
    fn claim(&self, key: &ConvKey) -> bool {
        match self.0.lock() {
            Ok(mut s) => s.len() < MAX_FOLDS_IN_FLIGHT && s.insert(key.clone()),
            Err(_) => false,
        }
    }

    fn release(&self, key: &ConvKey) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(key);
        }
    }
}

/// Folds `key`'s turns that its prompt no longer holds (it held the
/// newest `in_prompt` entries after the summary), if a fold is due, with
/// `model`. Logs what came of it; nothing waits for it.
pub(crate) async fn fold(shared: Arc<NodeShared>, key: ConvKey, model: String, in_prompt: usize) {
    if !shared.folding.claim(&key) {
        return;
    }
    let r = tokio::time::timeout(FOLD_DEADLINE, fold_once(&shared, &key, &model, in_prompt)).await;
    shared.folding.release(&key);
    match r {
        Ok(Ok(Some(covered))) => tracing::debug!(
            conversation = %key.conversation,
            covered,
            "older turns folded into the conversation's summary"
        ),
        Ok(Ok(None)) => {}
        Ok(Err(why)) => tracing::debug!(
            conversation = %key.conversation,
            why,
            "no summary this time; tried again after a later turn"
        ),
        Err(_) => tracing::debug!(
            conversation = %key.conversation,
            "a summary took too long; tried again after a later turn"
        ),
    }
}

/// One fold: `Some(turns folded)`, `None` when none was due.
async fn fold_once(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    model: &str,
    in_prompt: usize,
) -> Result<Option<usize>, String> {
    let held = replication::read(shared, key, false)
        .await
        .map_err(|e| e.message)?;
    let Some(f) = due(&held.entries, in_prompt) else {
        return Ok(None);
    };
    let turns = request(&f);
    let params = GenParams {
        max_tokens: SUMMARY_MAX_TOKENS,
        temperature: 0.0,
        ..Default::default()
    };
    let me = shared.identity.id();
    let ask = PlaceAsk {
        client: me,
        model: model.to_owned(),
        prompt_hash: run_hash(&turns, &params),
        max_tokens: SUMMARY_MAX_TOKENS,
        exclude: Vec::new(),
        avoid: Vec::new(),
        // The node's own request: no holder's prompt cache.
        cache_scope: [0; 16],
        cache_key: affinity_key(&[0; 16], model, &turns),
    };
    let placed = call(shared.directory.get().router, "the router", |reply| {
        RouterMsg::Place { ask, reply }
    })
    .await
    .and_then(|r| r)
    .map_err(|e| e.message)?;
    let (text, tokens) = if placed.target == me {
        let job = run_local(
            shared,
            placed.grant.clone(),
            None,
            me,
            &turns,
            &params,
            false,
        )
        .await
        .map_err(|e| e.message)?;
        collect_local(job.events).await?
    } else {
        let membership = shared
            .membership()
            .ok_or("this node has no membership to vouch for its grant")?;
        let run = RunRequest {
            grant: placed.grant.clone(),
            issuer_membership: membership,
            turns,
            params,
            may_queue: false,
        };
        let (tx, rx) = mpsc::channel(64);
        let (_cancel, cancelled) = oneshot::channel();
        tokio::spawn(fetch(
            Arc::clone(shared),
            placed.target,
            placed.addrs.clone(),
            run,
            tx,
            cancelled,
        ));
        collect_fetched(rx).await?
    };
    drop(placed);
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err("the model wrote an empty summary".into());
    }
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| format!("no randomness for an id: {e}"))?;
    let covered = f.turns.len();
    let summary = entry(&f, u64::from_be_bytes(id), text, tokens);
    replication::write(shared, key, held.floor, vec![summary])
        .await
        .map_err(|e| e.message)?;
    Ok(Some(covered))
}

async fn collect_local(mut events: mpsc::Receiver<EngineEvent>) -> Result<(String, u32), String> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            EngineEvent::Tokens(t) => t.iter().for_each(|t| text.push_str(&t.text)),
            EngineEvent::Done(d) => return Ok((text, d.generated_tokens)),
            EngineEvent::Failed(m) => return Err(m),
            EngineEvent::Queued { .. } | EngineEvent::Started { .. } => {}
        }
    }
    Err("the model worker stopped".into())
}

async fn collect_fetched(mut events: mpsc::Receiver<FetchEvent>) -> Result<(String, u32), String> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            FetchEvent::Token(t) => text.push_str(&t.text),
            FetchEvent::Done(d) => return Ok((text, d.generated_tokens)),
            FetchEvent::Failed(e, _) => return Err(e.message),
        }
    }
    Err("the fetch stopped".into())
}
