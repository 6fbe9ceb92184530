//! One entry point for each decoder of peer or user input, for fuzzing:
//! each takes arbitrary bytes, decodes them the way a node does what a
//! peer or a user sends, and runs on whatever decodes the checks the node
//! runs next. The cargo-fuzz targets in `crates/zavod-fuzz` call these, and
//! `tests/fuzz_smoke.rs` runs each over the committed corpora and seeded
//! mutations of valid inputs on every test run.
//!
//! Invariant: every function here is total. Whatever the bytes, it
//! returns: no panic, no unbounded allocation (the wire's own limit caps
//! every length prefix), no loop that input can stretch.

use crate::chat::reader::EntryReader;
use crate::mesh::capacity::CapacityReport;
use crate::mesh::view::{Announcement, MeshView, ViewConfig};
use crate::trust::{
    CapabilityToken, Credential, Grant, GrantCheck, JoinTicket, Keypair, OperatorProof, Receipt,
};
use crate::wire::embed::{EmbedReply, EmbedRequest, check_inputs, check_vectors};
use crate::wire::memory::{MemoryReply, MemoryRequest};
use crate::wire::replica::{ReplicaReply, ReplicaRequest};
use crate::wire::{
    ClientFrame, JoinReply, JoinRequest, RunReport, RunRequest, ServerFrame, StatusReply,
    StatusRequest, decode, decode_unversioned,
};
use crate::{NodeId, RequestId};
use std::collections::BTreeSet;

/// A fuzz target: any bytes in, nothing out but the absence of a panic.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the cargo-fuzz binaries and corpus folders
/// are named alike).
pub const TARGETS: [(&str, Target); 7] = [
    ("wire_frames", wire_frames),
    ("credentials", credentials),
    ("grants", grants),
    ("receipts", receipts),
    ("capacity_reports", capacity_reports),
    ("invites", invites),
    ("entry_reader", entry_reader),
];

/// A fixed authority the checks trust, so signed inputs can verify.
pub fn authority_key() -> Keypair {
    Keypair::from_secret([7; 32])
}

fn trusted() -> BTreeSet<NodeId> {
    [authority_key().public()].into_iter().collect()
}

/// Every frame a stream carries, as the node and the client read them.
pub fn wire_frames(data: &[u8]) {
    if let Ok(f) = decode::<ClientFrame>(data)
        && let ClientFrame::Chat(r) = &f
    {
        let _ = r.check();
    }
    let _ = decode::<ServerFrame>(data);
    if let Ok(r) = decode::<RunRequest>(data) {
        let _ = r.params.check();
    }
    let _ = decode::<RunReport>(data);
    let _ = decode::<JoinRequest>(data);
    let _ = decode::<JoinReply>(data);
    if let Ok(StatusRequest::Revoke(r)) = decode::<StatusRequest>(data) {
        let _ = crate::trust::Revocations::default().insert(*r, &trusted());
    }
    if let Ok(StatusReply::Revocations(list)) = decode::<StatusReply>(data) {
        let mut held = crate::trust::Revocations::default();
        for r in list {
            let _ = held.insert(r, &trusted());
        }
    }
    if let Ok(EmbedRequest { inputs, .. }) = decode::<EmbedRequest>(data) {
        let _ = check_inputs(&inputs);
    }
    if let Ok(EmbedReply::Vectors { vectors, .. }) = decode::<EmbedReply>(data) {
        let _ = check_vectors(&vectors, vectors.len());
    }
    if let Ok(r) = decode::<MemoryRequest>(data) {
        let _ = r
            .credential
            .verify_holder(&trusted(), &r.credential.body.holder, u64::MAX);
    }
    if let Ok(r) = decode::<MemoryReply>(data) {
        let _ = r.check();
    }
    // A member's replica request, as a replica applies it once checked.
    if let Ok(r) = decode::<ReplicaRequest>(data)
        && r.check().is_ok()
        && let ReplicaRequest::Write { floor, entries, .. } = r
    {
        let mut log = crate::memory::ReplicaLog::default();
        let _ = log.write(floor, &entries, 64);
        let _ = log.read(1 << 16);
    }
    // A replica's reply, as a read merges it once checked.
    if let Ok(r) = decode::<ReplicaReply>(data)
        && r.check().is_ok()
        && let ReplicaReply::Held(h) = r
    {
        let me = NodeId([1; 32]);
        let cfg = crate::memory::QuorumConfig::default();
        let mut read =
            crate::memory::read::Read::new(vec![me, NodeId([2; 32])], 1, 1 << 16, 0, cfg);
        while read.poll_transmit(0).is_some() {}
        read.handle_held(me, h.clone(), 0);
        read.handle_held(NodeId([2; 32]), h, 0);
        while read.poll_repair().is_some() {}
        let _ = read.poll_outcome();
    }
}

/// Credentials and capability tokens as text (a user's `--credential`, an
/// HTTP bearer) and as bytes (inside a chat request), operator proofs, and
/// revocations as text.
pub fn credentials(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let someone = NodeId([1; 32]);
    if let Ok(c) = Credential::from_text(&text) {
        let _ = c.verify(&trusted(), &someone, "m", 0);
        let _ = c.verify_holder(&trusted(), &c.body.holder, u64::MAX);
    }
    if let Ok(t) = CapabilityToken::from_text(&text) {
        let _ = t.credential.verify_holder(&trusted(), &someone, 0);
    }
    if let Ok(c) = decode_unversioned::<Credential>(data) {
        let _ = c.verify(&trusted(), &someone, "*", 1);
    }
    if let Ok(p) = decode_unversioned::<OperatorProof>(data) {
        let _ = p.verify(&someone, &someone, 0);
    }
    // Revocations as `zavod` reads them from a data directory's file.
    if let Ok(r) = crate::trust::Revocation::from_text(&text) {
        let _ = r.verify(&trusted());
    }
}

/// Grants, as a target checks the one a run request presents.
pub fn grants(data: &[u8]) {
    if let Ok(g) = decode_unversioned::<Grant>(data) {
        let node = NodeId([2; 32]);
        let check = GrantCheck {
            this_node: &node,
            client: &node,
            model: "m",
            prompt_hash: [0; 32],
            max_tokens: 16,
        };
        let _ = g.verify(|_| true, &check, 0);
        let _ = g.verify(|_| false, &check, u64::MAX);
    }
}

/// Receipts, as an entry checks the one a client or a target hands it.
pub fn receipts(data: &[u8]) {
    if let Ok(r) = decode_unversioned::<Receipt>(data) {
        let _ = r.verify(&r.signer.clone(), RequestId(0), "");
        let _ = r.verify(&NodeId([3; 32]), RequestId(u128::MAX), "answer");
    }
}

/// Capacity announcements from gossip, through the same view a node keeps.
pub fn capacity_reports(data: &[u8]) {
    if let Ok(a) = decode::<Announcement>(data) {
        let _ = a.report.body.plausible();
        let mut view = MeshView::new(trusted(), ViewConfig::default());
        let _ = view.on_announcement(&a, 0);
        let _ = view.on_announcement(&a, u64::MAX / 2);
    }
    if let Ok(r) = decode_unversioned::<CapacityReport>(data) {
        let _ = r.plausible();
    }
}

/// Invites as a joining node reads the text it was given, and as the
/// signing node checks what a joiner presents.
pub fn invites(data: &[u8]) {
    if let Ok(t) = JoinTicket::from_text(&String::from_utf8_lossy(data)) {
        let _ = t.verify(0);
    }
    if let Ok(t) = decode_unversioned::<JoinTicket>(data) {
        let _ = t.verify(u64::MAX);
    }
}

/// A stream of server frames as a client reads them from its entry: the
/// bytes are cut into frames by a two-byte little-endian length each.
pub fn entry_reader(data: &[u8]) {
    for follows in [false, true] {
        let mut reader = EntryReader::new(follows);
        let mut rest = data;
        while let [lo, hi, tail @ ..] = rest {
            let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
            let (frame, next) = tail.split_at(n);
            rest = next;
            let frame = decode::<ServerFrame>(frame).ok();
            let end = frame.is_none();
            if reader.read(frame).is_err() || end {
                break;
            }
        }
    }
}
