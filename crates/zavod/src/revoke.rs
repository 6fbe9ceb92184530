//! `zavod mesh revoke` and `zavod cap revoke`: sign a revocation with the
//! data directory's authority key and hand it to a running member (which
//! holds it and spreads it), or, when no node runs on the data directory
//! and no member is named, write it into the data directory for its node
//! to spread when it starts.

use crate::cli::RevokeArgs;
use anyhow::{Context, Result, bail};
use zavod_node::clock::now_ms;
use zavod_node::config::default_data_dir;
use zavod_node::datadir::{self, LISTEN_ADDRS, NodeIdentity};
use zavod_proto::NodeId;
use zavod_proto::trust::{CapabilityToken, Credential, Revocation, Revoked, parse_hex16};
use zavod_proto::wire::{StatusReply, StatusRequest};

/// A node named by its peer id or its node key.
pub fn parse_node(text: &str) -> Result<NodeId> {
    let text = text.trim();
    if let Ok(id) = NodeId::from_hex(text) {
        return Ok(id);
    }
    let peer: libp2p::PeerId = text.parse().with_context(|| {
        format!("{text:?} is neither a peer id (12D3KooW…) nor a node key (64 hex digits)")
    })?;
    zavod_net::node_id_of(&peer).with_context(|| {
        format!("peer id {peer} does not hold an ed25519 key, so no zavod node has it")
    })
}

/// A credential's id: given as 32 hex digits, or read from a credential or
/// capability token (a file, or the text).
pub fn credential_id(text: &str) -> Result<[u8; 16]> {
    let text = text.trim();
    if let Some(id) = parse_hex16(text) {
        return Ok(id);
    }
    let path = std::path::Path::new(text);
    let owned;
    let body = if text.len() < 4096 && path.is_file() {
        owned =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        owned.trim()
    } else {
        text
    };
    if let Ok(t) = CapabilityToken::from_text(body) {
        return Ok(t.credential.body.id);
    }
    match Credential::from_text(body) {
        Ok(c) => Ok(c.body.id),
        Err(e) => bail!(
            "{} is not a credential id (32 hex digits), nor a credential or capability token ({e})",
            if body.len() > 40 {
                format!("{}…", &body[..40])
            } else {
                body.to_string()
            }
        ),
    }
}

pub fn run(subject: Revoked, to: &RevokeArgs) -> Result<()> {
    let dir = to.data_dir.clone().unwrap_or_else(default_data_dir);
    let (id, _) = NodeIdentity::open_for_join(&dir, now_ms())?;
    let Some(authority) = id.authority.as_ref() else {
        bail!(
            "{} holds no mesh authority key: revocations are signed where the mesh was created \
             (zavod mesh init), with --data-dir naming that directory",
            dir.display()
        );
    };
    let revocation = authority.revoke(subject, now_ms());
    let peer = match &to.peer {
        Some(p) => p.clone(),
        None => match datadir::lock_dir(&dir) {
            // No node runs here: its data directory takes the revocation.
            Ok(_lock) => {
                let held = zavod_node::revocations::record(&dir, &id.authorities, revocation)?;
                println!("revoked {subject}");
                println!(
                    "recorded in {} ({held} revocations held); no node runs on this data \
                     directory, so its node spreads it when it starts, or hand it to a running \
                     member now with --peer ADDR",
                    dir.join(zavod_node::revocations::REVOCATIONS_FILE)
                        .display()
                );
                return Ok(());
            }
            Err(_) => local_node_addr(&dir)?,
        },
    };
    let (new, held) = deliver(&peer, to, revocation)
        .with_context(|| format!("handing the revocation to {peer}"))?;
    println!("revoked {subject}");
    println!(
        "{} ({held} revocations held there); every member holds it within one gossip round",
        if new {
            format!("taken by {peer}")
        } else {
            format!("{peer} already held it")
        }
    );
    Ok(())
}

/// The first address the node on `dir` listens on.
fn local_node_addr(dir: &std::path::Path) -> Result<libp2p::Multiaddr> {
    let path = dir.join(LISTEN_ADDRS);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "a node runs on {} but {} cannot be read; name a running member with --peer ADDR",
            dir.display(),
            path.display()
        )
    })?;
    text.lines()
        .map(str::trim)
        .find_map(|l| l.parse().ok())
        .with_context(|| format!("{} names no address; use --peer ADDR", path.display()))
}

fn deliver(peer: &libp2p::Multiaddr, to: &RevokeArgs, r: Revocation) -> Result<(bool, u32)> {
    let key = datadir::client_key(&to.data_dir.clone().unwrap_or_else(default_data_dir))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(zavod_node::client::ask_status(
        &key,
        peer.clone(),
        zavod_net::NetConfig::client(to.psk_file.as_deref())?,
        &StatusRequest::Revoke(Box::new(r)),
    ))?;
    match reply {
        Some(StatusReply::Revoked { new, held }) => Ok((new, held)),
        Some(StatusReply::Refused(e)) => bail!("the node refused it: {}", e.message),
        Some(_) => bail!("the node answered with something else"),
        None => bail!("the node closed the stream without answering"),
    }
}
