//! The revocations this node knows (`zavod mesh revoke`, `zavod cap
//! revoke`), kept in memory for every check and on disk in the data
//! directory, one signed revocation per line, so a restart forgets none.
//!
//! Invariants: every revocation held was signed by one of this mesh's
//! authorities (checked on load as on receipt); the file is rewritten
//! atomically before a new revocation counts as held, and when that write
//! fails the revocation is still enforced in memory (and the failure
//! logged), because refusing a revoked node is never wrong.

use crate::datadir::{DataDirError, write_file};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use zavod_proto::NodeId;
use zavod_proto::trust::{Revocation, RevocationDigest, RevocationError, Revocations, Revoked};

/// The file, in the data directory, of revocations this node holds.
pub const REVOCATIONS_FILE: &str = "revocations";

#[derive(Debug)]
pub(crate) struct RevocationStore {
    path: PathBuf,
    authorities: BTreeSet<NodeId>,
    pub(crate) set: Revocations,
}

impl RevocationStore {
    /// Reads what `dir` holds; a line that does not parse or verify is
    /// skipped with a warning (another member will hand it over again).
    pub(crate) fn load(dir: &Path, authorities: &BTreeSet<NodeId>) -> Result<Self, DataDirError> {
        let path = dir.join(REVOCATIONS_FILE);
        let text = crate::datadir::read_if_present(&path)?;
        let mut set = Revocations::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let added = Revocation::from_text(line)
                .map_err(RevocationError::from)
                .and_then(|r| set.insert(r, authorities));
            if let Err(e) = added {
                tracing::warn!(file = %path.display(), error = %e, "skipping a revocation");
            }
        }
        Ok(RevocationStore {
            path,
            authorities: authorities.clone(),
            set,
        })
    }

    pub(crate) fn node_revoked(&self, node: &NodeId) -> bool {
        self.set.node_revoked(node)
    }

    pub(crate) fn credential_revoked(&self, id: &[u8; 16]) -> bool {
        self.set.credential_revoked(id)
    }

    pub(crate) fn digest(&self) -> RevocationDigest {
        self.set.digest()
    }

    /// The nodes revoked.
    pub(crate) fn nodes(&self) -> Vec<NodeId> {
        self.set
            .iter()
            .filter_map(|r| match r.body.subject {
                Revoked::Node(n) => Some(n),
                Revoked::Credential(_) => None,
            })
            .collect()
    }

    /// Adds the revocations among `rs` that are new, then writes the file
    /// once; returns the new ones and the refusals.
    pub(crate) fn add(
        &mut self,
        rs: impl IntoIterator<Item = Revocation>,
    ) -> (Vec<Revocation>, Vec<RevocationError>) {
        let (mut new, mut errors) = (Vec::new(), Vec::new());
        for r in rs {
            match self.set.insert(r.clone(), &self.authorities) {
                Ok(true) => new.push(r),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        if !new.is_empty()
            && let Err(e) = self.save()
        {
            tracing::error!(file = %self.path.display(), error = %e,
                "cannot record revocations on disk; they hold until this node restarts, and \
                 members hand them back after it");
        }
        (new, errors)
    }

    fn save(&self) -> Result<(), DataDirError> {
        let mut text = String::from(
            "# Revocations signed by this mesh's authority (zavod mesh revoke, zavod cap revoke).\n",
        );
        for r in self.set.iter() {
            text.push_str(&r.to_text());
            text.push('\n');
        }
        write_file(&self.path, &text, false)
    }
}

/// Writes one revocation into a data directory no node runs on (the
/// caller holds its lock); returns how many it holds then.
pub fn record(
    dir: &Path,
    authorities: &BTreeSet<NodeId>,
    r: Revocation,
) -> Result<usize, DataDirError> {
    let mut store = RevocationStore::load(dir, authorities)?;
    let (_, errors) = store.add([r]);
    if let Some(e) = errors.into_iter().next() {
        return Err(DataDirError::Mesh(e.to_string()));
    }
    store.save()?;
    Ok(store.set.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zavod_proto::trust::{Authority, Keypair};

    #[test]
    fn revocations_survive_a_reload_and_strangers_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Authority::new(Keypair::from_secret([1; 32]));
        let auths: BTreeSet<NodeId> = [a.id()].into_iter().collect();
        let mut s = RevocationStore::load(dir.path(), &auths).expect("empty");
        assert!(s.set.is_empty());
        let node = Keypair::from_secret([2; 32]).public();
        let stranger = Authority::new(Keypair::from_secret([3; 32]));
        let (new, errors) = s.add([
            a.revoke(Revoked::Node(node), 1),
            a.revoke(Revoked::Node(node), 2),
            stranger.revoke(Revoked::Credential([4; 16]), 1),
            a.revoke(Revoked::Credential([5; 16]), 3),
        ]);
        assert_eq!(new.len(), 2, "the second revocation of one node is not new");
        assert_eq!(errors.len(), 1, "a stranger's revocation is refused");

        let again = RevocationStore::load(dir.path(), &auths).expect("reload");
        assert!(again.set.node_revoked(&node));
        assert!(again.set.credential_revoked(&[5; 16]));
        assert_eq!(again.set.digest(), s.set.digest());
        // Another mesh's authorities read none of it.
        let other: BTreeSet<NodeId> = [stranger.id()].into_iter().collect();
        assert!(
            RevocationStore::load(dir.path(), &other)
                .expect("load")
                .set
                .is_empty()
        );
    }
}
