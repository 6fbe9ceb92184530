//! `zavod status`: the mesh as one node sees it, as a table or JSON.

use crate::cli::StatusArgs;
use anyhow::{Context, Result, bail};
use zavod_node::config::default_data_dir;
use zavod_node::datadir::{self, ClientIdentity, DataDirError};
use zavod_proto::trust::{Keypair, OperatorProof};
use zavod_proto::wire::{StatusReply, StatusRequest, StatusRow};

fn peer_of(row: &StatusRow) -> String {
    zavod_net::peer_label(&row.node)
}

fn gib(b: u64) -> String {
    format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
}

/// The key to connect with and what to show the node: the client
/// credential when there is one (or one was named); else, in a node's own
/// data directory, a proof signed with the node's key, which that node
/// accepts from its operator.
fn authenticate(args: &StatusArgs) -> Result<(Keypair, StatusRequest)> {
    let dir = args.at.data_dir.clone().unwrap_or_else(default_data_dir);
    match ClientIdentity::load(&dir, args.at.credential.as_deref()) {
        Ok(id) => Ok((id.key, StatusRequest::Credential(id.credential))),
        Err(e @ DataDirError::NoCredential { .. }) => {
            let Some(node) = datadir::node_key(&dir)? else {
                return Err(e.into());
            };
            let client = datadir::client_key(&dir)?;
            let proof = OperatorProof::issue(&node, client.public(), zavod_node::clock::now_ms());
            Ok((client, StatusRequest::Operator(proof)))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run(args: StatusArgs) -> Result<()> {
    let (key, request) = authenticate(&args)?;
    let as_operator = matches!(request, StatusRequest::Operator(_));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The first node named that answers.
    let mut reply = None;
    for (i, peer) in args.at.peer.iter().enumerate() {
        let asked = rt
            .block_on(zavod_node::client::ask_status(
                &key,
                peer.clone(),
                zavod_net::NetConfig::client(args.at.psk_file.as_deref())?,
                &request,
            ))
            .with_context(|| format!("asking {peer} for status"));
        match asked {
            Ok(r) => {
                reply = Some(r);
                break;
            }
            Err(e) if i + 1 == args.at.peer.len() => return Err(e),
            Err(e) => eprintln!("warning: {e:#}; asking the next node"),
        }
    }
    let reply = reply.flatten();
    let (entry, mut rows, dropped) = match reply {
        Some(StatusReply::Mesh {
            entry,
            rows,
            dropped_non_member,
        }) => (entry, rows, dropped_non_member),
        Some(StatusReply::Refused(e)) if as_operator => bail!(
            "the node refused: {} (this data directory holds a node's key, which reads only \
             that node's own status; for another node, use a credential from the mesh's \
             authority: `zavod cap issue`, then --credential)",
            e.message
        ),
        Some(StatusReply::Refused(e)) => bail!("the node refused: {}", e.message),
        Some(
            StatusReply::Membership(_) | StatusReply::Revocations(_) | StatusReply::Revoked { .. },
        ) => {
            bail!("the node answered with something other than the mesh's status")
        }
        None => bail!("the node closed the stream without answering"),
    };
    rows.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.node.cmp(&b.node)));
    if args.json {
        let members: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "peer_id": peer_of(r),
                    "node_key": r.node.to_hex(),
                    "is_self": r.is_self,
                    "addrs": r.addrs,
                    "models": r.models.iter().map(|m| serde_json::json!({
                        "name": m.name,
                        "quant": m.quant,
                        "tier": zavod_proto::mesh::tiers::tier_of(&m.quant).map(|t| t.name()),
                        "context_tokens": m.context_tokens,
                        "slots_free": m.slots_free,
                        "slots_total": m.slots_total,
                        "queue_depth": m.queue_depth,
                    })).collect::<Vec<_>>(),
                    "on_gpu": r.on_gpu,
                    "mem_free_bytes": r.mem_free_bytes,
                    "mem_total_bytes": r.mem_total_bytes,
                    "slots_free": r.slots_free,
                    "slots_total": r.slots_total,
                    "queue_depth": r.queue_depth,
                    "tokens_per_s": r.tokens_per_s,
                    "state": r.liveness,
                    "breaker": r.breaker,
                    "rtt_ms": r.rtt_ms,
                    "score": r.score,
                    "heard_ms_ago": r.heard_ms_ago,
                    "tailnet_name": r.tailnet_name,
                })
            })
            .collect();
        let entry_peer = zavod_net::peer_id_of(&entry)
            .map(|p| p.to_string())
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "entry": entry_peer,
                "members": members,
                "dropped_non_member_reports": dropped,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<54} {:<8} {:<36} {:>9} {:>7} {:>7} {:>8} {:<9} {:>6}  ADDRESS",
        "PEER", "STATE", "MODELS", "FREE MEM", "JOBS", "TOK/S", "RTT", "BREAKER", "SCORE"
    );
    // ADDRESS: the tailnet name first, for nodes found on a tailnet.
    for r in &rows {
        let models = if r.models.is_empty() {
            "-".to_string()
        } else {
            r.models
                .iter()
                .map(|m| format!("{} ({})", m.name, m.quant))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mark = if r.is_self { "*" } else { " " };
        println!(
            "{:<54} {:<8} {:<36} {:>9} {:>7} {:>7.1} {:>8} {:<9} {:>6.3}  {}",
            format!("{}{mark}", peer_of(r)),
            r.liveness,
            models,
            gib(r.mem_free_bytes),
            format!(
                "{}/{}",
                r.slots_total - r.slots_free.min(r.slots_total),
                r.slots_total
            ),
            r.tokens_per_s,
            r.rtt_ms.map_or("-".into(), |v| format!("{v:.1}ms")),
            r.breaker,
            r.score,
            match &r.tailnet_name {
                Some(name) => format!("{name} {}", r.addrs.first().map_or("-", String::as_str)),
                None => r.addrs.first().map_or("-", String::as_str).to_string(),
            },
        );
    }
    println!(
        "{} members; * = the node asked; {} reports from non-members dropped",
        rows.len(),
        dropped
    );
    Ok(())
}
