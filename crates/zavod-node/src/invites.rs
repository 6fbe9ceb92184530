//! Invites admit one node each, or the few their maker asked for
//! (`zavod mesh invite --uses N`, signed into the invite). The node holding
//! the authority key (the only one that signs memberships) remembers, on
//! disk, which nodes each invite admitted, until the invite expires: a
//! copied or leaked invite admits nobody more, while a node it admitted may
//! present it again (a reply lost on the way must not lock that node out).
//!
//! Invariants: at most [`MAX_OPEN_INVITES`] invites are remembered; an
//! entry is dropped only once its invite has expired (so it can no longer
//! admit anyone anyway); the file is rewritten atomically before a
//! membership is handed out.

use crate::datadir::{DataDirError, write_file};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zavod_proto::trust::MAX_INVITE_USES;
use zavod_proto::{NodeId, UnixMs};

/// The file, in the data directory, of invites used and by whom.
pub(crate) const INVITES_USED: &str = "invites.used";

/// Unexpired invites remembered at most; past it, joins are refused until
/// some expire (each `zavod mesh invite` may live up to its --ttl).
pub(crate) const MAX_OPEN_INVITES: usize = 65_536;

#[derive(Debug)]
pub(crate) struct UsedInvites {
    path: PathBuf,
    /// Invite id to the nodes it admitted and when the invite expires.
    used: BTreeMap<[u8; 16], (Vec<NodeId>, UnixMs)>,
}

impl UsedInvites {
    /// Reads what `dir` remembers; a line that does not parse is skipped
    /// with a warning (the invite it named can then be used once more).
    pub(crate) fn load(dir: &Path) -> Result<Self, DataDirError> {
        let path = dir.join(INVITES_USED);
        let text = crate::datadir::read_if_present(&path)?;
        let mut used = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Some((id, members, expires)) => {
                    used.insert(id, (members, expires));
                }
                None => tracing::warn!(file = %path.display(), line, "skipping an unreadable line"),
            }
            if used.len() >= MAX_OPEN_INVITES {
                break;
            }
        }
        Ok(UsedInvites { path, used })
    }

    /// Lets `member` use invite `id` (admitting up to `uses` nodes,
    /// expiring at `expires_ms`): while fewer have used it, or when this
    /// node has. The claim is on disk when this returns `Ok`.
    pub(crate) fn claim(
        &mut self,
        id: [u8; 16],
        uses: u32,
        member: NodeId,
        expires_ms: UnixMs,
        now_ms: UnixMs,
    ) -> Result<(), String> {
        self.used.retain(|_, (_, exp)| *exp > now_ms);
        let uses = uses.clamp(1, MAX_INVITE_USES) as usize;
        let admitted = self.used.get(&id).map(|(m, _)| m.as_slice()).unwrap_or(&[]);
        if admitted.contains(&member) {
            return Ok(());
        }
        if admitted.len() >= uses {
            let names: Vec<String> = admitted.iter().map(NodeId::short).collect();
            return Err(format!(
                "invite refused: it admits {uses} node{} and was used by {}; ask the mesh's \
                 operator for a new one (zavod mesh invite)",
                if uses == 1 { "" } else { "s" },
                names.join(", ")
            ));
        }
        if admitted.is_empty() && self.used.len() >= MAX_OPEN_INVITES {
            return Err(format!(
                "invite refused: {MAX_OPEN_INVITES} unexpired invites are in use already; try \
                 again once some have expired"
            ));
        }
        self.used
            .entry(id)
            .or_insert_with(|| (Vec::new(), expires_ms))
            .0
            .push(member);
        if let Err(e) = self.save() {
            if let Some((m, _)) = self.used.get_mut(&id) {
                m.retain(|n| *n != member);
            }
            return Err(format!(
                "the node could not record the invite's use ({e}); try again"
            ));
        }
        Ok(())
    }

    fn save(&self) -> Result<(), DataDirError> {
        let mut text =
            String::from("# Invites used: invite id, expiry (ms), the nodes it admitted\n");
        for (id, (members, expires)) in &self.used {
            let members: Vec<String> = members.iter().map(|m| hex::encode(m.0)).collect();
            text.push_str(&format!(
                "{} {expires} {}\n",
                hex::encode(id),
                members.join(",")
            ));
        }
        write_file(&self.path, &text, false)
    }
}

fn parse_line(line: &str) -> Option<([u8; 16], Vec<NodeId>, UnixMs)> {
    let mut parts = line.split_whitespace();
    let id: [u8; 16] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
    let expires: UnixMs = parts.next()?.parse().ok()?;
    let members = parts
        .next()?
        .split(',')
        .take(MAX_INVITE_USES as usize)
        .map(|m| {
            let b: [u8; 32] = hex::decode(m).ok()?.try_into().ok()?;
            Some(NodeId(b))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((id, members, expires))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    #[test]
    fn an_invite_admits_its_nodes_again_and_again_and_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut u = UsedInvites::load(dir.path()).expect("load");
        u.claim([1; 16], 1, node(1), 1_000, 10).expect("first use");
        u.claim([1; 16], 1, node(1), 1_000, 20)
            .expect("the same node again");
        let e = u
            .claim([1; 16], 1, node(2), 1_000, 30)
            .expect_err("another node");
        assert!(e.contains("admits 1 node and was used by"), "{e}");
        // An invite for two admits two.
        u.claim([2; 16], 2, node(2), 1_000, 30)
            .expect("first of two");
        u.claim([2; 16], 2, node(3), 1_000, 30)
            .expect("second of two");
        assert!(u.claim([2; 16], 2, node(4), 1_000, 30).is_err());
        // Remembered across restarts.
        let mut again = UsedInvites::load(dir.path()).expect("load");
        assert!(again.claim([1; 16], 1, node(3), 1_000, 40).is_err());
        again
            .claim([2; 16], 2, node(3), 1_000, 40)
            .expect("still one of the two");
        assert!(again.claim([2; 16], 2, node(5), 1_000, 40).is_err());
        // Once expired, an invite admits nobody anyway; its entry goes.
        again.claim([3; 16], 1, node(3), 5_000, 1_000).expect("new");
        assert_eq!(again.used.len(), 1);
    }

    #[test]
    fn unreadable_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(INVITES_USED),
            format!(
                "# comment\nnot hex at all\n{} 99 {}\n",
                hex::encode([7u8; 16]),
                hex::encode([7u8; 32])
            ),
        )
        .expect("write");
        let mut u = UsedInvites::load(dir.path()).expect("load");
        assert!(u.claim([7; 16], 1, node(8), 99, 10).is_err());
        u.claim([7; 16], 1, node(7), 99, 10)
            .expect("the node it admitted");
    }
}
