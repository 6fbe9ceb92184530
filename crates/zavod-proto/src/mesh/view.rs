//! The mesh as one node sees it: the latest capacity report of every
//! member, its liveness and its measured RTT.
//!
//! Input is [`Announcement`]s (a report signed by the node it describes,
//! with that node's membership certificate) and `now`. An announcement is
//! accepted only from a member of this mesh whose certificate and report
//! signatures verify; a report older than the one held (by sequence number)
//! is ignored, so duplicated and reordered gossip is harmless. A member not
//! heard from for `suspect_after_ms` is suspect, for `gone_after_ms` gone;
//! only alive members are routing candidates. Gone members are forgotten
//! after `forget_after_ms`, and the view holds at most `max_members`, so
//! memory is bounded whatever peers send.
//!
//! Why this file passes 600 lines: the view and the announcements that feed
//! it are one state; over a third is tests.

use crate::UnixMs;
use crate::ids::NodeId;
use crate::mesh::capacity::{CacheSummary, CapacityReport};
use crate::mesh::score::Candidate;
use crate::trust::{AuthError, Membership, SignedReport};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What a node gossips about itself: its signed report (addresses
/// included) and its membership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub report: SignedReport,
    pub membership: Membership,
}

/// An announcement whose signatures and membership checked out. The report
/// and addresses are shared, not copied, by every view that takes it in
/// (one per process in a node; a thousand in the simulator).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedAnnouncement {
    pub report: Arc<CapacityReport>,
    pub addrs: Arc<[String]>,
    pub membership_expires_ms: UnixMs,
}

impl Announcement {
    /// Checks the membership against `authorities`, the report's signature,
    /// and that both name the same node; keeps the first addresses.
    pub fn verify(
        &self,
        authorities: &BTreeSet<NodeId>,
        now_ms: UnixMs,
    ) -> Result<VerifiedAnnouncement, ViewError> {
        let cert = self
            .membership
            .verify(authorities, now_ms)
            .map_err(ViewError::NotMember)?;
        let report = self.report.verify().map_err(ViewError::BadReport)?;
        if cert.member != report.node {
            return Err(ViewError::CertificateMismatch);
        }
        report.plausible().map_err(ViewError::Implausible)?;
        let addrs: Arc<[String]> = report
            .addrs
            .iter()
            .filter(|s| s.len() <= MAX_ADDR_BYTES)
            .take(MAX_ADDRS)
            .cloned()
            .collect();
        Ok(VerifiedAnnouncement {
            report: Arc::new(report.clone()),
            addrs,
            membership_expires_ms: cert.expires_at_ms,
        })
    }
}

/// Most addresses kept per announcement.
pub const MAX_ADDRS: usize = 16;
/// Longest address kept.
pub const MAX_ADDR_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    pub suspect_after_ms: u64,
    pub gone_after_ms: u64,
    pub forget_after_ms: u64,
    pub max_members: usize,
}

impl Default for ViewConfig {
    fn default() -> Self {
        ViewConfig {
            suspect_after_ms: 3_000,
            gone_after_ms: 8_000,
            forget_after_ms: 300_000,
            max_members: 4_096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Liveness {
    Alive,
    Suspect,
    Gone,
}

impl Liveness {
    pub fn name(&self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Gone => "gone",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The member's last report, as it signed it.
    pub report: Arc<CapacityReport>,
    pub addrs: Arc<[String]>,
    pub heard_at_ms: UnixMs,
    pub membership_expires_ms: UnixMs,
    pub rtt_ms: Option<f64>,
}

impl Member {
    pub fn liveness(&self, cfg: &ViewConfig, now_ms: UnixMs) -> Liveness {
        let silent = now_ms.saturating_sub(self.heard_at_ms);
        if silent >= cfg.gone_after_ms || now_ms >= self.membership_expires_ms {
            Liveness::Gone
        } else if silent >= cfg.suspect_after_ms {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("not a member: {0}")]
    NotMember(AuthError),
    #[error("bad report: {0}")]
    BadReport(AuthError),
    #[error("membership certificate is for another node")]
    CertificateMismatch,
    #[error("implausible report: {0}")]
    Implausible(String),
    #[error("the view is full")]
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A member not in the view before.
    New,
    Updated,
    /// Older than or equal to what is held; ignored.
    Stale,
}

/// Counts of what the view refused, for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub non_member: u64,
    pub bad_report: u64,
    pub stale: u64,
    pub full: u64,
}

/// What routing needs of one member serving one model, kept contiguous per
/// model so a routing decision scans a small array instead of the view.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    node: NodeId,
    mem_free_bytes: u64,
    slots_free: u32,
    slots_total: u32,
    queue_depth: u32,
    tokens_per_s: f64,
    rtt_ms: Option<f64>,
    heard_at_ms: UnixMs,
    membership_expires_ms: UnixMs,
    cached: CacheSummary,
    /// Quality of the member's file of the table's model.
    quality: u8,
}

impl Row {
    fn of(m: &Member) -> Self {
        Row {
            node: m.report.node,
            mem_free_bytes: m.report.mem_free_bytes,
            slots_free: m.report.slots_free,
            slots_total: m.report.slots_total,
            queue_depth: m.report.queue_depth,
            tokens_per_s: f64::from(m.report.tokens_per_s),
            rtt_ms: m.rtt_ms,
            heard_at_ms: m.heard_at_ms,
            membership_expires_ms: m.membership_expires_ms,
            cached: m.report.cached.clone(),
            quality: 0,
        }
    }
}

impl From<&Row> for Candidate {
    fn from(r: &Row) -> Self {
        Candidate {
            node: r.node,
            mem_free_bytes: r.mem_free_bytes,
            slots_free: r.slots_free,
            slots_total: r.slots_total,
            queue_depth: r.queue_depth,
            rtt_ms: r.rtt_ms,
            tokens_per_s: r.tokens_per_s,
            cache_hit: false,
            age_ms: 0,
            is_self: false,
            quality: r.quality,
        }
    }
}

/// Members serving one model; `pos` indexes `rows` by node.
#[derive(Debug, Clone, Default)]
struct Table {
    pos: BTreeMap<NodeId, usize>,
    rows: Vec<Row>,
}

impl Table {
    fn upsert(&mut self, row: Row) {
        match self.pos.get(&row.node) {
            Some(&i) => self.rows[i] = row,
            None => {
                self.pos.insert(row.node, self.rows.len());
                self.rows.push(row);
            }
        }
    }

    fn remove(&mut self, node: &NodeId) {
        if let Some(i) = self.pos.remove(node) {
            self.rows.swap_remove(i);
            if let Some(moved) = self.rows.get(i) {
                self.pos.insert(moved.node, i);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct MeshView {
    pub config: ViewConfig,
    authorities: BTreeSet<NodeId>,
    members: BTreeMap<NodeId, Member>,
    /// Routing tables by model name, kept in step with `members`.
    tables: BTreeMap<String, Table>,
    pub dropped: Dropped,
}

impl MeshView {
    pub fn new(authorities: BTreeSet<NodeId>, config: ViewConfig) -> Self {
        MeshView {
            config,
            authorities,
            members: BTreeMap::new(),
            tables: BTreeMap::new(),
            dropped: Dropped::default(),
        }
    }

    pub fn authorities(&self) -> &BTreeSet<NodeId> {
        &self.authorities
    }

    /// Whether `node` holds a membership this view has verified and not
    /// seen expire.
    pub fn is_member(&self, node: &NodeId, now_ms: UnixMs) -> bool {
        self.members
            .get(node)
            .is_some_and(|m| now_ms < m.membership_expires_ms)
    }

    /// Takes in an announcement from gossip (or this node's own).
    pub fn on_announcement(
        &mut self,
        a: &Announcement,
        now_ms: UnixMs,
    ) -> Result<Accepted, ViewError> {
        let r = a
            .verify(&self.authorities, now_ms)
            .and_then(|v| self.admit(v, now_ms));
        self.count(&r);
        r
    }

    /// Takes in an announcement already verified against this view's
    /// authorities (the simulator verifies each once, not once per
    /// receiver; everything after the signatures is the same code).
    pub fn on_verified(
        &mut self,
        v: VerifiedAnnouncement,
        now_ms: UnixMs,
    ) -> Result<Accepted, ViewError> {
        let r = self.admit(v, now_ms);
        self.count(&r);
        r
    }

    /// Counts what was dropped.
    pub fn count(&mut self, r: &Result<Accepted, ViewError>) {
        match &r {
            Err(ViewError::NotMember(_) | ViewError::CertificateMismatch) => {
                self.dropped.non_member += 1
            }
            Err(ViewError::BadReport(_) | ViewError::Implausible(_)) => {
                self.dropped.bad_report += 1
            }
            Err(ViewError::Full) => self.dropped.full += 1,
            Ok(Accepted::Stale) => self.dropped.stale += 1,
            Ok(_) => {}
        }
    }

    fn admit(&mut self, v: VerifiedAnnouncement, now_ms: UnixMs) -> Result<Accepted, ViewError> {
        let VerifiedAnnouncement {
            report,
            addrs,
            membership_expires_ms,
        } = v;
        let node = report.node;
        if let Some(m) = self.members.get_mut(&node) {
            if m.report.seq >= report.seq {
                return Ok(Accepted::Stale);
            }
            let old = std::mem::replace(&mut m.report, report);
            m.addrs = addrs;
            m.heard_at_ms = now_ms;
            m.membership_expires_ms = membership_expires_ms;
            for o in &old.models {
                if !m.report.serves(&o.name)
                    && let Some(t) = self.tables.get_mut(&o.name)
                {
                    t.remove(&node);
                }
            }
            refresh_rows(&mut self.tables, m);
            return Ok(Accepted::Updated);
        }
        if self.members.len() >= self.config.max_members {
            self.forget(now_ms);
            if self.members.len() >= self.config.max_members {
                return Err(ViewError::Full);
            }
        }
        let m = self.members.entry(node).or_insert(Member {
            report,
            addrs,
            heard_at_ms: now_ms,
            membership_expires_ms,
            rtt_ms: None,
        });
        refresh_rows(&mut self.tables, m);
        Ok(Accepted::New)
    }

    pub fn on_rtt(&mut self, node: &NodeId, rtt_ms: f64) {
        if let Some(m) = self.members.get_mut(node)
            && rtt_ms.is_finite()
            && rtt_ms >= 0.0
        {
            m.rtt_ms = Some(match m.rtt_ms {
                Some(old) => 0.8 * old + 0.2 * rtt_ms,
                None => rtt_ms,
            });
            refresh_rows(&mut self.tables, m);
        }
    }

    /// Drops members gone for longer than `forget_after_ms`.
    pub fn forget(&mut self, now_ms: UnixMs) {
        let horizon = self.config.gone_after_ms + self.config.forget_after_ms;
        let stale: Vec<NodeId> = self
            .members()
            .filter(|(_, m)| now_ms.saturating_sub(m.heard_at_ms) >= horizon)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.remove(&id);
        }
    }

    /// Drops a node from the view at once (its membership was revoked);
    /// it comes back only through an announcement the caller accepts.
    pub fn remove(&mut self, node: &NodeId) {
        if let Some(m) = self.members.remove(node) {
            for o in &m.report.models {
                if let Some(t) = self.tables.get_mut(&o.name) {
                    t.remove(node);
                }
            }
        }
        self.tables.retain(|_, t| !t.rows.is_empty());
    }

    pub fn liveness(&self, node: &NodeId, now_ms: UnixMs) -> Option<Liveness> {
        self.members
            .get(node)
            .map(|m| m.liveness(&self.config, now_ms))
    }

    pub fn get(&self, node: &NodeId) -> Option<&Member> {
        self.members.get(node)
    }

    /// Every member in node-id order.
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &Member)> {
        self.members.iter()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every alive member, whatever it serves, as a scoring candidate (for
    /// showing scores; routing uses [`MeshView::candidates`]).
    pub fn alive_candidates(&self, me: &NodeId, now_ms: UnixMs) -> Vec<Candidate> {
        self.members()
            .map(|(_, m)| m)
            .filter(|m| m.liveness(&self.config, now_ms) == Liveness::Alive)
            .map(|m| {
                let mut c = Candidate::from(&Row::of(m));
                if c.node == *me {
                    c.rtt_ms = Some(0.0);
                }
                c
            })
            .collect()
    }

    /// Alive members that serve `model`, as scoring candidates, in no
    /// particular order (scoring imposes its own total order). `me` gets an
    /// RTT of 0; a member whose cache summary holds `cache_key` is marked as
    /// a cache hit.
    pub fn candidates(
        &self,
        model: &str,
        me: &NodeId,
        now_ms: UnixMs,
        cache_key: Option<u64>,
    ) -> Vec<Candidate> {
        let Some(t) = self.tables.get(model) else {
            return Vec::new();
        };
        let cfg = &self.config;
        let mut out = Vec::with_capacity(t.rows.len());
        out.extend(
            t.rows
                .iter()
                .filter(|r| {
                    let silent = now_ms.saturating_sub(r.heard_at_ms);
                    silent < cfg.suspect_after_ms && now_ms < r.membership_expires_ms
                })
                .map(|r| {
                    let mut c = Candidate::from(r);
                    if r.node == *me {
                        c.rtt_ms = Some(0.0);
                        c.is_self = true;
                    }
                    c.cache_hit = cache_key.is_some_and(|k| r.cached.may_hold(k));
                    c.age_ms = now_ms.saturating_sub(r.heard_at_ms);
                    c
                }),
        );
        out
    }
}

/// Copies a member's routing figures into the tables of its models. A free
/// function so it can borrow the tables beside a member of the map.
fn refresh_rows(tables: &mut BTreeMap<String, Table>, m: &Member) {
    let row = Row::of(m);
    for o in &m.report.models {
        // Each model has its own engine: its slots and queue, not the
        // node's sum, say whether it can take a request.
        let row = Row {
            quality: crate::mesh::tiers::quality(&o.quant),
            slots_free: o.slots_free,
            slots_total: o.slots_total,
            queue_depth: o.queue_depth,
            ..row.clone()
        };
        match tables.get_mut(&o.name) {
            Some(t) => t.upsert(row),
            None => {
                let mut t = Table::default();
                t.upsert(row);
                tables.insert(o.name.clone(), t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::capacity::ModelOffer;
    use crate::trust::{Authority, Keypair, MembershipBody, sign_report};

    struct Fixture {
        authority: Authority,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                authority: Authority::new(Keypair::from_secret([200; 32])),
            }
        }

        fn view(&self) -> MeshView {
            MeshView::new(
                [self.authority.id()].into_iter().collect(),
                ViewConfig::default(),
            )
        }

        fn announce(&self, key: &Keypair, seq: u64, model: Option<&str>) -> Announcement {
            self.announce_cached(key, seq, model, &[])
        }

        fn announce_cached(
            &self,
            key: &Keypair,
            seq: u64,
            model: Option<&str>,
            cached: &[u64],
        ) -> Announcement {
            let membership = self.authority.certify_member(MembershipBody {
                member: key.public(),
                issued_at_ms: 0,
                expires_at_ms: 1_000_000,
            });
            let report = CapacityReport {
                node: key.public(),
                seq,
                at_ms: 0,
                on_gpu: false,
                mem_free_bytes: 1 << 30,
                mem_total_bytes: 2 << 30,
                slots_free: if model.is_some() { 4 } else { 0 },
                slots_total: if model.is_some() { 4 } else { 0 },
                queue_depth: 0,
                tokens_per_s: 50.0,
                models: model
                    .map(|m| {
                        vec![ModelOffer {
                            slots_free: 4,
                            slots_total: 4,
                            ..ModelOffer::new(m, "Q4_K_M", 4096)
                        }]
                    })
                    .unwrap_or_default(),
                cached: CacheSummary::of(cached),
                addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                revocations: Default::default(),
                usage: Vec::new(),
            };
            Announcement {
                report: sign_report(key, report),
                membership,
            }
        }
    }

    fn key(n: u8) -> Keypair {
        Keypair::from_secret([n; 32])
    }

    #[test]
    fn members_are_admitted_and_outsiders_dropped() {
        let f = Fixture::new();
        let mut v = f.view();
        assert_eq!(
            v.on_announcement(&f.announce(&key(1), 1, Some("m")), 10),
            Ok(Accepted::New)
        );
        assert_eq!(
            v.on_announcement(&f.announce(&key(1), 2, Some("m")), 11),
            Ok(Accepted::Updated)
        );
        assert_eq!(
            v.on_announcement(&f.announce(&key(1), 2, Some("m")), 12),
            Ok(Accepted::Stale)
        );
        assert_eq!(
            v.on_announcement(&f.announce(&key(1), 1, Some("m")), 13),
            Ok(Accepted::Stale)
        );

        // Certified by another authority.
        let other = Fixture {
            authority: Authority::new(Keypair::from_secret([201; 32])),
        };
        assert!(matches!(
            v.on_announcement(&other.announce(&key(2), 1, Some("m")), 10),
            Err(ViewError::NotMember(_))
        ));
        // A member's certificate wrapped around another node's report.
        let mut stolen = f.announce(&key(3), 1, Some("m"));
        stolen.membership = f.announce(&key(1), 1, None).membership;
        assert_eq!(
            v.on_announcement(&stolen, 10),
            Err(ViewError::CertificateMismatch)
        );
        // A forged report: figures changed after signing.
        let mut forged = f.announce(&key(1), 9, Some("m"));
        forged.report.body.slots_free = 999;
        assert!(matches!(
            v.on_announcement(&forged, 10),
            Err(ViewError::BadReport(_))
        ));
        // Addresses are signed too: a relay cannot point others elsewhere.
        let mut moved = f.announce(&key(1), 10, Some("m"));
        moved.report.body.addrs = vec!["/ip4/6.6.6.6/tcp/666".into()];
        assert!(matches!(
            v.on_announcement(&moved, 10),
            Err(ViewError::BadReport(_))
        ));
        assert_eq!(v.len(), 1);
        assert_eq!(v.dropped.non_member, 2);
        assert_eq!(v.dropped.bad_report, 2);
        assert_eq!(v.dropped.stale, 2);
    }

    #[test]
    fn implausible_reports_are_dropped_before_they_count() {
        let f = Fixture::new();
        let mut v = f.view();
        let k = key(1);
        let lies: [fn(&mut CapacityReport); 6] = [
            |r| r.mem_free_bytes = r.mem_total_bytes + 1,
            |r| {
                r.models[0].slots_free = 5;
                r.slots_free = 5;
            },
            |r| {
                r.models[0].slots_total = 10_000;
                r.models[0].slots_free = 10_000;
                r.slots_total = 10_000;
                r.slots_free = 10_000;
            },
            // Node-wide slots its models do not add up to.
            |r| {
                r.slots_total = 400;
                r.slots_free = 400;
            },
            |r| r.tokens_per_s = f32::NAN,
            |r| r.models[0].name = "m".repeat(1_000),
        ];
        for (seq, lie) in (1..).zip(lies) {
            let mut a = f.announce(&k, seq, Some("m"));
            let mut body = a.report.body.clone();
            lie(&mut body);
            a.report = sign_report(&k, body);
            assert!(
                matches!(v.on_announcement(&a, 10), Err(ViewError::Implausible(_))),
                "report {seq} was taken"
            );
        }
        assert!(v.is_empty());
        assert_eq!(v.dropped.bad_report, 6);
        // The same node's true report counts.
        assert_eq!(
            v.on_announcement(&f.announce(&k, 99, Some("m")), 10),
            Ok(Accepted::New)
        );
    }

    #[test]
    fn silence_makes_a_member_suspect_then_gone_then_forgotten() {
        let f = Fixture::new();
        let mut v = f.view();
        let a = key(1);
        v.on_announcement(&f.announce(&a, 1, Some("m")), 1_000)
            .expect("member");
        let id = a.public();
        assert_eq!(v.liveness(&id, 3_999), Some(Liveness::Alive));
        assert_eq!(v.candidates("m", &key(9).public(), 3_999, None).len(), 1);
        assert_eq!(v.liveness(&id, 4_000), Some(Liveness::Suspect));
        assert!(v.candidates("m", &key(9).public(), 4_000, None).is_empty());
        assert_eq!(v.liveness(&id, 9_000), Some(Liveness::Gone));
        // A fresh report revives it.
        v.on_announcement(&f.announce(&a, 2, Some("m")), 9_500)
            .expect("member");
        assert_eq!(v.liveness(&id, 9_600), Some(Liveness::Alive));
        v.forget(9_500 + 8_000 + 300_000);
        assert!(v.is_empty());
    }

    #[test]
    fn candidates_serve_the_model_and_carry_rtt() {
        let f = Fixture::new();
        let mut v = f.view();
        let (a, b) = (key(1), key(2));
        v.on_announcement(&f.announce(&a, 1, Some("m")), 0)
            .expect("a");
        v.on_announcement(&f.announce(&b, 1, None), 0).expect("b");
        v.on_rtt(&a.public(), 4.0);
        let c = v.candidates("m", &b.public(), 1, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].rtt_ms, Some(4.0));
        assert!(v.candidates("other", &b.public(), 1, None).is_empty());
        v.on_rtt(&a.public(), f64::NAN);
        assert_eq!(v.get(&a.public()).and_then(|m| m.rtt_ms), Some(4.0));
    }

    #[test]
    fn each_model_of_a_node_is_routed_by_its_own_slots() {
        let f = Fixture::new();
        let mut v = f.view();
        let a = key(1);
        let mut ann = f.announce(&a, 1, Some("busy"));
        let mut report = ann.report.body.clone();
        report.models[0].slots_free = 0;
        report.models.push(ModelOffer {
            slots_free: 2,
            slots_total: 2,
            ..ModelOffer::new("idle", "Q8_0", 2048)
        });
        // The node's figures are its models' sums.
        (report.slots_free, report.slots_total) = (2, 6);
        ann.report = sign_report(&a, report);
        v.on_announcement(&ann, 0).expect("a");
        let me = key(9).public();
        let busy = v.candidates("busy", &me, 1, None);
        let idle = v.candidates("idle", &me, 1, None);
        assert_eq!((busy[0].slots_free, busy[0].slots_total), (0, 4));
        assert_eq!((idle[0].slots_free, idle[0].slots_total), (2, 2));
        assert!(idle[0].quality > busy[0].quality);
    }

    #[test]
    fn routing_tables_follow_model_changes_and_forgetting() {
        let f = Fixture::new();
        let mut v = f.view();
        let (a, b) = (key(1), key(2));
        v.on_announcement(&f.announce(&a, 1, Some("m")), 0)
            .expect("a");
        v.on_announcement(&f.announce(&b, 1, Some("m")), 0)
            .expect("b");
        let me = key(9).public();
        assert_eq!(v.candidates("m", &me, 1, None).len(), 2);
        // a switches to another model.
        v.on_announcement(&f.announce(&a, 2, Some("n")), 10)
            .expect("a");
        let m: Vec<NodeId> = v
            .candidates("m", &me, 11, None)
            .iter()
            .map(|c| c.node)
            .collect();
        assert_eq!(m, vec![b.public()]);
        assert_eq!(v.candidates("n", &me, 11, None).len(), 1);
        // b is forgotten.
        v.on_announcement(&f.announce(&a, 3, Some("n")), 400_000)
            .expect("a");
        v.forget(400_000);
        assert!(v.candidates("m", &me, 400_000, None).is_empty());
        assert_eq!(v.candidates("n", &me, 400_000, None).len(), 1);
    }

    #[test]
    fn the_view_is_bounded() {
        let f = Fixture::new();
        let mut v = MeshView::new(
            [f.authority.id()].into_iter().collect(),
            ViewConfig {
                max_members: 3,
                ..Default::default()
            },
        );
        for n in 1..=3 {
            v.on_announcement(&f.announce(&key(n), 1, None), 0)
                .expect("fits");
        }
        assert_eq!(
            v.on_announcement(&f.announce(&key(4), 1, None), 1),
            Err(ViewError::Full)
        );
        // Once the old ones are long gone, room is made.
        let later = 8_000 + 300_000 + 1;
        assert_eq!(
            v.on_announcement(&f.announce(&key(4), 1, None), later),
            Ok(Accepted::New)
        );
        assert_eq!(v.len(), 1);
    }

    /// Three views exchanging announcements over a lossy, reordering
    /// "network" converge on the same membership and figures.
    #[test]
    fn views_converge_under_loss_and_reordering() {
        let f = Fixture::new();
        let keys: Vec<Keypair> = (1..=3).map(key).collect();
        let mut views: Vec<MeshView> = (0..3).map(|_| f.view()).collect();
        let mut rng: u64 = 0x1234_5678;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut in_flight: Vec<(usize, Announcement, u64)> = Vec::new();
        for round in 0..50u64 {
            let now = round * 500;
            for (i, k) in keys.iter().enumerate() {
                let a = f.announce(k, round + 1, Some("m"));
                for to in 0..3 {
                    // 30% loss, random delay up to 3 rounds.
                    if to != i && next() % 10 < 3 {
                        continue;
                    }
                    in_flight.push((to, a.clone(), now + (next() % 1_500)));
                }
            }
            in_flight.sort_by_key(|(_, _, t)| *t);
            let (due, later): (Vec<_>, Vec<_>) =
                in_flight.drain(..).partition(|(_, _, t)| *t <= now);
            in_flight = later;
            for (to, a, t) in due {
                let _ = views[to].on_announcement(&a, t);
            }
        }
        let end = 50 * 500;
        for v in &views {
            assert_eq!(v.len(), 3);
            for k in &keys {
                assert_eq!(v.liveness(&k.public(), end), Some(Liveness::Alive));
            }
        }
    }

    #[test]
    fn members_holding_a_prompt_cache_are_marked() {
        let f = Fixture::new();
        let mut v = f.view();
        let (a, b) = (key(1), key(2));
        v.on_announcement(&f.announce_cached(&a, 1, Some("m"), &[42, 43]), 10)
            .expect("accepted");
        v.on_announcement(&f.announce(&b, 1, Some("m")), 10)
            .expect("accepted");
        let me = key(9).public();
        let hits = |v: &MeshView, k: Option<u64>| {
            let mut h: Vec<NodeId> = v
                .candidates("m", &me, 20, k)
                .iter()
                .filter(|c| c.cache_hit)
                .map(|c| c.node)
                .collect();
            h.sort();
            h
        };
        assert_eq!(hits(&v, Some(42)), vec![a.public()]);
        assert_eq!(hits(&v, Some(7)), Vec::<NodeId>::new());
        assert_eq!(hits(&v, None), Vec::<NodeId>::new());
        // The next report without it: no longer a hit.
        v.on_announcement(&f.announce(&a, 2, Some("m")), 30)
            .expect("accepted");
        assert_eq!(hits(&v, Some(42)), Vec::<NodeId>::new());
    }
}
