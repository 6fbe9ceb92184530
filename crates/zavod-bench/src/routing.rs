//! The time of one placement decision over a view of many members, as the
//! Router makes it.

use std::time::Instant;

/// Times one routing decision (view candidates, then the Router's placer:
/// filter, load estimates, MCDA scores, two choices, remembering the pick)
/// over a view of `n` synthetic members; returns (p50, p99) in
/// microseconds.
pub(crate) fn decision_us(n: usize) -> (f64, f64) {
    use zavod_proto::mesh::capacity::{CacheSummary, CapacityReport, ModelOffer};
    use zavod_proto::mesh::placer::{Ask, Placer, PlacerConfig};
    use zavod_proto::mesh::view::{Announcement, MeshView, ViewConfig};
    use zavod_proto::trust::{Authority, Keypair, MembershipBody, sign_report};
    let authority = Authority::new(Keypair::from_secret([1; 32]));
    let mut view = MeshView::new(
        [authority.id()].into_iter().collect(),
        ViewConfig {
            max_members: n + 1,
            ..Default::default()
        },
    );
    for i in 0..n {
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(i as u64 + 2).to_le_bytes());
        let key = Keypair::from_secret(secret);
        let report = CapacityReport {
            node: key.public(),
            seq: 1,
            at_ms: 0,
            on_gpu: i % 3 == 0,
            mem_free_bytes: ((i * 7919) % 80) as u64 * (1 << 30),
            mem_total_bytes: 80 << 30,
            slots_free: (i % 9) as u32,
            slots_total: 8,
            queue_depth: 0,
            tokens_per_s: 20.0 + (i % 50) as f32,
            models: vec![ModelOffer {
                slots_free: (i % 9) as u32,
                slots_total: 8,
                ..ModelOffer::new(if i % 4 == 0 { "other" } else { "m" }, "Q4_K_M", 4096)
            }],
            cached: CacheSummary::of(&[i as u64]),
            addrs: vec![],
            revocations: Default::default(),
            usage: Vec::new(),
        };
        let a = Announcement {
            report: sign_report(&key, report),
            membership: authority.certify_member(MembershipBody {
                member: key.public(),
                issued_at_ms: 0,
                expires_at_ms: u64::MAX,
            }),
        };
        let _ = view.on_announcement(&a, 1);
        view.on_rtt(&key.public(), 1.0 + (i % 20) as f64);
    }
    let me = authority.id();
    let cfg = PlacerConfig {
        report_every_ms: 2_000,
        ..PlacerConfig::default()
    };
    let mut placer = Placer::new();
    let mut samples = Vec::with_capacity(2000);
    for r in 0..2000u128 {
        let t = Instant::now();
        let c = view.candidates("m", &me, 2, Some(r as u64 % 64));
        // The Router's decision: exclusions, breaker filter, estimates,
        // scores, pick; every tenth placement ends.
        let ask = Ask {
            request: zavod_proto::RequestId(r),
            exclude: &[],
            avoid: &[],
            until_ms: 60_000,
            cache_key: Some(r as u64 % 64),
        };
        let chosen = placer.place(&c, |_| true, &ask, &cfg, 2);
        if r % 10 == 0 {
            placer.on_done(zavod_proto::RequestId(r), 2);
        }
        std::hint::black_box(chosen);
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}
