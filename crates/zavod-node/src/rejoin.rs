//! Finding the mesh at start-up: dialling the bootstrap addresses given,
//! or, with none given, finding it again after a restart.
//!
//! A member remembers where the other members listen (`peers` in the data
//! directory: one multiaddr with its `/p2p/` peer id a line, the members
//! alive now first, then those remembered before, at most
//! [`MAX_REMEMBERED_PEERS`] members). A node started without a bootstrap
//! address dials those, and the node that signed its membership, in
//! rounds, until its view holds another member alive (one it dialled
//! announced itself, or one reached it first); gossip brings the rest. So a mesh survives the restart of any node, its
//! authority's included, on a new port or not, while one member it knew is
//! still up.
//!
//! The file is a hint, never trusted: an address that does not answer, or
//! answers as a node that is not a member, costs a dial a round and
//! nothing else.

use crate::actors::NodeShared;
use crate::actors::router::RouterMsg;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zavod_proto::limits::MAX_REMEMBERED_PEERS;

/// The file in the data directory.
const PEERS_FILE: &str = "peers";

/// Addresses kept per member.
const ADDRS_PER_MEMBER: usize = 4;

/// How often the file is brought up to date (written only on a change).
const REMEMBER_EVERY: Duration = Duration::from_secs(5);

/// The longest wait between two rounds of dials.
const MAX_ROUND_WAIT: Duration = Duration::from_secs(30);

/// The addresses remembered in `data_dir` (none when there is no file).
fn remembered(data_dir: &Path) -> Vec<Multiaddr> {
    std::fs::read_to_string(data_dir.join(PEERS_FILE))
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses the file's text, skipping lines that are not addresses with a
/// peer id, and keeping the bound.
fn parse(text: &str) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    let mut members = 0usize;
    let mut last_peer = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(addr) = line.parse::<Multiaddr>() else {
            continue;
        };
        let (_, Some(peer)) = zavod_net::addr::split_peer(&addr) else {
            continue;
        };
        if last_peer != Some(peer) {
            members += 1;
            last_peer = Some(peer);
        }
        if members > MAX_REMEMBERED_PEERS {
            break;
        }
        out.push(addr);
    }
    out
}

/// The file's new text: `alive` (each member's addresses, as announced)
/// first, then what `before` held of other members, within the bounds.
fn merge(alive: &[(libp2p::PeerId, Vec<String>)], before: &[Multiaddr]) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut kept: Vec<libp2p::PeerId> = Vec::new();
    for (peer, addrs) in alive {
        if kept.len() == MAX_REMEMBERED_PEERS {
            break;
        }
        let mut any = false;
        for a in addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .take(ADDRS_PER_MEMBER)
        {
            let base = zavod_net::addr::split_peer(&a).0;
            lines.push(base.with(Protocol::P2p(*peer)).to_string());
            any = true;
        }
        if any {
            kept.push(*peer);
        }
    }
    for a in before {
        let Some(peer) = zavod_net::addr::split_peer(a).1 else {
            continue;
        };
        // One alive now is where it announces now.
        if alive.iter().any(|(p, _)| *p == peer) {
            continue;
        }
        if !kept.contains(&peer) {
            if kept.len() == MAX_REMEMBERED_PEERS {
                continue;
            }
            kept.push(peer);
        }
        let line = a.to_string();
        let suffix = format!("/p2p/{peer}");
        if !lines.contains(&line)
            && lines.iter().filter(|l| l.ends_with(&suffix)).count() < ADDRS_PER_MEMBER
        {
            lines.push(line);
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Keeps the file up to date for as long as the node runs: the members
/// alive in the Router's view, other than this node, ahead of those
/// remembered before. An empty view leaves the file as it is, so a node
/// cut off from everyone still knows where to look.
pub(crate) async fn remember(shared: Arc<NodeShared>) {
    let path = shared.identity.dir.join(PEERS_FILE);
    let mut written = std::fs::read_to_string(&path).unwrap_or_default();
    loop {
        tokio::time::sleep(REMEMBER_EVERY).await;
        let Some(router) = shared.directory.get().router else {
            continue;
        };
        let Ok(alive) = ractor::call_t!(router, RouterMsg::MemberAddrs, 2_000) else {
            continue;
        };
        let alive: Vec<(libp2p::PeerId, Vec<String>)> = alive
            .into_iter()
            .filter_map(|(node, addrs)| Some((zavod_net::peer_id_of(&node)?, addrs)))
            .collect();
        if alive.is_empty() {
            continue;
        }
        let text = merge(&alive, &parse(&written));
        if text != written {
            // Best effort: the file only matters at the next start.
            match crate::datadir::write_file(&path, &text, false) {
                Ok(()) => written = text,
                Err(e) => tracing::warn!(error = %e, "could not remember where the members are"),
            }
        }
    }
}

/// Dials a bootstrap address until it answers, backing off to 30 s.
pub(crate) async fn dial_until_connected(net: zavod_net::Client, addr: Multiaddr) {
    let mut wait = Duration::from_millis(500);
    loop {
        match net.dial(addr.clone()).await {
            Ok(peer) => {
                tracing::info!(%peer, %addr, "connected to bootstrap node");
                return;
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, retry_ms = wait.as_millis() as u64, "bootstrap node unreachable");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_ROUND_WAIT);
            }
        }
    }
}

/// Where a node started with `bootstrap` (its configured addresses) looks
/// for the mesh when it has none: the node that signed its membership,
/// then the members it remembers.
pub(crate) fn rejoin_through(
    identity: &crate::datadir::NodeIdentity,
    bootstrap: &[Multiaddr],
) -> Vec<Multiaddr> {
    if !bootstrap.is_empty() {
        return Vec::new();
    }
    let mut through: Vec<Multiaddr> = identity
        .signer_addrs()
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    for a in remembered(&identity.dir) {
        if !through.contains(&a) {
            through.push(a);
        }
    }
    through
}

/// Dials `addrs` in rounds, all of a round at once, until this node knows
/// another member alive: through one that answered (its announcements
/// follow), or one that reached it first. An address that answers is not
/// enough by itself, as what listens there now may not be a member.
pub(crate) async fn rejoin(shared: Arc<NodeShared>, addrs: Vec<Multiaddr>) {
    if addrs.is_empty() {
        return;
    }
    let mut wait = Duration::from_millis(500);
    let mut round = 0u32;
    loop {
        if reached(&shared).await {
            tracing::info!("found the mesh again through the members this node knew");
            return;
        }
        let dials = addrs.iter().map(|a| {
            let net = shared.net.clone();
            let a = a.clone();
            async move { (net.dial(a.clone()).await, a) }
        });
        let mut last = String::new();
        let mut answered = false;
        for (r, addr) in futures::future::join_all(dials).await {
            match r {
                Ok(peer) => {
                    tracing::debug!(%peer, %addr, "a node this one knew answered");
                    answered = true;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        // Said at the first round and then now and then: a node whose
        // members are all gone would otherwise fill its log.
        if !answered && round.is_multiple_of(10) {
            tracing::warn!(
                addrs = addrs.len(),
                retry_ms = wait.as_millis() as u64,
                last_error = %last,
                "none of the members this node knew answered; give --bootstrap to join through another"
            );
        }
        round = round.saturating_add(1);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_ROUND_WAIT);
    }
}

/// Whether the Router's view holds a member other than this node alive.
async fn reached(shared: &NodeShared) -> bool {
    let Some(router) = shared.directory.get().router else {
        return false;
    };
    matches!(
        ractor::call_t!(router, RouterMsg::MemberAddrs, 2_000),
        Ok(alive) if !alive.is_empty()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(b: u8) -> libp2p::PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([b; 32]).expect("a key");
        key.public().to_peer_id()
    }

    #[test]
    fn alive_members_come_first_and_the_others_are_kept_behind_them() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let before = parse(&format!(
            "/ip4/10.0.0.2/tcp/7070/p2p/{b}\n/ip4/10.0.0.3/tcp/7070/p2p/{c}\nnot an address\n/ip4/10.0.0.9/tcp/1\n"
        ));
        assert_eq!(before.len(), 2, "lines without a peer id are skipped");
        // B is alive on a new port; C is not heard of now; A is new.
        let alive = vec![
            (a, vec!["/ip4/10.0.0.1/tcp/7070".to_string()]),
            (b, vec![format!("/ip4/10.0.0.2/tcp/7171/p2p/{b}")]),
        ];
        let text = merge(&alive, &before);
        assert_eq!(
            text,
            format!(
                "/ip4/10.0.0.1/tcp/7070/p2p/{a}\n/ip4/10.0.0.2/tcp/7171/p2p/{b}\n/ip4/10.0.0.3/tcp/7070/p2p/{c}\n"
            )
        );
        // The same view again changes nothing.
        assert_eq!(merge(&alive, &parse(&text)), text);
    }

    #[test]
    fn the_file_never_holds_more_members_than_the_bound() {
        let many: Vec<(libp2p::PeerId, Vec<String>)> = (0..(MAX_REMEMBERED_PEERS as u8 + 5))
            .map(|i| (peer(i + 1), vec![format!("/ip4/10.0.0.{i}/tcp/7070")]))
            .collect();
        let text = merge(&many, &[]);
        assert_eq!(parse(&text).len(), MAX_REMEMBERED_PEERS);
        let older = parse(&text);
        let text = merge(&many[..1], &older);
        assert_eq!(parse(&text).len(), MAX_REMEMBERED_PEERS);
        let long: String = (0..100).map(|_| text.clone()).collect();
        assert!(parse(&long).len() <= MAX_REMEMBERED_PEERS * ADDRS_PER_MEMBER);
    }
}
