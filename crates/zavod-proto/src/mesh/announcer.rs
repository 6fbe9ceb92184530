//! When a node announces its capacity: at its first chance, whenever a
//! figure routing reads has moved (free memory in [`MEM_STEP_BYTES`]
//! steps, slots, queue, decode rate in tenths, each model's offer and load,
//! addresses, cache summary, the revocations it holds), and otherwise once per heartbeat so peers
//! know it lives. The node's Router and the simulator both ask this one
//! announcer; neither decides on its own.

use crate::UnixMs;
use crate::mesh::capacity::{CacheSummary, CapacityReport, ModelOffer};
use crate::trust::RevocationDigest;

/// Free memory is compared in steps of this size (RAM readings jitter by
/// kilobytes every second).
pub const MEM_STEP_BYTES: u64 = 64 << 20;

/// The parts of a report whose change is worth announcing.
#[derive(Debug, Clone, PartialEq)]
struct Figures {
    mem_step: u64,
    slots_free: u32,
    slots_total: u32,
    queue_depth: u32,
    tokens_per_s_tenths: i64,
    models: Vec<ModelOffer>,
    addrs: Vec<String>,
    cached: CacheSummary,
    revocations: RevocationDigest,
}

impl Figures {
    fn of(r: &CapacityReport) -> Self {
        Figures {
            mem_step: r.mem_free_bytes / MEM_STEP_BYTES,
            slots_free: r.slots_free,
            slots_total: r.slots_total,
            queue_depth: r.queue_depth,
            tokens_per_s_tenths: (f64::from(r.tokens_per_s) * 10.0) as i64,
            models: r.models.clone(),
            addrs: r.addrs.clone(),
            cached: r.cached.clone(),
            revocations: r.revocations,
        }
    }
}

/// One node's announcing: what it last said, and when.
#[derive(Debug, Clone)]
pub struct Announcer {
    heartbeat_ms: u64,
    last: Option<(Figures, UnixMs)>,
}

impl Announcer {
    pub fn new(heartbeat_ms: u64) -> Self {
        Announcer {
            heartbeat_ms,
            last: None,
        }
    }

    /// Whether `report` (addresses included) is to be announced now; when
    /// it is, it counts as said.
    pub fn poll(&mut self, report: &CapacityReport, now_ms: UnixMs) -> bool {
        let figures = Figures::of(report);
        let due = match &self.last {
            None => true,
            Some((f, at)) => *f != figures || now_ms.saturating_sub(*at) >= self.heartbeat_ms,
        };
        if due {
            self.last = Some((figures, now_ms));
        }
        due
    }

    /// Forgets what was said (a restarted node announces at once).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;
    use crate::mesh::capacity::{Resources, WorkerLoad};

    fn report(slots_busy: u32, free: u64) -> CapacityReport {
        at(slots_busy, free, &["/ip4/1.2.3.4/tcp/1"])
    }

    fn at(slots_busy: u32, free: u64, addrs: &[&str]) -> CapacityReport {
        let res = Resources {
            ram_free_bytes: free,
            ..Default::default()
        };
        let load = WorkerLoad {
            slots_total: 4,
            slots_busy,
            ..Default::default()
        };
        let mut r = CapacityReport::build(
            NodeId([1; 32]),
            1,
            0,
            &res,
            &[(ModelOffer::new("m", "Q4_K_M", 4096), load)],
        );
        r.addrs = addrs.iter().map(|a| a.to_string()).collect();
        r
    }

    #[test]
    fn announces_first_on_change_and_on_the_heartbeat() {
        let mut a = Announcer::new(2_000);
        assert!(a.poll(&report(0, 1 << 30), 0), "first");
        assert!(!a.poll(&report(0, 1 << 30), 1_000), "nothing new");
        // Memory jitter inside a step is not news; a slot taken is.
        assert!(!a.poll(&report(0, (1 << 30) + 4096), 1_100));
        assert!(a.poll(&report(1, 1 << 30), 1_200), "a slot taken");
        assert!(!a.poll(&report(1, 1 << 30), 3_100));
        assert!(a.poll(&report(1, 1 << 30), 3_200), "heartbeat");
        // New addresses are news.
        let more = ["/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/1"];
        assert!(a.poll(&at(1, 1 << 30, &more), 3_300));
        a.reset();
        assert!(a.poll(&at(1, 1 << 30, &more), 3_301), "after a restart");
    }
}
