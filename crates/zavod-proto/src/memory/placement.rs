//! Where a conversation lives: the R members with the highest rendezvous
//! score for its key. Every node that sees the same alive members computes
//! the same set, in the same order, with no coordination; when a member
//! leaves, only the conversations it held move, each to the next member
//! in its own order.

use super::ConvKey;
use crate::ids::NodeId;
use sha2::{Digest, Sha256};

/// Replicas per conversation unless configured otherwise
/// (`memory.replicas`).
pub const DEFAULT_REPLICAS: usize = 3;

/// A member's score for a conversation: a hash of both, the same on every
/// node.
fn score(key: &ConvKey, node: &NodeId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"zavod/replica/1");
    h.update(key.owner.0);
    h.update(key.conversation.as_str().as_bytes());
    // The name's length ends it, so no (name, node) pair reads as another.
    h.update((key.conversation.as_str().len() as u32).to_be_bytes());
    h.update(node.0);
    h.finalize().into()
}

/// The replica set of `key` among `members` (duplicates ignored): the `r`
/// highest scores, best first (all of them when fewer than `r`).
pub fn replicas(key: &ConvKey, members: &[NodeId], r: usize) -> Vec<NodeId> {
    let mut scored: Vec<([u8; 32], NodeId)> = members.iter().map(|n| (score(key, n), *n)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(r).map(|(_, n)| n).collect()
}

/// Replicas a conversation should have: `r`, fewer in a mesh of fewer
/// known members (alive or not). Quorums are counted against this, not
/// against the replicas reachable now, so a node cut off from the others
/// cannot acknowledge a write that only it holds.
pub fn planned(r: usize, known_members: usize) -> usize {
    r.min(known_members).max(1)
}

/// Replicas that must hold a write before it is acknowledged: a majority,
/// so two writes' quorums always share a replica.
pub fn write_quorum(replicas: usize) -> usize {
    replicas / 2 + 1
}

/// Replicas a read waits for: enough that every read shares a replica
/// with every acknowledged write (read + write > replicas).
pub fn read_quorum(replicas: usize) -> usize {
    (replicas + 1).saturating_sub(write_quorum(replicas)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConversationId;

    fn key(name: &str) -> ConvKey {
        ConvKey {
            owner: NodeId([7; 32]),
            conversation: ConversationId::parse(name).expect("name"),
        }
    }

    fn nodes(n: u8) -> Vec<NodeId> {
        (0..n).map(|i| NodeId([i; 32])).collect()
    }

    #[test]
    fn every_order_of_the_members_gives_the_same_set() {
        let k = key("trip");
        let mut m = nodes(10);
        let a = replicas(&k, &m, 3);
        m.reverse();
        m.push(m[0]);
        assert_eq!(replicas(&k, &m, 3), a);
        assert_eq!(a.len(), 3);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "three distinct replicas");
    }

    #[test]
    fn a_member_leaving_moves_only_what_it_held() {
        let m = nodes(20);
        let gone = m[5];
        let rest: Vec<NodeId> = m.iter().copied().filter(|n| *n != gone).collect();
        let mut moved = 0;
        for i in 0..200 {
            let k = key(&format!("c{i}"));
            let before = replicas(&k, &m, 3);
            let after = replicas(&k, &rest, 3);
            if before.contains(&gone) {
                moved += 1;
                let kept: Vec<_> = before.iter().filter(|n| **n != gone).collect();
                assert!(kept.iter().all(|n| after.contains(n)), "survivors stay");
            } else {
                assert_eq!(before, after, "untouched conversations do not move");
            }
        }
        // About 3/20 of the conversations had the leaver.
        assert!((10..=60).contains(&moved), "{moved} moved");
    }

    #[test]
    fn load_spreads_over_the_members() {
        let m = nodes(10);
        let mut per = [0u32; 10];
        for i in 0..3000 {
            for n in replicas(&key(&format!("c{i}")), &m, 3) {
                per[n.0[0] as usize] += 1;
            }
        }
        // 900 each on average.
        assert!(per.iter().all(|&c| (700..=1100).contains(&c)), "{per:?}");
    }

    #[test]
    fn small_meshes_take_what_there_is() {
        assert_eq!(planned(3, 2), 2);
        assert_eq!(planned(3, 10), 3);
        assert_eq!(planned(3, 0), 1);
        assert_eq!(replicas(&key("a"), &nodes(2), 3).len(), 2);
        assert!(replicas(&key("a"), &[], 3).is_empty());
        for (n, w, r) in [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 3, 2), (5, 3, 3)] {
            assert_eq!((write_quorum(n), read_quorum(n)), (w, r), "{n} replicas");
            assert!(write_quorum(n) + read_quorum(n) > n);
            assert!(2 * write_quorum(n) > n);
        }
    }
}
