//! `zavod mesh init`, `zavod mesh invite`, `zavod cap issue`: offline
//! commands on a data directory that holds a mesh authority (and the
//! revocations, in `crate::revoke`).

use crate::cli::{CapCommand, MeshCommand};
use anyhow::{Context, Result, bail};
use zavod_node::clock::now_ms;
use zavod_node::config::default_data_dir;
use zavod_node::datadir::{LISTEN_ADDRS, NodeIdentity, write_file};
use zavod_proto::NodeId;
use zavod_proto::trust::{Revoked, hex16};

pub fn run_mesh(cmd: MeshCommand) -> Result<()> {
    match cmd {
        MeshCommand::Init { data_dir } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            if std::fs::metadata(dir.join("authorities")).is_ok() {
                let (id, _) = NodeIdentity::open_for_join(&dir, now_ms())?;
                let names: Vec<String> = id.authorities.iter().map(NodeId::short).collect();
                bail!(
                    "{} already belongs to a mesh (authority {}); use another --data-dir for a new one",
                    dir.display(),
                    names.join(", ")
                );
            }
            let (id, report) = NodeIdentity::open(&dir, now_ms())?;
            let authority = id
                .authorities
                .iter()
                .next()
                .map(NodeId::to_hex)
                .unwrap_or_default();
            println!("created mesh authority {authority}");
            println!("data dir: {}", dir.display());
            if let Some(p) = report.created_client_credential {
                println!("credential for this machine's user: {}", p.display());
            }
            println!("next: start `zavod node` here, then `zavod mesh invite` for each new node");
            Ok(())
        }
        MeshCommand::Revoke { node, to } => {
            let node = crate::revoke::parse_node(&node)?;
            crate::revoke::run(Revoked::Node(node), &to)
        }
        MeshCommand::Psk { out } => {
            if std::fs::symlink_metadata(&out).is_ok() {
                bail!(
                    "{} exists; a mesh key is never overwritten (every node of the mesh uses it). Name another file with --out",
                    out.display()
                );
            }
            let key = zavod_net::psk::generate()?;
            write_file(&out, &key, true)
                .with_context(|| format!("writing the mesh key to {}", out.display()))?;
            println!(
                "wrote a mesh key to {} (readable by you only)",
                out.display()
            );
            println!(
                "give every node and client of the mesh this file: zavod node --psk-file {0}; zavod chat --psk-file {0}",
                out.display()
            );
            Ok(())
        }
        MeshCommand::Invite {
            data_dir,
            ttl,
            bootstrap,
            uses,
            membership_ttl,
        } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let (id, _) = NodeIdentity::open_for_join(&dir, now_ms())?;
            let mut addrs: Vec<String> = bootstrap.iter().map(ToString::to_string).collect();
            if addrs.is_empty() {
                let path = dir.join(LISTEN_ADDRS);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no --bootstrap given and no {} (start `zavod node` on this data directory first)",
                        path.display()
                    )
                })?;
                addrs = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
            }
            if addrs.is_empty() {
                bail!("no bootstrap address: pass --bootstrap MULTIADDR");
            }
            let addrs = name_the_signer(addrs, &id.id())?;
            let ticket = id.invite(
                now_ms(),
                ttl.as_millis() as u64,
                addrs,
                uses,
                membership_ttl.as_millis() as u64,
            )?;
            println!("{}", ticket.to_text());
            Ok(())
        }
    }
}

/// Bootstrap addresses as an invite carries them: each ends in the peer id
/// of the node that signs memberships (this data directory's node, the one
/// holding the authority key), so a joining node dials that node and no
/// other that answers at the address. An address naming another peer is
/// refused.
fn name_the_signer(addrs: Vec<String>, me: &NodeId) -> Result<Vec<String>> {
    use libp2p::multiaddr::Protocol;
    let Some(peer) = zavod_net::peer_id_of(me) else {
        bail!("this data directory's node key is not a valid peer id");
    };
    addrs
        .into_iter()
        .map(|a| {
            let mut addr: libp2p::Multiaddr = a
                .parse()
                .with_context(|| format!("bootstrap address {a:?} is not a multiaddr"))?;
            match addr.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            }) {
                Some(id) if id == peer => {}
                Some(id) => bail!(
                    "bootstrap address {a} names peer {id}, but only this data directory's node \
                     ({peer}) signs memberships: give its own address"
                ),
                None => addr.push(Protocol::P2p(peer)),
            }
            Ok(addr.to_string())
        })
        .collect()
}

pub fn run_cap(cmd: CapCommand) -> Result<()> {
    match cmd {
        CapCommand::Issue {
            data_dir,
            models,
            max_tokens,
            ttl,
            rate,
            holder,
            out,
        } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let (id, _) = NodeIdentity::open_for_join(&dir, now_ms())?;
            let holder = match holder {
                Some(h) => {
                    Some(NodeId::from_hex(&h).map_err(|e| anyhow::anyhow!("--holder: {e}"))?)
                }
                None => None,
            };
            if max_tokens == 0 {
                eprintln!("error: --max-tokens must be at least 1");
                std::process::exit(2);
            }
            let text = id.issue_capability(
                now_ms(),
                &models,
                max_tokens,
                ttl.as_millis() as u64,
                rate,
                holder,
            )?;
            match out {
                Some(path) => {
                    write_file(&path, &format!("{text}\n"), true)?;
                    eprintln!("credential written to {}", path.display());
                }
                None => println!("{text}"),
            }
            if let Ok(id) = crate::revoke::credential_id(&text) {
                eprintln!(
                    "credential id {id} (to revoke it: zavod cap revoke {id})",
                    id = hex16(&id)
                );
            }
            Ok(())
        }
        CapCommand::Revoke { credential, to } => {
            let id = crate::revoke::credential_id(&credential)?;
            crate::revoke::run(Revoked::Credential(id), &to)
        }
    }
}
