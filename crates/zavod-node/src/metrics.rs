//! The node's metrics, in Prometheus text format on `GET /metrics`.
//!
//! Counters and histograms are updated where things happen (the entry and
//! target paths in `serve`, gossip in the Router); figures that change by
//! themselves with time (breaker states, peers by liveness) are set from the
//! actors when the page is scraped, so a scrape always shows the present.
//! Label values come from small fixed sets, except `peer`, which is bounded
//! by the view's own size limit.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use zavod_proto::mesh::capacity::{Resources, WorkerLoad};
use zavod_proto::wire::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `chat` (the stream protocol) or `http`.
    pub api: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerStateLabels {
    pub peer: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub tokens_generated: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub queue_wait: Histogram,
    pub queue_ahead: Histogram,
    pub prompt_tokens: Family<SourceLabels, Counter>,
    pub queue_depth: Gauge,
    pub active_jobs: Gauge,
    pub job_slots: Gauge,
    pub tokens_per_second: GaugeF,
    pub breaker: Family<PeerStateLabels, Gauge>,
    pub peers: Family<StateLabels, Gauge>,
    pub gossip_messages: Family<DirectionLabels, Counter>,
    pub ram_total_bytes: Gauge,
    pub ram_free_bytes: Gauge,
    pub cpu_percent: GaugeF,
    pub vram_total_bytes: Family<GpuLabels, Gauge>,
    pub vram_free_bytes: Family<GpuLabels, Gauge>,
    pub gpu_utilization_percent: Family<GpuLabels, Gauge>,
    pub gpu_temperature_celsius: Family<GpuLabels, Gauge>,
    pub gpu_power_watts: Family<GpuLabels, GaugeF>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zavod");
        let m = Metrics {
            requests: Family::default(),
            tokens_generated: Counter::default(),
            // 1 ms .. ~16 s
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 0.5 ms .. ~4 s
            inter_token: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            // 1 ms .. ~65 s
            queue_wait: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 0, 1, 2, 4 .. 512 jobs ahead
            queue_ahead: Histogram::new(
                std::iter::once(0.0).chain(exponential_buckets(1.0, 2.0, 10)),
            ),
            prompt_tokens: Family::default(),
            queue_depth: Gauge::default(),
            active_jobs: Gauge::default(),
            job_slots: Gauge::default(),
            tokens_per_second: GaugeF::default(),
            breaker: Family::default(),
            peers: Family::default(),
            gossip_messages: Family::default(),
            ram_total_bytes: Gauge::default(),
            ram_free_bytes: Gauge::default(),
            cpu_percent: GaugeF::default(),
            vram_total_bytes: Family::default(),
            vram_free_bytes: Family::default(),
            gpu_utilization_percent: Family::default(),
            gpu_temperature_celsius: Family::default(),
            gpu_power_watts: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Requests this node took as entry, by API and outcome",
            m.requests.clone(),
        );
        r.register(
            "tokens_generated",
            "Tokens this node's model generated",
            m.tokens_generated.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From a job reaching the model worker to its first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_seconds",
            "Time between consecutive tokens of one answer (averaged over tokens handed over together)",
            m.inter_token.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "From a job reaching the model worker to it getting a slot (jobs beyond the slots wait in a queue fair between credentials)",
            m.queue_wait.clone(),
        );
        r.register(
            "queue_position",
            "Jobs ahead of a job when it joined the wait line, in the line's fair order (only jobs that had to wait)",
            m.queue_ahead.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of this node's jobs: taken from the prompt cache, or computed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "queue_depth",
            "Jobs waiting for a slot",
            m.queue_depth.clone(),
        );
        r.register("active_jobs", "Jobs generating now", m.active_jobs.clone());
        r.register(
            "job_slots",
            "Jobs the model can run at once",
            m.job_slots.clone(),
        );
        r.register(
            "decode_tokens_per_second",
            "Recent decode rate per stream",
            m.tokens_per_second.clone(),
        );
        r.register(
            "breaker_state",
            "1 for each peer's current breaker state",
            m.breaker.clone(),
        );
        r.register(
            "peers",
            "Members in this node's view, by liveness",
            m.peers.clone(),
        );
        r.register(
            "gossip_messages",
            "Capacity announcements sent and received",
            m.gossip_messages.clone(),
        );
        r.register(
            "ram_total_bytes",
            "RAM of this machine",
            m.ram_total_bytes.clone(),
        );
        r.register(
            "ram_free_bytes",
            "Free RAM of this machine",
            m.ram_free_bytes.clone(),
        );
        r.register(
            "cpu_percent",
            "CPU use of this machine",
            m.cpu_percent.clone(),
        );
        r.register(
            "gpu_vram_total_bytes",
            "VRAM per GPU",
            m.vram_total_bytes.clone(),
        );
        r.register(
            "gpu_vram_free_bytes",
            "Free VRAM per GPU",
            m.vram_free_bytes.clone(),
        );
        r.register(
            "gpu_utilization_percent",
            "Utilisation per GPU",
            m.gpu_utilization_percent.clone(),
        );
        r.register(
            "gpu_temperature_celsius",
            "Temperature per GPU",
            m.gpu_temperature_celsius.clone(),
        );
        r.register(
            "gpu_power_watts",
            "Power draw per GPU",
            m.gpu_power_watts.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a finished request at the entry.
    pub fn request(&self, api: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { api, outcome })
            .inc();
    }

    pub fn resources(&self, r: &Resources) {
        self.ram_total_bytes.set(gauge_i64(r.ram_total_bytes));
        self.ram_free_bytes.set(gauge_i64(r.ram_free_bytes));
        self.cpu_percent.set(f64::from(r.cpu_percent));
        for (i, g) in r.gpus.iter().enumerate() {
            let l = GpuLabels {
                gpu: format!("{i}:{}", g.name),
            };
            self.vram_total_bytes
                .get_or_create(&l)
                .set(gauge_i64(g.vram_total_bytes));
            self.vram_free_bytes
                .get_or_create(&l)
                .set(gauge_i64(g.vram_free_bytes));
            self.gpu_utilization_percent
                .get_or_create(&l)
                .set(i64::from(g.utilization_percent));
            self.gpu_temperature_celsius
                .get_or_create(&l)
                .set(i64::from(g.temperature_c));
            self.gpu_power_watts
                .get_or_create(&l)
                .set(f64::from(g.power_milliwatts) / 1000.0);
        }
    }

    pub fn load(&self, l: &WorkerLoad) {
        self.queue_depth.set(i64::from(l.queue_depth));
        self.active_jobs.set(i64::from(l.slots_busy));
        self.job_slots.set(i64::from(l.slots_total));
        self.tokens_per_second.set(f64::from(l.tokens_per_s));
    }

    /// The page, in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The outcome label for an error.
pub(crate) fn outcome_of(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::BudgetExhausted => "budget_exhausted",
        ErrorCode::ModelUnavailable => "model_unavailable",
        ErrorCode::NoCapacity => "no_capacity",
        ErrorCode::FrameTooLarge => "too_large",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::Timeout => "timeout",
        ErrorCode::Internal => "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_family() {
        let m = Metrics::new();
        m.request("http", "ok");
        m.tokens_generated.inc_by(3);
        m.time_to_first_token.observe(0.02);
        let page = m.encode();
        for name in [
            "zavod_requests_total{api=\"http\",outcome=\"ok\"} 1",
            "zavod_tokens_generated_total 3",
            "zavod_time_to_first_token_seconds_bucket",
            "zavod_inter_token_seconds_count 0",
            "zavod_queue_depth 0",
            "# EOF",
        ] {
            assert!(page.contains(name), "{name} missing from\n{page}");
        }
    }
}
