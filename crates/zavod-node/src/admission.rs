//! How much of this node one peer can hold: the stream pools every
//! inbound stream passes, sized by the `[admission]` section
//! (`zavod_config::AdmissionSection`), and the open-files limit.
//!
//! Streams are admitted in three steps, so that what a stranger can hold
//! is small and short-lived:
//! 1. a per-peer quota (one peer cannot take every slot);
//! 2. until its first frame has arrived a stream holds a permit of a small
//!    pool of its own, for at most `first_frame_timeout_ms`;
//! 3. then a serving permit: members' runs and embeddings (work an entry
//!    granted) draw first on a pool reserved for them, everything else on
//!    the general pool (`limits.max_concurrent_streams`).
//!
//! Invariants: a peer's count is in the quota map only while it has a
//! stream in flight, so the map is bounded by the streams in flight; every
//! permit and quota slot is released by `Drop`, whatever path a stream
//! takes.

use libp2p::PeerId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zavod_config::AdmissionSection;

/// Raises this process's soft open-files limit towards `want` (never past
/// the hard limit) and returns the limit now in force.
pub(crate) fn raise_open_files(want: u64) -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(want)
}

/// The stream pools and per-peer quotas of one node.
#[derive(Debug)]
pub(crate) struct StreamPools {
    first_frame: Arc<Semaphore>,
    general: Arc<Semaphore>,
    members: Arc<Semaphore>,
    per_peer: Mutex<HashMap<PeerId, usize>>,
    max_per_peer: usize,
}

/// Why a stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// This peer has as many streams in flight as one peer may.
    PeerQuota,
    /// Every permit of the pool the stream needed is taken.
    Busy,
}

/// A peer's place in its quota; released on drop.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    pools: Arc<StreamPools>,
    peer: PeerId,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.pools.quota();
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

impl StreamPools {
    pub(crate) fn new(
        admission: &AdmissionSection,
        max_concurrent_streams: usize,
    ) -> Arc<StreamPools> {
        Arc::new(StreamPools {
            first_frame: Arc::new(Semaphore::new(admission.first_frame_streams)),
            general: Arc::new(Semaphore::new(max_concurrent_streams)),
            members: Arc::new(Semaphore::new(admission.member_streams)),
            per_peer: Mutex::new(HashMap::new()),
            max_per_peer: admission.max_streams_per_peer,
        })
    }

    fn quota(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, usize>> {
        // Counts are plain integers: a poisoned map is still consistent.
        self.per_peer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place in `peer`'s quota.
    pub(crate) fn peer_slot(self: &Arc<Self>, peer: PeerId) -> Result<PeerSlot, Refusal> {
        let mut map = self.quota();
        let n = map.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(Refusal::PeerQuota);
        }
        *n += 1;
        Ok(PeerSlot {
            pools: Arc::clone(self),
            peer,
        })
    }

    /// A permit to wait for a stream's first frame.
    pub(crate) fn first_frame(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        Arc::clone(&self.first_frame)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)
    }

    /// A permit to serve a stream: `reserved` streams (members' granted
    /// work) take the members' pool first and the general one when it is
    /// full; the rest take the general pool only.
    pub(crate) fn serve(&self, reserved: bool) -> Result<OwnedSemaphorePermit, Refusal> {
        if reserved && let Ok(p) = Arc::clone(&self.members).try_acquire_owned() {
            return Ok(p);
        }
        Arc::clone(&self.general)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)
    }

    /// Peers with a stream in flight now (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn peers_in_flight(&self) -> usize {
        self.quota().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(first: usize, general: usize, members: usize, per_peer: usize) -> Arc<StreamPools> {
        StreamPools::new(
            &AdmissionSection {
                first_frame_streams: first,
                member_streams: members,
                max_streams_per_peer: per_peer,
                ..Default::default()
            },
            general,
        )
    }

    #[test]
    fn one_peer_cannot_take_more_than_its_quota_and_gets_it_back() {
        let p = pools(8, 8, 0, 2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = p.peer_slot(a).expect("first");
        let a2 = p.peer_slot(a).expect("second");
        assert_eq!(p.peer_slot(a).err(), Some(Refusal::PeerQuota));
        // Another peer is not affected.
        let _b1 = p.peer_slot(b).expect("other peer");
        drop(a1);
        let _a3 = p.peer_slot(a).expect("a slot was freed");
        drop(a2);
        drop(_a3);
        assert_eq!(
            p.peers_in_flight(),
            1,
            "a peer with nothing in flight leaves the map"
        );
    }

    #[test]
    fn waiting_for_a_first_frame_does_not_take_a_serving_permit() {
        let p = pools(2, 1, 0, 8);
        let w1 = p.first_frame().expect("first");
        let _w2 = p.first_frame().expect("second");
        assert_eq!(p.first_frame().err(), Some(Refusal::Busy));
        // The silent streams hold no serving permit: a real request is served.
        let s = p.serve(false).expect("served");
        assert_eq!(p.serve(false).err(), Some(Refusal::Busy));
        drop(w1);
        let _again = p.first_frame().expect("freed");
        drop(s);
    }

    #[test]
    fn members_granted_work_has_a_reserve_clients_cannot_take() {
        let p = pools(4, 1, 2, 8);
        let _client = p.serve(false).expect("general");
        assert_eq!(
            p.serve(false).err(),
            Some(Refusal::Busy),
            "clients: general pool only"
        );
        let _m1 = p.serve(true).expect("reserved");
        let _m2 = p.serve(true).expect("reserved");
        assert_eq!(p.serve(true).err(), Some(Refusal::Busy));
    }
}
