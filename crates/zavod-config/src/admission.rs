//! The `[admission]` section: who may reach a node (peer allow and deny
//! lists), how many connections it keeps, how many streams one peer and
//! the strangers together may hold, and the open-files limit it raises
//! itself to. The node's stream pools (`zavod_node::admission`) are sized
//! from it.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// The `[admission]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// When not empty, only these peer ids may connect, in or out: list
    /// every member and every client (`zavod status` and `zavod chat
    /// --verbose` show peer ids).
    pub allow_peers: Vec<String>,
    /// Peer ids never connected with.
    pub deny_peers: Vec<String>,
    /// Established connections, in and out together.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Streams that have not sent their first frame yet.
    pub first_frame_streams: usize,
    /// How long a new stream may take to send its first frame.
    pub first_frame_timeout_ms: u64,
    /// Serving permits reserved for members' runs and embeddings, on top of
    /// `limits.max_concurrent_streams`.
    pub member_streams: usize,
    /// Streams one peer may have in flight at once.
    pub max_streams_per_peer: usize,
    /// The open-files limit the node raises itself to at start (up to the
    /// hard limit); each connection and stream costs descriptors.
    pub open_files: u64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        AdmissionSection {
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            max_connections: 1024,
            max_connections_per_peer: 4,
            max_pending_incoming: 128,
            first_frame_streams: 256,
            first_frame_timeout_ms: 3_000,
            member_streams: 128,
            max_streams_per_peer: 32,
            open_files: 65_536,
        }
    }
}

impl AdmissionSection {
    /// Checks the section against the rest of the configuration
    /// (`max_concurrent_streams`, `request_timeout_ms` from `[limits]`).
    pub fn check(
        &self,
        max_concurrent_streams: usize,
        request_timeout_ms: u64,
    ) -> Result<(), String> {
        let allow = parse_peers("admission.allow_peers", &self.allow_peers)?;
        let deny = parse_peers("admission.deny_peers", &self.deny_peers)?;
        if let Some(p) = allow.iter().find(|p| deny.contains(p)) {
            return Err(format!(
                "peer {p} is in both admission.allow_peers and admission.deny_peers; keep it in one"
            ));
        }
        for (key, v) in [
            ("admission.max_connections", self.max_connections as u64),
            (
                "admission.max_connections_per_peer",
                self.max_connections_per_peer as u64,
            ),
            (
                "admission.max_pending_incoming",
                self.max_pending_incoming as u64,
            ),
            (
                "admission.first_frame_streams",
                self.first_frame_streams as u64,
            ),
            (
                "admission.max_streams_per_peer",
                self.max_streams_per_peer as u64,
            ),
            (
                "admission.first_frame_timeout_ms",
                self.first_frame_timeout_ms,
            ),
        ] {
            if v == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(format!(
                "admission.max_connections_per_peer ({}) must be at most admission.max_connections ({})",
                self.max_connections_per_peer, self.max_connections
            ));
        }
        if self.max_streams_per_peer > max_concurrent_streams + self.member_streams {
            return Err(format!(
                "admission.max_streams_per_peer ({}) must be at most limits.max_concurrent_streams plus admission.member_streams ({})",
                self.max_streams_per_peer,
                max_concurrent_streams + self.member_streams
            ));
        }
        if self.first_frame_timeout_ms > request_timeout_ms {
            return Err(format!(
                "admission.first_frame_timeout_ms ({}) must be at most limits.request_timeout_ms ({request_timeout_ms})",
                self.first_frame_timeout_ms
            ));
        }
        if self.open_files < 256 {
            return Err(format!(
                "admission.open_files must be at least 256, got {}",
                self.open_files
            ));
        }
        Ok(())
    }

    /// What the swarm enforces (the lists were checked by [`Self::check`]).
    pub fn net(&self) -> zavod_net::Admission {
        let peers = |v: &[String]| v.iter().filter_map(|s| s.parse().ok()).collect();
        zavod_net::Admission {
            allow: peers(&self.allow_peers),
            deny: peers(&self.deny_peers),
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            max_pending_incoming: self.max_pending_incoming,
        }
    }
}

fn parse_peers(key: &str, v: &[String]) -> Result<Vec<PeerId>, String> {
    v.iter()
        .map(|s| {
            s.parse::<PeerId>().map_err(|e| {
                format!("{key}: {s:?} is not a peer id ({e}); peer ids look like 12D3KooW…")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_checked_against_the_limits() {
        let ok = AdmissionSection::default();
        ok.check(256, 10_000).expect("defaults");
        let bad_peer = AdmissionSection {
            deny_peers: vec!["not-a-peer".into()],
            ..Default::default()
        };
        let e = bad_peer.check(256, 10_000).unwrap_err();
        assert!(
            e.contains("admission.deny_peers") && e.contains("not-a-peer"),
            "{e}"
        );
        let p = PeerId::random().to_string();
        let both = AdmissionSection {
            allow_peers: vec![p.clone()],
            deny_peers: vec![p],
            ..Default::default()
        };
        assert!(both.check(256, 10_000).unwrap_err().contains("both"));
        let slow = AdmissionSection {
            first_frame_timeout_ms: 20_000,
            ..Default::default()
        };
        assert!(
            slow.check(256, 10_000)
                .unwrap_err()
                .contains("request_timeout_ms")
        );
        let greedy = AdmissionSection {
            max_streams_per_peer: 10_000,
            ..Default::default()
        };
        assert!(
            greedy
                .check(256, 10_000)
                .unwrap_err()
                .contains("max_streams_per_peer")
        );
    }
}
